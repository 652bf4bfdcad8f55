"""Triton kernels for the grouped MoE: gating, align, and the grouped expert MLP (fwd + bwd).

Semantics are those of :mod:`unif2ace.kernels.reference.moe`; this file only makes them fast.

Gating (:func:`gating_forward`, :func:`gating_backward`)
    One program per BLOCK_T tokens. Each token reads its own group's column window (group offsets
    and sizes come from two tiny int32 tables), computes softmax/sigmoid in fp32, picks the top-k
    by k rounds of "max, lowest index among the maxima" (the reference's tie rule), optionally
    renormalises, and writes ids (int32) and gates. Balance statistics are deterministic: every
    program writes per-block partial sums (scores, counts, tokens per group) into its own row of
    a partial buffer, and a second one-program-per-group kernel reduces the rows in block order.
    No float atomics. The backward recomputes scores and choices per token and applies the
    closed form of ``moe_gating_backward_ref`` in a kernel; the per-expert term
    ``dP_e / T_g`` is formed by a few elementwise torch ops on ``[E_total]`` vectors.

Align (:func:`align`)
    vLLM ``moe_align_block_size`` contract (see ``moe_align_ref``), three launches and no host
    sync: per-chunk expert counts (one program per BLOCK_N ids), a one-program scan (expert
    totals, padded segment starts, per-(chunk, expert) offsets, the padded total), then a block-id
    kernel and a scatter kernel (rank of an id inside its chunk by a cumulative sum over a
    one-hot tile, so every expert's indices stay ascending). Ids outside ``[0, E)`` match no
    expert and are dropped. ``sorted_token_ids`` starts as the sentinel N (``torch.full``).

Grouped expert MLP (:func:`expert_mlp_forward`, :func:`expert_mlp_backward`)
    Tokens are never copied: the align index list (padded to BLOCK_M per expert) is read in the
    GEMM prologues and rows are gathered through ``sorted_token_ids // k``.
    forward: up-kernel ``h = act(x[tok] @ w1[e] + b1[e])`` (activation in the epilogue, h stored
    per padded position), down-kernel ``y[a] = gate[a] * (h @ w2[e] + b2[e])`` stored per
    assignment a = t*k + j, and a combine kernel that sums ``y[t*k + j]`` for j = 0..k-1 in fp32 in
    that order (deterministic, no atomics; invalid ids are skipped).
    backward: one kernel recomputes ``h`` and ``dA = grad_out[tok] @ w2[e]^T`` in a shared loop over
    D, writes the activation ``a`` and ``dh`` (through the activation derivative, gate applied) and
    per-F-tile partials of ``dgates = <a, dA> + <grad_out, b2>`` (reduced over tiles in fixed
    order); dW1/dW2/db1/db2 by one grouped ``X^T Y`` kernel (one program per (expert, tile),
    walking that expert's blocks of the index list in order); dX per assignment by a
    gather-GEMM and the same fixed-order k-way combine.

Numerics: every load is converted to fp32, reductions and epilogues are fp32; bf16/fp16 appear
only as ``tl.dot`` operands (x, w, and the stored h / dh). fp32 dots use ``input_precision="ieee"``
(no TF32) so fp32 parity holds on GPUs. All address arithmetic is int64.

Tile configurations live in small tables (``ALIGN_CONFIGS``, ``MLP_CONFIGS``) keyed by a shape
class, to be tuned on a GPU; the interpreter gets large tiles (each program costs ~1 ms there).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = [
    "ALIGN_CONFIGS",
    "MLP_CONFIGS",
    "align",
    "align_config",
    "expert_mlp_backward",
    "expert_mlp_forward",
    "gating_backward",
    "gating_forward",
    "mlp_config",
]

Tensor = torch.Tensor
# every output and scratch buffer is allocated through these (tests swap in poisoned allocations)
_empty = torch.empty
_empty_like = torch.empty_like
MAX_GROUP_EXPERTS = 1024  # one tile per group window; larger groups would need a tiled top-k


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------------------------------------------
# tile configuration tables (shape class -> tiles). Values for GPUs are first guesses from the
# vLLM defaults; tune them on the device and edit here.

ALIGN_CONFIGS: Dict[str, Dict[str, int]] = {
    "interpret": dict(BLOCK_N=1024, BLOCK_E=128, BLOCK_B=1024),
    "gpu": dict(BLOCK_N=256, BLOCK_E=64, BLOCK_B=256),
}

MLP_CONFIGS: Dict[str, Dict[str, int]] = {
    # BLOCK_M: rows per block (= align block size); BLOCK_F: hidden (F) tile; BLOCK_D: model (D) tile
    "interpret": dict(BLOCK_M=32, BLOCK_F=64, BLOCK_D=64, num_warps=4, num_stages=1),
    "decode": dict(BLOCK_M=16, BLOCK_F=64, BLOCK_D=64, num_warps=4, num_stages=3),  # ~<= 16 rows / expert
    "medium": dict(BLOCK_M=64, BLOCK_F=64, BLOCK_D=64, num_warps=4, num_stages=3),
    "large": dict(BLOCK_M=64, BLOCK_F=128, BLOCK_D=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_M=32, BLOCK_F=64, BLOCK_D=32, num_warps=4, num_stages=2),  # ieee fp32 dots
}


def align_config() -> Dict[str, int]:
    return ALIGN_CONFIGS["interpret" if _interpreting() else "gpu"]


def mlp_config(num_assignments: int, num_experts: int, dtype: torch.dtype) -> Dict[str, int]:
    """Tile config for the grouped MLP from the shape class (rows per expert, dtype)."""
    if _interpreting():
        return MLP_CONFIGS["interpret"]
    if dtype == torch.float32:
        return MLP_CONFIGS["fp32"]
    per_expert = num_assignments / max(num_experts, 1)
    if per_expert <= 16:
        return MLP_CONFIGS["decode"]
    if per_expert <= 1024:
        return MLP_CONFIGS["medium"]
    return MLP_CONFIGS["large"]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


_TABLES: Dict[Tuple[Tuple[int, ...], str], Tuple[Tensor, Tensor, Tensor]] = {}


def _group_tables(sizes: Sequence[int], device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """(offsets [G] int32, sizes [G] int32, group of each expert [E_total] int64), cached per device."""
    key = (tuple(int(s) for s in sizes), str(device))
    t = _TABLES.get(key)
    if t is None:
        offs = [0]
        for s in sizes[:-1]:
            offs.append(offs[-1] + int(s))
        gexp = [g for g, s in enumerate(sizes) for _ in range(int(s))]
        t = (
            torch.tensor(offs, dtype=torch.int32, device=device),
            torch.tensor(list(sizes), dtype=torch.int32, device=device),
            torch.tensor(gexp, dtype=torch.int64, device=device),
        )
        _TABLES[key] = t
    return t


# ------------------------------------------------------------------------------------------------
# gating


@triton.jit
def _gating_scores(
    Z,
    GID,
    GOFF,
    GSIZE,
    pid,
    T,
    stride_zt,
    stride_ze,
    stride_gid,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr,
):
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    g = tl.load(GID + rows64 * stride_gid, mask=rmask, other=0).to(tl.int32)
    goff = tl.load(GOFF + g, mask=rmask, other=0)
    gsz = tl.load(GSIZE + g, mask=rmask, other=0)
    cols = tl.arange(0, BLOCK_E)
    cmask = rmask[:, None] & (cols[None, :] < gsz[:, None])
    ptr = Z + rows64[:, None] * stride_zt + (goff[:, None] + cols[None, :]).to(tl.int64) * stride_ze
    z = tl.load(ptr, mask=cmask, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-z))
    else:
        m = tl.max(z, 1)
        m = tl.where(rmask, m, 0.0)
        ez = tl.exp(z - m[:, None])
        den = tl.sum(ez, 1)
        s = ez / tl.where(rmask, den, 1.0)[:, None]
    s = tl.where(cmask, s, 0.0)
    return rows, rmask, g, goff, gsz, cols, cmask, s


@triton.jit
def _gating_fwd_kernel(
    Z,
    GID,
    GOFF,
    GSIZE,
    IDS,
    GATES,
    PART_S,
    PART_C,
    PART_N,
    T,
    G,
    E_total,
    stride_zt,
    stride_ze,
    stride_gid,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask, g, goff, gsz, cols, cmask, s = _gating_scores(
        Z, GID, GOFF, GSIZE, pid, T, stride_zt, stride_ze, stride_gid, BLOCK_T, BLOCK_E, SIGMOID
    )
    sel = tl.where(cmask, s, -1.0)  # scores are >= 0: padding never wins
    kk = tl.arange(0, BLOCK_K)
    top_v = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for j in tl.static_range(K):
        m = tl.max(sel, 1)
        idx = tl.min(tl.where(sel == m[:, None], cols[None, :], BLOCK_E), 1)  # ties -> lowest index
        hit = cols[None, :] == idx[:, None]
        chosen += (hit & cmask).to(tl.int32)
        sel = tl.where(hit, -2.0, sel)
        top_v = tl.where(kk[None, :] == j, m[:, None], top_v)
        top_i = tl.where(kk[None, :] == j, idx[:, None], top_i)
    if RENORM:
        top_v = top_v / tl.sum(top_v, 1)[:, None]
    rows64 = rows.to(tl.int64)
    omask = rmask[:, None] & (kk[None, :] < K)
    optr = rows64[:, None] * K + kk[None, :]
    tl.store(IDS + optr, (goff[:, None] + top_i).to(tl.int32), mask=omask)
    tl.store(GATES + optr, top_v, mask=omask)
    # per-block partial statistics, one row of the partial buffers per program
    pid64 = pid.to(tl.int64)
    for gg in range(0, G):
        off_g = tl.load(GOFF + gg)
        sz_g = tl.load(GSIZE + gg)
        ing = rmask & (g == gg)
        ps = tl.sum(tl.where(ing[:, None], s, 0.0), 0)
        pc = tl.sum(tl.where(ing[:, None], chosen, 0), 0)
        n = tl.sum(ing.to(tl.int32), 0)
        dst = pid64 * E_total + off_g + cols
        tl.store(PART_S + dst, ps, mask=cols < sz_g)
        tl.store(PART_C + dst, pc, mask=cols < sz_g)
        tl.store(PART_N + pid64 * G + gg, n)


@triton.jit
def _gating_stats_kernel(
    PART_S,
    PART_C,
    PART_N,
    GOFF,
    GSIZE,
    FRAC,
    PROB,
    LOSS,
    NTOK,
    n_blocks,
    G,
    E_total,
    coef,
    K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    gg = tl.program_id(0)
    off = tl.load(GOFF + gg)
    sz = tl.load(GSIZE + gg)
    cols = tl.arange(0, BLOCK_E)
    cm = cols < sz
    acc_s = tl.zeros([BLOCK_E], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_E], dtype=tl.int32)
    n = tl.load(PART_N + gg) * 0
    ps = PART_S + off + cols  # pointers advance row by row (64-bit pointer arithmetic)
    pc = PART_C + off + cols
    pn = PART_N + gg
    for _ in range(0, n_blocks):  # fixed block order: deterministic
        acc_s += tl.load(ps, mask=cm, other=0.0)
        acc_c += tl.load(pc, mask=cm, other=0)
        n += tl.load(pn)
        ps += E_total
        pc += E_total
        pn += G
    den = tl.maximum(n.to(tl.float32), 1.0)
    P = acc_s / den
    f = acc_c.to(tl.float32) / (den * K)
    loss = coef * sz.to(tl.float32) * tl.sum(tl.where(cm, f * P, 0.0), 0)
    tl.store(FRAC + off + cols, f, mask=cm)
    tl.store(PROB + off + cols, P, mask=cm)
    tl.store(LOSS + gg, loss)
    tl.store(NTOK + gg, n)


@triton.jit
def _gating_bwd_kernel(
    Z,
    GID,
    GOFF,
    GSIZE,
    GG,
    DPS,
    DZ,
    T,
    E_total,
    stride_zt,
    stride_ze,
    stride_gid,
    stride_ggt,
    stride_ggk,
    stride_dzt,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, rmask, g, goff, gsz, cols, cmask, s = _gating_scores(
        Z, GID, GOFF, GSIZE, pid, T, stride_zt, stride_ze, stride_gid, BLOCK_T, BLOCK_E, SIGMOID
    )
    rows64 = rows.to(tl.int64)
    sel = tl.where(cmask, s, -1.0)
    dc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    csum = tl.zeros([BLOCK_T], dtype=tl.float32)
    cdot = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K):
        m = tl.max(sel, 1)
        idx = tl.min(tl.where(sel == m[:, None], cols[None, :], BLOCK_E), 1)
        hit = cols[None, :] == idx[:, None]
        sel = tl.where(hit, -2.0, sel)
        gj = tl.load(GG + rows64 * stride_ggt + j * stride_ggk, mask=rmask, other=0.0).to(tl.float32)
        dc = tl.where(hit, gj[:, None], dc)
        chosen = tl.where(hit, 1, chosen)
        csum += m
        cdot += gj * m
    if RENORM:
        S = tl.where(rmask, csum, 1.0)
        dc = tl.where(chosen != 0, (dc - (cdot / S)[:, None]) / S[:, None], 0.0)
    dps = tl.load(DPS + (goff[:, None] + cols[None, :]), mask=cmask, other=0.0)
    ds = tl.where(cmask, dps + dc, 0.0)
    if SIGMOID:
        dz = ds * s * (1.0 - s)
    else:
        dz = s * (ds - tl.sum(ds * s, 1)[:, None])
    drow = DZ + rows64[:, None] * stride_dzt
    tl.store(drow + (goff[:, None] + cols[None, :]).to(tl.int64), dz.to(DZ.dtype.element_ty), mask=cmask)
    # columns of the other groups get zero
    for c0 in range(0, E_total, BLOCK_E):
        cz = c0 + cols
        outside = (cz[None, :] < goff[:, None]) | (cz[None, :] >= (goff + gsz)[:, None])
        zero = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        tl.store(
            drow + cz[None, :].to(tl.int64),
            zero.to(DZ.dtype.element_ty),
            mask=rmask[:, None] & (cz[None, :] < E_total) & outside,
        )


def _gating_tiles(T: int, sizes: Sequence[int]) -> Tuple[int, int]:
    block_e = _pow2(max(sizes), 16)
    # keep a [BLOCK_T, BLOCK_E] tile around 4K elements on GPUs; the interpreter prefers few programs
    cap = 8192 if _interpreting() else 4096
    block_t = max(1, min(_pow2(T, 1), cap // block_e, 128 if _interpreting() else 64))
    return block_t, block_e


def _gating_launch(router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef):
    dev = router_logits.device
    T, E_total = router_logits.shape
    G = len(group_sizes)
    k = int(top_k)
    goff, gsize, _ = _group_tables(group_sizes, dev)
    ids = _empty((T, k), dtype=torch.int32, device=dev)
    gates = _empty((T, k), dtype=torch.float32, device=dev)
    frac = _empty(E_total, dtype=torch.float32, device=dev)
    prob = _empty(E_total, dtype=torch.float32, device=dev)
    loss = _empty(G, dtype=torch.float32, device=dev)
    ntok = _empty(G, dtype=torch.int32, device=dev)
    block_t, block_e = _gating_tiles(T, group_sizes)
    n_blocks = triton.cdiv(T, block_t)
    part_s = _empty((max(n_blocks, 1), E_total), dtype=torch.float32, device=dev)
    part_c = _empty((max(n_blocks, 1), E_total), dtype=torch.int32, device=dev)
    part_n = _empty((max(n_blocks, 1), G), dtype=torch.int32, device=dev)
    if n_blocks > 0:
        _gating_fwd_kernel[(n_blocks,)](
            router_logits,
            group_ids,
            goff,
            gsize,
            ids,
            gates,
            part_s,
            part_c,
            part_n,
            T,
            G,
            E_total,
            router_logits.stride(0),
            router_logits.stride(1),
            group_ids.stride(0),
            K=k,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            BLOCK_K=_pow2(k, 2),
            SIGMOID=score == "sigmoid",
            RENORM=bool(renormalize),
            num_warps=4,
        )
    _gating_stats_kernel[(G,)](
        part_s,
        part_c,
        part_n,
        goff,
        gsize,
        frac,
        prob,
        loss,
        ntok,
        n_blocks,
        G,
        E_total,
        float(balance_coef),
        K=k,
        BLOCK_E=block_e,
        num_warps=4,
    )
    return ids, gates, frac, prob, loss, ntok


def gating_forward(
    router_logits: Tensor,
    group_ids: Tensor,
    group_sizes: Sequence[int],
    top_k: int,
    score: str = "softmax",
    renormalize: bool = False,
    balance_coef: float = 0.01,
):
    """Same contract as ``moe_gating_ref``: ``(expert_ids, gates, expert_fraction, expert_prob, balance_loss)``.

    Groups of more than ``MAX_GROUP_EXPERTS`` experts (one tile) run the reference instead."""
    if max(group_sizes) > MAX_GROUP_EXPERTS:
        from ..reference.moe import moe_gating_ref

        return moe_gating_ref(router_logits, group_ids, list(group_sizes), top_k, score, renormalize, balance_coef)
    ids, gates, frac, prob, loss, _ = _gating_launch(
        router_logits, group_ids, list(group_sizes), top_k, score, renormalize, balance_coef
    )
    return ids, gates, frac, prob, loss


def gating_backward(
    grad_gates: Tensor,
    grad_prob: Tensor,
    grad_loss: Tensor,
    router_logits: Tensor,
    group_ids: Tensor,
    group_sizes: Sequence[int],
    top_k: int,
    score: str = "softmax",
    renormalize: bool = False,
    balance_coef: float = 0.01,
) -> Tensor:
    """Same contract as ``moe_gating_backward_ref`` (d router_logits, router_logits' dtype)."""
    sizes = list(group_sizes)
    if max(sizes) > MAX_GROUP_EXPERTS:
        from ..reference.moe import moe_gating_backward_ref

        return moe_gating_backward_ref(
            grad_gates, grad_prob, grad_loss, router_logits, group_ids, sizes, top_k, score, renormalize, balance_coef
        )
    dev = router_logits.device
    T, E_total = router_logits.shape
    dz = _empty((T, E_total), dtype=router_logits.dtype, device=dev)
    if T == 0:
        return dz
    # f_e and T_g are recomputed (the forward's outputs are not saved by the custom op)
    _, _, frac, _, _, ntok = _gating_launch(router_logits, group_ids, sizes, top_k, score, renormalize, balance_coef)
    _, gsize, gexp = _group_tables(sizes, dev)
    dP = grad_prob.float() + grad_loss.float()[gexp] * float(balance_coef) * gsize[gexp].float() * frac
    dps = (dP / ntok.float().clamp_min(1.0)[gexp]).contiguous()
    grad_gates = grad_gates.float()
    block_t, block_e = _gating_tiles(T, sizes)
    _gating_bwd_kernel[(triton.cdiv(T, block_t),)](
        router_logits,
        group_ids,
        *_group_tables(sizes, dev)[:2],
        grad_gates,
        dps,
        dz,
        T,
        E_total,
        router_logits.stride(0),
        router_logits.stride(1),
        group_ids.stride(0),
        grad_gates.stride(0),
        grad_gates.stride(1),
        dz.stride(0),
        K=int(top_k),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        SIGMOID=score == "sigmoid",
        RENORM=bool(renormalize),
        num_warps=4,
    )
    return dz


# ------------------------------------------------------------------------------------------------
# align


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


def align(expert_ids: Tensor, num_experts: int, block_size: int, *, with_segments: bool = False):
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
    if n_chunks:
        _align_count_kernel[(n_chunks,)](flat, part, N, E, BLOCK_N=BN, BLOCK_E=BE, num_warps=4)
    _align_scan_kernel[(1,)](part, chunk_off, counts, seg, total, n_chunks, E, bs, BLOCK_E=BE, num_warps=4)
    if max_blocks:
        _align_blocks_kernel[(triton.cdiv(max_blocks, BB),)](
            counts, seg, total, block_ids, E, max_blocks, bs, BLOCK_B=BB, BLOCK_E=BE, num_warps=4
        )
    if n_chunks:
        _align_scatter_kernel[(n_chunks,)](flat, chunk_off, seg, sorted_ids, N, E, BLOCK_N=BN, BLOCK_E=BE, num_warps=4)
    out = (sorted_ids, block_ids, total, counts)
    return out + (seg,) if with_segments else out


# ------------------------------------------------------------------------------------------------
# grouped expert MLP

ACT_GELU, ACT_GELU_TANH, ACT_SWIGLU = 0, 1, 2
_ACT = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "swiglu": ACT_SWIGLU}


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): saturates cleanly to +-1 (exp overflow -> inf -> 0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _act_fwd(h, up, ACT: tl.constexpr):
    if ACT == 0:
        a = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 1:
        a = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    else:
        a = h / (1.0 + tl.exp(-h)) * up
    return a


@triton.jit
def _rows_of_block(SORTED, pid_m, N, K: tl.constexpr, BLOCK_M: tl.constexpr):
    pos = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    a = tl.load(SORTED + pos).to(tl.int64)  # blocks with an expert lie inside the padded total
    valid = a < N
    tok = a // K
    return pos, a, valid, tok


@triton.jit
def _mlp_up_kernel(
    X,
    W1,
    B1,
    SORTED,
    BEID,
    H,
    N,
    D,
    F,
    stride_xt,
    stride_xd,
    stride_w1e,
    stride_w1d,
    stride_w1f,
    stride_b1e,
    stride_ht,
    K: tl.constexpr,
    ACT: tl.constexpr,
    HAS_B1: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    e = tl.load(BEID + pid_m).to(tl.int64)
    if e < 0:
        return
    pos, a_idx, valid, tok = _rows_of_block(SORTED, pid_m, N, K, BLOCK_M)
    fc = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = fc < F
    w1e = W1 + e * stride_w1e
    acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        dm = dc < D
        xa = tl.load(
            X + tok[:, None] * stride_xt + dc[None, :].to(tl.int64) * stride_xd,
            mask=valid[:, None] & dm[None, :],
            other=0.0,
        )
        wp = w1e + dc[:, None].to(tl.int64) * stride_w1d
        w = tl.load(wp + fc[None, :].to(tl.int64) * stride_w1f, mask=dm[:, None] & fm[None, :], other=0.0)
        acc = tl.dot(xa, w, acc, input_precision=PREC)
        if ACT == 2:
            wu = tl.load(wp + (F + fc[None, :]).to(tl.int64) * stride_w1f, mask=dm[:, None] & fm[None, :], other=0.0)
            acc_up = tl.dot(xa, wu, acc_up, input_precision=PREC)
    if HAS_B1:
        acc += tl.load(B1 + e * stride_b1e + fc, mask=fm, other=0.0).to(tl.float32)[None, :]
        if ACT == 2:
            acc_up += tl.load(B1 + e * stride_b1e + F + fc, mask=fm, other=0.0).to(tl.float32)[None, :]
    act = _act_fwd(acc, acc_up, ACT)
    tl.store(H + pos[:, None] * stride_ht + fc[None, :], act.to(H.dtype.element_ty), mask=fm[None, :])


@triton.jit
def _mlp_down_kernel(
    H,
    W2,
    B2,
    GATES,
    SORTED,
    BEID,
    Y,
    N,
    F,
    D,
    stride_ht,
    stride_w2e,
    stride_w2f,
    stride_w2d,
    stride_b2e,
    stride_yt,
    K: tl.constexpr,
    HAS_B2: tl.constexpr,
    APPLY_GATE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    e = tl.load(BEID + pid_m).to(tl.int64)
    if e < 0:
        return
    pos, a_idx, valid, tok = _rows_of_block(SORTED, pid_m, N, K, BLOCK_M)
    dc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dc < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        fc = f0 + tl.arange(0, BLOCK_F)
        fm = fc < F
        h = tl.load(H + pos[:, None] * stride_ht + fc[None, :], mask=fm[None, :], other=0.0)
        w = tl.load(
            W2 + e * stride_w2e + fc[:, None].to(tl.int64) * stride_w2f + dc[None, :].to(tl.int64) * stride_w2d,
            mask=fm[:, None] & dm[None, :],
            other=0.0,
        )
        acc = tl.dot(h, w, acc, input_precision=PREC)
    if HAS_B2:
        acc += tl.load(B2 + e * stride_b2e + dc, mask=dm, other=0.0).to(tl.float32)[None, :]
    if APPLY_GATE:
        g = tl.load(GATES + a_idx, mask=valid, other=0.0).to(tl.float32)
        acc = acc * g[:, None]
    tl.store(Y + a_idx[:, None] * stride_yt + dc[None, :], acc, mask=valid[:, None] & dm[None, :])


@triton.jit
def _combine_kernel(
    Y, IDS, OUT, T, D, E, stride_yt, stride_ot, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dc = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = rows < T
    dm = dc < D
    out = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):  # fixed order j = 0..k-1, fp32
        a = rows * K + j
        eid = tl.load(IDS + a, mask=rm, other=-1).to(tl.int64)
        ok = rm & (eid >= 0) & (eid < E)
        out += tl.load(Y + a[:, None] * stride_yt + dc[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
    tl.store(
        OUT + rows[:, None] * stride_ot + dc[None, :], out.to(OUT.dtype.element_ty), mask=rm[:, None] & dm[None, :]
    )


@triton.jit
def _mlp_bwd_act_kernel(
    X,
    W1,
    B1,
    W2,
    B2,
    GO,
    GATES,
    SORTED,
    BEID,
    A_OUT,
    DH,
    DGP,
    N,
    D,
    F,
    stride_xt,
    stride_xd,
    stride_w1e,
    stride_w1d,
    stride_w1f,
    stride_b1e,
    stride_w2e,
    stride_w2f,
    stride_w2d,
    stride_b2e,
    stride_got,
    stride_at,
    stride_dht,
    K: tl.constexpr,
    ACT: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    e = tl.load(BEID + pid_m).to(tl.int64)
    if e < 0:
        return
    pos, a_idx, valid, tok = _rows_of_block(SORTED, pid_m, N, K, BLOCK_M)
    fc = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = fc < F
    w1e = W1 + e * stride_w1e
    w2e = W2 + e * stride_w2e
    h = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    dA = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)  # grad_out[tok] @ w2[e][fc, :]^T (no gate yet)
    gob = tl.zeros([BLOCK_M], dtype=tl.float32)  # <grad_out[tok], b2[e]>
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        dm = dc < D
        rmask = valid[:, None] & dm[None, :]
        xa = tl.load(X + tok[:, None] * stride_xt + dc[None, :].to(tl.int64) * stride_xd, mask=rmask, other=0.0)
        wp = w1e + dc[:, None].to(tl.int64) * stride_w1d
        w = tl.load(wp + fc[None, :].to(tl.int64) * stride_w1f, mask=dm[:, None] & fm[None, :], other=0.0)
        h = tl.dot(xa, w, h, input_precision=PREC)
        if ACT == 2:
            wu = tl.load(wp + (F + fc[None, :]).to(tl.int64) * stride_w1f, mask=dm[:, None] & fm[None, :], other=0.0)
            up = tl.dot(xa, wu, up, input_precision=PREC)
        go = tl.load(GO + tok[:, None] * stride_got + dc[None, :], mask=rmask, other=0.0)
        w2t = tl.load(
            w2e + fc[None, :].to(tl.int64) * stride_w2f + dc[:, None].to(tl.int64) * stride_w2d,
            mask=dm[:, None] & fm[None, :],
            other=0.0,
        )
        dA = tl.dot(go, w2t, dA, input_precision=PREC)
        if HAS_B2:
            b2 = tl.load(B2 + e * stride_b2e + dc, mask=dm & (pid_f == 0), other=0.0).to(tl.float32)
            gob += tl.sum(go.to(tl.float32) * b2[None, :], 1)
    if HAS_B1:
        h += tl.load(B1 + e * stride_b1e + fc, mask=fm, other=0.0).to(tl.float32)[None, :]
        if ACT == 2:
            up += tl.load(B1 + e * stride_b1e + F + fc, mask=fm, other=0.0).to(tl.float32)[None, :]
    act = _act_fwd(h, up, ACT)
    act = tl.where(fm[None, :], act, 0.0)
    # dgates partial of this F tile: <act, dA>; the bias term once (tile 0)
    tl.store(DGP + pid_f.to(tl.int64) * N + a_idx, tl.sum(act * dA, 1) + gob, mask=valid)
    g = tl.load(GATES + a_idx, mask=valid, other=0.0).to(tl.float32)
    dA = dA * g[:, None]
    dhp = DH + pos[:, None] * stride_dht
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        tl.store(dhp + fc[None, :], (dA * (cdf + h * pdf)).to(DH.dtype.element_ty), mask=fm[None, :])
    elif ACT == 1:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        tl.store(dhp + fc[None, :], (dA * d).to(DH.dtype.element_ty), mask=fm[None, :])
    else:
        sig = 1.0 / (1.0 + tl.exp(-h))
        silu = h * sig
        dsilu = sig * (1.0 + h * (1.0 - sig))
        tl.store(dhp + fc[None, :], (dA * up * dsilu).to(DH.dtype.element_ty), mask=fm[None, :])
        tl.store(dhp + F + fc[None, :], (dA * silu).to(DH.dtype.element_ty), mask=fm[None, :])
    tl.store(A_OUT + pos[:, None] * stride_at + fc[None, :], act.to(A_OUT.dtype.element_ty), mask=fm[None, :])


@triton.jit
def _grouped_xty_kernel(
    X,
    Y,
    GATES,
    SORTED,
    SEG_START,
    COUNTS,
    OUT,
    DBIAS,
    N,
    P,
    Q,
    stride_xr,
    stride_xc,
    stride_yr,
    stride_oe,
    stride_op,
    stride_oq,
    stride_be,
    K: tl.constexpr,
    X_BY_TOKEN: tl.constexpr,
    Y_BY_TOKEN_GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    # OUT[e] = sum over expert e's assignment rows r of X_r^T Y_r ([P, Q]); DBIAS[e] = sum_r Y_r.
    # X rows: x[token] (X_BY_TOKEN) or a per-position buffer; Y rows: gate * grad_out[token]
    # (Y_BY_TOKEN_GATED) or a per-position buffer. Walks e's blocks of the index list in order.
    e = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    pc = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qc = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pm = pc < P
    qm = qc < Q
    start = tl.load(SEG_START + e).to(tl.int64)
    cnt = tl.load(COUNTS + e)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    bacc = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for r0 in range(0, cnt, BLOCK_M):
        pos = start + r0 + tl.arange(0, BLOCK_M)
        a = tl.load(SORTED + pos).to(tl.int64)
        valid = a < N
        tok = a // K
        if X_BY_TOKEN:
            xr = tok
        else:
            xr = pos
        xt = tl.load(
            X + xr[:, None] * stride_xr + pc[None, :].to(tl.int64) * stride_xc,
            mask=valid[:, None] & pm[None, :],
            other=0.0,
        )
        if Y_BY_TOKEN_GATED:
            g = tl.load(GATES + a, mask=valid, other=0.0).to(tl.float32)
            yf = (
                tl.load(Y + tok[:, None] * stride_yr + qc[None, :], mask=valid[:, None] & qm[None, :], other=0.0).to(
                    tl.float32
                )
                * g[:, None]
            )
            yt = yf.to(Y.dtype.element_ty)
        else:
            yt = tl.load(Y + pos[:, None] * stride_yr + qc[None, :], mask=valid[:, None] & qm[None, :], other=0.0)
            yf = yt.to(tl.float32)
        acc = tl.dot(tl.trans(xt), yt, acc, input_precision=PREC)
        if HAS_BIAS:
            bacc += tl.sum(yf, 0)
    optr = OUT + e * stride_oe + pc[:, None].to(tl.int64) * stride_op + qc[None, :].to(tl.int64) * stride_oq
    tl.store(optr, acc.to(OUT.dtype.element_ty), mask=pm[:, None] & qm[None, :])
    if HAS_BIAS:
        tl.store(DBIAS + e * stride_be + qc, bacc.to(DBIAS.dtype.element_ty), mask=qm & (pid_p == 0))


@triton.jit
def _mlp_dx_kernel(
    DH,
    W1,
    SORTED,
    BEID,
    DXA,
    N,
    D,
    F1,
    stride_dht,
    stride_w1e,
    stride_w1d,
    stride_w1f,
    stride_dxt,
    K: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    e = tl.load(BEID + pid_m).to(tl.int64)
    if e < 0:
        return
    pos, a_idx, valid, tok = _rows_of_block(SORTED, pid_m, N, K, BLOCK_M)
    dc = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dc < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for f0 in range(0, F1, BLOCK_F):
        fc = f0 + tl.arange(0, BLOCK_F)
        fm = fc < F1
        dh = tl.load(DH + pos[:, None] * stride_dht + fc[None, :], mask=fm[None, :], other=0.0)
        w1t = tl.load(
            W1 + e * stride_w1e + fc[:, None].to(tl.int64) * stride_w1f + dc[None, :].to(tl.int64) * stride_w1d,
            mask=fm[:, None] & dm[None, :],
            other=0.0,
        )
        acc = tl.dot(dh, w1t, acc, input_precision=PREC)
    tl.store(DXA + a_idx[:, None] * stride_dxt + dc[None, :], acc, mask=valid[:, None] & dm[None, :])


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dts = {t.dtype for t in tensors}
    if len(dts) == 1 and next(iter(dts)) in (torch.bfloat16, torch.float16):
        return next(iter(dts))
    return torch.float32


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _Routing:
    """Align metadata shared by the forward and backward launches."""

    def __init__(self, expert_ids: Tensor, E: int, block_m: int):
        self.T, self.k = expert_ids.shape
        self.N = self.T * self.k
        self.ids = expert_ids.contiguous()
        self.sorted, self.block_eid, self.total, self.counts, self.seg = align(self.ids, E, block_m, with_segments=True)
        self.L = self.sorted.numel()
        self.NB = self.block_eid.numel()


def _combine(y: Tensor, rt: _Routing, E: int, out_dtype: torch.dtype, D: int) -> Tensor:
    out = _empty((rt.T, D), dtype=out_dtype, device=y.device)
    if rt.T == 0 or D == 0:
        return out
    BT = min(_pow2(rt.T), 64)
    BD = min(_pow2(D), 128 if _interpreting() else 64)
    _combine_kernel[(triton.cdiv(rt.T, BT), triton.cdiv(D, BD))](
        y, rt.ids, out, rt.T, D, E, y.stride(0), out.stride(0), K=rt.k, BLOCK_T=BT, BLOCK_D=BD, num_warps=4
    )
    return out


def expert_mlp_forward(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    activation: str = "gelu",
    *,
    config: Optional[Dict[str, int]] = None,
) -> Tensor:
    """Same contract as ``moe_expert_mlp_ref``; ``config`` overrides the tile table (tests)."""
    T, D = x.shape
    E, _, F1 = w1.shape
    F = w2.shape[1]
    k = expert_ids.shape[1]
    dev = x.device
    if T == 0 or k == 0:
        return torch.zeros((T, D), dtype=x.dtype, device=dev)
    cdt = _compute_dtype(x, w1, w2)
    xc, w1c, w2c = x.to(cdt), w1.to(cdt), w2.to(cdt)
    cfg = dict(config or mlp_config(T * k, E, cdt))
    BM, BF, BD = cfg["BLOCK_M"], cfg["BLOCK_F"], cfg["BLOCK_D"]
    kw = dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1))
    rt = _Routing(expert_ids, E, BM)
    g = gates.contiguous()
    h = _empty((rt.L, F), dtype=cdt, device=dev)
    dummy = h
    _mlp_up_kernel[(rt.NB, triton.cdiv(F, BF))](
        xc,
        w1c,
        dummy if b1 is None else b1,
        rt.sorted,
        rt.block_eid,
        h,
        rt.N,
        D,
        F,
        xc.stride(0),
        xc.stride(1),
        w1c.stride(0),
        w1c.stride(1),
        w1c.stride(2),
        0 if b1 is None else b1.stride(0),
        h.stride(0),
        K=k,
        ACT=_ACT[activation],
        HAS_B1=b1 is not None,
        PREC=_prec(cdt),
        BLOCK_M=BM,
        BLOCK_F=BF,
        BLOCK_D=BD,
        **kw,
    )
    y = _empty((rt.N, D), dtype=torch.float32, device=dev)
    _mlp_down_kernel[(rt.NB, triton.cdiv(D, BD))](
        h,
        w2c,
        dummy if b2 is None else b2,
        g,
        rt.sorted,
        rt.block_eid,
        y,
        rt.N,
        F,
        D,
        h.stride(0),
        w2c.stride(0),
        w2c.stride(1),
        w2c.stride(2),
        0 if b2 is None else b2.stride(0),
        y.stride(0),
        K=k,
        HAS_B2=b2 is not None,
        APPLY_GATE=True,
        PREC=_prec(cdt),
        BLOCK_M=BM,
        BLOCK_F=BF,
        BLOCK_D=BD,
        **kw,
    )
    return _combine(y, rt, E, x.dtype, D)


def expert_mlp_backward(
    grad_out: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    activation: str = "gelu",
    *,
    config: Optional[Dict[str, int]] = None,
):
    """Same contract as ``moe_expert_mlp_backward_ref``: ``(dx, dw1, dw2, dgates, db1, db2)``."""
    T, D = x.shape
    E, _, F1 = w1.shape
    F = w2.shape[1]
    k = expert_ids.shape[1]
    dev = x.device
    dw1 = _empty_like(w1, memory_format=torch.contiguous_format)
    dw2 = _empty_like(w2, memory_format=torch.contiguous_format)
    db1 = None if b1 is None else _empty_like(b1, memory_format=torch.contiguous_format)
    db2 = None if b2 is None else _empty_like(b2, memory_format=torch.contiguous_format)
    cdt = _compute_dtype(x, w1, w2)
    cfg = dict(config or mlp_config(T * k, E, cdt))
    BM, BF, BD = cfg["BLOCK_M"], cfg["BLOCK_F"], cfg["BLOCK_D"]
    kw = dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1))
    xc, w1c, w2c = x.to(cdt), w1.to(cdt), w2.to(cdt)
    go = grad_out.to(cdt).contiguous()
    g = gates.contiguous()
    rt = _Routing(expert_ids.reshape(T, k), E, BM)
    nF = triton.cdiv(F, BF)
    a_buf = _empty((rt.L, F), dtype=cdt, device=dev)
    dh = _empty((rt.L, F1), dtype=cdt, device=dev)
    dgp = torch.zeros((nF, rt.N), dtype=torch.float32, device=dev)  # invalid assignments keep 0
    dummy = a_buf
    prec = _prec(cdt)
    if rt.N:
        _mlp_bwd_act_kernel[(rt.NB, nF)](
            xc,
            w1c,
            dummy if b1 is None else b1,
            w2c,
            dummy if b2 is None else b2,
            go,
            g,
            rt.sorted,
            rt.block_eid,
            a_buf,
            dh,
            dgp,
            rt.N,
            D,
            F,
            xc.stride(0),
            xc.stride(1),
            w1c.stride(0),
            w1c.stride(1),
            w1c.stride(2),
            0 if b1 is None else b1.stride(0),
            w2c.stride(0),
            w2c.stride(1),
            w2c.stride(2),
            0 if b2 is None else b2.stride(0),
            go.stride(0),
            a_buf.stride(0),
            dh.stride(0),
            K=k,
            ACT=_ACT[activation],
            HAS_B1=b1 is not None,
            HAS_B2=b2 is not None,
            PREC=prec,
            BLOCK_M=BM,
            BLOCK_F=BF,
            BLOCK_D=BD,
            **kw,
        )
    dgates = dgp.sum(0).view(T, k).to(gates.dtype)  # fixed-order reduction over F tiles
    # dW2[e] = a_e^T (g * grad_out)_e, db2[e] = sum (g * grad_out)_e
    _grouped_xty_kernel[(E, triton.cdiv(F, BF), triton.cdiv(D, BD))](
        a_buf,
        go,
        g,
        rt.sorted,
        rt.seg,
        rt.counts,
        dw2,
        dummy if db2 is None else db2,
        rt.N,
        F,
        D,
        a_buf.stride(0),
        a_buf.stride(1),
        go.stride(0),
        dw2.stride(0),
        dw2.stride(1),
        dw2.stride(2),
        0 if db2 is None else db2.stride(0),
        K=k,
        X_BY_TOKEN=False,
        Y_BY_TOKEN_GATED=True,
        HAS_BIAS=db2 is not None,
        PREC=prec,
        BLOCK_M=BM,
        BLOCK_P=BF,
        BLOCK_Q=BD,
        **kw,
    )
    # dW1[e] = x_e^T dh_e, db1[e] = sum dh_e
    _grouped_xty_kernel[(E, triton.cdiv(D, BD), triton.cdiv(F1, BF))](
        xc,
        dh,
        g,
        rt.sorted,
        rt.seg,
        rt.counts,
        dw1,
        dummy if db1 is None else db1,
        rt.N,
        D,
        F1,
        xc.stride(0),
        xc.stride(1),
        dh.stride(0),
        dw1.stride(0),
        dw1.stride(1),
        dw1.stride(2),
        0 if db1 is None else db1.stride(0),
        K=k,
        X_BY_TOKEN=True,
        Y_BY_TOKEN_GATED=False,
        HAS_BIAS=db1 is not None,
        PREC=prec,
        BLOCK_M=BM,
        BLOCK_P=BD,
        BLOCK_Q=BF,
        **kw,
    )
    # dX: per-assignment dh @ w1[e]^T, then the fixed-order k-way combine
    dxa = _empty((rt.N, D), dtype=torch.float32, device=dev)
    if rt.N:
        _mlp_dx_kernel[(rt.NB, triton.cdiv(D, BD))](
            dh,
            w1c,
            rt.sorted,
            rt.block_eid,
            dxa,
            rt.N,
            D,
            F1,
            dh.stride(0),
            w1c.stride(0),
            w1c.stride(1),
            w1c.stride(2),
            dxa.stride(0),
            K=k,
            PREC=prec,
            BLOCK_M=BM,
            BLOCK_F=BF,
            BLOCK_D=BD,
            **kw,
        )
    dx = _combine(dxa, rt, E, x.dtype, D)
    return dx, dw1, dw2, dgates, db1, db2
