"""Triton kernels for the D3Diff loss fused with the LM head (vocabulary-tiled, CCE geometry).

Computes, for logits ``ℓ = hidden @ weight.T + bias`` that are never written to memory, the
per-row numbers the whole D3Diff loss is assembled from (see ``unif2ace/kernels/_custom_ops/d3diff.py``,
``RowStats``): ``row_max_i = max_v ℓ_iv``, ``lse_rel_i = log Σ_v exp(ℓ_iv − row_max_i)`` and
``tgt_i = ℓ_i[target_i]`` (fp32, 0, 0, 0 on rows with ``target == ignore_index``), and their
backward for hidden, weight and bias.

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
    runs zero loop iterations, and the dW kernel shares the ``⌈count / BLOCK_M⌉`` row blocks
    that carry loss evenly among its row splits.
    Hidden rows are gathered through ``order`` inside the kernels (no copy), so the cost falls
    with the masking rate.

Forward (:func:`head_lse_gather`)
    Programs over (row block, vocabulary split). Each sweeps its split's BLOCK_V tiles with an
    online max / sum-exp per row (the rescale guarded while the max is −inf), picks the target
    logit in the tile that holds it, and writes a partial max, log-sum-exp relative to it and
    ``tgt`` per split; a tiny torch max / ``logsumexp`` / ``sum`` over the splits finishes the job.

Backward (:func:`head_lse_gather_backward`)
    ``dℓ = grad_lse·exp((ℓ − row_max) − lse_rel) + grad_tgt·[v = target]`` from recomputed logit tiles, then
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

Block sizes come from a small table keyed by kernel (:data:`KERNELS`), dtype and D class
(:func:`pick_config`; checked for spills by the sm_90a compile check, to be tuned on an H100), no
autotuning. Under the interpreter (CPU tensors, tests) :data:`INTERPRETER_CONFIG`
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
from .d3diff import online_lse_step

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
    """Launch parameters of one kernel. ``splits``: None = choose from the SM count (CUDA); an int
    fixes the number of vocabulary splits (forward, dH) and row splits (dW), clipped to what
    exists."""

    block_m: int
    block_v: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    splits: Optional[int] = None
    max_splits: int = 16


KERNELS = ("fwd", "dh", "dw", "atomic")
"""The kernels, each with its own config: the forward, the deterministic backward's dH and dW,
and the opt-in atomic backward."""

# (kernel, dtype class, D class) -> config; checked by scripts/check_triton_sm90.py (no spill in
# 16-bit kernels, none in the hot loops of fp32 ones, wgmma for the 64-row 16-bit dots; registers
# and shared memory in benchmarks/results/triton_sm90_resources.md). Untuned for speed: to be
# timed on an H100.
#   16-bit: the logit tile and dℓ (hi + lo) live in registers next to the wgmma accumulator, so
#   the gradient kernels take 64-row tiles and a narrower K step than the forward.
#   fp32 IEEE (FMA, no tensor cores): a dot holds its whole reduction dimension in registers per
#   thread, so the dot that reduces over a tile of the loop (dH over BLOCK_V, dW over BLOCK_M)
#   keeps that tile at 16; with TF32 (torch.set_float32_matmul_precision("high")) the same tiles
#   run on wgmma.
_C = FusedConfig
_CONFIGS = {
    ("fwd", "16bit", "small"): _C(block_m=64, block_v=128, block_k=64, num_warps=4, num_stages=3),
    ("fwd", "16bit", "large"): _C(block_m=128, block_v=128, block_k=64, num_warps=8, num_stages=3),
    ("dh", "16bit", "small"): _C(block_m=64, block_v=128, block_k=64, num_warps=8, num_stages=3),
    ("dh", "16bit", "large"): _C(block_m=64, block_v=128, block_k=64, num_warps=8, num_stages=3),
    ("dw", "16bit", "small"): _C(block_m=64, block_v=128, block_k=64, num_warps=8, num_stages=3),
    ("dw", "16bit", "large"): _C(block_m=64, block_v=128, block_k=64, num_warps=8, num_stages=3),
    ("atomic", "16bit", "small"): _C(block_m=64, block_v=128, block_k=64, num_warps=8, num_stages=3),
    ("atomic", "16bit", "large"): _C(block_m=64, block_v=128, block_k=64, num_warps=8, num_stages=3),
    ("fwd", "fp32", "small"): _C(block_m=64, block_v=64, block_k=32, num_warps=4, num_stages=2),
    ("fwd", "fp32", "large"): _C(block_m=64, block_v=128, block_k=32, num_warps=8, num_stages=2),
    ("dh", "fp32", "small"): _C(block_m=64, block_v=16, block_k=32, num_warps=4, num_stages=2),
    ("dh", "fp32", "large"): _C(block_m=64, block_v=16, block_k=32, num_warps=4, num_stages=2),
    ("dw", "fp32", "small"): _C(block_m=16, block_v=64, block_k=32, num_warps=4, num_stages=2),
    ("dw", "fp32", "large"): _C(block_m=16, block_v=64, block_k=32, num_warps=4, num_stages=2),
    ("atomic", "fp32", "small"): _C(block_m=16, block_v=16, block_k=32, num_warps=4, num_stages=2),
    ("atomic", "fp32", "large"): _C(block_m=16, block_v=16, block_k=32, num_warps=4, num_stages=2),
}
_D_SMALL = 1024

INTERPRETER_CONFIG = FusedConfig(block_m=64, block_v=256, block_k=128, num_warps=4, num_stages=1, splits=1)
"""CPU tensors under TRITON_INTERPRET=1: few, large program instances (~1 ms each)."""


def pick_config(kernel: str, dtype: torch.dtype, D: int, device: torch.device) -> FusedConfig:
    """The config of ``kernel`` (one of :data:`KERNELS`) for inputs of ``dtype`` with D columns."""
    if not _launch.on_gpu(device):
        return INTERPRETER_CONFIG
    dclass = "small" if D <= _D_SMALL else "large"
    return _CONFIGS[(kernel, "fp32" if dtype == torch.float32 else "16bit", dclass)]


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 operands: exact IEEE products unless torch allows TF32 matmuls
    (``torch.set_float32_matmul_precision("high")`` or ``allow_tf32``); 16-bit: the default."""
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
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 [rows, cols] tile of hidden[rows] @ weight[cols].T (+ bias[cols])."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
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
def _row_coefficients(MAX, LREL, GL, GT, rows, m_mask):
    """(row max, lse_rel, grad_lse, grad_tgt) of the rows, 0 outside the mask."""
    mx = tl.load(MAX + rows, mask=m_mask, other=0.0)
    lrel = tl.load(LREL + rows, mask=m_mask, other=0.0)
    gl = tl.load(GL + rows, mask=m_mask, other=0.0)
    gt = tl.load(GT + rows, mask=m_mask, other=0.0)
    return mx, lrel, gl, gt


@triton.jit
def _dlogit_tile(
    H,
    W,
    Bias,
    rows,
    m_mask,
    tgt,
    coefs,
    cols,
    c_mask,
    D,
    stride_h,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 dℓ tile = gl·exp((ℓ − max) − lse_rel) + gt·[v = t] of the recomputed logit tile, 0
    outside the valid rows/columns; ``coefs`` from :func:`_row_coefficients`."""
    logits = _logit_tile(H, W, Bias, rows, m_mask, cols, c_mask, D, stride_h, stride_w, HAS_BIAS, BLOCK_K, PRECISION)
    mx, lrel, gl, gt = coefs
    p = tl.exp((logits - mx[:, None]) - lrel[:, None])
    g = gl[:, None] * p + tl.where(cols[None, :] == tgt[:, None], gt[:, None], 0.0)
    return tl.where(m_mask[:, None] & c_mask[None, :], g, 0.0)


@triton.jit
def _operand(g32, DT: tl.constexpr, SPLIT_GRAD: tl.constexpr):
    """dℓ as the gradient GEMMs' operand in dtype DT: (hi, lo) with hi + lo ≈ g32 when SPLIT_GRAD
    (lo is hi otherwise, and unused)."""
    hi = g32.to(DT)
    if SPLIT_GRAD:
        lo = (g32 - hi.to(tl.float32)).to(DT)
    else:
        lo = hi
    return hi, lo


@triton.jit
def _dot_hi_lo(a, b, acc, SPLIT_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b for an operand pair a = (hi, lo) (see :func:`_operand`)."""
    hi, lo = a
    acc = tl.dot(hi, b, acc, input_precision=PRECISION)
    if SPLIT_GRAD:
        acc = tl.dot(lo, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dh_step(g, W, cols, c_mask, ks, k_mask, stride_w, acc, SPLIT_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    """acc + dℓ @ W[cols, ks] (rows × K chunk)."""
    w = tl.load(W + cols[:, None] * stride_w + ks[None, :], mask=c_mask[:, None] & k_mask[None, :], other=0.0)
    return _dot_hi_lo(g, w, acc, SPLIT_GRAD, PRECISION)


@triton.jit
def _transposed(pair):
    """(hiᵀ, loᵀ) of an operand pair."""
    hi, lo = pair
    return tl.trans(hi), tl.trans(lo)


@triton.jit
def _dw_step(gT, H, rows, m_mask, ks, k_mask, stride_h, acc, SPLIT_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    """acc + dℓᵀ @ H[rows, ks] (vocabulary tile × K chunk)."""
    h = tl.load(H + rows[:, None] * stride_h + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    return _dot_hi_lo(gT, h, acc, SPLIT_GRAD, PRECISION)


@triton.jit
def _split_range(pid_s, n_units, per_split):
    """[lo, hi) of split pid_s over n_units units, per_split each."""
    lo = pid_s * per_split
    return lo, tl.minimum(lo + per_split, n_units)


@triton.jit
def _rows_and_tiles(ORDER, COUNT, T, V, tiles_per_split, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program (row block, vocabulary split) of the forward and dH grids: its rows, their mask and
    targets, and its tile range [t_lo, t_hi) (empty for a row block beyond the count)."""
    rows, m_mask, tgt, active = _row_block(ORDER, COUNT, T, tl.program_id(0), BLOCK_M)
    t_lo, t_hi = _split_range(tl.program_id(1), tl.cdiv(V, BLOCK_V), tiles_per_split)
    return rows, m_mask, tgt, t_lo, tl.where(active, t_hi, t_lo)


@triton.jit
def _fwd_kernel(
    H,
    W,
    Bias,
    T,
    ORDER,
    COUNT,
    PART_MAX,
    PART_LREL,
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
    rows, m_mask, tgt, t_lo, t_hi = _rows_and_tiles(ORDER, COUNT, T, V, tiles_per_split, BLOCK_M, BLOCK_V)
    offs_v = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    tg = tl.zeros((BLOCK_M,), tl.float32)
    for tile in range(t_lo, t_hi):
        cols = (tile * BLOCK_V + offs_v).to(tl.int64)
        c_mask = cols < V
        acc = _logit_tile(H, W, Bias, rows, m_mask, cols, c_mask, D, stride_h, stride_w, HAS_BIAS, BLOCK_K, PRECISION)
        x = tl.where(c_mask[None, :], acc, float("-inf"))
        m, s = online_lse_step(m, s, tl.max(x, 1), x, 1)
        tg += tl.sum(tl.where(cols[None, :] == tgt[:, None], acc, 0.0), 1)
        if DEBUG:
            tl.atomic_add(CTR, 1, sem="relaxed")
    out = tl.program_id(1).to(tl.int64) * N + rows
    tl.store(PART_MAX + out, m, mask=m_mask)
    tl.store(PART_LREL + out, tl.log(tl.where(m_mask, s, 1.0)), mask=m_mask)  # idle rows: no log(0)
    tl.store(PART_TGT + out, tg, mask=m_mask)


@triton.jit
def _bwd_dh_kernel(
    H,
    W,
    Bias,
    T,
    ORDER,
    COUNT,
    MAX,
    LREL,
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
    rows, m_mask, tgt, t_lo, t_hi = _rows_and_tiles(ORDER, COUNT, T, V, tiles_per_split, BLOCK_M, BLOCK_V)
    coefs = _row_coefficients(MAX, LREL, GL, GT, rows, m_mask)
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    dh_base = DH + (tl.program_id(1).to(tl.int64) * N + rows[:, None]) * D
    for tile in range(t_lo, t_hi):
        cols = (tile * BLOCK_V + offs_v).to(tl.int64)
        c_mask = cols < V
        args = (H, W, Bias, rows, m_mask, tgt, coefs, cols, c_mask, D, stride_h, stride_w)
        g32 = _dlogit_tile(*args, HAS_BIAS, BLOCK_K, PRECISION)
        g = _operand(g32, W.dtype.element_ty, SPLIT_GRAD)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < D
            io = m_mask[:, None] & k_mask[None, :]
            acc = tl.load(dh_base + ks[None, :], mask=io, other=0.0)
            acc = _dh_step(g, W, cols, c_mask, ks, k_mask, stride_w, acc, SPLIT_GRAD, PRECISION)
            tl.store(dh_base + ks[None, :], acc, mask=io)
        if DEBUG:
            tl.atomic_add(CTR, 1, sem="relaxed")


@triton.jit
def _bwd_dw_kernel(
    H,
    W,
    Bias,
    T,
    ORDER,
    COUNT,
    MAX,
    LREL,
    GL,
    GT,
    DW,
    DB,
    CTR,
    CTR_SPLITS,
    N,
    V,
    D,
    stride_h,
    stride_w,
    n_splits,
    HAS_BIAS: tl.constexpr,
    DEBUG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT_GRAD: tl.constexpr,
):
    """dW/dbias partial of row split pid_s for vocabulary tile pid_v (exclusive). The n_splits
    splits share the row blocks that hold rows carrying loss -- their number comes from the
    device count, not from N -- evenly."""
    pid_v = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_blocks = tl.cdiv(tl.load(COUNT), BLOCK_M)  # only row blocks holding rows that carry loss
    b_lo, b_hi = _split_range(pid_s, n_blocks, tl.cdiv(n_blocks, n_splits))
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    c_mask = cols < V
    offs_k = tl.arange(0, BLOCK_K)
    dw_base = DW + (pid_s.to(tl.int64) * V + cols[:, None]) * D
    db = tl.zeros((BLOCK_V,), tl.float32)
    for rb in range(b_lo, b_hi):
        rows, m_mask, tgt, active = _row_block(ORDER, COUNT, T, rb, BLOCK_M)
        coefs = _row_coefficients(MAX, LREL, GL, GT, rows, m_mask)
        args = (H, W, Bias, rows, m_mask, tgt, coefs, cols, c_mask, D, stride_h, stride_w)
        g32 = _dlogit_tile(*args, HAS_BIAS, BLOCK_K, PRECISION)
        if HAS_BIAS:
            db += tl.sum(g32, 0)
        gT = _transposed(_operand(g32, H.dtype.element_ty, SPLIT_GRAD))
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < D
            io = c_mask[:, None] & k_mask[None, :]
            acc = tl.load(dw_base + ks[None, :], mask=io, other=0.0)
            acc = _dw_step(gT, H, rows, m_mask, ks, k_mask, stride_h, acc, SPLIT_GRAD, PRECISION)
            tl.store(dw_base + ks[None, :], acc, mask=io)
        if DEBUG:
            tl.atomic_add(CTR, 1, sem="relaxed")
            tl.atomic_add(CTR_SPLITS + pid_s, 1, sem="relaxed")
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
    MAX,
    LREL,
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
    """One (row block, vocabulary tile): dH, dW, dbias by fp32 atomics (relaxed: plain sums, no
    ordering needed; non-deterministic summation order)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows, m_mask, tgt, active = _row_block(ORDER, COUNT, T, pid_m, BLOCK_M)
    if active:
        coefs = _row_coefficients(MAX, LREL, GL, GT, rows, m_mask)
        cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        c_mask = cols < V
        args = (H, W, Bias, rows, m_mask, tgt, coefs, cols, c_mask, D, stride_h, stride_w)
        g32 = _dlogit_tile(*args, HAS_BIAS, BLOCK_K, PRECISION)
        if HAS_BIAS:
            tl.atomic_add(DB + cols, tl.sum(g32, 0), mask=c_mask, sem="relaxed")
        g = _operand(g32, H.dtype.element_ty, SPLIT_GRAD)
        gT = _transposed(g)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < D
            zero_h = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
            zero_w = tl.zeros((BLOCK_V, BLOCK_K), tl.float32)
            ch = _dh_step(g, W, cols, c_mask, ks, k_mask, stride_w, zero_h, SPLIT_GRAD, PRECISION)
            cw = _dw_step(gT, H, rows, m_mask, ks, k_mask, stride_h, zero_w, SPLIT_GRAD, PRECISION)
            hm, wm = m_mask[:, None] & k_mask[None, :], c_mask[:, None] & k_mask[None, :]
            tl.atomic_add(DH + rows[:, None] * D + ks[None, :], ch, mask=hm, sem="relaxed")
            tl.atomic_add(DW + cols[:, None] * D + ks[None, :], cw, mask=wm, sem="relaxed")
        if DEBUG:
            tl.atomic_add(CTR, 1, sem="relaxed")


# ------------------------------------------------------------------------------------ launchers


def _unit_cols(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _prep(hidden, weight, bias, target, ignore_index):
    hidden, weight = _unit_cols(hidden), _unit_cols(weight)
    bias = None if bias is None else bias.contiguous()
    target = target.contiguous()
    valid, order, count = compact_rows(target, ignore_index)
    return hidden, weight, bias, target, valid, order, count


def _configs(hidden, config: Optional[FusedConfig], *kernels: str):
    """The config of each kernel: ``config`` for all of them when given, else its table entry."""
    D = hidden.shape[1]
    return [config if config is not None else pick_config(k, hidden.dtype, D, hidden.device) for k in kernels]


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(row_max, lse_rel, tgt)``, fp32 ``[N]``, of ``hidden @ weight.T + bias`` without
    storing logits.

    Rows with ``target == ignore_index`` get 0, 0, 0 and cost nothing; a target outside [0, V)
    (value checks off) gives ``tgt = NaN``. ``debug_counter`` (int32 [1], test hook): incremented
    once per logit tile computed; also NaN-poisons the internal partial buffers.
    """
    hidden, weight, bias, target, valid, order, count = _prep(hidden, weight, bias, target, ignore_index)
    (N, D), V = hidden.shape, weight.shape[0]
    (cfg,) = _configs(hidden, config, "fwd")
    dev = hidden.device
    if N == 0:
        return tuple(torch.zeros(0, dtype=torch.float32, device=dev) for _ in range(3))
    n_tiles = triton.cdiv(V, cfg.block_v)
    n_rb = triton.cdiv(N, cfg.block_m)
    S, per = _split(n_tiles, n_rb, cfg, dev)
    part_max, part_lrel, part_tgt = torch.empty((3, S, N), dtype=torch.float32, device=dev)
    if debug_counter is not None:  # test hook: rows that carry loss must all be written
        for part in (part_max, part_lrel, part_tgt):
            part.fill_(float("nan"))
    ctr = debug_counter if debug_counter is not None else count
    b_arg = bias if bias is not None else hidden
    args = (hidden, weight, b_arg, target, order, count, part_max, part_lrel, part_tgt, ctr, N, V, D)
    launch(
        Launch(
            _fwd_kernel,
            (n_rb, S),
            args + (hidden.stride(0), weight.stride(0), per),
            *_meta(hidden, bias, cfg, debug_counter),
        )
    )
    # merge the splits (max, then the relative sums rescaled to it); ignored rows were never
    # written: select them away (no host sync)
    if S == 1:
        mx, lse_rel, tgt = part_max[0], part_lrel[0], part_tgt[0]
    else:
        mx = part_max.max(0).values
        lse_rel = torch.logsumexp((part_max - mx) + part_lrel, 0)
        tgt = part_tgt.sum(0)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    in_range = (target >= 0) & (target < V)
    tgt = torch.where(in_range, tgt, torch.full_like(zero, float("nan")))
    return tuple(torch.where(valid, x, zero) for x in (mx, lse_rel, tgt))


def head_lse_gather_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    row_max: torch.Tensor,
    lse_rel: torch.Tensor,
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
    ``torch.use_deterministic_algorithms``). ``debug_counter`` (int32, test hook): element 0 is
    incremented once per logit tile recomputed (both kernels of the deterministic scheme); with
    more elements, element 1 + s counts the tiles of the dW kernel's row split s. ``precise_grad``:
    None = :data:`PRECISE_GRAD` (16-bit inputs only).
    """
    hidden, weight, bias, target, valid, order, count = _prep(hidden, weight, bias, target, ignore_index)
    (N, D), V = hidden.shape, weight.shape[0]
    dev = hidden.device
    if deterministic is None:
        deterministic = DETERMINISTIC or torch.are_deterministic_algorithms_enabled()
    rv = tuple(x.contiguous().float() for x in (row_max, lse_rel, grad_lse, grad_tgt))
    ctr = debug_counter if debug_counter is not None else count
    if precise_grad is None:
        precise_grad = PRECISE_GRAD
    split_grad = bool(precise_grad) and hidden.dtype != torch.float32
    b_arg = bias if bias is not None else hidden
    common = (hidden, weight, b_arg, target, order, count, *rv)
    strides = (hidden.stride(0), weight.stride(0))
    if N == 0:
        gh = torch.zeros((0, D), dtype=torch.float32, device=dev)
        gw = torch.zeros((V, D), dtype=torch.float32, device=dev)
        gb = torch.zeros(V, dtype=torch.float32, device=dev)
    elif deterministic:
        c_h, c_w = _configs(hidden, config, "dh", "dw")
        n_tiles, n_rb = triton.cdiv(V, c_h.block_v), triton.cdiv(N, c_h.block_m)
        S_h, per_h = _split(n_tiles, n_rb, c_h, dev, bytes_per_split=N * D * 4)
        dh = torch.zeros((S_h, N, D), dtype=torch.float32, device=dev)
        meta = _meta(hidden, bias, c_h, debug_counter, SPLIT_GRAD=split_grad)
        launch(Launch(_bwd_dh_kernel, (n_rb, S_h), common + (dh, ctr, N, V, D, *strides, per_h), *meta))
        # row splits planned for all N rows; the kernel shares the row blocks that carry loss
        # (the device count) evenly among them
        n_tiles, n_rb = triton.cdiv(V, c_w.block_v), triton.cdiv(N, c_w.block_m)
        S_w, _ = _split(n_rb, n_tiles, c_w, dev, bytes_per_split=V * D * 4)
        dw = torch.zeros((S_w, V, D), dtype=torch.float32, device=dev)
        db = torch.empty((S_w, V), dtype=torch.float32, device=dev)
        if debug_counter is not None:
            db.fill_(float("nan"))
        per_split_ctr = ctr  # unread unless debugging
        if debug_counter is not None:  # element 1 + s: tiles of row split s (scratch when too short)
            n = debug_counter.numel()
            per_split_ctr = debug_counter[1:] if n > S_w else torch.zeros(S_w, dtype=torch.int32, device=dev)
        meta = _meta(hidden, bias, c_w, debug_counter, SPLIT_GRAD=split_grad)
        args = common + (dw, db, ctr, per_split_ctr, N, V, D, *strides, S_w)
        launch(Launch(_bwd_dw_kernel, (n_tiles, S_w), args, *meta))
        gh = dh[0] if S_h == 1 else dh.sum(0)
        gw = dw[0] if S_w == 1 else dw.sum(0)
        gb = db[0] if S_w == 1 else db.sum(0)
    else:
        (c_a,) = _configs(hidden, config, "atomic")
        n_tiles, n_rb = triton.cdiv(V, c_a.block_v), triton.cdiv(N, c_a.block_m)
        gh = torch.zeros((N, D), dtype=torch.float32, device=dev)
        gw = torch.zeros((V, D), dtype=torch.float32, device=dev)
        gb = torch.zeros(V, dtype=torch.float32, device=dev)
        meta = _meta(hidden, bias, c_a, debug_counter, SPLIT_GRAD=split_grad)
        launch(Launch(_bwd_atomic_kernel, (n_rb, n_tiles), common + (gh, gw, gb, ctr, N, V, D, *strides), *meta))
    gh = gh.to(hidden.dtype)
    gw = gw.to(weight.dtype)
    gb = gb.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return gh, gw, gb
