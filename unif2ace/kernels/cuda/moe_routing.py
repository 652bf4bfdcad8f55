"""cuda backend of ``moe_expert_histogram`` and ``moe_align``: host glue of csrc/cuda/moe_routing.cu
(``torch.ops.unif2ace_cuda``). The single-CTA scan of the align kernel handles at most
``CUDA_ALIGN_MAX_EXPERTS`` experts; more run the reference here. Arguments and results are those of
``moe_expert_histogram_ref`` / ``moe_align_ref``."""

from __future__ import annotations

from .. import _ext
from ..reference.moe_routing import moe_align_ref

CUDA_ALIGN_MAX_EXPERTS = 1024  # csrc/cuda/moe_routing.cuh kAlignMaxExperts


def moe_expert_histogram(expert_ids, num_experts):
    return _ext.cuda_ops().moe_expert_histogram(expert_ids, num_experts)


def moe_align(expert_ids, num_experts, block_size):
    if num_experts > CUDA_ALIGN_MAX_EXPERTS:
        return moe_align_ref(expert_ids, num_experts, block_size)
    return tuple(_ext.cuda_ops().moe_align(expert_ids, num_experts, block_size))
