"""cpu backend of ``moe_expert_mlp``: host glue of csrc/cpu/moe_mlp.cpp (``torch.ops.unif2ace_cpu``;
counting sort of the slots by expert, per-expert oneDNN GEMMs -- on bf16 operands where the machine
has bf16 matrix instructions, see :func:`unif2ace.kernels.cpu.lowp_gemm` -- and vectorised
activations).

Arguments and results are those of ``moe_expert_mlp_ref`` / ``moe_expert_mlp_backward_ref``
(positional, the op schemas in the .cpp; a missing bias gradient is None), except that the forward
also returns the pre-activations it computed (``saved_h``, see :func:`saved_h_meta`), which the
backward takes as an optional last argument instead of recomputing them."""

from __future__ import annotations

from typing import Tuple

import torch

from .. import _ext
from . import lowp_gemm


def gemm_dtype(w1: torch.Tensor, w2: torch.Tensor) -> torch.dtype:
    """The dtype of the kernel's GEMM operands (``gemm_dtype`` in the .cpp): the weights' bf16 / fp16
    when both share it and the machine runs GEMMs on it, else fp32."""
    return w1.dtype if w2.dtype == w1.dtype and lowp_gemm(w1.dtype)[0] else torch.float32


def saved_h_meta(x, w1, w2, expert_ids) -> Tuple[Tuple[int, int], torch.dtype]:
    """Shape and dtype of the forward's ``saved_h``: ``[T*k, F1]`` in :func:`gemm_dtype`."""
    return (expert_ids.shape[0] * expert_ids.shape[1], w1.shape[2]), gemm_dtype(w1, w2)


def moe_expert_mlp(*args):
    """``(out [T, D] in x's dtype, saved_h)``; out as ``moe_expert_mlp_ref``."""
    return tuple(_ext.cpu_ops().moe_expert_mlp(*args))


def moe_expert_mlp_backward(*args):
    """``(dx, dw1, dw2, dgates, db1, db2)``, as ``moe_expert_mlp_backward_ref``; an optional last
    argument ``saved_h`` (the forward's) spares recomputing the pre-activations."""
    return tuple(_ext.cpu_ops().moe_expert_mlp_backward(*args))
