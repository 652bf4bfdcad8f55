"""Reference (oracle) of the grouped MoE routing metadata, in plain PyTorch: the expert histogram
and ``moe_align`` (the vLLM/SGLang ``moe_align_block_size`` contract).

These functions define the semantics every fast backend is tested against. No input validation
happens here: the public functions in :mod:`unif2ace.kernels.moe` check inputs first.
"""

from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


def moe_expert_histogram_ref(expert_ids: Tensor, num_experts: int) -> Tensor:
    """``[E]`` int32: how many entries of ``expert_ids`` (any shape) equal each e in ``[0, E)``.

    Ids outside ``[0, E)`` (e.g. -1, the null expert) are ignored.
    """
    flat = expert_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    return torch.bincount(flat[valid], minlength=num_experts).to(torch.int32)


def moe_align_size_bound(numel: int, num_experts: int, block_size: int) -> Tuple[int, int]:
    """(length of sorted_token_ids, length of block_expert_ids): host-computable worst case."""
    max_len = numel + num_experts * (block_size - 1)
    return max_len, (max_len + block_size - 1) // block_size


def moe_align_ref(expert_ids: Tensor, num_experts: int, block_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group assignment indices by expert, each expert's segment padded to ``block_size``.

    ``expert_ids``: ``[T, k]`` (or ``[N]``) integer; the flat assignment index of entry
    ``(t, j)`` is ``t * k + j``; ``N = T * k``. Ids outside ``[0, E)`` are dropped.

    Returns ``(sorted_token_ids, block_expert_ids, num_tokens_post_padded, expert_counts)``:
        sorted_token_ids: ``[N + E*(block_size-1)]`` int32. Expert e's segment starts at
            ``off_e = sum_{e' < e} ceil(c_e' / block_size) * block_size`` and lists its flat
            indices in ascending order, then sentinel ``N`` up to the padded length; everything
            past the padded total is ``N`` too.
        block_expert_ids: ``[ceil((N + E*(block_size-1)) / block_size)]`` int32: the expert of
            each block of ``block_size`` entries; ``-1`` for blocks past the padded total.
            Experts with no assignments own no block.
        num_tokens_post_padded: ``[1]`` int32, the padded total ``sum_e ceil(c_e/bs)*bs``.
        expert_counts: ``[E]`` int32 ``c_e`` (before padding).
    """
    dev = expert_ids.device
    flat = expert_ids.reshape(-1).long()
    N = flat.numel()
    max_len, max_blocks = moe_align_size_bound(N, num_experts, block_size)
    sorted_ids = torch.full((max_len,), N, dtype=torch.int32, device=dev)
    block_ids = torch.full((max_blocks,), -1, dtype=torch.int32, device=dev)
    counts = moe_expert_histogram_ref(expert_ids, num_experts)
    off = 0
    for e in range(num_experts):
        members = torch.nonzero(flat == e).flatten()  # ascending
        c = members.numel()
        if c == 0:
            continue
        padded = (c + block_size - 1) // block_size * block_size
        sorted_ids[off : off + c] = members.to(torch.int32)
        block_ids[off // block_size : (off + padded) // block_size] = e
        off += padded
    total = torch.tensor([off], dtype=torch.int32, device=dev)
    return sorted_ids, block_ids, total, counts
