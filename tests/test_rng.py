"""The counter-based RNG and the exactly defined fp32 math of the sampling ops (stem ``rng``:
unif2ace/kernels/reference/rng.py, csrc/common/rng.h, unif2ace/kernels/triton/rng.py).

The definition is a contract that the Triton/CUDA/C++ kernels reimplement bit for bit, so it is
pinned three ways: an independent pure-Python uint32 implementation of the words written here from
the docstring, hard-coded known answers, and statistical checks of the output (fixed keys, so each
statistical test is deterministic; the false-failure rate stated for each is what a fresh key would
have). The fp32 functions (Gumbel, log, the fixed-point exponential and log-sum-exp) are checked
against float64 math for accuracy, and the backends' versions against the reference for identity:
bit for bit, since every one of them is a fixed sequence of IEEE operations (no libm).
"""

from __future__ import annotations

import math

import pytest
import torch

from unif2ace.kernels import _ext
from unif2ace.kernels._dispatch import triton_interpreter_enabled
from unif2ace.kernels.reference import rng
from unif2ace.testing import chi2_sf

M32 = 0xFFFFFFFF
F32_EPS = torch.finfo(torch.float32).eps
needs_cpu = pytest.mark.skipif(not _ext.cpu_status()[0], reason=f"C++ extension missing: {_ext.cpu_status()[1]}")
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_enabled()), reason="needs a GPU or TRITON_INTERPRET=1"
)


# ------------------------------------------------------------------ independent Python version


def py_mix32(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % (1 << 32)
    x ^= x >> 15
    x = (x * 0xD35A2D97) % (1 << 32)
    x ^= x >> 15
    return x


def py_row_key(seed: int, step: int, stream: int, word: int, sample: int, position: int) -> int:
    h = py_mix32((seed // (1 << 32)) ^ ((0x9E3779B9 * (2 * stream + word + 1)) % (1 << 32)))
    h = py_mix32(h ^ (seed % (1 << 32)))
    h = py_mix32(h ^ (step % (1 << 32)))
    h = py_mix32(h ^ (step // (1 << 32)))
    h = py_mix32(h ^ (sample % (1 << 32)))
    return py_mix32(h ^ position)


def py_element(key: int, token: int) -> int:
    return py_mix32((py_mix32(key ^ token) + 0x632BE5AB) % (1 << 32))


def py_words(seed, step, stream, sample, position, token):
    return tuple(py_element(py_row_key(seed, step, stream, w, sample, position), token) for w in (0, 1))


def test_chi2_sf_known_values():
    # textbook critical values: P(chi2_1 > 3.841) = 0.05, P(chi2_10 > 23.209) = 0.01,
    # P(chi2_255 > 310.457) = 0.01
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, rel=1e-4)
    assert chi2_sf(23.209251, 10) == pytest.approx(0.01, rel=1e-4)
    assert chi2_sf(310.4574, 255) == pytest.approx(0.01, rel=1e-3)
    assert chi2_sf(2.0, 10) == pytest.approx(0.9963402, rel=1e-5)


# ------------------------------------------------------------------ the words


def test_mix32_matches_python_uint32():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 1 << 32, (4000,), generator=g, dtype=torch.int64)
    x = torch.cat([x, torch.tensor([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, M32])])
    got = rng.mix32(x)
    want = torch.tensor([py_mix32(int(v)) for v in x], dtype=torch.int64)
    assert torch.equal(got, want)
    assert int(got.min()) >= 0 and int(got.max()) <= M32
    assert int(x[-1]) == M32  # input not modified (the tensor version works in place internally)


def test_mix32_is_a_bijection_sample():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65537  # distinct 32-bit words
    assert torch.unique(rng.mix32(x)).numel() == x.numel()


def test_words_match_python_on_random_keys():
    g = torch.Generator().manual_seed(2)
    for seed, step in [(0, 0), (1, 5), (1 << 32, 2**40 + 3), (0xDEADBEEFCAFEF00D, 17), ((1 << 64) - 1, (1 << 63) - 1)]:
        for stream in (0, 1):
            sample = torch.randint(0, 1 << 40, (3, 1, 1), generator=g)  # only the low 32 bits count
            pos = torch.randint(0, 1 << 32, (1, 4, 1), generator=g)
            tok = torch.randint(0, 1 << 20, (1, 1, 5), generator=g)
            hi, lo = rng.random_words(seed, step, stream, sample, pos, tok)
            assert hi.shape == lo.shape == (3, 4, 5)
            for i in range(3):
                for j in range(4):
                    for k in range(5):
                        args = (seed, step, stream, int(sample[i, 0, 0]), int(pos[0, j, 0]), int(tok[0, 0, k]))
                        assert (int(hi[i, j, k]), int(lo[i, j, k])) == py_words(*args)


def test_int_helpers_match_tensor_version():
    for args in [(3, 0, 0, 0, 5, 9), (2**63 + 7, 2**62 + 1, 1, 1, 2**32 - 1, 2**32 - 1)]:
        seed, step, stream, word, sample, pos = args
        k = rng.row_key_int(*args)
        assert k == py_row_key(*args)
        kt = rng.row_key(seed, step, stream, word, torch.tensor([sample]), torch.tensor([pos]))
        assert int(kt[0]) == k
        assert rng.element_int(k, 77) == int(rng.element(kt, 77)[0]) == py_element(k, 77)
    assert rng.call_keys(5, 9) == [rng.call_key_int(5, 9, s, w) for s in (0, 1) for w in (0, 1)]


KNOWN_ANSWERS = [
    # (seed, step, stream, word, sample, position, token) -> element
    ((0, 0, 0, 0, 0, 0, 0), 0x5A1D8C53),
    ((0x0123456789ABCDEF, 17, 0, 1, 7, 255, 8191), 0x111EAD46),
    (((1 << 64) - 1, (1 << 63) - 1, 1, 0, (1 << 32) - 1, 12345, 0), 0x4EF1D475),
]


@pytest.mark.parametrize("key,value", KNOWN_ANSWERS)
def test_known_answers(key, value):
    seed, step, stream, word, sample, pos, tok = key
    assert py_element(py_row_key(seed, step, stream, word, sample, pos), tok) == value
    t = rng.element(rng.row_key(seed, step, stream, word, torch.tensor(sample), torch.tensor(pos)), tok)
    assert int(t) == value


def test_key_fields():
    """Only the sample id's low 32 bits enter; both halves of the seed and of the step, the stream
    and the word each give a different family of numbers."""
    a = rng.random_words(5, 0, 0, torch.tensor([[3], [3 + (1 << 32)]]), 0, torch.arange(4)[None, :])[0]
    assert torch.equal(a[0], a[1])
    toks = torch.arange(64)
    fams = [rng.random_words(s, t, 0, 0, 0, toks)[0] for s, t in ((1, 0), (1 << 32, 0), ((1 << 32) + 1, 0))]
    fams += [rng.random_words(1, t, 0, 0, 0, toks)[0] for t in (1, 1 << 32, (1 << 32) + 1)]
    fams += list(rng.random_words(1, 0, 1, 0, 0, toks))  # stream 1, words 0 and 1
    fams += [rng.random_words(1, 0, 0, 0, 0, toks)[1]]  # stream 0, word 1
    for i in range(len(fams)):
        for j in range(i):
            assert not torch.equal(fams[i], fams[j]), (i, j)


@pytest.mark.parametrize("seed", [-1, 1 << 64, 1.0, True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        rng.split_seed(seed)


@pytest.mark.parametrize("step", [-1, 1 << 63, 2.0])
def test_bad_step(step):
    with pytest.raises(ValueError, match="step"):
        rng.split_step(step)


# ------------------------------------------------------------------ statistics of the words


def _draws(n_pos: int, n_tok: int, seed: int = 12345, step: int = 0, stream: int = 0):
    pos = torch.arange(n_pos, dtype=torch.int64)[:, None]
    return rng.random_words(seed, step, stream, 3, pos, torch.arange(n_tok, dtype=torch.int64)[None, :])


@pytest.fixture(scope="module")
def words():
    return _draws(512, 256)  # 131072 draws of (hi, lo)


@pytest.mark.parametrize("which", ["hi_top8", "hi_low8", "lo_top8", "lo_low8"])
def test_uniform_bytes_chi2(words, which):
    """χ² of 8-bit fields over 131072 draws vs uniform; fails at p < 1e-4, so a fresh key would
    fail 1 time in 10^4."""
    w = words[0] if which.startswith("hi") else words[1]
    b = (w >> 24) if which.endswith("top8") else (w & 0xFF)
    counts = torch.bincount(b.flatten(), minlength=256).double()
    exp = counts.sum() / 256
    chi2 = float(((counts - exp) ** 2 / exp).sum())
    assert chi2_sf(chi2, 255) > 1e-4, (which, chi2)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().flatten()
    b = b.double().flatten()
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_words_uncorrelated(words):
    """Correlations between neighbouring tokens, positions, the two words, the two streams,
    neighbouring seeds and neighbouring steps are ~N(0, 1/n); the bound is 5 standard deviations
    (false-failure rate ~6e-7 each)."""
    hi, lo = words
    bound = 5 / math.sqrt(hi.numel())
    assert abs(_corr(hi[:, 1:], hi[:, :-1])) < 5 / math.sqrt(hi[:, 1:].numel())  # adjacent tokens
    assert abs(_corr(hi[1:], hi[:-1])) < 5 / math.sqrt(hi[1:].numel())  # adjacent positions
    assert abs(_corr(hi, lo)) < bound  # the two words of one draw
    assert abs(_corr(hi, _draws(512, 256, stream=1)[0])) < bound  # the two streams
    assert abs(_corr(hi, _draws(512, 256, seed=12346)[0])) < bound  # neighbouring seeds
    assert abs(_corr(hi, _draws(512, 256, step=1)[0])) < bound  # neighbouring steps
    # the low bits of adjacent tokens too (a weak mixer shows up there first)
    assert abs(_corr(hi[:, 1:] & 0xFF, hi[:, :-1] & 0xFF)) < 5 / math.sqrt(hi[:, 1:].numel())


# ------------------------------------------------------------------ the fp32 definitions


def test_exponential_moments_and_tail():
    """Exp(1) from 2^22 draws (the exact float64 value of the construction): mean within 5 sigma of
    1 (sigma = 2^-11), P(E < 1e-3) within 5 sigma of 1 - e^-1e-3, and the count of E < 1e-6
    (expected 4.2) within the Poisson range [0, 17] (P(Poisson(4.2) > 17) ~ 3e-6). The fp32 Gumbel
    of the same words: mean and variance match Euler's gamma and π²/6."""
    hi, lo = _draws(1 << 10, 1 << 12, seed=777)
    e = rng.exponential_exact(hi, lo)
    n = e.numel()
    assert abs(float(e.mean()) - 1.0) < 5 / math.sqrt(n)
    p3 = -math.expm1(-1e-3)
    assert abs(float((e < 1e-3).double().mean()) - p3) < 5 * math.sqrt(p3 * (1 - p3) / n)
    assert 0 <= int((e < 1e-6).sum()) <= 17
    g = rng.gumbel_from_words(hi, lo)
    assert g.dtype == torch.float32
    assert abs(float(g.double().mean()) - 0.5772156649) < 5 * (math.pi / math.sqrt(6)) / math.sqrt(n)
    assert abs(float(g.double().var()) - math.pi**2 / 6) < 0.02


def _edge_words():
    vals = [0, 1, 2, 255, 256, 2**26 - 1, 2**26, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]
    hi = torch.tensor([h for h in vals for _ in vals])
    lo = torch.tensor([l for _ in vals for l in vals])
    return hi, lo


def _test_words(n=200_000):
    """Random words, the far tails (hi near 0 and near 2^32) and the edge words."""
    g = torch.Generator().manual_seed(5)
    hi = torch.randint(0, 2**32, (n,), generator=g)
    lo = torch.randint(0, 2**32, (n,), generator=g)
    small = torch.randint(0, 2**12, (n // 10,), generator=g)
    ehi, elo = _edge_words()
    return torch.cat([hi, small, M32 - small, ehi]), torch.cat([lo, lo[: n // 5], elo])


def test_gumbel_fp32_close_to_exact_and_tails_not_truncated():
    """The fp32 Gumbel is within a few ulp of the exact -log(-log1p(-w)) everywhere, far tails
    included: the largest at hi = lo = 0 (w = 2^-65): 65 ln 2 ≈ 45.05, far beyond the ≈16.6 cap of
    fp32 uniforms; the smallest at hi = lo = 2^32 - 1: -log(65 ln 2) ≈ -3.81."""
    hi, lo = _test_words()
    g = rng.gumbel_from_words(hi, lo).double()
    exact = rng.gumbel_exact(hi, lo)
    err = (g - exact).abs() / (F32_EPS * exact.abs().clamp(min=0.5))
    assert float(err.max()) < 8, float(err.max())
    ends = rng.gumbel_from_words(torch.tensor([0, M32]), torch.tensor([0, M32]))
    assert float(ends[0]) == pytest.approx(rng.GUMBEL_MAX, rel=1e-6) and float(ends[0]) > 45
    assert float(ends[1]) == pytest.approx(-math.log(65 * math.log(2)), rel=1e-6)


def test_exponential_exact_in_both_tails():
    """The float64 E = -log(1 - w), w = (hi·2^32 + lo + 0.5)/2^64: full precision at both ends and
    monotone across the branch switch at hi = 2^31."""
    lo = torch.tensor([0, 1, 12345, M32], dtype=torch.int64)
    for hi_val in (0, 1, 1000):
        e = rng.exponential_exact(torch.full_like(lo, hi_val), lo)
        for i in range(4):
            w = (hi_val * 2.0**32 + int(lo[i]) + 0.5) * 2.0**-64
            assert float(e[i]) == pytest.approx(-math.log1p(-w), rel=1e-14)
    for hi_val in (M32, M32 - 1, M32 - 1000):
        e = rng.exponential_exact(torch.full_like(lo, hi_val), lo)
        for i in range(4):
            w_c = ((M32 - hi_val) * 2.0**32 + (M32 - int(lo[i])) + 0.5) * 2.0**-64  # 1 - w
            assert float(e[i]) == pytest.approx(-math.log(w_c), rel=1e-14)
    h31 = 1 << 31
    hs = torch.tensor([0, 1, h31 - 2, h31 - 1, h31 - 1, h31, h31, h31 + 1, M32], dtype=torch.int64)
    ls = torch.tensor([5, 0, M32, 0, M32, 0, 1, 0, M32], dtype=torch.int64)
    e = rng.exponential_exact(hs, ls)
    assert bool((e[1:] >= e[:-1]).all()), e
    assert float(e[4]) == pytest.approx(math.log(2), rel=1e-9)


def test_log_and_exp_accuracy():
    """log_f32 within 2 ulp (absolute 2^-23 near 1) of log; exp_fixed(d, K) within 2e-7 relative
    (plus the truncation's unit) of exp(d) 2^K; exp(0) exactly 2^K; 0 below -K ln 2 and at -inf."""
    x = torch.cat(
        [torch.rand(200_000, dtype=torch.float64) * 100, torch.logspace(-37, 38, 20_000, dtype=torch.float64)]
    )
    x = x.float().clamp(min=torch.finfo(torch.float32).tiny)
    err = (rng.log_f32(x).double() - torch.log(x.double())).abs()
    assert float((err / torch.log(x.double()).abs().clamp(min=1.0)).max()) < 2 * F32_EPS
    d = torch.cat([torch.linspace(-27, 0, 100_001), torch.tensor([0.0])])
    K = 40
    q = rng.exp_fixed(d, K)
    assert int(q[-1]) == 1 << K
    want = torch.exp(d.double()) * 2.0**K
    assert bool(((q.double() - want).abs() <= 2e-7 * want + 1).all())  # polynomial error + truncation
    assert rng.exp_fixed(torch.tensor([-30.0, -87.0, -1e30, float("-inf")]), K).tolist() == [0, 0, 0, 0]


def test_fixed_point_softmax_exact_order_free_and_accurate():
    """lse_rel within 1e-6 of the float64 log-sum-exp; a row and a permutation of it give the same
    bits (the integer sum does not depend on the order); sum_bits keeps V 2^K < 2^63."""
    x = torch.randn(64, 8192, generator=torch.Generator().manual_seed(3)) * 3
    m = x.amax(-1, keepdim=True)
    lse = rng.lse_rel(x, m)
    want = torch.logsumexp(x.double() - m.double(), -1, keepdim=True)
    assert float((lse.double() - want).abs().max()) < 1e-6
    perm = torch.randperm(8192, generator=torch.Generator().manual_seed(4))
    assert torch.equal(rng.lse_rel(x[:, perm], m), lse)
    for V in (1, 8192, 2**22 - 1, 2**22, 2**40):
        assert V * 2 ** rng.sum_bits(V) < 2**63
    assert rng.sum_bits(8192) == 40 and rng.sum_bits(2**23) == 38


def test_mulhi_u64_matches_python_ints():
    g = torch.Generator().manual_seed(6)
    hi = torch.randint(0, 2**32, (5000,), generator=g)
    lo = torch.randint(0, 2**32, (5000,), generator=g)
    s = torch.randint(0, 2**63 - 1, (5000,), generator=g)
    hi, lo, s = (
        torch.cat([t, torch.tensor(e)]) for t, e in ((hi, [M32, 0, M32]), (lo, [M32, 0, 0]), (s, [2**63 - 1, 5, 1]))
    )
    want = [((int(a) << 32 | int(b)) * int(c)) >> 64 for a, b, c in zip(hi, lo, s)]
    assert rng.mulhi_u64(hi, lo, s).tolist() == want


# ------------------------------------------------------------------ the backends vs the reference


@needs_cpu
@pytest.mark.parametrize(
    "seed,step", [(0, 0), (2**32 - 1, 1), (2**32, 2**32), (2**64 - 1, 2**63 - 1), (0x9E3779B97F4A7C15, 17)]
)
def test_cpu_words_bit_identical(seed, step):
    """csrc/common/rng.h (through the C++ test hook) gives the reference's words."""
    g = torch.Generator().manual_seed(seed % 1000)
    n = 4000
    sample = torch.randint(0, 2**62, (n,), generator=g)
    sample[:3] = torch.tensor([0, 2**32 - 1, 2**32 + 5])  # only the low 32 bits enter
    position = torch.randint(0, 2**32, (n,), generator=g)
    token = torch.randint(0, 2**32, (n,), generator=g)
    for stream in (0, 1):
        got = _ext.cpu_ops().sampling_rng_words(
            sample, position, token, *rng.split_seed(seed), *rng.split_step(step), stream
        )
        want = rng.random_words(seed, step, stream, sample, position, token)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), stream


@needs_cpu
def test_cpu_fp32_math_bit_identical():
    """rng.h's Gumbel, log_f32, exp_fixed and fixed-point log-sum-exp equal the reference's bit for
    bit (the same IEEE operations in the same order, no FMA contraction)."""
    hi, lo = _test_words()
    assert torch.equal(_ext.cpu_ops().sampling_gumbel_from_words(hi, lo), rng.gumbel_from_words(hi, lo))
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.rand(100_000, generator=g) * 100 + 1e-30, torch.logspace(-37, 38, 5000)])
    d = torch.cat([-torch.rand(100_000, generator=g) * 90, torch.tensor([0.0, -1e-30, -87.0, -1e30, float("-inf")])])
    rows = torch.randn(7, 1000, generator=g) * 5
    rows[1, ::2] = float("-inf")
    lg, _, lse = _ext.cpu_ops().sampling_f32_math(x, rows)
    _, ex, _ = _ext.cpu_ops().sampling_f32_math(d, rows)
    assert torch.equal(lg, rng.log_f32(x))
    assert torch.equal(ex, rng.exp_fixed(d, 40))
    assert torch.equal(lse, rng.lse_rel(rows, rows.amax(-1, keepdim=True))[:, 0])


@needs_triton
def test_triton_gumbel_bit_identical():
    """The Triton kernels' fp32 Gumbel (unif2ace/kernels/triton/rng.py) equals the reference's bit
    for bit, the far tails included."""
    from unif2ace.kernels.triton import rng as triton_rng

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hi, lo = _test_words(20_000)
    got = triton_rng.gumbel_from_words(hi.to(dev), lo.to(dev)).cpu()
    assert torch.equal(got, rng.gumbel_from_words(hi, lo))
