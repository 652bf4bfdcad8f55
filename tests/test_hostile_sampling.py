"""Hostile inputs for the sampling ops (issue 18): NaN / ±inf / huge offsets, empty and degenerate
shapes, non-contiguous layouts, low-precision dtypes and extreme temperatures, every backend that
runs here (``cpu``, ``triton`` under the interpreter, ``cuda`` through the CPU emulator and on a
card) against the reference -- bit for bit, as the NaN / inf contract of docs/kernels.md §C says --
and the custom ops under ``torch.compile(fullgraph=True)`` with non-contiguous inputs, fake and
real output strides compared.

Shapes are small: the interpreter and the emulator run ~1 ms per program.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_sampling import ALL, CPU, FAST, assert_same_ar, assert_same_step, device_for

from unif2ace.kernels import ar_sample, masked_sample_step
from unif2ace.kernels._custom_ops import sampling as custom_ops

FLT_MAX = torch.finfo(torch.float32).max
NAN, INF = float("nan"), float("inf")


def hostile_rows(n: int, V: int, seed: int) -> torch.Tensor:
    """``n`` rows of V logits, one kind of hostility per row (cycling): random logits with NaN
    sprinkled, all NaN, all -inf, +inf ties, FLT_MAX and -FLT_MAX, a huge common offset, a single
    finite value, denormals, ±1e30 mixtures."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V, generator=g) * 3
    for r in range(n):
        kind = r % 10
        if kind == 0:
            x[r, torch.rand(V, generator=g) < 0.3] = NAN
        elif kind == 1:
            x[r] = NAN
        elif kind == 2:
            x[r] = -INF
        elif kind == 3:
            x[r, :: max(1, V // 3)] = INF  # several +inf: a tie at FLT_MAX
        elif kind == 4:
            x[r, 0], x[r, -1] = FLT_MAX, -FLT_MAX
        elif kind == 5:
            x[r] += 1e30  # huge offset: every value the same fp32 number
        elif kind == 6:
            x[r] = -INF
            x[r, V // 2] = -5.0  # one finite value
        elif kind == 7:
            x[r] = torch.randn(V, generator=g) * 1e-40  # denormals
        elif kind == 8:
            x[r, ::2] = 1e30
            x[r, 1::2] = -1e30
        else:
            x[r] += 1e6  # large offset, distinct values
    return x


STEP_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.0, confidence_noise=0.0),
    dict(temperature=0.3, top_k=3),
    dict(temperature=1e-30),  # every finite score overflows: clamped to ±FLT_MAX or -inf
    dict(temperature=5.0, guidance=1.5),
    dict(temperature=1.0, guidance=-0.5, top_k=1),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kw", STEP_CASES, ids=[str(k) for k in STEP_CASES])
def test_masked_step_hostile_logits(backend, kw):
    dev = device_for(backend)
    B, L, V = 2, 5, 7  # the 10 kinds of row once each
    cond = hostile_rows(B * L, V, seed=1).view(B, L, V)
    unc = hostile_rows(B * L, V, seed=2).view(B, L, V).flip(1)  # hostility of another kind per row
    is_masked = torch.rand(B, L, generator=torch.Generator().manual_seed(3)) < 0.85
    tokens = torch.where(is_masked, V, 2)
    kw = dict(kw)
    s = kw.pop("guidance", 0.0)
    step_kw = dict(step=1, num_steps=4, seed=5, mask_token_id=V, uncond_logits=unc.to(dev), guidance_scale=s, **kw)
    out = masked_sample_step(cond.to(dev), tokens.to(dev), is_masked.to(dev), backend=backend, **step_kw)
    ref = masked_sample_step(cond, tokens, is_masked, backend="reference", **{**step_kw, "uncond_logits": unc})
    assert_same_step(out, ref)
    assert not torch.isnan(out.confidence).any()
    assert bool(((out.sampled >= 0) & (out.sampled <= V)).all())


AR_CASES = [
    dict(),
    dict(temperature=0.0),
    dict(temperature=1e-30),
    dict(temperature=3.0, top_k=2),
    dict(temperature=0.7, top_p=0.5),
    dict(temperature=0.9, top_k=4, top_p=0.8),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("kw", AR_CASES, ids=[str(k) for k in AR_CASES])
def test_ar_hostile_logits(backend, kw):
    dev = device_for(backend)
    x = hostile_rows(10, 9, seed=4)
    out = ar_sample(x.to(dev), seed=6, position=3, backend=backend, **kw)
    ref = ar_sample(x, seed=6, position=3, backend="reference", **kw)
    assert_same_ar(out, ref)
    assert not torch.isnan(out.logprobs).any()
    assert out.tokens[1:3].tolist() == [0, 0] and bool(torch.isneginf(out.logprobs[1:3]).all())


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_overflowing_guidance(backend, dtype):
    """bf16 / fp16 logits at their extremes: the guidance combine is fp32 (fp16 max 65504 times 1 + s
    stays finite; bf16 max overflows fp32 to inf, then FLT_MAX), ±inf and NaN of the dtype."""
    dev = device_for(backend)
    B, L, V = 1, 6, 5
    big = torch.finfo(dtype).max
    cond = torch.tensor([[big, -big, 1.0, INF, NAN]] * L, dtype=torch.float32).view(B, L, V)
    cond[0, 1] = cond[0, 1].flip(0)
    cond[0, 2] = torch.tensor([-INF, -INF, NAN, -INF, NAN])
    unc = (-cond).nan_to_num(nan=1.0)
    cond, unc = cond.to(dtype), unc.to(dtype)
    tokens = torch.full((B, L), V)
    is_masked = torch.ones(B, L, dtype=torch.bool)
    for s in (0.0, 2.0):
        kw = dict(step=0, num_steps=3, seed=9, mask_token_id=V, uncond_logits=unc, guidance_scale=s)
        out = masked_sample_step(
            cond.to(dev), tokens.to(dev), is_masked.to(dev), backend=backend, **{**kw, "uncond_logits": unc.to(dev)}
        )
        assert_same_step(out, masked_sample_step(cond, tokens, is_masked, backend="reference", **kw))


@pytest.mark.parametrize("backend", ALL)
def test_degenerate_shapes(backend):
    dev = device_for(backend)
    kw = dict(step=0, num_steps=2, seed=1, mask_token_id=3, backend=backend)
    for B, L, V in ((0, 4, 3), (3, 0, 3), (1, 1, 1), (2, 3, 1), (1, 1, 2)):
        cond = torch.randn(B, L, V).to(dev)
        tokens = torch.zeros(B, L, dtype=torch.long, device=dev)
        is_masked = torch.ones(B, L, dtype=torch.bool, device=dev)
        out = masked_sample_step(cond, tokens, is_masked, **kw)
        assert all(t.shape == (B, L) for t in out)
        if B * L:
            ref = masked_sample_step(cond.cpu(), tokens.cpu(), is_masked.cpu(), **{**kw, "backend": "reference"})
            assert_same_step(out, ref)
    for B, V in ((0, 5), (1, 1), (3, 1), (2, 2)):
        x = torch.randn(B, V).to(dev)
        out = ar_sample(x, seed=1, position=0, backend=backend)
        assert out.tokens.shape == (B,)
        assert_same_ar(out, ar_sample(x.cpu(), seed=1, position=0, backend="reference"))
    with pytest.raises(ValueError, match="'cond_logits'"):
        masked_sample_step(torch.randn(1, 2, 0, device=dev), tokens[:1, :2], is_masked[:1, :2], **kw)
    with pytest.raises(ValueError, match="'logits'"):
        ar_sample(torch.randn(2, 0, device=dev), seed=1, position=0, backend=backend)


def _layouts(B, L, V, seed, backend):
    """Non-contiguous [B, L, V] views of random logits: transposed, stride-0 expanded, and (but
    under Triton's slow interpreter) vocabulary-sliced, batch-strided, L-transposed."""
    g = torch.Generator().manual_seed(seed)
    yield "transposed", torch.randn(B, V, L, generator=g).transpose(1, 2)
    yield "expanded", torch.randn(1, 1, V, generator=g).expand(B, L, V)
    if backend == "triton" and not torch.cuda.is_available():
        return
    yield "v-slice", torch.randn(B, L, V + 6, generator=g)[..., 3 : 3 + V]
    yield "batch-strided", torch.randn(2 * B, L, V, generator=g)[::2]
    yield "l-transposed", torch.randn(L, B, V, generator=g).transpose(0, 1)


@pytest.mark.parametrize("backend", FAST)
def test_non_contiguous_layouts(backend):
    dev = device_for(backend)
    B, L, V = 2, 5, 13
    is_masked = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.8
    tokens_t = torch.where(is_masked, V, 1).t().contiguous().t()  # non-contiguous tokens too
    for (_, cond), (_, unc) in zip(_layouts(B, L, V, 1, backend), _layouts(B, L, V, 2, backend)):
        kw = dict(step=0, num_steps=3, seed=4, mask_token_id=V, uncond_logits=unc, guidance_scale=1.25)
        out = masked_sample_step(
            cond.to(dev), tokens_t.to(dev), is_masked.to(dev), backend=backend, **{**kw, "uncond_logits": unc.to(dev)}
        )
        assert_same_step(out, masked_sample_step(cond, tokens_t, is_masked, backend="reference", **kw))
        x = cond[:, 0]
        assert_same_ar(
            ar_sample(x.to(dev), seed=2, position=1, top_k=4, backend=backend),
            ar_sample(x, seed=2, position=1, top_k=4, backend="reference"),
        )


# ------------------------------------------------------------------ the custom ops: fake vs real


def _step_args(cond, tokens, is_masked, unc, backend):
    return (cond, tokens, is_masked, unc, None, 1, 4, 5, 0, 13, 1.5, 0.7, 4.5, "cosine", 2.0, 3, backend)


def _fake_strides(fn, *args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return [t.stride() for t in fn(*fake_args)]


@pytest.mark.parametrize("backend", FAST)
def test_custom_op_fake_strides_match_real(backend):
    """For every non-contiguous layout the fake implementations promise the strides the kernels
    return (a mismatch crashes a compiled graph with ``expected size ..., stride ...``)."""
    dev = device_for(backend)
    B, L, V = 2, 5, 13
    is_masked = (torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.8).to(dev)
    tokens = torch.where(is_masked, V, 1).t().contiguous().t()
    for (_, cond), (_, unc) in zip(_layouts(B, L, V, 1, backend), _layouts(B, L, V, 2, backend)):
        cond, unc = cond.to(dev), unc.to(dev)
        args = _step_args(cond, tokens, is_masked, unc, backend)
        real = custom_ops.masked_sample_step_op(*args)
        assert [t.stride() for t in real] == _fake_strides(custom_ops.masked_sample_step_op, *args)
        ar_args = (cond[:, 0], None, 3, None, 5, 0, 0.9, 4, 0.8, True, backend)
        real = custom_ops.ar_sample_op(*ar_args)
        assert [t.stride() for t in real] == _fake_strides(custom_ops.ar_sample_op, *ar_args)


@pytest.mark.parametrize("backend", [CPU])
def test_compiled_fullgraph_non_contiguous(backend):
    """Both ops in one ``torch.compile(fullgraph=True)`` graph, fed transposed / sliced logits: the
    compiled results equal the eager ones (one graph: compiling costs ~20 s)."""

    def both(cond, tokens, is_masked, unc, x):
        step = masked_sample_step(
            cond, tokens, is_masked, step=1, num_steps=4, seed=5, mask_token_id=13, uncond_logits=unc,
            guidance_scale=1.5, top_k=3, backend=backend,
        )  # fmt: skip
        ar = ar_sample(x, seed=2, position=1, temperature=0.8, top_p=0.9, backend=backend)
        return step.tokens, step.confidence, step.is_masked, ar.tokens, ar.logprobs

    B, L, V = 2, 5, 13
    g = torch.Generator().manual_seed(7)
    cond = torch.randn(B, V, L, generator=g).transpose(1, 2)
    unc = torch.randn(B, L, V + 4, generator=g)[..., 2 : 2 + V]
    x = torch.randn(V, 3, generator=g).t()
    is_masked = torch.rand(B, L, generator=g) < 0.8
    tokens = torch.where(is_masked, V, 1)
    torch._dynamo.reset()
    got = torch.compile(both, fullgraph=True)(cond, tokens, is_masked, unc, x)
    for a, b in zip(got, both(cond, tokens, is_masked, unc, x)):
        assert torch.equal(a, b) and a.stride() == b.stride()
    assert math.isfinite(float(got[4].min()))
