"""The ``cpu`` backend of the sampling ops (csrc/cpu/sampling.cpp, csrc/common/rng.h) against the
reference (unif2ace/kernels/reference/sampling.py) and on its own (distribution, edge cases).

Exactness contract tested here: the RNG words are bit-identical; the fp32 Gumbel values are
bit-identical (float64 ``log``/``log1p`` of glibc vs. torch's may differ by an ulp in float64, which
moves the fp32 rounding with probability ~2^-28 per value: the fixed seeds below have none);
sampled codes, tokens and masks equal the reference's; confidences / logprobs agree within the fp32
tolerance (polynomial exp, fp32 sums in another order).

Statistical tests use fixed seeds, so each is deterministic; the false-failure rate stated is what
it would have with a fresh seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from unif2ace.kernels import _ext, ar_sample, masked_sample_step
from unif2ace.kernels.reference import rng
from unif2ace.testing import assert_close, chi2_pvalue

pytestmark = pytest.mark.skipif(not _ext.cpu_status()[0], reason=f"C++ extension missing: {_ext.cpu_status()[1]}")

NEG_INF = float("-inf")
M32 = 0xFFFFFFFF


def ops():
    return _ext.cpu_ops()


def make_inputs(B, L, V, *, masked_frac=0.7, seed=0, guided=False, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cond = (torch.randn(B, L, V, generator=g) * scale).to(dtype)
    unc = (torch.randn(B, L, V, generator=g) * scale).to(dtype) if guided else None
    is_masked = torch.rand(B, L, generator=g) < masked_frac
    tokens = torch.where(is_masked, V, torch.randint(0, V, (B, L), generator=g))
    return cond, unc, tokens, is_masked, V


def both_step(cond, tokens, is_masked, **kw):
    return (
        masked_sample_step(cond, tokens, is_masked, backend="cpu", **kw),
        masked_sample_step(cond, tokens, is_masked, backend="reference", **kw),
    )


def assert_same_step(out, ref):
    assert torch.equal(out.sampled, ref.sampled)
    assert torch.equal(out.is_masked, ref.is_masked)
    assert torch.equal(out.tokens, ref.tokens)
    assert out.confidence.dtype == torch.float32
    # ±inf at the same places, finite values within fp32 tolerance
    assert torch.equal(torch.isposinf(out.confidence), torch.isposinf(ref.confidence))
    assert torch.equal(torch.isneginf(out.confidence), torch.isneginf(ref.confidence))
    fin = torch.isfinite(ref.confidence)
    assert_close(out.confidence[fin], ref.confidence[fin], name="confidence")


def assert_same_ar(out, ref):
    assert torch.equal(out.tokens, ref.tokens)
    assert torch.equal(torch.isneginf(out.logprobs), torch.isneginf(ref.logprobs))
    fin = torch.isfinite(ref.logprobs)
    assert_close(out.logprobs[fin], ref.logprobs[fin], name="logprobs")


# ------------------------------------------------------------------ RNG (csrc/common/rng.h)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**64 - 1, 0x9E3779B97F4A7C15])
def test_rng_words_bit_identical(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    n = 4000
    sample = torch.randint(0, 2**62, (n,), generator=g)
    sample[:3] = torch.tensor([0, 2**32 - 1, 2**32 + 5])  # only the low 32 bits enter
    position = torch.randint(0, 2**32, (n,), generator=g)
    token = torch.randint(0, 2**32, (n,), generator=g)
    for stream in (0, 1):
        hi, lo = ops().sampling_rng_words(sample, position, token, seed & M32, seed >> 32, stream)
        want_hi, want_lo = rng.random_words(seed, stream, sample, position, token)
        assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo), stream


def _edge_words():
    vals = [0, 1, 2, 255, 256, 2**26 - 1, 2**26, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]
    hi = torch.tensor([h for h in vals for _ in vals])
    lo = torch.tensor([l for _ in vals for l in vals])
    return hi, lo


def test_gumbel_bit_identical_and_upper_bound():
    g = torch.Generator().manual_seed(5)
    hi = torch.randint(0, 2**32, (200_000,), generator=g)
    lo = torch.randint(0, 2**32, (200_000,), generator=g)
    small = torch.randint(0, 2**12, (20_000,), generator=g)  # the far tails: hi near 0 and near 2^32
    ehi, elo = _edge_words()
    hi = torch.cat([hi, small, M32 - small, ehi])
    lo = torch.cat([lo, lo[:40_000], elo])
    gum, upper = ops().sampling_gumbel_from_words(hi, lo)
    want = rng.gumbel_from_words(hi, lo)
    assert torch.equal(gum, want)
    assert float(gum.max()) == pytest.approx(rng.GUMBEL_MAX, rel=1e-6)  # hi = lo = 0 is in the set
    # the pruning bound is a strict upper bound of the fp32 Gumbel for every word ...
    assert bool((upper > gum).all()), (hi[upper <= gum][:5], lo[upper <= gum][:5])
    # ... and tight (margin 1e-3 plus lo's part of the interval) where hi carries the precision
    big = (hi > 2**20) & (hi < 2**32 - 2**20)
    assert float((upper - gum)[big].max()) < 1.5e-3


# ------------------------------------------------------------------ masked step vs reference


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("top_k", [None, 7])
def test_greedy_matches_reference(guided, top_k):
    B, L, V = 3, 37, 111
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=guided, seed=1)
    is_masked[2] = False  # a row with nothing masked
    tokens[2] = torch.randint(0, V, (L,))
    for step in (0, 4, 6):
        out, ref = both_step(
            cond,
            tokens,
            is_masked,
            step=step,
            num_steps=7,
            seed=5,
            mask_token_id=mid,
            uncond_logits=unc,
            guidance_scale=1.75 if guided else 0.0,
            temperature=0.0,
            confidence_noise=0.0,
            top_k=top_k,
        )
        assert_same_step(out, ref)
        assert torch.equal(out.tokens[2], tokens[2]) and not out.is_masked[2].any()


def test_hand_computed_small_case():
    c = torch.tensor([[[2.0, 0, 0], [0, 0, 1], [0, 3, 3], [5, 5, 5]]])
    tokens = torch.tensor([[9, 9, 9, 2]])
    is_masked = torch.tensor([[True, True, True, False]])
    out = masked_sample_step(
        c,
        tokens,
        is_masked,
        step=0,
        num_steps=2,
        seed=1,
        mask_token_id=9,
        temperature=0.0,
        confidence_noise=0.0,
        backend="cpu",
    )
    # n = floor(4 cos(π/4)) = 2 of 3 masked: positions 2 and 1 (lowest log p) re-masked
    assert out.tokens.tolist() == [[0, 9, 9, 2]]
    assert out.is_masked.tolist() == [[False, True, True, False]]
    assert out.sampled.tolist() == [[0, 2, 1, 2]]  # position 2: tie between codes 1 and 2 -> 1
    want = [2 - math.log(math.e**2 + 2), 1 - math.log(2 + math.e), 3 - math.log(1 + 2 * math.e**3)]
    assert out.confidence[0, :3].tolist() == pytest.approx(want, rel=1e-6)
    assert math.isinf(out.confidence[0, 3]) and out.confidence[0, 3] > 0


def test_confidence_ties_remask_lowest_positions_first():
    """Every position has the same row (expanded, stride 0): equal confidences, so the re-masked
    positions are the lowest-indexed masked ones."""
    L, V = 50, 33
    row = torch.randn(V)
    is_masked = torch.rand(2, L, generator=torch.Generator().manual_seed(2)) < 0.8
    tokens = torch.where(is_masked, V, 3)
    out, ref = both_step(
        row.expand(2, L, V),
        tokens,
        is_masked,
        step=2,
        num_steps=6,
        seed=1,
        mask_token_id=V,
        temperature=0.0,
        confidence_noise=0.0,
    )
    assert_same_step(out, ref)
    for b in range(2):
        pos = is_masked[b].nonzero().flatten()
        n = int(out.is_masked[b].sum())
        assert n > 0 and out.is_masked[b].nonzero().flatten().tolist() == pos[:n].tolist()


@pytest.mark.parametrize(
    "B,L,V,guided,temp,top_k,step",
    [
        (3, 64, 333, True, 1.0, None, 0),
        (2, 41, 1000, False, 0.7, None, 5),
        (2, 23, 4099, True, 1.3, None, 1),  # several Gumbel tiles, a ragged last one
        (3, 30, 257, True, 1.0, 17, 3),
        (2, 19, 64, False, 2.5, 1, 8),  # top_k = 1 keeps the max (and its ties) only
    ],
)
def test_sampling_with_noise_matches_reference(B, L, V, guided, temp, top_k, step):
    """Random inputs, Gumbel sampling and confidence noise on: tokens, masks and codes identical."""
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=guided, seed=V, scale=3.0)
    ids = torch.randint(0, 2**40, (B,), generator=torch.Generator().manual_seed(L))
    out, ref = both_step(
        cond,
        tokens,
        is_masked,
        step=step,
        num_steps=10,
        seed=2**40 + V,
        mask_token_id=mid,
        uncond_logits=unc,
        guidance_scale=1.75 if guided else 0.0,
        temperature=temp,
        confidence_noise=4.5,
        top_k=top_k,
        sample_ids=ids,
    )
    assert_same_step(out, ref)


def test_sampling_match_rate_many_positions():
    """4096 positions x V = 2048 on near-flat logits (many near-ties in x/T + g): every code equal."""
    B, L, V = 4, 1024, 2048
    g = torch.Generator().manual_seed(9)
    cond = torch.randn(B, L, V, generator=g) * 0.5
    tokens = torch.full((B, L), V)
    is_masked = torch.ones(B, L, dtype=torch.bool)
    out, ref = both_step(cond, tokens, is_masked, step=3, num_steps=12, seed=77, mask_token_id=V)
    assert int((out.sampled != ref.sampled).sum()) == 0
    assert_same_step(out, ref)


def test_all_schedules_and_last_step():
    B, L, V = 3, 40, 29
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, masked_frac=0.9, seed=3)
    for schedule in ("cosine", "linear", "pow", "sigmoid"):
        for step in (0, 2, 4):
            out, ref = both_step(
                cond,
                tokens,
                is_masked,
                step=step,
                num_steps=5,
                seed=2,
                mask_token_id=mid,
                uncond_logits=unc,
                guidance_scale=0.5,
                schedule=schedule,
                schedule_exponent=3.0,
            )
            assert_same_step(out, ref)
    assert not out.is_masked.any()  # last step: everything decoded
    assert bool((out.tokens < V).all())


# ------------------------------------------------------------------ masked step: edge cases


def test_nan_inf_rows_match_reference():
    L, V = 6, 9
    c = torch.randn(2, L, V)
    c[0, 1, ::2] = float("nan")  # partially NaN: NaN codes act as -inf
    c[0, 2] = float("nan")  # all NaN
    c[0, 4] = NEG_INF  # all -inf
    c[0, 3, 5] = math.inf  # +inf acts as FLT_MAX: always drawn, log p = 0
    c[1, 0, 2] = c[1, 0, 7] = math.inf  # two +inf: a tie at FLT_MAX
    c[1, 5] = torch.finfo(torch.float32).max  # FLT_MAX / T overflows: clamped
    tokens = torch.full((2, L), V)
    is_masked = torch.ones(2, L, dtype=torch.bool)
    for temp in (0.0, 1.0, 0.3):
        for noise in (0.0, 4.5):
            out, ref = both_step(
                c,
                tokens,
                is_masked,
                step=0,
                num_steps=2,
                seed=4,
                mask_token_id=V,
                temperature=temp,
                confidence_noise=noise,
            )
            assert_same_step(out, ref)
            assert out.sampled[0, 2] == 0 and out.sampled[0, 4] == 0
            assert bool(torch.isneginf(out.confidence[0, [2, 4]]).all())
            assert out.sampled[0, 3] == 5 and int(out.sampled[0, 1]) % 2 == 1
            assert not torch.isnan(out.confidence).any()
    # guidance that makes inf - inf = NaN -> -inf, and +inf - finite -> FLT_MAX
    u = torch.randn(2, L, V)
    u[0, 0] = math.inf
    c2 = torch.randn(2, L, V)
    c2[0, 0] = math.inf
    c2[1, 1, 3] = math.inf
    out, ref = both_step(
        c2, tokens, is_masked, step=0, num_steps=2, seed=4, mask_token_id=V, uncond_logits=u, guidance_scale=1.0
    )
    assert_same_step(out, ref)
    assert out.sampled[0, 0] == 0 and math.isinf(out.confidence[0, 0]) and out.sampled[1, 1] == 3


def test_neg_inf_codes_never_sampled():
    B, L, V = 4, 256, 40
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(B, L, V, generator=g) * 3
    dead = torch.rand(B, L, V, generator=g) < 0.6
    dead[..., 0] = False
    cond = cond.masked_fill(dead, NEG_INF)
    tokens = torch.full((B, L), V)
    is_masked = torch.ones(B, L, dtype=torch.bool)
    for temp in (1.0, 2.5):
        out = masked_sample_step(
            cond, tokens, is_masked, step=0, num_steps=2, seed=11, mask_token_id=V, temperature=temp, backend="cpu"
        )
        assert not bool(dead.gather(-1, out.sampled[..., None]).any())
        assert bool(torch.isfinite(out.confidence).all())


def test_top_k_at_least_vocab_and_small_shapes():
    B, L, V = 2, 21, 13
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, seed=8)
    kw = dict(step=1, num_steps=4, seed=8, mask_token_id=mid, uncond_logits=unc, guidance_scale=0.5)
    base = masked_sample_step(cond, tokens, is_masked, backend="cpu", **kw)
    for k in (V, V + 3):
        out = masked_sample_step(cond, tokens, is_masked, top_k=k, backend="cpu", **kw)
        for a, b in zip(out, base):
            assert torch.equal(a, b)
    # V = 1, L = 1, and empty batches
    out, ref = both_step(
        torch.randn(3, 1, 1),
        torch.ones(3, 1, dtype=torch.long),
        torch.tensor([[True], [False], [True]]),
        step=0,
        num_steps=3,
        seed=1,
        mask_token_id=1,
    )
    assert_same_step(out, ref)
    for B, L in ((0, 5), (3, 0)):
        out = masked_sample_step(
            torch.randn(B, L, 7),
            torch.zeros(B, L, dtype=torch.long),
            torch.ones(B, L, dtype=torch.bool),
            step=0,
            num_steps=3,
            seed=1,
            mask_token_id=7,
            backend="cpu",
        )
        assert all(t.shape == (B, L) for t in out)


def test_batch_order_sub_batch_and_thread_count():
    B, L, V = 5, 19, 333
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, seed=6)
    ids = torch.tensor([10, 3, 7, 42, 2**33])
    kw = dict(step=2, num_steps=8, seed=123456789, mask_token_id=mid, guidance_scale=1.5, top_k=200, backend="cpu")
    a = masked_sample_step(cond, tokens, is_masked, uncond_logits=unc, sample_ids=ids, **kw)
    perm = torch.tensor([3, 0, 4, 1, 2])
    c = masked_sample_step(
        cond[perm], tokens[perm], is_masked[perm], uncond_logits=unc[perm], sample_ids=ids[perm], **kw
    )
    for x, y in zip(a, c):
        assert torch.equal(x[perm], y)
    d = masked_sample_step(cond[1:3], tokens[1:3], is_masked[1:3], uncond_logits=unc[1:3], sample_ids=ids[1:3], **kw)
    for x, y in zip(a, d):
        assert torch.equal(x[1:3], y)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        e = masked_sample_step(cond, tokens, is_masked, uncond_logits=unc, sample_ids=ids, **kw)
    finally:
        torch.set_num_threads(n)
    for x, y in zip(a, e):
        assert torch.equal(x, y)
    f = masked_sample_step(cond, tokens, is_masked, uncond_logits=unc, sample_ids=ids, **{**kw, "seed": 1})
    assert not torch.equal(a.sampled, f.sampled)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_strided_inputs(dtype):
    B, L, V = 2, 15, 210
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, seed=4, dtype=dtype)
    kw = dict(step=0, num_steps=3, seed=4, mask_token_id=mid, guidance_scale=1.0)
    out, ref = both_step(cond, tokens.int(), is_masked, uncond_logits=unc, **kw)
    assert out.tokens.dtype == torch.int64
    assert_same_step(out, ref)
    # mixed dtypes (uncond fp32), and non-contiguous views: a V-slice and a transposed layout
    out, ref = both_step(cond, tokens, is_masked, uncond_logits=unc.float(), **kw)
    assert_same_step(out, ref)
    big = torch.randn(B, V + 5, L).to(dtype).transpose(1, 2)[..., 3 : 3 + V]
    assert not big.is_contiguous() and big.stride(-1) != 1
    out, ref = both_step(big, tokens, is_masked, uncond_logits=unc[:, :, :], **kw)
    assert_same_step(out, ref)
    sl = torch.randn(B, L, V + 9).to(dtype)[..., 4 : 4 + V]  # last dim contiguous, row stride V + 9
    out, ref = both_step(sl, tokens, is_masked, uncond_logits=unc, **kw)
    assert_same_step(out, ref)


# ------------------------------------------------------------------ masked step: distribution


@pytest.mark.parametrize("top_k", [None, 5])
def test_masked_step_chi2(top_k):
    """Codes drawn at 40000 positions sharing one logit row, temperature 0.7, match
    softmax(logits / 0.7) (renormalised over the top-k codes; the others never appear). χ² rejects
    at p < 1e-4: false-failure rate 1e-4 for a fresh seed."""
    V, temp = 12, 0.7
    row = torch.linspace(-2.0, 1.5, V)[torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    B, L = 8, 5000
    out = masked_sample_step(
        row.expand(B, L, V),
        torch.full((B, L), V),
        torch.ones(B, L, dtype=torch.bool),
        step=0,
        num_steps=12,
        seed=2024,
        mask_token_id=V,
        temperature=temp,
        top_k=top_k,
        backend="cpu",
    )
    z = row.double() / temp
    if top_k is not None:
        z = torch.where(row >= row.topk(top_k).values[-1], z, -math.inf)
    assert chi2_pvalue(out.sampled, torch.softmax(z, 0)) > 1e-4


def test_tail_mass():
    """Rare codes keep their mass: 4 common codes and 2044 rare ones (each p < 1e-4, together
    ≈ 6.5%); over 8192 draws their total frequency is within 5 sigma of their mass (binomial;
    false-failure rate ~6e-7). Noise capped at ~9 or built from 16 random bits fails this (see
    tests/test_sampling_reference.py::test_tail_mass)."""
    V = 2048
    row = torch.empty(V)
    row[:4] = torch.tensor([0.0, -0.5, -1.0, -1.5])
    row[4:] = torch.linspace(-11.0, -8.5, V - 4)
    mass = float(torch.softmax(row.double(), 0)[4:].sum())
    B, L = 4, 2048
    out = masked_sample_step(
        row.expand(B, L, V),
        torch.full((B, L), V),
        torch.ones(B, L, dtype=torch.bool),
        step=0,
        num_steps=10,
        seed=31337,
        mask_token_id=V,
        backend="cpu",
    )
    n = B * L
    rare = int((out.sampled >= 4).sum())
    assert abs(rare - n * mass) < 5 * math.sqrt(n * mass * (1 - mass)), (rare, n * mass)


# ------------------------------------------------------------------ autoregressive sampling


AR_CASES = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=0.0),
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=40, temperature=1.3),
    dict(top_p=0.8),
    dict(top_k=50, top_p=0.9, temperature=0.8),
    dict(top_p=1.0, top_k=10**6),
]


@pytest.mark.parametrize("kw", AR_CASES, ids=[str(k) for k in AR_CASES])
def test_ar_matches_reference(kw):
    B, V = 24, 3001
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(B, V, generator=g) * 3
    ids = torch.randint(0, 2**40, (B,), generator=g)
    pos = torch.randint(0, 2**32, (B,), generator=g)
    out = ar_sample(logits, seed=99, position=pos, sample_ids=ids, backend="cpu", **kw)
    ref = ar_sample(logits, seed=99, position=pos, sample_ids=ids, backend="reference", **kw)
    assert_same_ar(out, ref)
    out = ar_sample(logits, seed=2**63 + 1, position=17, backend="cpu", **kw)
    ref = ar_sample(logits, seed=2**63 + 1, position=17, backend="reference", **kw)
    assert_same_ar(out, ref)


@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999])
def test_ar_top_p_large_nucleus_matches_reference(top_p):
    """Flat logits: the nucleus holds thousands of codes, so the kernel widens its candidate set
    (1024, 4096, ... largest) before sorting; fp16 and bf16 logits too."""
    B, V = 8, 6000
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(1)) * 0.5
    logits[0, :100] = 4.0  # a 100-way tie at the top
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dt)
        out = ar_sample(x, seed=5, position=3, top_p=top_p, temperature=0.9, backend="cpu")
        ref = ar_sample(x, seed=5, position=3, top_p=top_p, temperature=0.9, backend="reference")
        assert_same_ar(out, ref)


def test_ar_top_p_support_ties_and_chi2():
    V, temp, top_p = 40, 0.8, 0.7
    row = torch.randn(V, generator=torch.Generator().manual_seed(6)) * 1.5
    z = (row / temp).double()
    p = torch.softmax(z, 0)
    allowed = {v for v in range(V) if float(p[z > z[v]].sum()) < top_p}
    assert 2 < len(allowed) < V
    B = 20000
    out = ar_sample(row.expand(B, V), seed=99, position=4, temperature=temp, top_p=top_p, backend="cpu")
    assert set(out.tokens.unique().tolist()) == allowed
    mask = torch.tensor([v in allowed for v in range(V)])
    assert chi2_pvalue(out.tokens, torch.softmax(torch.where(mask, z, -math.inf), 0)) > 1e-4
    row2 = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])
    p2 = torch.softmax(row2, 0)
    out2 = ar_sample(row2.expand(4000, 5), seed=3, position=1, top_p=float(p2[0]) + 0.01, backend="cpu")
    assert set(out2.tokens.unique().tolist()) == {0, 1, 2, 3}  # the tied codes survive together
    out3 = ar_sample(row2.expand(2000, 5), seed=3, position=1, top_p=float(p2[0]) * 0.999, backend="cpu")
    assert set(out3.tokens.unique().tolist()) == {0}


def test_ar_chi2_temperature_and_top_k_ties():
    """20000 draws at temperature 1.3 match softmax(row / 1.3) (χ², p < 1e-4 rejection,
    false-failure rate 1e-4); top_k = 7 with a tie at the 7th value draws exactly those 8 codes."""
    V, temp = 10, 1.3
    row = torch.randn(V, generator=torch.Generator().manual_seed(8))
    out = ar_sample(row.expand(20000, V), seed=4242, position=17, temperature=temp, backend="cpu")
    assert chi2_pvalue(out.tokens, torch.softmax(row.double() / temp, 0)) > 1e-4
    row = torch.randn(50, generator=torch.Generator().manual_seed(4))
    order = row.argsort(descending=True)
    row[order[7]] = row[order[6]]
    out = ar_sample(row.expand(3000, 50), seed=77, position=0, temperature=1.5, top_k=7, backend="cpu")
    assert set(out.tokens.unique().tolist()) == set(order[:8].tolist())


def test_ar_edge_rows_and_never_sampled():
    V = 20
    logits = torch.randn(5, V)
    logits[0] = float("nan")
    logits[1] = NEG_INF
    logits[2, :15] = float("nan")
    logits[3, 4] = math.inf
    logits[4, 7] = logits[4, 9] = math.inf  # tie at FLT_MAX
    for kw in (dict(), dict(temperature=0.0), dict(top_k=3, top_p=0.5, temperature=0.5), dict(temperature=1e-30)):
        out = ar_sample(logits, seed=1, position=0, backend="cpu", **kw)
        assert_same_ar(out, ar_sample(logits, seed=1, position=0, backend="reference", **kw))
        assert out.tokens[:2].tolist() == [0, 0] and bool(torch.isneginf(out.logprobs[:2]).all())
        assert int(out.tokens[2]) >= 15 and int(out.tokens[3]) == 4 and float(out.logprobs[3]) == 0.0
    B = 4000
    x = torch.randn(B, 25) * 2
    dead = torch.rand(B, 25) < 0.7
    dead[:, 3] = False
    x = x.masked_fill(dead, NEG_INF)
    for kw in (dict(), dict(temperature=3.0, top_p=0.99), dict(top_k=20)):
        out = ar_sample(x, seed=6, position=2, backend="cpu", **kw)
        assert not bool(dead.gather(-1, out.tokens[:, None]).any())
    out = ar_sample(torch.randn(0, 5), seed=1, position=0, backend="cpu")
    assert out.tokens.shape == (0,) and out.logprobs.shape == (0,)


def test_ar_batch_order_and_positions():
    B, V = 64, 300
    logits = torch.randn(B, V)
    a = ar_sample(logits, seed=1, position=5, backend="cpu")
    b = ar_sample(logits, seed=1, position=torch.full((B,), 5), backend="cpu")
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, ar_sample(logits, seed=1, position=6, backend="cpu").tokens)
    ids = torch.randperm(1000)[:B]
    perm = torch.randperm(B)
    pos = torch.randint(0, 100, (B,))
    d = ar_sample(logits, seed=2, position=pos, sample_ids=ids, top_p=0.9, backend="cpu")
    e = ar_sample(logits[perm], seed=2, position=pos[perm], sample_ids=ids[perm], top_p=0.9, backend="cpu")
    assert torch.equal(d.tokens[perm], e.tokens) and torch.equal(d.logprobs[perm], e.logprobs)


# ------------------------------------------------------------------ dispatch and errors


def test_cpu_is_the_default_backend_on_cpu_tensors():
    cond, _, tokens, is_masked, mid = make_inputs(2, 9, 31, seed=2)
    kw = dict(step=0, num_steps=3, seed=3, mask_token_id=mid)
    a = masked_sample_step(cond, tokens, is_masked, **kw)
    b = masked_sample_step(cond, tokens, is_masked, backend="cpu", **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bad_inputs_name_the_argument():
    cond, unc, tokens, is_masked, mid = make_inputs(2, 5, 7, guided=True)
    with pytest.raises(ValueError, match="'step'"):
        masked_sample_step(cond, tokens, is_masked, step=3, num_steps=3, seed=1, mask_token_id=mid, backend="cpu")
    with pytest.raises(ValueError, match="'tokens'"):
        masked_sample_step(
            cond, tokens[:, :4], is_masked, step=0, num_steps=3, seed=1, mask_token_id=mid, backend="cpu"
        )
    with pytest.raises(ValueError, match="'top_p'"):
        ar_sample(cond[0], seed=1, position=0, top_p=0.0, backend="cpu")
    # the raw C++ ops check their own contract too
    with pytest.raises(RuntimeError, match="tokens must be int64"):
        ops().masked_sample_step(cond, None, tokens.int(), is_masked, torch.arange(2), 0, 0, 0.0, 1.0, 0.0, 0, 1, 7)
    with pytest.raises(RuntimeError, match="position must be int64"):
        ops().ar_sample(cond[0], torch.arange(5), torch.zeros(4, dtype=torch.long), 0, 0, 1.0, 0, 1.0)
    with pytest.raises(RuntimeError, match="seed_lo"):
        ops().ar_sample(cond[0], torch.arange(5), torch.zeros(5, dtype=torch.long), 2**32, 0, 1.0, 0, 1.0)
