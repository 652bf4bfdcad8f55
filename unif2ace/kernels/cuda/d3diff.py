"""cuda backend of ``d3diff_loss_from_logits``: the row kernels of csrc/cuda/d3diff.cu (a warp or a
CTA per row, 128-bit loads; ``torch.ops.unif2ace_cuda.lse_gather`` / ``lse_gather_backward``, from
the extension ``unif2ace._C_cuda``). Every V is covered: no fall-back.

Entry points as :mod:`unif2ace.kernels.cpu.d3diff`. The kernels return the plain ``lse``; it is
passed on as the statistics ``(row_max = lse, lse_rel = 0, tgt)`` (a valid shift, without the
accuracy at large offsets the split gives the other backends) until the kernels return the split.
"""

from __future__ import annotations

import torch

from .. import _ext

__all__ = ["lse_gather", "lse_gather_backward"]


def lse_gather(logits, target, ignore_index):
    lse, tgt = _ext.cuda_ops().lse_gather(logits, target, ignore_index)
    return lse, torch.zeros_like(lse), tgt


def lse_gather_backward(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index):
    return _ext.cuda_ops().lse_gather_backward(logits, target, row_max + lse_rel, grad_lse, grad_tgt, ignore_index)
