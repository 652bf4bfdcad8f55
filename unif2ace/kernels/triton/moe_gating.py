"""Triton kernels of the grouped MoE gating (forward + backward) and their launch glue.

Semantics are those of :mod:`unif2ace.kernels.reference.moe_gating`; this file only makes them fast.

One program per BLOCK_T tokens. Each token reads its own group's column window (group offsets
and sizes come from two tiny int32 tables), computes softmax/sigmoid in fp32, picks the top-k
by k rounds of "max, lowest index among the maxima" (the reference's tie rule), optionally
renormalises, and writes ids (int32) and gates. Balance statistics are deterministic: every
program writes per-block partial sums (scores, counts, tokens per group) into its own row of
a partial buffer, and a second one-program-per-group kernel reduces the rows in block order.
No float atomics. The backward recomputes scores and choices per token and applies the
closed form of ``moe_gating_backward_ref`` in a kernel; the per-expert term
``dP_e / T_g`` is formed by a few elementwise torch ops on ``[E_total]`` vectors.
Groups of more than ``MAX_GROUP_EXPERTS`` experts (one tile) run the reference instead.

Numerics: every load is converted to fp32; scores, selection and statistics are fp32. All address
arithmetic is int64.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..reference.moe_gating import moe_gating_backward_ref, moe_gating_ref
from ._launch import Launch, interpreting, launch

__all__ = ["MAX_GROUP_EXPERTS", "moe_gating", "moe_gating_backward"]

Tensor = torch.Tensor
# every output and scratch buffer is allocated through these (tests swap in poisoned allocations)
_empty = torch.empty
MAX_GROUP_EXPERTS = 1024  # one tile per group window; larger groups would need a tiled top-k


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
def _take_max(sel, cols, BLOCK_E: tl.constexpr):
    # one top-k round per row: the max m, its column idx (ties -> lowest index), the one-hot hit,
    # and sel with that column taken out (scores are >= 0; -2 marks taken, -1 padding)
    m = tl.max(sel, 1)
    idx = tl.min(tl.where(sel == m[:, None], cols[None, :], BLOCK_E), 1)
    hit = cols[None, :] == idx[:, None]
    return m, idx, hit, tl.where(hit, -2.0, sel)


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
        m, idx, hit, sel = _take_max(sel, cols, BLOCK_E)
        chosen += (hit & cmask).to(tl.int32)
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
        m, idx, hit, sel = _take_max(sel, cols, BLOCK_E)
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
    cap = 8192 if interpreting() else 4096
    block_t = max(1, min(_pow2(T, 1), cap // block_e, 128 if interpreting() else 64))
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
        launch(
            Launch(
                _gating_fwd_kernel,
                (n_blocks,),
                (router_logits, group_ids, goff, gsize, ids, gates, part_s, part_c, part_n, T, G, E_total)
                + (router_logits.stride(0), router_logits.stride(1), group_ids.stride(0)),
                dict(
                    K=k,
                    BLOCK_T=block_t,
                    BLOCK_E=block_e,
                    BLOCK_K=_pow2(k, 2),
                    SIGMOID=score == "sigmoid",
                    RENORM=bool(renormalize),
                ),
                dict(num_warps=4),
            )
        )
    launch(
        Launch(
            _gating_stats_kernel,
            (G,),
            (part_s, part_c, part_n, goff, gsize, frac, prob, loss, ntok, n_blocks, G, E_total, float(balance_coef)),
            dict(K=k, BLOCK_E=block_e),
            dict(num_warps=4),
        )
    )
    return ids, gates, frac, prob, loss, ntok


def moe_gating(
    router_logits: Tensor,
    group_ids: Tensor,
    group_sizes: Sequence[int],
    top_k: int,
    score: str = "softmax",
    renormalize: bool = False,
    balance_coef: float = 0.01,
):
    """Same contract as ``moe_gating_ref``: ``(expert_ids, gates, expert_fraction, expert_prob, balance_loss)``."""
    if max(group_sizes) > MAX_GROUP_EXPERTS:
        return moe_gating_ref(router_logits, group_ids, list(group_sizes), top_k, score, renormalize, balance_coef)
    ids, gates, frac, prob, loss, _ = _gating_launch(
        router_logits, group_ids, list(group_sizes), top_k, score, renormalize, balance_coef
    )
    return ids, gates, frac, prob, loss


def moe_gating_backward(
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
    launch(
        Launch(
            _gating_bwd_kernel,
            (triton.cdiv(T, block_t),),
            (router_logits, group_ids, *_group_tables(sizes, dev)[:2], grad_gates, dps, dz, T, E_total)
            + (router_logits.stride(0), router_logits.stride(1), group_ids.stride(0))
            + (grad_gates.stride(0), grad_gates.stride(1), dz.stride(0)),
            dict(K=int(top_k), BLOCK_T=block_t, BLOCK_E=block_e, SIGMOID=score == "sigmoid", RENORM=bool(renormalize)),
            dict(num_warps=4),
        )
    )
    return dz
