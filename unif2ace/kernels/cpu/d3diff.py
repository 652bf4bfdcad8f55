"""cpu backend of ``d3diff_loss_from_logits``: the C++ row kernels of csrc/cpu/d3diff.cpp
(``torch.ops.unif2ace_cpu.lse_gather`` / ``lse_gather_backward``).

Entry points of the op record (see :data:`unif2ace.kernels.d3diff.OP_FROM_LOGITS`):

- ``lse_gather(logits [N, V], target [N] int64, ignore_index) -> (row_max, lse_rel, tgt)``, fp32 ``[N]``
  (:class:`~unif2ace.kernels._custom_ops.d3diff.RowStats`)
- ``lse_gather_backward(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index) -> grad_logits``
"""

from __future__ import annotations

from .. import _ext

__all__ = ["lse_gather", "lse_gather_backward"]


def lse_gather(logits, target, ignore_index):
    return _ext.cpu_ops().lse_gather(logits, target, ignore_index)


def lse_gather_backward(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index):
    return _ext.cpu_ops().lse_gather_backward(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index)
