"""Triton kernels for the D3Diff loss fused with the LM head (vocabulary-tiled, CCE geometry).

Computes, for logits ``ℓ = hidden @ weight.T + bias`` that are never written to memory, the two
per-row numbers the whole D3Diff loss is assembled from (see ``unif2ace/kernels/_custom_ops/d3diff.py``):
``lse_i = logsumexp_v ℓ_iv`` and ``tgt_i = ℓ_i[target_i]`` (fp32, 0 and 0 on rows with
``target == ignore_index``), and their backward for hidden, weight and bias.

Shapes and dtypes: hidden ``[N, D]``, weight ``[V, D]``, bias ``[V]`` or None, one dtype among
fp32/fp16/bf16, unit column stride (otherwise copied); target ``[N]`` int. Gradients come back in
the inputs' dtypes, accumulated in fp32.

Geometry
    A logit tile ``[BLOCK_M, BLOCK_V]`` is computed by a K-loop over D with ``tl.dot`` (fp32
    accumulator; bf16/fp16 operands stay in their dtype, fp32 operands use IEEE fp32 unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set) and lives only in registers.

Masked-row compaction (no host sync)
    ``order = argsort(target == ignore_index, stable)`` puts the rows that carry loss first, in
    ascending order, and ``count`` (a device int32 scalar) is their number. Grids are sized for
    the worst case (all N rows); each program reads ``count`` and a row block at or beyond it
    runs zero loop iterations, and the dW kernel bounds its loop over row blocks by ``count``.
    Hidden rows are gathered through ``order`` inside the kernels (no copy), so the cost falls
    with the masking rate.

Forward (:func:`head_lse_gather`)
    Programs over (row block, vocabulary split). Each sweeps its split's BLOCK_V tiles with an
    online max / sum-exp per row, picks the target logit in the tile that holds it, and writes
    a partial ``lse`` and ``tgt`` per split; a tiny torch ``logsumexp`` / ``sum`` over the
    splits finishes the job.

Backward (:func:`head_lse_gather_backward`)
    ``dℓ = grad_lse·exp(ℓ − lse) + grad_tgt·[v = target]`` from recomputed logit tiles, then
    ``dH = dℓ @ W``, ``dW = dℓᵀ @ H``, ``dbias = Σ_rows dℓ``. The ``dℓ`` tile is cast to the input
    dtype for the two gradient ``tl.dot`` s, by default as a hi + lo pair (:data:`PRECISE_GRAD`);
    for fp16 inputs this needs |dℓ| < 65504, i.e. per-row upstream gradients of sane size.

    - deterministic (default): two kernels. dH: programs over (row block, vocabulary split),
      each owning its rows of an fp32 partial buffer ``[S, N, D]`` (read-modify-write, no
      atomics); dW/dbias: programs over (vocabulary tile, row split), each owning its tile of an
      fp32 partial ``[S, V, D]``; the partials are summed by torch in a fixed order. The logits
      are recomputed twice (4 GEMM-equivalents in all; 6 with :data:`PRECISE_GRAD`). Split
      counts fill the GPU and are capped by :data:`PARTIAL_BUDGET_BYTES`.
    - ``deterministic=False``: one kernel over (row block, vocabulary tile) that recomputes each
      tile once and ``tl.atomic_add`` s into fp32 ``dH [N, D]``, ``dW [V, D]`` and ``dbias`` (3
      GEMM-equivalents, 5 with :data:`PRECISE_GRAD`; fp32 summation order then varies between runs).

    :data:`DETERMINISTIC` selects the default; ``torch.use_deterministic_algorithms(True)`` forces
    the deterministic scheme.

Block sizes come from a small table keyed by dtype and D class (:func:`pick_config`; to be tuned
on an H100), no autotuning. Under the interpreter (CPU tensors, tests) :data:`INTERPRETER_CONFIG`
is used. Offsets are int64. Everything loaded for arithmetic is converted to fp32 at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import Launch, launch

__all__ = [
    "FusedConfig",
    "pick_config",
    "compact_rows",
    "head_lse_gather",
    "head_lse_gather_backward",
    "DETERMINISTIC",
    "PARTIAL_BUDGET_BYTES",
    "PRECISE_GRAD",
]

DETERMINISTIC = os.environ.get("UNIF2ACE_FUSED_DETERMINISTIC", "1") not in ("0", "")
"""Default backward scheme: True = two kernels, no atomics (bitwise reproducible)."""

PRECISE_GRAD = True
"""16-bit inputs: feed dℓ to the gradient GEMMs as a bf16/fp16 hi + lo pair (two tensor-core dots,
≈ fp32-exact dℓ) instead of rounding it once (as Cut Cross-Entropy/Liger do). Rounding once
costs ~2⁻⁹ of |grad_tgt·W[target]| per element, which shows where the softmax and target terms
cancel; the split doubles the two gradient GEMMs (backward ≈ 6 instead of 4 GEMM-equivalents)."""

PARTIAL_BUDGET_BYTES = 512 << 20
"""Cap on each fp32 partial-gradient buffer of the deterministic backward ([S, N, D], [S, V, D])."""


@dataclass(frozen=True)
class FusedConfig:
    """Launch parameters. ``splits``: None = choose from the SM count (CUDA); an int fixes the
    number of vocabulary splits (forward, dH) and row splits (dW), clipped to what exists."""

    block_m: int
    block_v: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    splits: Optional[int] = None
    max_splits: int = 16


# (dtype class, D class) -> config. Starting points only (CCE/Liger-like tiles); tune on an H100.
_CONFIGS = {
    ("16bit", "small"): FusedConfig(block_m=64, block_v=128, block_k=64, num_warps=4, num_stages=3),
    ("16bit", "large"): FusedConfig(block_m=128, block_v=128, block_k=64, num_warps=8, num_stages=3),
    ("fp32", "small"): FusedConfig(block_m=64, block_v=64, block_k=32, num_warps=4, num_stages=2),
    ("fp32", "large"): FusedConfig(block_m=64, block_v=128, block_k=32, num_warps=8, num_stages=2),
}
_D_SMALL = 1024

INTERPRETER_CONFIG = FusedConfig(block_m=64, block_v=256, block_k=128, num_warps=4, num_stages=1, splits=1)
"""CPU tensors under TRITON_INTERPRET=1: few, large program instances (~1 ms each)."""


def pick_config(dtype: torch.dtype, D: int, device: torch.device) -> FusedConfig:
    if not _launch.on_gpu(device):
        return INTERPRETER_CONFIG
    dclass = "small" if D <= _D_SMALL else "large"
    return _CONFIGS[("fp32" if dtype == torch.float32 else "16bit", dclass)]


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 operands: exact IEEE products unless torch allows TF32 matmuls; 16-bit: the default."""
    if dtype == torch.float32 and not (_launch.on_gpu(device) and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _split(
    n_units: int, base_programs: int, cfg: FusedConfig, device: torch.device, bytes_per_split: int = 0
) -> Tuple[int, int]:
    """(number of splits S, units per split) for ``n_units`` units (tiles or row blocks), every
    split non-empty. ``base_programs``: programs of the grid per split."""
    if cfg.splits is not None:
        want = cfg.splits
    elif _launch.on_gpu(device):
        want = triton.cdiv(2 * _launch.sm_count(device), max(1, base_programs))
    else:
        want = 1
    want = max(1, min(want, cfg.max_splits, n_units))
    if bytes_per_split:
        want = max(1, min(want, PARTIAL_BUDGET_BYTES // bytes_per_split))
    per = triton.cdiv(n_units, want)
    return triton.cdiv(n_units, per), per


def compact_rows(target: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid [N] bool, order [N] int64 with the valid rows first in ascending order, count [1]
    int32), all on the device, no host sync."""
    valid = target != ignore_index
    order = torch.argsort((~valid).to(torch.int8), stable=True)
    count = valid.sum(dtype=torch.int32).reshape(1)
    return valid, order, count


# ------------------------------------------------------------------------------------- kernels


@triton.jit
def _logit_tile(
    H,
    W,
    Bias,
    rows,
    m_mask,
    cols,
    c_mask,
    D,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_V] tile of hidden[rows] @ weight[cols].T (+ bias[cols])."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    h_base = H + rows[:, None] * stride_h
    w_base = W + cols[None, :] * stride_w
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < D
        h = tl.load(h_base + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + ks[:, None], mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(Bias + cols, mask=c_mask, other=0.0).to(tl.float32)
        acc += b[None, :]
    return acc


@triton.jit
def _row_block(ORDER, COUNT, T, pid_m, BLOCK_M: tl.constexpr):
    """Rows (int64, original indices) of compacted row block pid_m, their mask and targets."""
    count = tl.load(COUNT)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs < count
    rows = tl.load(ORDER + offs, mask=m_mask, other=0).to(tl.int64)
    tgt = tl.load(T + rows, mask=m_mask, other=-1).to(tl.int64)
    active = pid_m * BLOCK_M < count
    return rows, m_mask, tgt, active


@triton.jit
def _dlogits(logits, tgt, cols, m_mask, c_mask, lse, gl, gt):
    """dℓ = gl·exp(ℓ − lse) + gt·[v = t], 0 outside the valid rows/columns (fp32)."""
    p = tl.exp(logits - lse[:, None])
    g = gl[:, None] * p + tl.where(cols[None, :] == tgt[:, None], gt[:, None], 0.0)
    return tl.where(m_mask[:, None] & c_mask[None, :], g, 0.0)


@triton.jit
def _fwd_kernel(
    H,
    W,
    Bias,
    T,
    ORDER,
    COUNT,
    PART_LSE,
    PART_TGT,
    CTR,
    N,
    V,
    D,
    stride_h,
    stride_w,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    DEBUG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, m_mask, tgt, active = _row_block(ORDER, COUNT, T, pid_m, BLOCK_M)
    n_tiles = tl.cdiv(V, BLOCK_V)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    t_hi = tl.where(active, t_hi, t_lo)  # row blocks beyond count: no work
    offs_v = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    tg = tl.zeros((BLOCK_M,), tl.float32)
    for tile in range(t_lo, t_hi):
        cols = (tile * BLOCK_V + offs_v).to(tl.int64)
        c_mask = cols < V
        acc = _logit_tile(
            H,
            W,
            Bias,
            rows,
            m_mask,
            cols,
            c_mask,
            D,
            stride_h,
            stride_w,
            HAS_BIAS,
            BLOCK_M,
            BLOCK_V,
            BLOCK_K,
            PRECISION,
        )
        x = tl.where(c_mask[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))  # every tile holds >= 1 column: finite
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        tg += tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), 1)
        m = m_new
        if DEBUG:
            tl.atomic_add(CTR, 1)
    out = pid_s.to(tl.int64) * N + rows
    part = tl.where(m_mask, m, 0.0) + tl.log(tl.where(m_mask, s, 1.0))  # idle rows: no log(0)
    tl.store(PART_LSE + out, part, mask=m_mask)
    tl.store(PART_TGT + out, tg, mask=m_mask)


@triton.jit
def _bwd_dh_kernel(
    H,
    W,
    Bias,
    T,
    ORDER,
    COUNT,
    LSE,
    GL,
    GT,
    DH,
    CTR,
    N,
    V,
    D,
    stride_h,
    stride_w,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    DEBUG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT_GRAD: tl.constexpr,
):
    """dH partial of split pid_s: DH[pid_s, rows, :] += dℓ @ W[tiles of the split] (exclusive)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, m_mask, tgt, active = _row_block(ORDER, COUNT, T, pid_m, BLOCK_M)
    lse = tl.load(LSE + rows, mask=m_mask, other=0.0)
    gl = tl.load(GL + rows, mask=m_mask, other=0.0)
    gt = tl.load(GT + rows, mask=m_mask, other=0.0)
    n_tiles = tl.cdiv(V, BLOCK_V)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)
    t_hi = tl.where(active, t_hi, t_lo)
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    dh_base = DH + (pid_s.to(tl.int64) * N + rows[:, None]) * D
    for tile in range(t_lo, t_hi):
        cols = (tile * BLOCK_V + offs_v).to(tl.int64)
        c_mask = cols < V
        acc = _logit_tile(
            H,
            W,
            Bias,
            rows,
            m_mask,
            cols,
            c_mask,
            D,
            stride_h,
            stride_w,
            HAS_BIAS,
            BLOCK_M,
            BLOCK_V,
            BLOCK_K,
            PRECISION,
        )
        g32 = _dlogits(acc, tgt, cols, m_mask, c_mask, lse, gl, gt)
        g = g32.to(W.dtype.element_ty)
        g_lo = (g32 - g.to(tl.float32)).to(W.dtype.element_ty)  # dead code unless SPLIT_GRAD
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < D
            w = tl.load(W + cols[:, None] * stride_w + ks[None, :], mask=c_mask[:, None] & k_mask[None, :], other=0.0)
            contrib = tl.dot(g, w, input_precision=PRECISION)
            if SPLIT_GRAD:
                contrib = tl.dot(g_lo, w, contrib, input_precision=PRECISION)
            io = m_mask[:, None] & k_mask[None, :]
            old = tl.load(dh_base + ks[None, :], mask=io, other=0.0)
            tl.store(dh_base + ks[None, :], old + contrib, mask=io)
        if DEBUG:
            tl.atomic_add(CTR, 1)


@triton.jit
def _bwd_dw_kernel(
    H,
    W,
    Bias,
    T,
    ORDER,
    COUNT,
    LSE,
    GL,
    GT,
    DW,
    DB,
    CTR,
    N,
    V,
    D,
    stride_h,
    stride_w,
    blocks_per_split,
    HAS_BIAS: tl.constexpr,
    DEBUG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT_GRAD: tl.constexpr,
):
    """dW/dbias partial of row split pid_s for vocabulary tile pid_v (exclusive)."""
    pid_v = tl.program_id(0)
    pid_s = tl.program_id(1)
    count = tl.load(COUNT)
    n_blocks = tl.cdiv(count, BLOCK_M)  # only row blocks holding rows that carry loss
    b_lo = pid_s * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, n_blocks)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    c_mask = cols < V
    offs_k = tl.arange(0, BLOCK_K)
    dw_base = DW + (pid_s.to(tl.int64) * V + cols[:, None]) * D
    db = tl.zeros((BLOCK_V,), tl.float32)
    for rb in range(b_lo, b_hi):
        rows, m_mask, tgt, active = _row_block(ORDER, COUNT, T, rb, BLOCK_M)
        lse = tl.load(LSE + rows, mask=m_mask, other=0.0)
        gl = tl.load(GL + rows, mask=m_mask, other=0.0)
        gt = tl.load(GT + rows, mask=m_mask, other=0.0)
        acc = _logit_tile(
            H,
            W,
            Bias,
            rows,
            m_mask,
            cols,
            c_mask,
            D,
            stride_h,
            stride_w,
            HAS_BIAS,
            BLOCK_M,
            BLOCK_V,
            BLOCK_K,
            PRECISION,
        )
        g32 = _dlogits(acc, tgt, cols, m_mask, c_mask, lse, gl, gt)
        db += tl.sum(g32, 0)
        g = g32.to(H.dtype.element_ty)
        gT = tl.trans(g)
        gT_lo = tl.trans((g32 - g.to(tl.float32)).to(H.dtype.element_ty))
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < D
            h = tl.load(H + rows[:, None] * stride_h + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            contrib = tl.dot(gT, h, input_precision=PRECISION)
            if SPLIT_GRAD:
                contrib = tl.dot(gT_lo, h, contrib, input_precision=PRECISION)
            io = c_mask[:, None] & k_mask[None, :]
            old = tl.load(dw_base + ks[None, :], mask=io, other=0.0)
            tl.store(dw_base + ks[None, :], old + contrib, mask=io)
        if DEBUG:
            tl.atomic_add(CTR, 1)
    if HAS_BIAS:
        tl.store(DB + pid_s.to(tl.int64) * V + cols, db, mask=c_mask)


@triton.jit
def _bwd_atomic_kernel(
    H,
    W,
    Bias,
    T,
    ORDER,
    COUNT,
    LSE,
    GL,
    GT,
    DH,
    DW,
    DB,
    CTR,
    N,
    V,
    D,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    DEBUG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT_GRAD: tl.constexpr,
):
    """One (row block, vocabulary tile): dH, dW, dbias by fp32 atomics (non-deterministic order)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows, m_mask, tgt, active = _row_block(ORDER, COUNT, T, pid_m, BLOCK_M)
    if active:
        lse = tl.load(LSE + rows, mask=m_mask, other=0.0)
        gl = tl.load(GL + rows, mask=m_mask, other=0.0)
        gt = tl.load(GT + rows, mask=m_mask, other=0.0)
        cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        c_mask = cols < V
        acc = _logit_tile(
            H,
            W,
            Bias,
            rows,
            m_mask,
            cols,
            c_mask,
            D,
            stride_h,
            stride_w,
            HAS_BIAS,
            BLOCK_M,
            BLOCK_V,
            BLOCK_K,
            PRECISION,
        )
        g32 = _dlogits(acc, tgt, cols, m_mask, c_mask, lse, gl, gt)
        if HAS_BIAS:
            tl.atomic_add(DB + cols, tl.sum(g32, 0), mask=c_mask)
        g = g32.to(H.dtype.element_ty)
        gT = tl.trans(g)
        g_lo = (g32 - g.to(tl.float32)).to(H.dtype.element_ty)
        gT_lo = tl.trans(g_lo)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < D
            hm = m_mask[:, None] & k_mask[None, :]
            wm = c_mask[:, None] & k_mask[None, :]
            w = tl.load(W + cols[:, None] * stride_w + ks[None, :], mask=wm, other=0.0)
            h = tl.load(H + rows[:, None] * stride_h + ks[None, :], mask=hm, other=0.0)
            ch = tl.dot(g, w, input_precision=PRECISION)
            cw = tl.dot(gT, h, input_precision=PRECISION)
            if SPLIT_GRAD:
                ch = tl.dot(g_lo, w, ch, input_precision=PRECISION)
                cw = tl.dot(gT_lo, h, cw, input_precision=PRECISION)
            tl.atomic_add(DH + rows[:, None] * D + ks[None, :], ch, mask=hm)
            tl.atomic_add(DW + cols[:, None] * D + ks[None, :], cw, mask=wm)
        if DEBUG:
            tl.atomic_add(CTR, 1)


# ------------------------------------------------------------------------------------ launchers


def _unit_cols(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _prep(hidden, weight, bias, target, ignore_index, config):
    hidden, weight = _unit_cols(hidden), _unit_cols(weight)
    bias = None if bias is None else bias.contiguous()
    target = target.contiguous()
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = config if config is not None else pick_config(hidden.dtype, D, hidden.device)
    valid, order, count = compact_rows(target, ignore_index)
    return hidden, weight, bias, target, N, D, V, cfg, valid, order, count


def _meta(hidden, bias, cfg, counter, **extra):
    """(constexprs, compile options) of the head kernels for config ``cfg``."""
    constexprs = dict(
        HAS_BIAS=bias is not None,
        DEBUG=counter is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_V=cfg.block_v,
        BLOCK_K=cfg.block_k,
        PRECISION=_precision(hidden.dtype, hidden.device),
        **extra,
    )
    return constexprs, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def head_lse_gather(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    ignore_index: int,
    *,
    config: Optional[FusedConfig] = None,
    debug_counter: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(lse [N], tgt [N])`` fp32 of ``hidden @ weight.T + bias`` without storing logits.

    Rows with ``target == ignore_index`` get 0, 0 and cost nothing; a target outside [0, V)
    (value checks off) gives ``tgt = NaN``. ``debug_counter`` (int32 [1], test hook): incremented
    once per logit tile computed; also NaN-poisons the internal partial buffers.
    """
    hidden, weight, bias, target, N, D, V, cfg, valid, order, count = _prep(
        hidden, weight, bias, target, ignore_index, config
    )
    dev = hidden.device
    if N == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return z, z.clone()
    n_tiles = triton.cdiv(V, cfg.block_v)
    n_rb = triton.cdiv(N, cfg.block_m)
    S, per = _split(n_tiles, n_rb, cfg, dev)
    part_lse = torch.empty((S, N), dtype=torch.float32, device=dev)
    part_tgt = torch.empty((S, N), dtype=torch.float32, device=dev)
    if debug_counter is not None:  # test hook: rows that carry loss must all be written
        part_lse.fill_(float("nan"))
        part_tgt.fill_(float("nan"))
    ctr = debug_counter if debug_counter is not None else count
    b_arg = bias if bias is not None else hidden
    args = (hidden, weight, b_arg, target, order, count, part_lse, part_tgt, ctr, N, V, D)
    launch(
        Launch(
            _fwd_kernel,
            (n_rb, S),
            args + (hidden.stride(0), weight.stride(0), per),
            *_meta(hidden, bias, cfg, debug_counter),
        )
    )
    # ignored rows were never written: select them away (no host sync)
    lse = part_lse[0] if S == 1 else torch.logsumexp(part_lse, 0)
    tgt = part_tgt[0] if S == 1 else part_tgt.sum(0)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    in_range = (target >= 0) & (target < V)
    lse = torch.where(valid, lse, zero)
    tgt = torch.where(valid, torch.where(in_range, tgt, torch.full_like(zero, float("nan"))), zero)
    return lse, tgt


def head_lse_gather_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_tgt: torch.Tensor,
    ignore_index: int,
    *,
    deterministic: Optional[bool] = None,
    precise_grad: Optional[bool] = None,
    config: Optional[FusedConfig] = None,
    debug_counter: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_hidden, grad_weight, grad_bias)`` in the inputs' dtypes (grad_bias empty without
    bias) for ``dℓ = grad_lse·softmax(ℓ) + grad_tgt·onehot(target)`` on the rows that carry loss.

    ``deterministic``: None = :data:`DETERMINISTIC` (or True under
    ``torch.use_deterministic_algorithms``). ``debug_counter``: incremented once per logit tile
    recomputed (both kernels of the deterministic scheme). ``precise_grad``: None =
    :data:`PRECISE_GRAD` (16-bit inputs only).
    """
    hidden, weight, bias, target, N, D, V, cfg, valid, order, count = _prep(
        hidden, weight, bias, target, ignore_index, config
    )
    dev = hidden.device
    if deterministic is None:
        deterministic = DETERMINISTIC or torch.are_deterministic_algorithms_enabled()
    lse = lse.contiguous().float()
    grad_lse = grad_lse.contiguous().float()
    grad_tgt = grad_tgt.contiguous().float()
    n_tiles = triton.cdiv(V, cfg.block_v)
    n_rb = triton.cdiv(N, cfg.block_m)
    ctr = debug_counter if debug_counter is not None else count
    if precise_grad is None:
        precise_grad = PRECISE_GRAD
    meta = _meta(hidden, bias, cfg, debug_counter, SPLIT_GRAD=bool(precise_grad) and hidden.dtype != torch.float32)
    b_arg = bias if bias is not None else hidden
    common = (hidden, weight, b_arg, target, order, count, lse, grad_lse, grad_tgt)
    strides = (hidden.stride(0), weight.stride(0))
    if N == 0:
        gh = torch.zeros((0, D), dtype=torch.float32, device=dev)
        gw = torch.zeros((V, D), dtype=torch.float32, device=dev)
        gb = torch.zeros(V, dtype=torch.float32, device=dev)
    elif deterministic:
        S_h, per_h = _split(n_tiles, n_rb, cfg, dev, bytes_per_split=N * D * 4)
        dh = torch.zeros((S_h, N, D), dtype=torch.float32, device=dev)
        launch(Launch(_bwd_dh_kernel, (n_rb, S_h), common + (dh, ctr, N, V, D, *strides, per_h), *meta))
        S_w, per_w = _split(n_rb, n_tiles, cfg, dev, bytes_per_split=V * D * 4)
        dw = torch.zeros((S_w, V, D), dtype=torch.float32, device=dev)
        db = torch.empty((S_w, V), dtype=torch.float32, device=dev)
        if debug_counter is not None:
            db.fill_(float("nan"))
        launch(Launch(_bwd_dw_kernel, (n_tiles, S_w), common + (dw, db, ctr, N, V, D, *strides, per_w), *meta))
        gh = dh[0] if S_h == 1 else dh.sum(0)
        gw = dw[0] if S_w == 1 else dw.sum(0)
        gb = db[0] if S_w == 1 else db.sum(0)
    else:
        gh = torch.zeros((N, D), dtype=torch.float32, device=dev)
        gw = torch.zeros((V, D), dtype=torch.float32, device=dev)
        gb = torch.zeros(V, dtype=torch.float32, device=dev)
        launch(Launch(_bwd_atomic_kernel, (n_rb, n_tiles), common + (gh, gw, gb, ctr, N, V, D, *strides), *meta))
    gh = gh.to(hidden.dtype)
    gw = gw.to(weight.dtype)
    gb = gb.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return gh, gw, gb
