"""The counter-based RNG of the sampling ops (stem ``rng``: unif2ace/kernels/reference/rng.py,
csrc/common/rng.h, unif2ace/kernels/triton/rng.py).

The definition is a contract that Triton/CUDA/C++ kernels reimplement bit for bit, so it is pinned
three ways: an independent pure-Python uint32 implementation written here from the docstring,
hard-coded known answers, and statistical checks of the output (fixed keys, so each statistical
test is deterministic; the false-failure rate stated for each is what a fresh key would have).
Then the backends against the reference: the C++ words and fp32 Gumbel values are bit-identical
(float64 ``log``/``log1p`` of glibc vs. torch's may differ by an ulp in float64, which moves the
fp32 rounding with probability ~2^-28 per value: the fixed seeds below have none), and Triton's
fp32 Gumbel agrees within a few ulp.
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


def py_row_key(seed: int, stream: int, word: int, sample: int, position: int) -> int:
    seed_lo, seed_hi = seed % (1 << 32), seed // (1 << 32)
    h = py_mix32(seed_hi ^ ((0x9E3779B9 * (2 * stream + word + 1)) % (1 << 32)))
    h = py_mix32(h ^ seed_lo)
    h = py_mix32(h ^ (sample % (1 << 32)))
    return py_mix32(h ^ position)


def py_element(key: int, token: int) -> int:
    return py_mix32((py_mix32(key ^ token) + 0x632BE5AB) % (1 << 32))


def py_words(seed, stream, sample, position, token):
    return (
        py_element(py_row_key(seed, stream, 0, sample, position), token),
        py_element(py_row_key(seed, stream, 1, sample, position), token),
    )


def test_chi2_sf_known_values():
    # textbook critical values: P(chi2_1 > 3.841) = 0.05, P(chi2_10 > 23.209) = 0.01,
    # P(chi2_255 > 310.457) = 0.01
    assert chi2_sf(3.841459, 1) == pytest.approx(0.05, rel=1e-4)
    assert chi2_sf(23.209251, 10) == pytest.approx(0.01, rel=1e-4)
    assert chi2_sf(310.4574, 255) == pytest.approx(0.01, rel=1e-3)
    assert chi2_sf(2.0, 10) == pytest.approx(0.9963402, rel=1e-5)


# ------------------------------------------------------------------ exact arithmetic


def test_mix32_matches_python_uint32():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 1 << 32, (4000,), generator=g, dtype=torch.int64)
    x = torch.cat([x, torch.tensor([0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, M32])])
    got = rng.mix32(x)
    want = torch.tensor([py_mix32(int(v)) for v in x], dtype=torch.int64)
    assert torch.equal(got, want)
    assert int(got.min()) >= 0 and int(got.max()) <= M32
    # input not modified (the tensor version works in place internally)
    assert int(x[-1]) == M32


def test_mix32_is_a_bijection_sample():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65537  # distinct 32-bit words
    assert torch.unique(rng.mix32(x)).numel() == x.numel()


def test_words_match_python_on_random_keys():
    g = torch.Generator().manual_seed(2)
    seeds = [0, 1, (1 << 32), 0xDEADBEEFCAFEF00D, (1 << 64) - 1]
    for seed in seeds:
        for stream in (0, 1):
            sample = torch.randint(0, 1 << 40, (5, 1, 1), generator=g)  # only the low 32 bits count
            pos = torch.randint(0, 1 << 32, (1, 4, 1), generator=g)
            tok = torch.randint(0, 1 << 20, (1, 1, 6), generator=g)
            hi, lo = rng.random_words(seed, stream, sample, pos, tok)
            assert hi.shape == lo.shape == (5, 4, 6)
            for i in range(5):
                for j in range(4):
                    for k in range(6):
                        want = py_words(seed, stream, int(sample[i, 0, 0]), int(pos[0, j, 0]), int(tok[0, 0, k]))
                        assert (int(hi[i, j, k]), int(lo[i, j, k])) == want


def test_int_helpers_match_tensor_version():
    for args in [(3, 0, 0, 5, 9), (2**63 + 7, 1, 1, 2**32 - 1, 2**32 - 1)]:
        seed, stream, word, sample, pos = args
        k = rng.row_key_int(*args)
        assert k == py_row_key(*args)
        kt = rng.row_key(seed, stream, word, torch.tensor([sample]), torch.tensor([pos]))
        assert int(kt[0]) == k
        assert rng.element_int(k, 77) == int(rng.element(kt, 77)[0]) == py_element(k, 77)


KNOWN_ANSWERS = [
    # (seed, stream, word, sample, position, token) -> element
    ((0, 0, 0, 0, 0, 0), 0xA18F4773),
    ((0x0123456789ABCDEF, 0, 1, 7, 255, 8191), 0xE065F1D3),
    (((1 << 64) - 1, 1, 0, (1 << 32) - 1, 12345, 0), 0xD0533D63),
]


@pytest.mark.parametrize("key,value", KNOWN_ANSWERS)
def test_known_answers(key, value):
    seed, stream, word, sample, pos, tok = key
    assert py_element(py_row_key(seed, stream, word, sample, pos), tok) == value
    t = rng.element(rng.row_key(seed, stream, word, torch.tensor(sample), torch.tensor(pos)), tok)
    assert int(t) == value


def test_sample_id_uses_low_32_bits_and_seed_halves_matter():
    a = rng.random_words(5, 0, torch.tensor([[3], [3 + (1 << 32)]]), 0, torch.arange(4)[None, :])[0]
    assert torch.equal(a[0], a[1])
    w = [rng.random_words(s, 0, 0, 0, torch.arange(8))[0] for s in (1, 1 << 32, (1 << 32) + 1)]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2]) and not torch.equal(w[1], w[2])
    # streams and words are distinct families
    s0 = rng.random_words(5, 0, 0, 0, torch.arange(64))
    s1 = rng.random_words(5, 1, 0, 0, torch.arange(64))
    assert not torch.equal(s0[0], s1[0]) and not torch.equal(s0[0], s0[1])


@pytest.mark.parametrize("seed", [-1, 1 << 64, 1.0, True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        rng.split_seed(seed)


# ------------------------------------------------------------------ statistics


def _draws(n_pos: int, n_tok: int, seed: int = 12345, stream: int = 0):
    pos = torch.arange(n_pos, dtype=torch.int64)[:, None]
    return rng.random_words(seed, stream, 3, pos, torch.arange(n_tok, dtype=torch.int64)[None, :])


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
    """Correlations between neighbouring tokens, positions, the two words, and the two streams are
    ~N(0, 1/n); the bound is 5 standard deviations (false-failure rate ~6e-7 each)."""
    hi, lo = words
    n = hi.numel()
    bound = 5 / math.sqrt(n)
    assert abs(_corr(hi[:, 1:], hi[:, :-1])) < 5 / math.sqrt(hi[:, 1:].numel())  # adjacent tokens
    assert abs(_corr(hi[1:], hi[:-1])) < 5 / math.sqrt(hi[1:].numel())  # adjacent positions
    assert abs(_corr(hi, lo)) < bound  # the two words of one draw
    hi1, _ = _draws(512, 256, stream=1)
    assert abs(_corr(hi, hi1)) < bound  # the two streams
    hi_s, _ = _draws(512, 256, seed=12346)
    assert abs(_corr(hi, hi_s)) < bound  # neighbouring seeds
    # the low bits of adjacent tokens too (a weak mixer shows up there first)
    assert abs(_corr(hi[:, 1:] & 0xFF, hi[:, :-1] & 0xFF)) < 5 / math.sqrt(hi[:, 1:].numel())


def test_exponential_moments_and_tail():
    """Exp(1) from 2^22 draws: mean within 5 sigma of 1 (sigma = 2^-11), P(E < 1e-3) within 5 sigma
    of 1 - e^-1e-3, and the count of E < 1e-6 (expected 4.2) within the Poisson range [0, 17]
    (P(Poisson(4.2) > 17) ~ 3e-6). Gumbel mean and variance match Euler's gamma and π²/6."""
    hi, lo = _draws(1 << 10, 1 << 12, seed=777)
    e = rng.exponential_from_words(hi, lo)
    n = e.numel()
    assert e.dtype == torch.float64
    assert abs(float(e.mean()) - 1.0) < 5 / math.sqrt(n)
    p3 = -math.expm1(-1e-3)
    f3 = float((e < 1e-3).double().mean())
    assert abs(f3 - p3) < 5 * math.sqrt(p3 * (1 - p3) / n)
    c6 = int((e < 1e-6).sum())
    assert 0 <= c6 <= 17, c6
    g = rng.gumbel_from_words(hi, lo)
    assert g.dtype == torch.float32
    assert abs(float(g.double().mean()) - 0.5772156649) < 5 * (math.pi / math.sqrt(6)) / math.sqrt(n)
    assert abs(float(g.double().var()) - math.pi**2 / 6) < 0.02


# ------------------------------------------------------------------ the construction itself


def test_gumbel_extremes_not_truncated():
    """The largest Gumbel is at hi = lo = 0 (w = 2^-65, E = 2^-65): -log(E) = 65 ln 2 ≈ 45.05, far
    beyond the ≈16.6 cap of fp32 uniforms. The smallest is at hi = lo = 2^32 - 1 (1 - w = 2^-65,
    E = 65 ln 2): -log(65 ln 2) ≈ -3.81. Both finite."""
    hi = torch.tensor([0, M32], dtype=torch.int64)
    lo = torch.tensor([0, M32], dtype=torch.int64)
    g = rng.gumbel_from_words(hi, lo)
    assert torch.isfinite(g).all()
    assert float(g[0]) > 40
    assert float(g[0]) == pytest.approx(65 * math.log(2), rel=1e-6)
    assert float(g[1]) == pytest.approx(-math.log(65 * math.log(2)), rel=1e-6)
    assert float(g[0]) == pytest.approx(rng.GUMBEL_MAX, rel=1e-6)


def test_exponential_exact_in_both_tails():
    """E = -log(1 - w), w = (hi·2^32 + lo + 0.5)/2^64, to full float64 precision at both ends and
    continuous (monotone) across the branch switch at hi = 2^31."""
    lo = torch.tensor([0, 1, 12345, M32], dtype=torch.int64)
    for hi_val in (0, 1, 1000):
        hi = torch.full_like(lo, hi_val)
        e = rng.exponential_from_words(hi, lo)
        for i in range(4):
            w = (hi_val * 2.0**32 + int(lo[i]) + 0.5) * 2.0**-64
            assert float(e[i]) == pytest.approx(-math.log1p(-w), rel=1e-14)
    for hi_val in (M32, M32 - 1, M32 - 1000):
        hi = torch.full_like(lo, hi_val)
        e = rng.exponential_from_words(hi, lo)
        for i in range(4):
            w_c = ((M32 - hi_val) * 2.0**32 + (M32 - int(lo[i])) + 0.5) * 2.0**-64  # 1 - w
            assert float(e[i]) == pytest.approx(-math.log(w_c), rel=1e-14)
    # monotone increasing in (hi, lo) around the branch switch and overall
    h31 = 1 << 31
    hs = torch.tensor([0, 1, h31 - 2, h31 - 1, h31 - 1, h31, h31, h31 + 1, M32], dtype=torch.int64)
    ls = torch.tensor([5, 0, M32, 0, M32, 0, 1, 0, M32], dtype=torch.int64)
    e = rng.exponential_from_words(hs, ls)
    assert bool((e[1:] >= e[:-1]).all()), e
    assert float(e[4]) == pytest.approx(math.log(2), rel=1e-9)
    assert float(e[5]) == pytest.approx(math.log(2), rel=1e-9)


def test_gumbel_broadcast_matches_words():
    sample = torch.tensor([[4], [9]])
    g = rng.gumbel(99, 0, sample, 3, torch.arange(7)[None, :])
    hi, lo = rng.random_words(99, 0, sample, 3, torch.arange(7)[None, :])
    assert g.shape == (2, 7)
    assert torch.equal(g, rng.gumbel_from_words(hi, lo))
    w = py_words(99, 0, 9, 3, 6)
    want = (
        -math.log(-math.log1p(-((w[0] * 2.0**32 + w[1] + 0.5) * 2.0**-64)))
        if w[0] < (1 << 31)
        else -math.log(-math.log(((M32 - w[0]) * 2.0**32 + (M32 - w[1]) + 0.5) * 2.0**-64))
    )
    assert float(g[1, 6]) == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------ the backends' RNG vs the reference


@needs_cpu
@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**64 - 1, 0x9E3779B97F4A7C15])
def test_rng_words_bit_identical(seed):
    """csrc/common/rng.h (through the C++ test hook) gives the reference's words."""
    g = torch.Generator().manual_seed(seed % 1000)
    n = 4000
    sample = torch.randint(0, 2**62, (n,), generator=g)
    sample[:3] = torch.tensor([0, 2**32 - 1, 2**32 + 5])  # only the low 32 bits enter
    position = torch.randint(0, 2**32, (n,), generator=g)
    token = torch.randint(0, 2**32, (n,), generator=g)
    for stream in (0, 1):
        hi, lo = _ext.cpu_ops().sampling_rng_words(sample, position, token, seed & M32, seed >> 32, stream)
        want_hi, want_lo = rng.random_words(seed, stream, sample, position, token)
        assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo), stream


def _edge_words():
    vals = [0, 1, 2, 255, 256, 2**26 - 1, 2**26, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]
    hi = torch.tensor([h for h in vals for _ in vals])
    lo = torch.tensor([l for _ in vals for l in vals])
    return hi, lo


@needs_cpu
def test_gumbel_bit_identical_and_upper_bound():
    g = torch.Generator().manual_seed(5)
    hi = torch.randint(0, 2**32, (200_000,), generator=g)
    lo = torch.randint(0, 2**32, (200_000,), generator=g)
    small = torch.randint(0, 2**12, (20_000,), generator=g)  # the far tails: hi near 0 and near 2^32
    ehi, elo = _edge_words()
    hi = torch.cat([hi, small, M32 - small, ehi])
    lo = torch.cat([lo, lo[:40_000], elo])
    gum, upper = _ext.cpu_ops().sampling_gumbel_from_words(hi, lo)
    want = rng.gumbel_from_words(hi, lo)
    assert torch.equal(gum, want)
    assert float(gum.max()) == pytest.approx(rng.GUMBEL_MAX, rel=1e-6)  # hi = lo = 0 is in the set
    # the pruning bound is a strict upper bound of the fp32 Gumbel for every word ...
    assert bool((upper > gum).all()), (hi[upper <= gum][:5], lo[upper <= gum][:5])
    # ... and tight (margin 1e-3 plus lo's part of the interval) where hi carries the precision
    big = (hi > 2**20) & (hi < 2**32 - 2**20)
    assert float((upper - gum)[big].max()) < 1.5e-3


@needs_triton
def test_gumbel_fp32_matches_reference():
    """The Triton kernels' fp32 Gumbel (unif2ace/kernels/triton/rng.py) within a few ulp of the
    reference's float64-then-rounded value, the far tail included."""
    from unif2ace.kernels.triton import rng as triton_rng

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(1)
    hi = torch.randint(0, 2**32, (50000,), generator=g, dtype=torch.int64)
    lo = torch.randint(0, 2**32, (50000,), generator=g, dtype=torch.int64)
    ext = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 2, 12345], dtype=torch.int64)
    hi = torch.cat([hi, ext, ext]).to(dev)
    lo = torch.cat([lo, ext, ext.flip(0)]).to(dev)
    got = triton_rng.gumbel_from_words(hi, lo).cpu()
    want = rng.gumbel_from_words(hi.cpu(), lo.cpu())
    err = (got - want).abs()
    assert float(err.max()) <= 2e-6, float(err.max())
    assert float((err / want.abs().clamp(min=1.0)).max()) <= 4 * torch.finfo(torch.float32).eps
    assert float(got[-14]) == pytest.approx(rng.GUMBEL_MAX, rel=1e-6)  # hi = lo = 0: the far tail
