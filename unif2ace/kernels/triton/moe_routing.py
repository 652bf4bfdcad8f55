"""Triton kernels of the grouped MoE routing metadata (``moe_align``) and their launch glue.

Semantics are those of :mod:`unif2ace.kernels.reference.moe_routing`; this file only makes them fast.

vLLM ``moe_align_block_size`` contract (see ``moe_align_ref``), three launches and no host
sync: per-chunk expert counts (one program per BLOCK_N ids), a one-program scan (expert
totals, padded segment starts, per-(chunk, expert) offsets, the padded total), then a block-id
kernel and a scatter kernel (rank of an id inside its chunk by a cumulative sum over a
one-hot tile, so every expert's indices stay ascending). Ids outside ``[0, E)`` match no
expert and are dropped. ``sorted_token_ids`` starts as the sentinel N (``torch.full``).
The grouped expert MLP (:mod:`unif2ace.kernels.triton.moe_mlp`) runs on this index list.

Tile configurations live in a small table (``ALIGN_CONFIGS``), to be tuned on a GPU; the
interpreter gets large tiles (each program costs ~1 ms there). All address arithmetic is int64.
"""

from __future__ import annotations

from typing import Dict

import torch
import triton
import triton.language as tl

from ._launch import Launch, interpreting, launch

__all__ = ["ALIGN_CONFIGS", "align_config", "moe_align"]

Tensor = torch.Tensor
# every output and scratch buffer is allocated through these (tests swap in poisoned allocations)
_empty = torch.empty
_empty_like = torch.empty_like

# tile configuration (interpreter / GPU). Values for GPUs are first guesses from the vLLM
# defaults; tune them on the device and edit here.
ALIGN_CONFIGS: Dict[str, Dict[str, int]] = {
    "interpret": dict(BLOCK_N=1024, BLOCK_E=128, BLOCK_B=1024),
    "gpu": dict(BLOCK_N=256, BLOCK_E=64, BLOCK_B=256),
}


def align_config() -> Dict[str, int]:
    return ALIGN_CONFIGS["interpret" if interpreting() else "gpu"]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


@triton.jit
def _align_count_kernel(IDS, PART, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(IDS + offs, mask=offs < N, other=-1).to(tl.int64)
    for e0 in range(0, E, BLOCK_E):
        ecols = e0 + tl.arange(0, BLOCK_E)
        cnt = tl.sum((ids[:, None] == ecols[None, :]).to(tl.int32), 0)
        tl.store(PART + pid * E + ecols, cnt, mask=ecols < E)


@triton.jit
def _align_scan_kernel(PART, CHUNK_OFF, COUNTS, SEG_START, TOTAL, n_chunks, E, bs, BLOCK_E: tl.constexpr):
    base = tl.load(TOTAL) * 0  # running padded total of the expert tiles done so far
    for e0 in range(0, E, BLOCK_E):
        ecols = e0 + tl.arange(0, BLOCK_E)
        em = ecols < E
        run = tl.zeros([BLOCK_E], dtype=tl.int32)
        pp = PART + ecols
        po = CHUNK_OFF + ecols
        for _ in range(0, n_chunks):
            p = tl.load(pp, mask=em, other=0)
            tl.store(po, run, mask=em)  # offset of this chunk inside each expert's segment
            run += p
            pp += E
            po += E
        padded = (run + bs - 1) // bs * bs
        start = base + tl.cumsum(padded, 0) - padded
        tl.store(COUNTS + ecols, run, mask=em)
        tl.store(SEG_START + ecols, start, mask=em)
        base += tl.sum(padded, 0)
    tl.store(TOTAL, base)


@triton.jit
def _align_blocks_kernel(
    COUNTS, SEG_START, TOTAL, BLOCK_IDS, E, n_blocks, bs, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    pos = b * bs
    total = tl.load(TOTAL).to(tl.int64)
    n_before = tl.zeros([BLOCK_B], dtype=tl.int32)  # experts whose padded segment ends at or before pos
    for e0 in range(0, E, BLOCK_E):
        ecols = e0 + tl.arange(0, BLOCK_E)
        em = ecols < E
        c = tl.load(COUNTS + ecols, mask=em, other=0)
        end = tl.load(SEG_START + ecols, mask=em, other=0).to(tl.int64) + ((c + bs - 1) // bs * bs)
        n_before += tl.sum(((end[None, :] <= pos[:, None]) & em[None, :]).to(tl.int32), 1)
    tl.store(BLOCK_IDS + b, tl.where(pos < total, n_before, -1), mask=b < n_blocks)


@triton.jit
def _align_scatter_kernel(IDS, CHUNK_OFF, SEG_START, SORTED, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = offs < N
    ids = tl.load(IDS + offs, mask=m, other=-1).to(tl.int64)
    dst = tl.zeros([BLOCK_N], dtype=tl.int64)
    for e0 in range(0, E, BLOCK_E):
        ecols = e0 + tl.arange(0, BLOCK_E)
        em = ecols < E
        onehot = (ids[:, None] == ecols[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - onehot  # earlier ids of the same expert in this chunk
        base = tl.load(SEG_START + ecols, mask=em, other=0) + tl.load(CHUNK_OFF + pid * E + ecols, mask=em, other=0)
        dst += tl.sum(tl.where(onehot == 1, base[None, :] + rank, 0), 1).to(tl.int64)
    valid = m & (ids >= 0) & (ids < E)
    tl.store(SORTED + dst, offs.to(tl.int32), mask=valid)


def moe_align(expert_ids: Tensor, num_experts: int, block_size: int, *, with_segments: bool = False):
    """Same contract as ``moe_align_ref``: ``(sorted_token_ids, block_expert_ids, num_tokens_post_padded,
    expert_counts)``; with ``with_segments`` also the padded segment start of each expert ``[E]`` int32."""
    dev = expert_ids.device
    flat = expert_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    N = flat.numel()
    E, bs = int(num_experts), int(block_size)
    max_len = N + E * (bs - 1)
    max_blocks = triton.cdiv(max_len, bs)
    cfg = align_config()
    BN, BE, BB = cfg["BLOCK_N"], min(cfg["BLOCK_E"], _pow2(E)), cfg["BLOCK_B"]
    n_chunks = triton.cdiv(N, BN)
    sorted_ids = torch.full((max_len,), N, dtype=torch.int32, device=dev)
    block_ids = _empty((max_blocks,), dtype=torch.int32, device=dev)
    total = _empty((1,), dtype=torch.int32, device=dev)
    counts = _empty((E,), dtype=torch.int32, device=dev)
    seg = _empty((E,), dtype=torch.int32, device=dev)
    part = _empty((max(n_chunks, 1), E), dtype=torch.int32, device=dev)
    chunk_off = _empty_like(part)
    w4 = dict(num_warps=4)
    if n_chunks:
        launch(Launch(_align_count_kernel, (n_chunks,), (flat, part, N, E), dict(BLOCK_N=BN, BLOCK_E=BE), w4))
    scan_args = (part, chunk_off, counts, seg, total, n_chunks, E, bs)
    launch(Launch(_align_scan_kernel, (1,), scan_args, dict(BLOCK_E=BE), w4))
    if max_blocks:
        blocks_args = (counts, seg, total, block_ids, E, max_blocks, bs)
        launch(
            Launch(_align_blocks_kernel, (triton.cdiv(max_blocks, BB),), blocks_args, dict(BLOCK_B=BB, BLOCK_E=BE), w4)
        )
    if n_chunks:
        scatter_args = (flat, chunk_off, seg, sorted_ids, N, E)
        launch(Launch(_align_scatter_kernel, (n_chunks,), scatter_args, dict(BLOCK_N=BN, BLOCK_E=BE), w4))
    out = (sorted_ids, block_ids, total, counts)
    return out + (seg,) if with_segments else out
