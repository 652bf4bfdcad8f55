"""cuda backend of ``moe_gating``: host glue of csrc/cuda/moe_gating.cu (``torch.ops.unif2ace_cuda``).

The warp-per-token kernel holds a group's scores in registers (at most
``CUDA_GATING_MAX_GROUP_EXPERTS`` experts per group) and passes the group table by value (at most
``CUDA_GATING_MAX_GROUPS`` groups); larger cases run the reference here. Arguments and results are
those of ``moe_gating_ref`` / ``moe_gating_backward_ref`` (positional)."""

from __future__ import annotations

from typing import Sequence

from .. import _ext
from ..reference.moe_gating import moe_gating_backward_ref, moe_gating_ref

CUDA_GATING_MAX_GROUP_EXPERTS = 128  # csrc/cuda/moe_gating.cuh kMaxGroupExperts (one warp, 4 columns per lane)
CUDA_GATING_MAX_GROUPS = 255  # csrc/cuda/moe_gating.cuh kMaxGroups (group table passed by value)


def gating_fits(group_sizes: Sequence[int]) -> bool:
    """Whether the CUDA kernel covers these groups (else the reference runs)."""
    return len(group_sizes) <= CUDA_GATING_MAX_GROUPS and max(group_sizes) <= CUDA_GATING_MAX_GROUP_EXPERTS


def moe_gating(router_logits, group_ids, group_sizes, *args):
    """``(expert_ids, gates, expert_fraction, expert_prob, balance_loss)``, as ``moe_gating_ref``."""
    if not gating_fits(group_sizes):
        return moe_gating_ref(router_logits, group_ids, group_sizes, *args)
    return tuple(_ext.cuda_ops().moe_gating(router_logits, group_ids, group_sizes, *args))


def moe_gating_backward(grad_gates, grad_prob, grad_loss, router_logits, group_ids, group_sizes, *args):
    """d router_logits, as ``moe_gating_backward_ref``."""
    grads = (grad_gates, grad_prob, grad_loss, router_logits, group_ids, group_sizes)
    if not gating_fits(group_sizes):
        return moe_gating_backward_ref(*grads, *args)
    return _ext.cuda_ops().moe_gating_backward(*grads, *args)
