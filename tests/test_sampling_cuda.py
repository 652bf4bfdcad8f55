"""CUDA backend of the sampling ops (csrc/cuda/sampling.cu) against the reference: exact tokens
(the CUDA kernels evaluate the reference's float64 Gumbel), fp32-tolerance confidences. GPU only."""

from __future__ import annotations

import math

import pytest
import torch

from unif2ace.kernels import ar_sample, masked_sample_step
from unif2ace.testing import assert_close

pytestmark = pytest.mark.gpu


def _inputs(B, L, V, dtype, guided, seed):
    g = torch.Generator().manual_seed(seed)
    cond = (torch.randn(B, L, V, generator=g) * 2).to(dtype).cuda()
    unc = (torch.randn(B, L, V, generator=g) * 2).to(dtype).cuda() if guided else None
    is_masked = (torch.rand(B, L, generator=g) < 0.8).cuda()
    tokens = torch.where(is_masked, V, torch.randint(0, V, (B, L), generator=g).cuda())
    return cond, unc, tokens, is_masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [8192, 1001])
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.7, 50)])
@pytest.mark.parametrize("L", [256, 5000])
def test_masked_step_cuda_matches_reference(dtype, V, temperature, top_k, L):
    cond, unc, tokens, is_masked = _inputs(2, L, V, dtype, True, 0)
    kw = dict(
        step=3,
        num_steps=18,
        seed=2**63 + 1,
        mask_token_id=V,
        uncond_logits=unc,
        guidance_scale=1.75,
        temperature=temperature,
        top_k=top_k,
    )
    a = masked_sample_step(cond, tokens, is_masked, backend="cuda", **kw)
    b = masked_sample_step(cond, tokens, is_masked, backend="reference", **kw)
    for f in ("tokens", "is_masked", "sampled"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert_close(a.confidence, b.confidence, name="confidence")


def test_masked_step_cuda_edge_rows():
    L, V = 6, 40
    c = torch.randn(1, L, V)
    c[0, 2] = float("nan")
    c[0, 4] = float("-inf")
    c[0, 3, 5] = math.inf
    c = c.cuda()
    tokens = torch.full((1, L), V, device="cuda")
    m = torch.ones(1, L, dtype=torch.bool, device="cuda")
    for temp in (0.0, 1.0):
        a = masked_sample_step(
            c, tokens, m, step=0, num_steps=2, seed=4, mask_token_id=V, temperature=temp, backend="cuda"
        )
        b = masked_sample_step(
            c, tokens, m, step=0, num_steps=2, seed=4, mask_token_id=V, temperature=temp, backend="reference"
        )
        assert torch.equal(a.sampled, b.sampled) and torch.equal(a.is_masked, b.is_masked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, None, None), (0.8, 50, 0.9)])
def test_ar_cuda_matches_reference(dtype, temperature, top_k, top_p):
    x = (torch.randn(64, 32000) * 3).to(dtype).cuda()
    a = ar_sample(x, seed=3, position=9, temperature=temperature, top_k=top_k, top_p=top_p, backend="cuda")
    b = ar_sample(x, seed=3, position=9, temperature=temperature, top_k=top_k, top_p=top_p, backend="reference")
    assert torch.equal(a.tokens, b.tokens)
    assert_close(a.logprobs, b.logprobs, name="logprobs")
