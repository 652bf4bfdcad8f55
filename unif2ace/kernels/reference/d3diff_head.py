"""Reference D3Diff loss fused with the LM head (docs/model.md §2): the logits ``hidden @ weight.T +
bias`` in fp32, then the from-logits oracle :func:`~unif2ace.kernels.reference.d3diff.d3diff_loss_from_logits_ref`
(explicit SEDD score-vector form). Materialises the ``[N, V]`` logits, which the fast backends never do.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .d3diff import D3DiffRefOutput, d3diff_loss_from_logits_ref

__all__ = ["d3diff_loss_ref"]


def d3diff_loss_ref(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    **kwargs,
) -> D3DiffRefOutput:
    """D3Diff loss fused with the LM head, reference: logits = hidden @ weight.T + bias in fp32.

    hidden ``[N, D]`` (or ``[B, L, D]``), weight ``[V, D]``, bias ``[V]`` or None, one float dtype;
    every other argument and the result as :func:`d3diff_loss_from_logits_ref`. Materialises the
    ``[N, V]`` fp32 logits (the fast backends do not). Rows whose target is ``ignore_index`` are
    never read (NaN/inf there reach neither the loss nor any gradient, dW and dbias included).
    """
    ignore_index = kwargs.get("ignore_index", -100)
    h = hidden.float()
    valid = (target != ignore_index).reshape(h.shape[:-1] + (1,))
    h = torch.where(valid, h, torch.zeros((), dtype=h.dtype, device=h.device))
    logits = F.linear(h, weight.float(), None if bias is None else bias.float())
    return d3diff_loss_from_logits_ref(logits, target, **kwargs)
