"""cuda backend of ``d3diff_loss_from_logits``: the row kernels of csrc/cuda/d3diff.cu (a warp or a
CTA per row, 128-bit loads; ``torch.ops.unif2ace_cuda.lse_gather`` / ``lse_gather_backward``, from
the extension ``unif2ace._C_cuda``). Every V is covered: no fall-back.

Entry points as :mod:`unif2ace.kernels.cpu.d3diff`.
"""

from __future__ import annotations

from .. import _ext

__all__ = ["lse_gather", "lse_gather_backward"]


def lse_gather(logits, target, ignore_index):
    return _ext.cuda_ops().lse_gather(logits, target, ignore_index)


def lse_gather_backward(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index):
    return _ext.cuda_ops().lse_gather_backward(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index)
