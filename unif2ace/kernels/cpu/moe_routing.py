"""cpu backend of ``moe_expert_histogram`` and ``moe_align``: host glue of csrc/cpu/moe_routing.cpp
(``torch.ops.unif2ace_cpu``; chunked counting sort, deterministic across thread counts).

Arguments and results are those of ``moe_expert_histogram_ref`` / ``moe_align_ref``."""

from __future__ import annotations

from .. import _ext


def moe_expert_histogram(expert_ids, num_experts):
    return _ext.cpu_ops().moe_expert_histogram(expert_ids, num_experts)


def moe_align(expert_ids, num_experts, block_size):
    return tuple(_ext.cpu_ops().moe_align(expert_ids, num_experts, block_size))
