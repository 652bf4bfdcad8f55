"""The fused-head D3Diff reference (stem ``d3diff_head``): the from-logits oracle applied to the
fp32 logits ``hidden @ weight.T + bias``."""

import torch

from unif2ace.kernels import d3diff_loss
from unif2ace.kernels.reference.d3diff import d3diff_loss_from_logits_ref
from unif2ace.kernels.reference.d3diff_head import d3diff_loss_ref
from unif2ace.testing import assert_close, randn


def test_fused_reference_equals_logits_reference():
    N, D, V = 29, 16, 23
    h, w, b = randn(N, D), randn(V, D), randn(V)
    target = torch.randint(0, V, (N,))
    si = torch.randint(0, 2, (N,))
    kw = dict(sample_index=si, mask_rate=torch.tensor([0.3, 0.7]), mask_rate_deriv=torch.tensor([1.0, 0.5]))
    o = d3diff_loss(h, w, target, bias=b, backend="reference", **kw)
    want = d3diff_loss_from_logits_ref(h @ w.T + b, target, **kw)
    for a, e in zip(o, want):
        assert_close(a, e)
    o2 = d3diff_loss_ref(h.bfloat16(), w.bfloat16(), target, **kw)  # low precision upcast to fp32
    assert o2.loss.dtype == torch.float32
