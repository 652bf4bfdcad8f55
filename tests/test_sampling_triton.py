"""Triton backend of the sampling ops (``masked_sample_step``, ``ar_sample``) on CPU tensors under
the Triton interpreter, against the reference (unif2ace/kernels/reference/sampling.py).

Token choices are compared exactly: the kernels' fp32 Gumbel agrees with the reference's
float64-then-rounded value to ~1e-6 absolute (test_gumbel_fp32_matches_reference), so a token could
only differ on a near-tie of x/T + g (probability ~1e-6 per position; none with these seeds).
Confidences / logprobs differ by the online sum-exp's rounding: fp32 tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch

from unif2ace.kernels import ar_sample, masked_sample_step
from unif2ace.kernels import sampling as S
from unif2ace.kernels._dispatch import triton_interpreter_enabled
from unif2ace.kernels.reference import rng
from unif2ace.testing import assert_close, chi2_pvalue

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_enabled()), reason="needs a GPU or TRITON_INTERPRET=1"
)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEG_INF = float("-inf")


def make_inputs(B, L, V, *, masked_frac=0.7, seed=0, guided=False):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(B, L, V, generator=g) * 2
    unc = torch.randn(B, L, V, generator=g) * 2 if guided else None
    is_masked = torch.rand(B, L, generator=g) < masked_frac
    tokens = torch.where(is_masked, V, torch.randint(0, V, (B, L), generator=g))
    mv = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return mv(cond), mv(unc), mv(tokens), mv(is_masked), V


def both(fn, *args, **kw):
    return fn(*args, backend="triton", **kw), fn(*args, backend="reference", **kw)


def check_same(a, b, conf_name="confidence"):
    for f in ("tokens", "is_masked", "sampled"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert_close(a.confidence, b.confidence, name=conf_name)


def test_gumbel_fp32_matches_reference():
    g = torch.Generator().manual_seed(1)
    hi = torch.randint(0, 2**32, (50000,), generator=g, dtype=torch.int64)
    lo = torch.randint(0, 2**32, (50000,), generator=g, dtype=torch.int64)
    ext = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 2, 12345], dtype=torch.int64)
    hi = torch.cat([hi, ext, ext]).to(DEV)
    lo = torch.cat([lo, ext, ext.flip(0)]).to(DEV)
    from unif2ace.kernels.triton import sampling as TS

    got = TS.gumbel_from_words(hi, lo).cpu()
    want = rng.gumbel_from_words(hi.cpu(), lo.cpu())
    err = (got - want).abs()
    assert float(err.max()) <= 2e-6, float(err.max())
    assert float((err / want.abs().clamp(min=1.0)).max()) <= 4 * torch.finfo(torch.float32).eps
    assert float(got[-14]) == pytest.approx(rng.GUMBEL_MAX, rel=1e-6)  # hi = lo = 0: the far tail


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_masked_step_matches_reference(guided, temperature):
    B, L, V = 3, 13, 333
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=guided, seed=int(temperature * 10))
    a, b = both(
        masked_sample_step,
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
        sample_ids=torch.tensor([9, 2**40, 3], device=DEV),
    )
    check_same(a, b)


@pytest.mark.parametrize("top_k", [1, 7, 332, 333, 500])
def test_masked_step_top_k(top_k):
    B, L, V = 2, 9, 333
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, seed=top_k)
    cond[0, 0, :20] = cond[0, 0, 20]  # ties at the threshold are all kept
    a, b = both(
        masked_sample_step,
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
    check_same(a, b)


def test_masked_step_multi_tile_and_bf16():
    """V > BLOCK_V (several tiles carried across), bf16 logits and int32 tokens."""
    from unif2ace.kernels.triton import sampling as TS

    B, L, V = 1, 3, TS.MAX_BLOCK_V + 517
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, masked_frac=1.0, seed=4)
    for dt in (torch.float32, torch.bfloat16):
        a, b = both(
            masked_sample_step,
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
        check_same(a, b)


def test_edge_rows_nan_inf_and_no_masked_positions():
    L, V = 6, 40
    c = torch.randn(2, L, V)
    c[0, 1, ::2] = float("nan")
    c[0, 2] = float("nan")
    c[0, 4] = NEG_INF
    c[0, 3, 5] = math.inf
    tokens = torch.full((2, L), V)
    is_masked = torch.ones(2, L, dtype=torch.bool)
    is_masked[1] = False  # a row with nothing masked
    tokens[1] = torch.arange(L)
    c, tokens, is_masked = c.to(DEV), tokens.to(DEV), is_masked.to(DEV)
    for temp in (0.0, 1.0, 0.3):
        a, b = both(
            masked_sample_step, c, tokens, is_masked, step=0, num_steps=2, seed=4, mask_token_id=V, temperature=temp
        )
        check_same(a, b)
        assert a.sampled[0, 2] == 0 and a.sampled[0, 4] == 0 and a.sampled[0, 3] == 5
        assert torch.equal(a.tokens[1], tokens[1]) and not a.is_masked[1].any()
        assert bool(torch.isposinf(a.confidence[1]).all())


def test_last_step_and_ties_in_confidence():
    """Equal confidences (identical rows, no noise): re-masking takes the lowest positions first."""
    B, L, V = 2, 11, 17
    row = torch.randn(V)
    cond = row.expand(B, L, V).clone().to(DEV)
    tokens = torch.full((B, L), V, device=DEV)
    is_masked = torch.ones(B, L, dtype=torch.bool, device=DEV)
    a, b = both(
        masked_sample_step,
        cond,
        tokens,
        is_masked,
        step=0,
        num_steps=3,
        seed=1,
        mask_token_id=V,
        temperature=0.0,
        confidence_noise=0.0,
    )
    check_same(a, b)
    n = S.num_to_keep_masked(L, 0, 3)
    assert a.is_masked[0].tolist() == [i < n for i in range(L)]
    a, b = both(masked_sample_step, cond, tokens, is_masked, step=2, num_steps=3, seed=1, mask_token_id=V)
    check_same(a, b)
    assert not a.is_masked.any()


def test_long_rows_use_torch_selection(monkeypatch):
    from unif2ace.kernels.triton import sampling as TS

    monkeypatch.setattr(TS, "MAX_L", 8)
    cond, unc, tokens, is_masked, mid = make_inputs(2, 21, 50, seed=2)
    a, b = both(masked_sample_step, cond, tokens, is_masked, step=1, num_steps=5, seed=5, mask_token_id=mid)
    check_same(a, b)


def test_outputs_fully_written():
    """Outputs are allocated inside the backend (torch.empty, so garbage if unwritten): two calls give
    identical, fully defined results (no NaN confidence, codes in range)."""
    prev = None
    cond, unc, tokens, is_masked, mid = make_inputs(3, 7, 31, seed=6)
    for _ in range(2):
        a = masked_sample_step(
            cond, tokens, is_masked, step=0, num_steps=3, seed=2, mask_token_id=mid, backend="triton"
        )
        assert not torch.isnan(a.confidence).any()
        assert bool(((a.sampled >= 0) & (a.sampled <= mid)).all())
        assert bool(((a.tokens >= 0) & (a.tokens <= mid)).all())
        if prev is not None:
            for x, y in zip(a, prev):
                assert torch.equal(x, y)
        prev = a


def test_neg_inf_never_sampled_and_chi2():
    """All L·B positions share one distribution: code frequencies vs softmax(x / T) (χ², p > 1e-4:
    false-failure rate 1e-4 per fresh seed); -inf codes never drawn."""
    B, L, V, T = 4, 250, 12, 0.8
    x = torch.randn(V) * 1.5
    x[3] = NEG_INF
    x[7] = -9.0  # a rare code
    cond = x.expand(B, L, V).contiguous().to(DEV)
    tokens = torch.full((B, L), V, device=DEV)
    is_masked = torch.ones(B, L, dtype=torch.bool, device=DEV)
    out = masked_sample_step(
        cond, tokens, is_masked, step=0, num_steps=2, seed=77, mask_token_id=V, temperature=T, backend="triton"
    )
    assert not bool((out.sampled == 3).any())
    p = torch.softmax(x.double() / T, 0)
    keep = p * B * L >= 5
    probs = torch.where(keep, p, 0.0)
    samples = out.sampled.cpu().flatten()
    samples = samples[keep[samples]]
    assert chi2_pvalue(samples, probs / probs.sum()) > 1e-4


def test_batch_reordering():
    cond, unc, tokens, is_masked, mid = make_inputs(4, 9, 45, guided=True, seed=9)
    ids = torch.tensor([10, 3, 7, 42], device=DEV)
    kw = dict(step=1, num_steps=6, seed=123, mask_token_id=mid, guidance_scale=1.5, top_k=20, backend="triton")
    a = masked_sample_step(cond, tokens, is_masked, uncond_logits=unc, sample_ids=ids, **kw)
    perm = torch.tensor([2, 0, 3, 1], device=DEV)
    c = masked_sample_step(
        cond[perm], tokens[perm], is_masked[perm], uncond_logits=unc[perm], sample_ids=ids[perm], **kw
    )
    for x, y in zip(a, c):
        assert torch.equal(x[perm], y)


# ------------------------------------------------------------------ autoregressive


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [
        (0.0, None, None),
        (1.0, None, None),
        (0.8, 50, None),
        (0.8, 50, 0.9),
        (1.3, None, 0.5),
        (1.0, 1, None),
        (1.0, 5000, None),
        (0.5, None, 1.0),
    ],
)
def test_ar_matches_reference(temperature, top_k, top_p):
    B, V = 5, 777
    x = (torch.randn(B, V) * 3).to(DEV)
    x[1, 100:110] = x[1, 99]  # ties
    pos = torch.tensor([0, 5, 2**32 - 1, 7, 7], device=DEV)
    a = ar_sample(x, seed=11, position=pos, temperature=temperature, top_k=top_k, top_p=top_p, backend="triton")
    b = ar_sample(x, seed=11, position=pos, temperature=temperature, top_k=top_k, top_p=top_p, backend="reference")
    assert torch.equal(a.tokens, b.tokens)
    assert_close(a.logprobs, b.logprobs, name="logprobs")


def test_ar_edge_rows_and_bf16():
    V = 300
    x = torch.randn(4, V)
    x[0] = float("nan")
    x[1] = NEG_INF
    x[2, ::3] = float("nan")
    x[3, 17] = math.inf
    x = x.to(DEV)
    for temp in (0.0, 1.0):
        a = ar_sample(x, seed=1, position=3, temperature=temp, backend="triton")
        b = ar_sample(x, seed=1, position=3, temperature=temp, backend="reference")
        assert torch.equal(a.tokens, b.tokens)
        assert a.tokens[:2].tolist() == [0, 0] and bool(torch.isneginf(a.logprobs[:2]).all())
        assert int(a.tokens[2]) % 3 != 0 and int(a.tokens[3]) == 17
    xb = (torch.randn(3, V) * 2).to(torch.bfloat16).to(DEV)
    a = ar_sample(xb, seed=2, position=0, top_k=40, backend="triton")
    b = ar_sample(xb, seed=2, position=0, top_k=40, backend="reference")
    assert torch.equal(a.tokens, b.tokens)
    assert_close(a.logprobs, b.logprobs, name="logprobs")


def test_custom_op_opcheck():
    """The custom ops' schemas / fake impls are consistent (torch.compile of the triton backend is not
    possible on CPU; opcheck runs the fake-tensor and schema checks instead)."""
    cond, unc, tokens, is_masked, mid = make_inputs(1, 4, 20, guided=True, seed=1)
    torch.library.opcheck(
        S._masked_sample_step_op,
        (cond, tokens, is_masked, unc, None, 0, 3, 5, 1, mid, 1.0, 1.0, 4.5, "cosine", 2.0, None, "triton"),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        S._ar_sample_op,
        (cond[0], None, 3, None, 5, 0, 1.0, 3, 0.9, "triton"),
        test_utils=("test_schema", "test_faketensor"),
    )
