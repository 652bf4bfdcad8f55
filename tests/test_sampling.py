"""The fast backends of the sampling ops (``masked_sample_step``, ``ar_sample``) against the reference
(unif2ace/kernels/reference/sampling.py), with the backend as a parameter: ``cpu`` (C++/OpenMP,
csrc/cpu/sampling.cpp), ``triton`` (CPU tensors under the interpreter, or a GPU) and ``cuda``
(csrc/cuda/sampling.cu: on a GPU, marked ``gpu``, and through the CPU emulator of the CUDA kernels,
marked ``cuda_emu``; the statistical tests with tens of thousands of positions run on the card
only). The distribution tests run on the ``reference`` too: one body for the oracle and every
backend.

Exactness contract tested here: every output equals the reference's bit for bit -- sampled codes,
tokens, masks, confidences, logprobs (every backend computes the reference's fp32 operations and its
integer fixed-point softmax, see unif2ace/kernels/reference/rng.py). The only exception is the
``cpu`` backend's top-p keep/drop decision, which uses its own fp32 softmax (a code whose
higher-ranked mass is within ~1e-6 of top_p could be decided differently; none in these tests).
The RNG and the fp32 definitions themselves are tested in tests/test_rng.py.

Statistical tests use fixed seeds, so each is deterministic; the false-failure rate stated is what
it would have with a fresh seed (χ² tests reject at p < 1e-4). Bodies that launch thousands of
programs run Triton on a GPU only (the interpreter takes ~1 ms per program).
"""

from __future__ import annotations

import math

import pytest
import torch
from sampling_testing import GREEDY, special_rows

from unif2ace.kernels import _ext, ar_sample, masked_sample_step
from unif2ace.kernels._custom_ops import sampling as custom_ops
from unif2ace.kernels._dispatch import triton_interpreter_enabled
from unif2ace.kernels.sampling import MASKED_SAMPLE_STEP, num_to_keep_masked
from unif2ace.testing import chi2_pvalue, cuda_emu

NEG_INF = float("-inf")

CPU = pytest.param(
    "cpu", marks=pytest.mark.skipif(not _ext.cpu_status()[0], reason=f"C++ extension missing: {_ext.cpu_status()[1]}")
)
TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        not (torch.cuda.is_available() or triton_interpreter_enabled()), reason="needs a GPU or TRITON_INTERPRET=1"
    ),
)
TRITON_GPU = pytest.param("triton", marks=pytest.mark.gpu)  # too many programs for the interpreter
CUDA_GPU, CUDA_EMU = cuda_emu.cuda_backends()  # on the card (gpu) and through the CPU emulator (cuda_emu)

FAST = [CPU, TRITON, CUDA_GPU, CUDA_EMU]
ALL = ["reference", CPU, TRITON, CUDA_GPU, CUDA_EMU]
# too many programs for Triton's interpreter, fine for the CUDA emulator
FAST_NO_INTERP = [CPU, TRITON_GPU, CUDA_GPU, CUDA_EMU]
ALL_NO_INTERP = ["reference", CPU, TRITON_GPU, CUDA_GPU, CUDA_EMU]
# too many positions for either (tens of thousands of blocks): the cuda backend on the card only
FAST_HEAVY = [CPU, TRITON_GPU, CUDA_GPU]
ALL_HEAVY = ["reference", CPU, TRITON_GPU, CUDA_GPU]


def device_for(backend: str) -> torch.device:
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return cuda_emu.device(backend)


def make_inputs(B, L, V, *, masked_frac=0.7, seed=0, guided=False, scale=2.0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cond = (torch.randn(B, L, V, generator=g) * scale).to(dtype)
    unc = (torch.randn(B, L, V, generator=g) * scale).to(dtype) if guided else None
    is_masked = torch.rand(B, L, generator=g) < masked_frac
    tokens = torch.where(is_masked, V, torch.randint(0, V, (B, L), generator=g))
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(cond), mv(unc), mv(tokens), mv(is_masked), V


def both_step(backend, cond, tokens, is_masked, **kw):
    return (
        masked_sample_step(cond, tokens, is_masked, backend=backend, **kw),
        masked_sample_step(cond, tokens, is_masked, backend="reference", **kw),
    )


def assert_same_step(out, ref):
    assert out.confidence.dtype == torch.float32 and out.tokens.dtype == out.sampled.dtype == torch.int64
    for name in ("sampled", "is_masked", "tokens", "confidence"):
        a, b = getattr(out, name).cpu(), getattr(ref, name).cpu()
        assert torch.equal(a, b), (name, (a != b).nonzero()[:5].tolist())


def assert_same_ar(out, ref):
    assert torch.equal(out.tokens.cpu(), ref.tokens.cpu())
    assert torch.equal(out.logprobs.cpu(), ref.logprobs.cpu())


# ------------------------------------------------------------------ masked step vs reference


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("top_k", [None, 7])
def test_greedy_matches_reference(backend, guided, top_k):
    B, L, V = 3, 37, 111
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=guided, seed=1)
    is_masked[2] = False  # a row with nothing masked
    tokens[2] = torch.randint(0, V, (L,))
    dev = device_for(backend)
    cond, tokens, is_masked = cond.to(dev), tokens.to(dev), is_masked.to(dev)
    unc = None if unc is None else unc.to(dev)
    for step in (0, 4, 6):
        out, ref = both_step(
            backend,
            cond,
            tokens,
            is_masked,
            step=step,
            num_steps=7,
            seed=5,
            mask_token_id=mid,
            uncond_logits=unc,
            guidance_scale=1.75 if guided else 0.0,
            **GREEDY,
            top_k=top_k,
        )
        assert_same_step(out, ref)
        assert torch.equal(out.tokens[2], tokens[2]) and not out.is_masked[2].any()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_masked_step_matches_reference(backend, guided, temperature):
    dev = device_for(backend)
    B, L, V = 3, 13, 333
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=guided, seed=int(temperature * 10), device=dev)
    out, ref = both_step(
        backend,
        cond,
        tokens,
        is_masked,
        step=2,
        num_steps=7,
        seed=2**63 + 5,
        mask_token_id=mid,
        uncond_logits=unc,
        guidance_scale=1.75 if guided else 0.0,
        temperature=temperature,
        sample_ids=torch.tensor([9, 2**40, 3], device=dev),
    )
    assert_same_step(out, ref)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("top_k", [1, 7, 332, 333, 500])
def test_masked_step_top_k(backend, top_k):
    B, L, V = 2, 9, 333
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, seed=top_k, device=device_for(backend))
    cond[0, 0, :20] = cond[0, 0, 20]  # ties at the threshold are all kept
    out, ref = both_step(
        backend,
        cond,
        tokens,
        is_masked,
        step=0,
        num_steps=4,
        seed=3,
        mask_token_id=mid,
        uncond_logits=unc,
        guidance_scale=0.5,
        top_k=top_k,
    )
    assert_same_step(out, ref)


@pytest.mark.parametrize("backend", ALL)
def test_hand_computed_small_case(backend):
    dev = device_for(backend)
    c = torch.tensor([[[2.0, 0, 0], [0, 0, 1], [0, 3, 3], [5, 5, 5]]], device=dev)
    tokens = torch.tensor([[9, 9, 9, 2]], device=dev)
    is_masked = torch.tensor([[True, True, True, False]], device=dev)
    out = masked_sample_step(
        c,
        tokens,
        is_masked,
        step=0,
        num_steps=2,
        seed=1,
        mask_token_id=9,
        **GREEDY,
        backend=backend,
    )
    # n_raw = floor(4 cos(π/4)) = 2, masked 3 -> n = 2: positions 2 and 1 (lowest log p) re-masked
    assert out.tokens.tolist() == [[0, 9, 9, 2]]
    assert out.is_masked.tolist() == [[False, True, True, False]]
    assert out.sampled.tolist() == [[0, 2, 1, 2]]  # position 2: tie between codes 1 and 2 -> 1
    want = [2 - math.log(math.e**2 + 2), 1 - math.log(2 + math.e), 3 - math.log(1 + 2 * math.e**3)]
    assert out.confidence[0, :3].tolist() == pytest.approx(want, rel=1e-6)
    assert math.isinf(out.confidence[0, 3]) and out.confidence[0, 3] > 0


@pytest.mark.parametrize("backend", FAST)
def test_confidence_ties_remask_lowest_positions_first(backend):
    """Every position has the same row (expanded, stride 0): equal confidences, so the re-masked
    positions are the lowest-indexed masked ones."""
    dev = device_for(backend)
    L, V = 50, 33
    row = torch.randn(V).to(dev)
    is_masked = (torch.rand(2, L, generator=torch.Generator().manual_seed(2)) < 0.8).to(dev)
    tokens = torch.where(is_masked, V, 3)
    out, ref = both_step(
        backend,
        row.expand(2, L, V),
        tokens,
        is_masked,
        step=2,
        num_steps=6,
        seed=1,
        mask_token_id=V,
        **GREEDY,
    )
    assert_same_step(out, ref)
    for b in range(2):
        pos = is_masked[b].nonzero().flatten()
        n = int(out.is_masked[b].sum())
        assert n > 0 and out.is_masked[b].nonzero().flatten().tolist() == pos[:n].tolist()


@pytest.mark.parametrize("backend", ALL)
def test_permuted_rows_tie_exactly_on_every_backend(backend):
    """Issue 18 item 8: greedy steps without noise, every position holding the same logits in a
    different order. Their confidences are mathematically equal and must be equal bit for bit (the
    fixed-point log-sum-exp does not depend on the order of the terms), so every backend re-masks
    the lowest masked positions first -- the same positions as the reference."""
    dev = device_for(backend)
    B, L, V = 2, 24, 257
    g = torch.Generator().manual_seed(11)
    base = torch.randn(V, generator=g) * 4
    perms = torch.stack([torch.randperm(V, generator=g) for _ in range(B * L)])
    cond = base[perms].view(B, L, V)
    unc = torch.randn(V, generator=g)[perms].view(B, L, V)  # guidance: permuted the same way
    is_masked = torch.rand(B, L, generator=g) < 0.8
    tokens = torch.where(is_masked, V, 5)
    kw = dict(step=1, num_steps=5, seed=3, mask_token_id=V, **GREEDY)
    for guided in (False, True):
        gkw = dict(uncond_logits=unc.to(dev), guidance_scale=1.5) if guided else {}
        out = masked_sample_step(cond.to(dev), tokens.to(dev), is_masked.to(dev), backend=backend, **kw, **gkw)
        ref = masked_sample_step(cond, tokens, is_masked, backend="reference", **kw, **gkw)
        assert_same_step(out, ref)
        conf = out.confidence.cpu()[is_masked]
        assert bool((conf == conf[0]).all()), conf.unique()
        for b in range(B):
            pos = is_masked[b].nonzero().flatten()
            n = int(out.is_masked[b].sum())
            assert n > 0 and out.is_masked[b].cpu().nonzero().flatten().tolist() == pos[:n].tolist()


@pytest.mark.parametrize("backend", ALL)
def test_every_step_draws_fresh_noise(backend):
    """Issue 23 item 1: the step is part of the RNG key. Two steps with the same logits and seed
    draw different codes and different confidence noise; the same (seed, step) reproduces exactly."""
    dev = device_for(backend)
    B, L, V = 2, 40, 64
    cond = (torch.randn(B, L, V, generator=torch.Generator().manual_seed(5)) * 0.3).to(dev)  # near flat
    tokens = torch.full((B, L), V, device=dev)
    is_masked = torch.ones(B, L, dtype=torch.bool, device=dev)
    kw = dict(num_steps=8, seed=1234, mask_token_id=V, temperature=1.0, confidence_noise=4.5, backend=backend)
    a = masked_sample_step(cond, tokens, is_masked, step=2, **kw)
    again = masked_sample_step(cond, tokens, is_masked, step=2, **kw)
    for x, y in zip(a, again):
        assert torch.equal(x, y)
    b = masked_sample_step(cond, tokens, is_masked, step=3, **kw)
    # same code by chance: sum_v p_v^2 ~ 1/64 per position; 80 positions
    assert int((a.sampled == b.sampled).sum()) < 20
    # the noise part of the confidence, τ(t)·g': its sign pattern differs between the steps
    lp_a = masked_sample_step(cond, tokens, is_masked, step=2, **{**kw, "confidence_noise": 0.0}).confidence
    lp_b = masked_sample_step(cond, tokens, is_masked, step=3, **{**kw, "confidence_noise": 0.0}).confidence
    assert not torch.equal(torch.sign(a.confidence - lp_a), torch.sign(b.confidence - lp_b))
    # ar_sample: a new position is a new draw, the same position the same one
    x = (torch.randn(80, V, generator=torch.Generator().manual_seed(6)) * 0.3).to(dev)
    t1 = ar_sample(x, seed=9, position=4, backend=backend).tokens
    assert torch.equal(t1, ar_sample(x, seed=9, position=4, backend=backend).tokens)
    assert int((t1 == ar_sample(x, seed=9, position=5, backend=backend).tokens).sum()) < 20


@pytest.mark.parametrize("backend", ALL)
def test_huge_and_numpy_scalar_arguments(backend):
    """Issue 18 item 7: top_k of any size (>= V: no filtering, as None) and numpy integer / real
    scalars are accepted on every backend alike; num_steps >= 2^63 (the step is a 63-bit RNG key
    field) is refused with the same error on every backend."""
    np = pytest.importorskip("numpy")
    dev = device_for(backend)
    cond, unc, tokens, is_masked, mid = make_inputs(2, 9, 31, guided=True, seed=3, device=dev)
    kw = dict(step=1, num_steps=5, seed=7, mask_token_id=mid, uncond_logits=unc, guidance_scale=1.0)
    base = masked_sample_step(cond, tokens, is_masked, backend=backend, **kw)
    for k in (31, 2**63, 2**70):
        for x, y in zip(masked_sample_step(cond, tokens, is_masked, backend=backend, top_k=k, **kw), base):
            assert torch.equal(x, y)
    npkw = dict(
        step=np.int8(1),
        num_steps=np.uint64(5),
        seed=np.uint64(7),
        mask_token_id=np.int32(mid),
        uncond_logits=unc,
        guidance_scale=np.float32(1.0),
        temperature=np.float64(1.0),
        confidence_noise=np.float16(4.5),
        top_k=np.int64(2**62),
    )
    for x, y in zip(masked_sample_step(cond, tokens, is_masked, backend=backend, **npkw), base):
        assert torch.equal(x, y)
    for steps in (2**63, 2**64 + 5):
        with pytest.raises(ValueError, match="'num_steps'"):
            masked_sample_step(cond, tokens, is_masked, backend=backend, **{**kw, "num_steps": steps})
    logits = cond[:, 0]
    ar_base = ar_sample(logits, seed=4, position=3, backend=backend)
    for k in (2**63, np.uint64(2**64 - 1)):
        assert_same_ar(ar_sample(logits, seed=4, position=3, top_k=k, backend=backend), ar_base)
    ar_np = ar_sample(logits, seed=np.uint32(4), position=np.int16(3), temperature=np.float32(1.0), backend=backend)
    assert_same_ar(ar_np, ar_base)


@pytest.mark.parametrize("backend", FAST)
def test_last_step_and_ties_in_confidence(backend):
    """Equal confidences (identical rows, no noise): re-masking takes the lowest positions first."""
    dev = device_for(backend)
    B, L, V = 2, 11, 17
    row = torch.randn(V)
    cond = row.expand(B, L, V).clone().to(dev)
    tokens = torch.full((B, L), V, device=dev)
    is_masked = torch.ones(B, L, dtype=torch.bool, device=dev)
    kw = dict(seed=1, mask_token_id=V, num_steps=3)
    out, ref = both_step(backend, cond, tokens, is_masked, step=0, **GREEDY, **kw)
    assert_same_step(out, ref)
    n = num_to_keep_masked(L, 0, 3)
    assert out.is_masked[0].tolist() == [i < n for i in range(L)]
    out, ref = both_step(backend, cond, tokens, is_masked, step=2, **kw)
    assert_same_step(out, ref)
    assert not out.is_masked.any()


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(
    "B,L,V,guided,temp,top_k,step",
    [
        (3, 64, 333, True, 1.0, None, 0),
        (2, 41, 1000, False, 0.7, None, 5),
        (2, 23, 4099, True, 1.3, None, 1),  # several vocabulary tiles, a ragged last one
        (3, 30, 257, True, 1.0, 17, 3),
        (2, 19, 64, False, 2.5, 1, 8),  # top_k = 1 keeps the max (and its ties) only
    ],
)
def test_sampling_with_noise_matches_reference(backend, B, L, V, guided, temp, top_k, step):
    """Random inputs, sampling and confidence noise on: every output identical."""
    dev = device_for(backend)
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=guided, seed=V, scale=3.0, device=dev)
    ids = torch.randint(0, 2**40, (B,), generator=torch.Generator().manual_seed(L)).to(dev)
    out, ref = both_step(
        backend,
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


@pytest.mark.parametrize("backend", FAST_HEAVY)
def test_sampling_match_rate_many_positions(backend):
    """4096 positions x V = 2048 on near-flat logits (many near-ties in x/T + g): every code equal."""
    dev = device_for(backend)
    B, L, V = 4, 1024, 2048
    g = torch.Generator().manual_seed(9)
    cond = (torch.randn(B, L, V, generator=g) * 0.5).to(dev)
    tokens = torch.full((B, L), V, device=dev)
    is_masked = torch.ones(B, L, dtype=torch.bool, device=dev)
    out, ref = both_step(backend, cond, tokens, is_masked, step=3, num_steps=12, seed=77, mask_token_id=V)
    assert int((out.sampled != ref.sampled).sum()) == 0
    assert_same_step(out, ref)


@pytest.mark.parametrize("backend", FAST_NO_INTERP)
def test_all_schedules_and_last_step(backend):
    B, L, V = 3, 40, 29
    cond, unc, tokens, is_masked, mid = make_inputs(
        B, L, V, guided=True, masked_frac=0.9, seed=3, device=device_for(backend)
    )
    for schedule in ("cosine", "linear", "pow", "sigmoid"):
        for step in (0, 2, 4):
            out, ref = both_step(
                backend,
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


@pytest.mark.parametrize("backend", FAST)
def test_multi_tile_and_bf16(backend):
    """V > Triton's MAX_BLOCK_V (several tiles carried across), bf16 logits and int32 tokens."""
    B, L, V = 1, 3, 4096 + 517
    cond, unc, tokens, is_masked, mid = make_inputs(
        B, L, V, guided=True, masked_frac=1.0, seed=4, device=device_for(backend)
    )
    for dt in (torch.float32, torch.bfloat16):
        out, ref = both_step(
            backend,
            cond.to(dt),
            tokens.int(),
            is_masked,
            step=0,
            num_steps=3,
            seed=8,
            mask_token_id=mid,
            uncond_logits=unc.to(dt),
            guidance_scale=1.0,
        )
        assert_same_step(out, ref)


# ------------------------------------------------------------------ masked step: edge cases


@pytest.mark.parametrize("backend", FAST)
def test_nan_inf_rows_match_reference(backend):
    dev = device_for(backend)
    L, V = 6, 9
    c = special_rows(2, L, V)
    c[1, 0, 2] = c[1, 0, 7] = math.inf  # two +inf: a tie at FLT_MAX
    c[1, 5] = torch.finfo(torch.float32).max  # FLT_MAX / T overflows: clamped
    c = c.to(dev)
    tokens = torch.full((2, L), V, device=dev)
    is_masked = torch.ones(2, L, dtype=torch.bool, device=dev)
    for temp in (0.0, 1.0, 0.3):
        for noise in (0.0, 4.5):
            out, ref = both_step(
                backend,
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
        backend,
        c2.to(dev),
        tokens,
        is_masked,
        step=0,
        num_steps=2,
        seed=4,
        mask_token_id=V,
        uncond_logits=u.to(dev),
        guidance_scale=1.0,
    )
    assert_same_step(out, ref)
    assert out.sampled[0, 0] == 0 and math.isinf(out.confidence[0, 0]) and out.sampled[1, 1] == 3


@pytest.mark.parametrize("backend", FAST)
def test_edge_rows_nan_inf_and_no_masked_positions(backend):
    dev = device_for(backend)
    L, V = 6, 40
    c = special_rows(2, L, V)
    tokens = torch.full((2, L), V)
    is_masked = torch.ones(2, L, dtype=torch.bool)
    is_masked[1] = False  # a row with nothing masked
    tokens[1] = torch.arange(L)
    c, tokens, is_masked = c.to(dev), tokens.to(dev), is_masked.to(dev)
    for temp in (0.0, 1.0, 0.3):
        out, ref = both_step(
            backend, c, tokens, is_masked, step=0, num_steps=2, seed=4, mask_token_id=V, temperature=temp
        )
        assert_same_step(out, ref)
        assert out.sampled[0, 2] == 0 and out.sampled[0, 4] == 0 and out.sampled[0, 3] == 5
        assert torch.equal(out.tokens[1], tokens[1]) and not out.is_masked[1].any()
        assert bool(torch.isposinf(out.confidence[1]).all())


@pytest.mark.parametrize("backend", ALL_NO_INTERP)
def test_neg_inf_codes_never_sampled(backend):
    dev = device_for(backend)
    B, L, V = 4, 256, 40
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(B, L, V, generator=g) * 3
    dead = torch.rand(B, L, V, generator=g) < 0.6
    dead[..., 0] = False
    cond, dead = cond.masked_fill(dead, NEG_INF).to(dev), dead.to(dev)
    tokens = torch.full((B, L), V, device=dev)
    is_masked = torch.ones(B, L, dtype=torch.bool, device=dev)
    for temp in (1.0, 2.5):
        out = masked_sample_step(
            cond, tokens, is_masked, step=0, num_steps=2, seed=11, mask_token_id=V, temperature=temp, backend=backend
        )
        assert not bool(dead.gather(-1, out.sampled[..., None]).any())
        assert bool(torch.isfinite(out.confidence).all())


@pytest.mark.parametrize("backend", ALL)
def test_top_k_at_least_vocab_and_small_shapes(backend):
    dev = device_for(backend)
    B, L, V = 2, 21, 13
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, seed=8, device=dev)
    kw = dict(step=1, num_steps=4, seed=8, mask_token_id=mid, uncond_logits=unc, guidance_scale=0.5, backend=backend)
    base = masked_sample_step(cond, tokens, is_masked, **kw)
    for k in (V, V + 3):
        out = masked_sample_step(cond, tokens, is_masked, top_k=k, **kw)
        for a, b in zip(out, base):
            assert torch.equal(a, b)
    out = masked_sample_step(cond, tokens, is_masked, top_k=V - 1, **kw)
    assert not torch.equal(out.confidence, base.confidence)  # the filter is real below V
    # V = 1, L = 1, and empty batches
    out, ref = both_step(
        backend,
        torch.randn(3, 1, 1, device=dev),
        torch.ones(3, 1, dtype=torch.long, device=dev),
        torch.tensor([[True], [False], [True]], device=dev),
        step=0,
        num_steps=3,
        seed=1,
        mask_token_id=1,
    )
    assert_same_step(out, ref)
    for B, L in ((0, 5), (3, 0)):
        out = masked_sample_step(
            torch.randn(B, L, 7, device=dev),
            torch.zeros(B, L, dtype=torch.long, device=dev),
            torch.ones(B, L, dtype=torch.bool, device=dev),
            step=0,
            num_steps=3,
            seed=1,
            mask_token_id=7,
            backend=backend,
        )
        assert all(t.shape == (B, L) for t in out)


@pytest.mark.parametrize("backend", ALL)
def test_batch_order_sub_batch_and_thread_count(backend):
    dev = device_for(backend)
    B, L, V = 5, 19, 333
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, seed=6, device=dev)
    ids = torch.tensor([10, 3, 7, 42, 2**33], device=dev)
    kw = dict(step=2, num_steps=8, seed=123456789, mask_token_id=mid, guidance_scale=1.5, top_k=200, backend=backend)
    a = masked_sample_step(cond, tokens, is_masked, uncond_logits=unc, sample_ids=ids, **kw)
    b = masked_sample_step(cond, tokens, is_masked, uncond_logits=unc, sample_ids=ids, **kw)
    for x, y in zip(a, b):  # deterministic
        assert torch.equal(x, y)
    perm = torch.tensor([3, 0, 4, 1, 2], device=dev)
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


@pytest.mark.parametrize("backend", [CPU, TRITON])  # the cuda kernels take one logits dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_strided_inputs(backend, dtype):
    dev = device_for(backend)
    B, L, V = 2, 15, 210
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, seed=4, dtype=dtype, device=dev)
    kw = dict(step=0, num_steps=3, seed=4, mask_token_id=mid, guidance_scale=1.0)
    out, ref = both_step(backend, cond, tokens.int(), is_masked, uncond_logits=unc, **kw)
    assert out.tokens.dtype == torch.int64
    assert_same_step(out, ref)
    # mixed dtypes (uncond fp32), and non-contiguous views: a V-slice and a transposed layout
    out, ref = both_step(backend, cond, tokens, is_masked, uncond_logits=unc.float(), **kw)
    assert_same_step(out, ref)
    big = torch.randn(B, V + 5, L).to(dtype).to(dev).transpose(1, 2)[..., 3 : 3 + V]
    assert not big.is_contiguous() and big.stride(-1) != 1
    out, ref = both_step(backend, big, tokens, is_masked, uncond_logits=unc[:, :, :], **kw)
    assert_same_step(out, ref)
    sl = torch.randn(B, L, V + 9).to(dtype).to(dev)[..., 4 : 4 + V]  # last dim contiguous, row stride V + 9
    out, ref = both_step(backend, sl, tokens, is_masked, uncond_logits=unc, **kw)
    assert_same_step(out, ref)


@pytest.mark.parametrize("backend", FAST)
def test_outputs_fully_written(backend):
    """Outputs are allocated inside the backend (torch.empty, so garbage if unwritten): two calls give
    identical, fully defined results (no NaN confidence, codes in range)."""
    prev = None
    cond, unc, tokens, is_masked, mid = make_inputs(3, 7, 31, seed=6, device=device_for(backend))
    for _ in range(2):
        a = masked_sample_step(cond, tokens, is_masked, step=0, num_steps=3, seed=2, mask_token_id=mid, backend=backend)
        assert not torch.isnan(a.confidence).any()
        assert bool(((a.sampled >= 0) & (a.sampled <= mid)).all())
        assert bool(((a.tokens >= 0) & (a.tokens <= mid)).all())
        if prev is not None:
            for x, y in zip(a, prev):
                assert torch.equal(x, y)
        prev = a


@pytest.mark.parametrize("backend", [TRITON, CUDA_GPU, CUDA_EMU])
def test_long_rows_use_torch_selection(backend, monkeypatch):
    """Rows longer than the re-mask kernel's limit take the reference's ranking (MAX_L patched to 8)."""
    monkeypatch.setattr(MASKED_SAMPLE_STEP.kernels(backend), "MAX_L", 8)
    cond, unc, tokens, is_masked, mid = make_inputs(2, 21, 50, seed=2, device=device_for(backend))
    out, ref = both_step(backend, cond, tokens, is_masked, step=1, num_steps=5, seed=5, mask_token_id=mid)
    assert_same_step(out, ref)


# ------------------------------------------------------------------ masked step: distribution


@pytest.mark.parametrize("backend", ALL_HEAVY)
@pytest.mark.parametrize("top_k", [None, 5])
def test_masked_step_chi2(backend, top_k):
    """Codes drawn at 40000 positions sharing one logit row, temperature 0.7, match
    softmax(logits / 0.7) (renormalised over the top-k codes when filtered; the others never
    appear). χ² rejects at p < 1e-4: false-failure rate 1e-4 for a fresh seed."""
    dev = device_for(backend)
    V, temp = 12, 0.7
    row = torch.linspace(-2.0, 1.5, V)[torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    B, L = 8, 5000
    out = masked_sample_step(
        row.to(dev).expand(B, L, V),
        torch.full((B, L), V, device=dev),
        torch.ones(B, L, dtype=torch.bool, device=dev),
        step=0,
        num_steps=12,
        seed=2024,
        mask_token_id=V,
        temperature=temp,
        top_k=top_k,
        backend=backend,
    )
    z = row.double() / temp
    if top_k is not None:
        z = torch.where(row >= row.topk(top_k).values[-1], z, -math.inf)
    assert chi2_pvalue(out.sampled.cpu(), torch.softmax(z, 0)) > 1e-4


@pytest.mark.parametrize("backend", FAST)
def test_neg_inf_never_sampled_and_chi2(backend):
    """All L·B positions share one distribution: code frequencies vs softmax(x / T) (χ², p > 1e-4:
    false-failure rate 1e-4 per fresh seed); -inf codes never drawn."""
    dev = device_for(backend)
    B, L, V, T = 4, 250, 12, 0.8
    x = torch.randn(V) * 1.5
    x[3] = NEG_INF
    x[7] = -9.0  # a rare code
    cond = x.expand(B, L, V).contiguous().to(dev)
    tokens = torch.full((B, L), V, device=dev)
    is_masked = torch.ones(B, L, dtype=torch.bool, device=dev)
    out = masked_sample_step(
        cond, tokens, is_masked, step=0, num_steps=2, seed=77, mask_token_id=V, temperature=T, backend=backend
    )
    assert not bool((out.sampled == 3).any())
    p = torch.softmax(x.double() / T, 0)
    keep = p * B * L >= 5
    probs = torch.where(keep, p, 0.0)
    samples = out.sampled.cpu().flatten()
    samples = samples[keep[samples]]
    assert chi2_pvalue(samples, probs / probs.sum()) > 1e-4


TAIL_CASES = [("reference", None, 2), ("reference", 13, 2)] + [
    pytest.param(b.values[0], None, 4, marks=b.marks) for b in FAST_HEAVY
]


@pytest.mark.parametrize("backend,bits,B", TAIL_CASES)
def test_tail_mass(monkeypatch, backend, bits, B):
    """Rare codes keep their probability mass. V = 2048: four common codes (logits 0 … −1.5) and
    2044 rare ones (logits spread over [−11, −8.5], each p < 1e-4, together ≈ 6.5% of the mass).
    Over B·2048 draws their total frequency must be within 5 sigma of their total mass (binomial;
    false-failure rate ~6e-7). The reference with its fixed-point softmax cut to 13 fraction bits
    (each code's weight truncated to a multiple of 2^-13 of the top code's: the codes more than
    13 ln 2 ≈ 9 below it vanish, a truncated tail) must fail, showing the test can fail.

    Reach: this catches tails cut above ≈ e^-11 of the top code (e.g. a sampler keeping ≤ 16 bits
    of probability, or fp16/bf16 probabilities). The real sampler's cut, 2^-40 ≈ e^-27.7 of the
    top code (rng.sum_bits), and its 64-bit draws are pinned in tests/test_rng.py instead.
    """
    if bits is not None:
        from unif2ace.kernels.reference import rng

        monkeypatch.setattr(rng, "sum_bits", lambda V: bits)
    dev = device_for(backend)
    V = 2048
    row = torch.empty(V)
    row[:4] = torch.tensor([0.0, -0.5, -1.0, -1.5])
    row[4:] = torch.linspace(-11.0, -8.5, V - 4)
    probs = torch.softmax(row.double(), 0)
    assert float(probs[4:].max()) < 1e-4
    mass = float(probs[4:].sum())
    L = 2048
    out = masked_sample_step(
        row.to(dev).expand(B, L, V),
        torch.full((B, L), V, device=dev),
        torch.ones(B, L, dtype=torch.bool, device=dev),
        step=0,
        num_steps=10,
        seed=31337,
        mask_token_id=V,
        backend=backend,
    )
    n = B * L
    rare = int((out.sampled >= 4).sum())
    sigma = math.sqrt(n * mass * (1 - mass))
    ok = abs(rare - n * mass) < 5 * sigma
    if bits is None:
        assert ok, (rare, n * mass, sigma)
    else:
        assert not ok, (rare, n * mass, sigma)


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
    dict(top_k=50, temperature=0.8),
    dict(top_p=0.5, temperature=1.3),
    dict(top_k=5000),
    dict(top_p=1.0, temperature=0.5),
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kw", AR_CASES, ids=[str(k) for k in AR_CASES])
def test_ar_matches_reference(backend, kw):
    dev = device_for(backend)
    B, V = 24, 3001
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(B, V, generator=g) * 3
    logits[1, 100:110] = logits[1, 99]  # ties
    ids = torch.randint(0, 2**40, (B,), generator=g)
    pos = torch.randint(0, 2**32, (B,), generator=g)
    pos[2] = 2**32 - 1
    logits, ids, pos = logits.to(dev), ids.to(dev), pos.to(dev)
    out = ar_sample(logits, seed=99, position=pos, sample_ids=ids, backend=backend, **kw)
    ref = ar_sample(logits, seed=99, position=pos, sample_ids=ids, backend="reference", **kw)
    assert_same_ar(out, ref)
    out = ar_sample(logits, seed=2**63 + 1, position=17, backend=backend, **kw)
    ref = ar_sample(logits, seed=2**63 + 1, position=17, backend="reference", **kw)
    assert_same_ar(out, ref)


@pytest.mark.parametrize("backend", [TRITON_GPU, CUDA_GPU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, None, None), (0.8, 50, 0.9)])
def test_ar_large_vocab_matches_reference(backend, dtype, temperature, top_k, top_p):
    x = (torch.randn(64, 32000) * 3).to(dtype).to(device_for(backend))
    kw = dict(seed=3, position=9, temperature=temperature, top_k=top_k, top_p=top_p)
    assert_same_ar(ar_sample(x, backend=backend, **kw), ar_sample(x, backend="reference", **kw))


@pytest.mark.parametrize("backend", [TRITON])
@pytest.mark.parametrize("segments", [2, 3])
def test_ar_rows_split_across_programs(backend, segments, monkeypatch):
    """Triton splits a row of a large vocabulary across programs (segments of whole tiles; on a GPU
    when B rows alone would not fill it): the same tokens and logprobs, bit for bit, however the
    row is split -- the fixed-point sums are exact (issue 16 item 5)."""
    from unif2ace.kernels.triton import sampling as triton_sampling

    monkeypatch.setattr(triton_sampling, "FORCE_AR_SEGMENTS", segments)
    x = torch.randn(3, 9000, generator=torch.Generator().manual_seed(3)) * 2
    x[1, :5000] = NEG_INF  # a segment with nothing finite
    x = x.to(device_for(backend))
    for kw in (dict(), dict(temperature=0.7), dict(top_k=50), dict(top_p=0.9, temperature=0.8), dict(temperature=0.0)):
        out = ar_sample(x, seed=3, position=5, backend=backend, **kw)
        assert_same_ar(out, ar_sample(x, seed=3, position=5, backend="reference", **kw))


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_ar_tokens_without_logprobs(backend):
    """``return_logprobs=False`` (text decoding): logprobs is None and the tokens are the
    reference's, bit for bit, in every sampling mode -- the cpu kernel then skips the exact row
    sum except where the draw itself needs it (unfiltered at temperature 1). fp32 rows read in
    place, rows that need sanitising (NaN, +inf, nothing finite), bf16; V large enough for the
    k-th-largest search's candidate list."""
    x = torch.randn(6, 9000, generator=torch.Generator().manual_seed(11)) * 2
    x[1] = NEG_INF
    x[2, ::7] = float("nan")
    x[3, 100] = float("inf")
    x[4, :4000] = x[4, :4000] - 30.0  # far below the max: their fixed-point exponentials are 0
    modes = (
        dict(temperature=0.0),
        dict(),
        dict(temperature=0.7),
        dict(top_k=50),
        dict(top_k=50, top_p=0.9, temperature=0.8),
        dict(top_p=0.9),
        dict(top_p=0.5, temperature=1.3),
    )
    for dt in (torch.float32, torch.bfloat16):
        xd = x.to(dt).to(device_for(backend))
        for kw in modes:
            out = ar_sample(xd, seed=21, position=4, return_logprobs=False, backend=backend, **kw)
            ref = ar_sample(xd, seed=21, position=4, backend="reference", **kw)
            assert out.logprobs is None, kw
            assert torch.equal(out.tokens.cpu(), ref.tokens), (dt, kw)
    with pytest.raises(TypeError, match="'return_logprobs' must be a bool, got int"):
        ar_sample(x, seed=1, position=0, return_logprobs=1, backend="cpu")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("top_p", [0.5, 0.95, 0.999])
def test_ar_top_p_large_nucleus_matches_reference(backend, top_p):
    """Flat logits: the nucleus holds thousands of codes (the C++ kernel brackets its boundary by
    mass passes and sorts only the codes near it); fp16 and bf16 logits too."""
    B, V = 8, 6000
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(1)) * 0.5
    logits[0, :100] = 4.0  # a 100-way tie at the top
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dt).to(device_for(backend))
        out = ar_sample(x, seed=5, position=3, top_p=top_p, temperature=0.9, backend=backend)
        ref = ar_sample(x, seed=5, position=3, top_p=top_p, temperature=0.9, backend="reference")
        assert_same_ar(out, ref)


@pytest.mark.parametrize("backend", FAST_HEAVY)
@pytest.mark.parametrize("temperature,kth_at", [(1.0, 2.0), (3.0, 3.5), (0.3, 1.5), (7.5, 7.75)])
def test_ar_top_k_rounding_ties_match_reference(backend, temperature, kth_at):
    """Top-k at a large vocabulary (the C++ kernel picks the candidates from its list of the codes
    near the top instead of a pass over the row): codes whose logits sit a few floats below the k-th
    largest tie with it once divided by the temperature (x / T rounds them to the same fp32 value;
    the k-th largest is placed where that happens), so they are candidates too -- the same tokens
    and logprobs as the reference, bit for bit."""
    B, V, k = 16, 32000, 50
    g = torch.Generator().manual_seed(7)
    t = torch.tensor(temperature)  # x / t: the reference's IEEE fp32 division
    down, up = torch.tensor(-math.inf), torch.tensor(math.inf)
    x = torch.randn(B, V, generator=g) * 3
    ties = 0
    for b in range(B):
        v = torch.tensor(kth_at * (1 + 0.02 * b / B))  # the k-th largest logit of the row ...
        for _ in range(1000):  # ... moved up to where the float below it ties with it after x / t
            if temperature == 1.0 or torch.nextafter(v, down) / t == v / t:
                break
            v = torch.nextafter(v, up)
        codes = torch.randperm(V, generator=g)
        x[b] = torch.minimum(x[b], v - 1)
        x[b, codes[: k - 1]] = v + 0.5 + torch.rand(k - 1, generator=g) * 3  # the k - 1 above
        x[b, codes[k - 1]] = v
        below = v
        for j in codes[k : k + 6].tolist():  # six codes, each one float lower
            below = torch.nextafter(below, down)
            x[b, j] = below
            ties += bool(below / t == v / t)
    assert (ties > 0) == (temperature != 1.0)  # the case under test occurs
    x = x.to(device_for(backend))
    for seed in (1, 2, 3):
        kw = dict(seed=seed, position=11, temperature=temperature, top_k=k)
        assert_same_ar(ar_sample(x, backend=backend, **kw), ar_sample(x, backend="reference", **kw))
        kw["top_p"] = 0.9
        assert_same_ar(ar_sample(x, backend=backend, **kw), ar_sample(x, backend="reference", **kw))


@pytest.mark.parametrize("backend", FAST_HEAVY)
def test_ar_top_k_when_the_sampled_chunks_mislead(backend):
    """The C++ k-th-largest search first guesses its threshold from every 8th 64-code chunk's
    maximum; rows where exactly those chunks hold the largest values make the guess too high
    (fewer than k chunks reach it), and the exact selection over every chunk must take over -- the
    same tokens and logprobs as the reference."""
    B, V, k = 4, 64 * 400, 40
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, V, generator=g)
    chunks = x.view(B, 400, 64)
    chunks[:, ::8, 5] = 50 + torch.rand(B, 50, generator=g) * 0.5  # the sampled chunks hold the top 50
    x = x.to(device_for(backend))
    for kw in (dict(temperature=1.0, top_k=k), dict(temperature=0.7, top_k=k, top_p=0.8)):
        for seed in (1, 2):
            out = ar_sample(x, seed=seed, position=4, backend=backend, **kw)
            assert_same_ar(out, ar_sample(x, seed=seed, position=4, backend="reference", **kw))


def _groups_by_value(z: torch.Tensor):
    """The distinct values of a 1-D fp32 row (descending), the reference's top-p mass strictly above
    each (fp64) and each value's own mass, with p = the fp32 softmax of the row."""
    p = torch.softmax(z, 0).double()
    vals, inv = torch.unique(z, return_inverse=True)
    mass = torch.zeros(len(vals), dtype=torch.float64).scatter_add_(0, inv, p).flip(0)
    return vals.flip(0), torch.cumsum(mass, 0) - mass, mass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ar_top_p_boundary_matches_reference(dtype):
    """top_p placed just above and just below the mass above a tie group (the group is then kept
    whole, or dropped whole, while the cumulative mass crosses top_p inside it), at several depths of
    the nucleus, with and without top-k, at two temperatures; and rows whose tail is many codes of
    p < 2^-29 with top_p so close to 1 that the boundary lies among them (the C++ kernel's sorted
    fallback). 16 copies of each row: a boundary one group off changes the kept mass, so the draws.
    Margins are 2e-5 or more: the C++ top-p uses its own fp32 softmax (see the module docstring)."""
    B, V = 16, 1000
    g = torch.Generator().manual_seed(11)
    row = torch.randn(V, generator=g) * 2
    row[100:130] = 3.0  # a 30-way tie with a sizeable share of the mass
    row[7] = row[8] = row.max() + 0.5  # a tie at the top
    tail = torch.full((V,), -30.0)
    tail[:8] = torch.randn(8, generator=g)
    tail[8:] = -21.0 - torch.rand(V - 8, generator=g)  # p ~ 1e-10 each, ~1e-7 in all
    t07 = torch.tensor(0.7, dtype=torch.float32)
    for temp in (1.0, 0.7):
        x = row.to(dtype)
        z = x.float() if temp == 1.0 else x.float() / t07
        vals, above, mass = _groups_by_value(z)
        big = [int(i) for i in torch.nonzero((mass >= 1e-3) & (above < 0.98)).flatten()]
        picks = sorted(set(big[:: max(1, len(big) // 3)] + [int(torch.nonzero(vals == z[100]).flatten()[0])]))
        for gi in picks:
            s, m = float(above[gi]), float(mass[gi])
            for top_p in (s + 0.02 * m, s + 0.5 * m, s + 0.98 * m, s - 0.02 * float(mass[max(gi - 1, 0)])):
                if not 0.0 < top_p < 1.0:
                    continue
                for top_k in (None, 300) if top_p == s + 0.5 * m else (None,):
                    kw = dict(seed=7, position=gi, temperature=temp, top_p=top_p, top_k=top_k)
                    xb = x.expand(B, V)
                    assert_same_ar(ar_sample(xb, backend="cpu", **kw), ar_sample(xb, backend="reference", **kw))
        xt = tail.to(dtype).expand(B, V)
        tail_mass = float(torch.softmax(tail.to(dtype).float(), 0)[8:].double().sum())
        for top_p in (1.0 - 0.5 * tail_mass, 1.0 - 1e-12, 1.0 - 2 * tail_mass):
            kw = dict(seed=9, position=1, temperature=temp, top_p=top_p)
            assert_same_ar(ar_sample(xt, backend="cpu", **kw), ar_sample(xt, backend="reference", **kw))


@pytest.mark.parametrize("backend", ALL)
def test_ar_nan_and_neg_inf_rows(backend):
    dev = device_for(backend)
    V = 20
    logits = torch.randn(5, V)
    logits[0] = float("nan")
    logits[1] = NEG_INF
    logits[2, :15] = float("nan")
    logits[3, 4] = math.inf
    logits[4, 7] = logits[4, 9] = math.inf  # tie at FLT_MAX
    logits = logits.to(dev)
    for kw in (dict(), dict(temperature=0.0), dict(top_k=3, top_p=0.5, temperature=0.5), dict(temperature=1e-30)):
        out = ar_sample(logits, seed=1, position=0, backend=backend, **kw)
        assert_same_ar(out, ar_sample(logits, seed=1, position=0, backend="reference", **kw))
        assert out.tokens[:2].tolist() == [0, 0] and bool(torch.isneginf(out.logprobs[:2]).all())
        assert int(out.tokens[2]) >= 15 and math.isfinite(out.logprobs[2])
        assert int(out.tokens[3]) == 4 and float(out.logprobs[3]) == 0.0
    out = ar_sample(torch.randn(0, 5, device=dev), seed=1, position=0, backend=backend)
    assert out.tokens.shape == (0,) and out.logprobs.shape == (0,)


@pytest.mark.parametrize("backend", ALL_HEAVY)
def test_ar_neg_inf_never_sampled(backend):
    dev = device_for(backend)
    B, V = 4000, 25
    x = torch.randn(B, V) * 2
    dead = torch.rand(B, V) < 0.7
    dead[:, 3] = False
    x, dead = x.masked_fill(dead, NEG_INF).to(dev), dead.to(dev)
    for kw in (dict(), dict(temperature=3.0, top_p=0.99), dict(top_k=20)):
        out = ar_sample(x, seed=6, position=2, backend=backend, **kw)
        assert not bool(dead.gather(-1, out.tokens[:, None]).any())


@pytest.mark.parametrize("backend", FAST)
def test_ar_edge_rows_and_bf16(backend):
    dev = device_for(backend)
    V = 300
    x = torch.randn(4, V)
    x[0] = float("nan")
    x[1] = NEG_INF
    x[2, ::3] = float("nan")
    x[3, 17] = math.inf
    x = x.to(dev)
    for temp in (0.0, 1.0):
        a = ar_sample(x, seed=1, position=3, temperature=temp, backend=backend)
        b = ar_sample(x, seed=1, position=3, temperature=temp, backend="reference")
        assert torch.equal(a.tokens, b.tokens)
        assert a.tokens[:2].tolist() == [0, 0] and bool(torch.isneginf(a.logprobs[:2]).all())
        assert int(a.tokens[2]) % 3 != 0 and int(a.tokens[3]) == 17
    xb = (torch.randn(3, V) * 2).to(torch.bfloat16).to(dev)
    a = ar_sample(xb, seed=2, position=0, top_k=40, backend=backend)
    b = ar_sample(xb, seed=2, position=0, top_k=40, backend="reference")
    assert_same_ar(a, b)


def independent_top_p_set(row: torch.Tensor, temp: float, top_p: float):
    z = (row.float() / torch.tensor(temp, dtype=torch.float32)).double()
    p = torch.softmax(z, 0)
    keep = set()
    for v in range(row.numel()):
        s = sum(float(p[u]) for u in range(row.numel()) if z[u] > z[v])
        if s < top_p:
            keep.add(v)
    return keep


@pytest.mark.parametrize("backend", ALL_HEAVY)
def test_ar_top_p_support_and_distribution(backend):
    """Draws lie exactly on {v : mass of strictly likelier codes < top_p} (computed here by brute
    force) and follow the renormalised tempered distribution (χ², p < 1e-4 rejection); tied codes
    are kept or dropped together."""
    dev = device_for(backend)
    V, temp, top_p = 40, 0.8, 0.7
    row = torch.randn(V, generator=torch.Generator().manual_seed(6)) * 1.5
    allowed = independent_top_p_set(row, temp, top_p)
    assert 2 < len(allowed) < V
    B = 20000
    out = ar_sample(row.to(dev).expand(B, V), seed=99, position=4, temperature=temp, top_p=top_p, backend=backend)
    assert set(out.tokens.unique().tolist()) == allowed
    z = row.double() / temp
    mask = torch.tensor([v in allowed for v in range(V)])
    probs = torch.softmax(torch.where(mask, z, -math.inf), 0)
    assert chi2_pvalue(out.tokens.cpu(), probs) > 1e-4
    row2 = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])
    p2 = torch.softmax(row2, 0)
    tp = float(p2[0]) + 0.01  # just above the top code's mass: the three tied codes all survive
    out2 = ar_sample(row2.to(dev).expand(4000, 5), seed=3, position=1, top_p=tp, backend=backend)
    assert set(out2.tokens.unique().tolist()) == {0, 1, 2, 3}
    out3 = ar_sample(row2.to(dev).expand(2000, 5), seed=3, position=1, top_p=float(p2[0]) * 0.999, backend=backend)
    assert set(out3.tokens.unique().tolist()) == {0}


@pytest.mark.parametrize("backend", ALL_HEAVY)
def test_ar_chi2_temperature(backend):
    """20000 draws from one row at temperature 1.3 match softmax(row / 1.3); χ² rejects at
    p < 1e-4 (false-failure rate 1e-4 for a fresh seed)."""
    V, temp = 10, 1.3
    row = torch.randn(V, generator=torch.Generator().manual_seed(8))
    x = row.to(device_for(backend)).expand(20000, V)
    out = ar_sample(x, seed=4242, position=17, temperature=temp, backend=backend)
    assert chi2_pvalue(out.tokens.cpu(), torch.softmax(row.double() / temp, 0)) > 1e-4


@pytest.mark.parametrize("backend", ALL_NO_INTERP)
def test_ar_top_k_support(backend):
    """top_k = 7 with a tie at the 7th/8th value: exactly those 8 codes are drawn (all of them,
    over 3000 draws: each has p > 4%, so a miss has probability < 1e-50)."""
    V = 50
    row = torch.randn(V, generator=torch.Generator().manual_seed(4))
    order = row.argsort(descending=True)
    row[order[7]] = row[order[6]]
    out = ar_sample(
        row.to(device_for(backend)).expand(3000, V), seed=77, position=0, temperature=1.5, top_k=7, backend=backend
    )
    assert set(out.tokens.unique().tolist()) == set(order[:8].tolist())


@pytest.mark.parametrize("backend", ALL)
def test_ar_position_keys_and_batch_order(backend):
    dev = device_for(backend)
    B, V = 64, 300
    logits = torch.randn(B, V, device=dev)
    a = ar_sample(logits, seed=1, position=5, backend=backend)
    b = ar_sample(logits, seed=1, position=torch.full((B,), 5, device=dev), backend=backend)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, ar_sample(logits, seed=1, position=6, backend=backend).tokens)
    ids = torch.randperm(1000)[:B].to(dev)
    perm = torch.randperm(B).to(dev)
    pos = torch.randint(0, 100, (B,)).to(dev)
    for kw in (dict(), dict(top_p=0.9)):
        d = ar_sample(logits, seed=2, position=pos, sample_ids=ids, backend=backend, **kw)
        e = ar_sample(logits[perm], seed=2, position=pos[perm], sample_ids=ids[perm], backend=backend, **kw)
        assert torch.equal(d.tokens[perm], e.tokens) and torch.equal(d.logprobs[perm], e.logprobs)


# ------------------------------------------------------------------ cpu backend only


@pytest.mark.skipif(not _ext.cpu_status()[0], reason="C++ extension missing")
def test_cpu_is_the_default_backend_on_cpu_tensors():
    cond, _, tokens, is_masked, mid = make_inputs(2, 9, 31, seed=2)
    kw = dict(step=0, num_steps=3, seed=3, mask_token_id=mid)
    a = masked_sample_step(cond, tokens, is_masked, **kw)
    b = masked_sample_step(cond, tokens, is_masked, backend="cpu", **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.skipif(not _ext.cpu_status()[0], reason="C++ extension missing")
def test_bad_inputs_name_the_argument():
    ops = _ext.cpu_ops()
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
        ops.masked_sample_step(cond, None, tokens.int(), is_masked, torch.arange(2), 0, 0, 0, 0, 0.0, 1.0, 0.0, 0, 1, 7)
    with pytest.raises(RuntimeError, match="position must be int64"):
        ops.ar_sample(cond[0], torch.arange(5), torch.zeros(4, dtype=torch.long), 0, 0, 1.0, 0, 1.0, True)
    with pytest.raises(RuntimeError, match="seed_lo"):
        ops.ar_sample(cond[0], torch.arange(5), torch.zeros(5, dtype=torch.long), 2**32, 0, 1.0, 0, 1.0, True)


# ------------------------------------------------------------------ cuda backend only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [8192, 1001])
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.7, 50)])
@pytest.mark.parametrize("backend,L", cuda_emu.cuda_backends(256) + cuda_emu.cuda_backends(5000)[:1])
def test_masked_step_cuda_matches_reference(backend, dtype, V, temperature, top_k, L):
    """GPU-sized steps (L = 5000 > MAX_L takes the reference's ranking after kernel A; on the card only)."""
    dev = device_for(backend)
    cond, unc, tokens, is_masked, _ = make_inputs(2, L, V, masked_frac=0.8, guided=True, dtype=dtype, device=dev)
    out, ref = both_step(
        "cuda",
        cond,
        tokens,
        is_masked,
        step=3,
        num_steps=18,
        seed=2**63 + 1,
        mask_token_id=V,
        uncond_logits=unc,
        guidance_scale=1.75,
        temperature=temperature,
        top_k=top_k,
    )
    assert_same_step(out, ref)


@pytest.mark.parametrize("backend", [CUDA_GPU, CUDA_EMU])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_vector_and_scalar_rows(backend, dtype):
    """The kernels read a row 4-wide when V % 4 == 0 and the row starts 4-element aligned, else
    element by element: both paths, rows shifted off alignment, all three logits dtypes."""
    dev = device_for(backend)
    B, L = 2, 9
    for V, shift in ((208, 0), (208, 1), (210, 0), (212, 2)):
        wide = (torch.randn(B, L, V + 8) * 2).to(dtype).to(dev)
        cond, unc = wide[..., shift : shift + V], (torch.randn(B, L, V) * 2).to(dtype).to(dev)
        _, _, tokens, is_masked, _ = make_inputs(B, L, V, seed=V + shift, device=dev)
        kw = dict(step=1, num_steps=4, seed=8, mask_token_id=V, uncond_logits=unc, guidance_scale=0.5)
        for temperature in (0.0, 1.0):
            assert_same_step(*both_step(backend, cond, tokens, is_masked, temperature=temperature, **kw))
        x = wide[0, :, shift : shift + V]
        for temperature in (0.0, 0.9):
            akw = dict(seed=5, position=3, temperature=temperature)
            assert_same_ar(ar_sample(x, backend=backend, **akw), ar_sample(x, backend="reference", **akw))


@pytest.mark.parametrize("backend", [CUDA_GPU, CUDA_EMU])
def test_cuda_raw_ops_check_what_they_index(backend):
    """The raw ops index every tensor with the shapes the others imply: a direct call with a short
    or misplaced tensor is an error, never an out-of-bounds read (is_masked and sample_ids were
    not size-checked, nor any device but the logits')."""
    dev = device_for(backend)
    elsewhere = torch.device("meta") if dev.type == "cpu" else torch.device("cpu")  # not the kernels' device
    ops = _ext.cuda_ops()
    B, L, V = 2, 3, 7
    cond = torch.randn(B * L, V, device=dev)
    tok = torch.zeros(B, L, dtype=torch.long, device=dev)
    m = torch.ones(B, L, dtype=torch.bool, device=dev)
    sid = torch.arange(B, device=dev)
    args = (cond, None, tok, m, sid, None, 1.0, 0.0, 1.0, 0.0, False, False, 1, 2, 2**32 - 1, 0)  # keys: scalars
    ops.masked_step_sample(*args)

    def bad(i, v, match):
        a = list(args)
        a[i] = v
        with pytest.raises(RuntimeError, match=match):
            ops.masked_step_sample(*a)

    bad(3, m[:, :2], "'is_masked' must have 6 elements")
    bad(3, torch.ones(L, B, dtype=torch.bool, device=dev), "'is_masked' must be \\[B, L\\]")
    bad(3, m.to(elsewhere), "'is_masked' must be on")
    bad(4, sid[:1], "'sample_ids' must have 2 elements")
    bad(4, sid.to(elsewhere), "'sample_ids' must be on")
    bad(14, 2**32, "32-bit words")
    bad(13, -1, "32-bit words")
    bad(2, tok[:, :2], "'tokens' must have 6 elements")
    bad(2, tok.float(), "'tokens' must be int32 or int64")
    bad(0, cond.to(elsewhere), "'cond' must be a CUDA")
    bad(0, cond.t(), "'cond' must have unit column stride")
    bad(1, torch.randn(B * L, V + 1, device=dev), "'unc' must match 'cond'")
    bad(5, torch.zeros(5, device=dev), "'thr' must have 6 elements")
    conf = torch.zeros(B, L, device=dev)
    ops.masked_step_remask(conf, m, tok, tok, 1, False, V)
    with pytest.raises(RuntimeError, match="'sampled' must have 6 elements"):
        ops.masked_step_remask(conf, m, tok, tok[:1], 1, False, V)
    with pytest.raises(RuntimeError, match="'is_masked' must be on"):
        ops.masked_step_remask(conf, m.to(elsewhere), tok, tok, 1, False, V)
    with pytest.raises(RuntimeError, match="'tokens' must be on"):
        ops.masked_step_remask(conf, m, tok.to(elsewhere), tok, 1, False, V)
    x, pos = torch.randn(B, V, device=dev), torch.zeros(B, dtype=torch.long, device=dev)
    ops.ar_sample(x, sid, pos, None, 1.0, False, 3, 4)
    with pytest.raises(RuntimeError, match="'position' must have 2 elements"):
        ops.ar_sample(x, sid, pos[:1], None, 1.0, False, 3, 4)
    with pytest.raises(RuntimeError, match="'position' must be int64"):
        ops.ar_sample(x, sid, pos.int(), None, 1.0, False, 3, 4)
    with pytest.raises(RuntimeError, match="'thr' must be on"):
        ops.ar_sample(x, sid, pos, torch.zeros(B, device=elsewhere), 1.0, False, 3, 4)
    with pytest.raises(RuntimeError, match="32-bit words"):
        ops.ar_sample(x, sid, pos, None, 1.0, False, 3, 2**32)


# ------------------------------------------------------------------ the custom ops


@pytest.mark.parametrize("backend", FAST)
def test_custom_op_opcheck(backend):
    """The custom ops' schemas / fake impls are consistent (torch.compile of the fast backends is
    not exercised on CPU; opcheck runs the fake-tensor and schema checks instead)."""
    cond, unc, tokens, is_masked, mid = make_inputs(1, 4, 20, guided=True, seed=1, device=device_for(backend))
    torch.library.opcheck(
        custom_ops.masked_sample_step_op,
        (cond, tokens, is_masked, unc, None, 0, 3, 5, 1, mid, 1.0, 1.0, 4.5, "cosine", 2.0, None, backend),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        custom_ops.ar_sample_op,
        (cond[0], None, 3, None, 5, 0, 1.0, 3, 0.9, False, backend),
        test_utils=("test_schema", "test_faketensor"),
    )
