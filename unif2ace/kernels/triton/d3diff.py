"""Triton row kernels for the D3Diff loss: per-row log-sum-exp and target logit, and their gradient.

The whole D3Diff loss (mask CE + SEDD score entropy, every parametrisation and reduction) is
assembled in PyTorch from the two ``[N]`` vectors these kernels produce; see
``unif2ace/kernels/_custom_ops/d3diff.py``.

- :func:`lse_gather`: logits ``[N, V]`` (fp32/fp16/bf16, unit column stride), target ``[N]`` int
  -> ``(row_max, lse_rel, tgt)``, fp32 ``[N]`` each (``lse = row_max + lse_rel``; see
  :class:`~unif2ace.kernels._custom_ops.d3diff.RowStats`). One program per row; the row is read
  once in BLOCK_V tiles with an online max / sum-exp in fp32; the rescale is guarded while the
  running max is still −inf (a first tile of −inf, e.g. a vocabulary mask on leading columns, is
  not a NaN). Rows with ``target == ignore_index`` skip the sweep and get 0, 0, 0; a target outside
  [0, V) gives ``tgt = NaN`` (never an out-of-bounds read); NaN in a row reaches ``lse_rel``.
- :func:`lse_gather_backward`: ``grad[i, v] = grad_lse[i]·exp((ℓ[i, v] − row_max[i]) − lse_rel[i]) +
  grad_tgt[i]·[v = t_i]`` in the logits' dtype (exactly 0 on ignored rows), one program per row,
  recomputing the softmax from the saved statistics.

Everything is computed in fp32 right after the load and cast at the store (the interpreter's bf16
arithmetic is broken, see docs/testing.md); offsets are int64.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import Launch, launch

__all__ = ["lse_gather", "lse_gather_backward", "block_v", "online_lse_step"]

MAX_BLOCK_V = 4096


def block_v(V: int) -> int:
    """Vocabulary tile: a power of two >= 16, at most MAX_BLOCK_V."""
    return max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def online_lse_step(m, s, tile_max, x, AXIS: tl.constexpr):
    """One tile of an online log-sum-exp: the running (max m, Σ exp(x − m) s) updated with tile
    ``x`` (fp32, −inf where masked) whose max along AXIS is ``tile_max``; m and s are scalars
    (AXIS 0 of a 1-D tile) or per row (AXIS 1). While the max is still −inf every term is 0: the
    shift is guarded so that −inf − (−inf) never makes a NaN; NaN in x reaches s."""
    m_new = tl.maximum(m, tile_max)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    if AXIS == 0:
        p = tl.sum(tl.exp(x - shift), 0)
    else:
        p = tl.sum(tl.exp(x - shift[:, None]), 1)
    return m_new, s * tl.exp(m - shift) + p


@triton.jit
def _row_target(T, ignore_index):
    """The program's row, its target (int64) and whether the row counts (target != ignore_index)."""
    row = tl.program_id(0)
    t = tl.load(T + row).to(tl.int64)
    return row, t, t != ignore_index


@triton.jit
def _lse_gather_fwd_kernel(
    X,
    T,
    MAX,
    LSE_REL,
    TGT,
    V,
    stride_x,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row, t, valid = _row_target(T, ignore_index)
    x_row = X + row.to(tl.int64) * stride_x
    offs = tl.arange(0, BLOCK_V)
    n_cols = tl.where(valid, V, 0)  # ignored rows skip the sweep
    m = float("-inf")
    s = 0.0
    tg = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m, s = online_lse_step(m, s, tl.max(x, 0), x, 0)
        tg += tl.sum(tl.where(cols == t, x, 0.0), 0)
    in_range = (t >= 0) & (t < V)
    tg = tl.where(in_range, tg, float("nan"))
    # ignored rows: m = -inf, s = 0 -> 0, 0, 0 (and no log(0))
    tl.store(MAX + row, tl.where(valid, m, 0.0))
    tl.store(LSE_REL + row, tl.log(tl.where(valid, s, 1.0)))
    tl.store(TGT + row, tl.where(valid, tg, 0.0))


@triton.jit
def _lse_gather_bwd_kernel(
    X,
    T,
    MAX,
    LSE_REL,
    GL,
    GT,
    G,
    V,
    stride_x,
    stride_g,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row, t, valid = _row_target(T, ignore_index)
    mx = tl.load(MAX + row).to(tl.float32)
    lse_rel = tl.load(LSE_REL + row).to(tl.float32)
    gl = tl.load(GL + row).to(tl.float32)
    gt = tl.load(GT + row).to(tl.float32)
    x_row = X + row.to(tl.int64) * stride_x
    g_row = G + row.to(tl.int64) * stride_g
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        x = tl.load(x_row + cols, mask=in_row & valid, other=0.0).to(tl.float32)
        g = gl * tl.exp((x - mx) - lse_rel) + tl.where(cols == t, gt, 0.0)
        g = tl.where(valid, g, 0.0)
        tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=in_row)


def _rows(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits with unit column stride (any row stride) and a contiguous target."""
    return (logits if logits.stride(-1) == 1 else logits.contiguous()), target.contiguous()


def _plan_fwd(logits, target, stats, ignore_index) -> Launch:
    N, V = logits.shape
    blk = block_v(V)
    return Launch(
        _lse_gather_fwd_kernel,
        (N,),
        (logits, target, *stats, V, logits.stride(0), int(ignore_index)),
        dict(BLOCK_V=blk),
        dict(num_warps=_num_warps(blk)),
    )


def _plan_bwd(logits, target, row_vectors, grad, ignore_index) -> Launch:
    """``row_vectors``: (row_max, lse_rel, grad_lse, grad_tgt), fp32 [N]."""
    N, V = logits.shape
    blk = block_v(V)
    return Launch(
        _lse_gather_bwd_kernel,
        (N,),
        (
            logits,
            target,
            *(v.contiguous() for v in row_vectors),
            grad,
            V,
            logits.stride(0),
            grad.stride(0),
            int(ignore_index),
        ),
        dict(BLOCK_V=blk),
        dict(num_warps=_num_warps(blk)),
    )


def lse_gather(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    *,
    out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(row_max, lse_rel, tgt)`` of ``logits [N, V]``; ``out``: optional preallocated
    fp32 ``[N]`` outputs."""
    logits, target = _rows(logits, target)
    N, V = logits.shape
    if out is None:
        out = tuple(torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    mx, lse_rel, tgt = out
    if N == 0:
        return mx, lse_rel, tgt
    launch(_plan_fwd(logits, target, (mx, lse_rel, tgt), ignore_index))
    return mx, lse_rel, tgt


def lse_gather_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    row_max: torch.Tensor,
    lse_rel: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_tgt: torch.Tensor,
    ignore_index: int,
    *,
    grad_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` (contiguous, logits' dtype); optional preallocated output."""
    logits, target = _rows(logits, target)
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device) if grad_out is None else grad_out
    if N == 0 or V == 0:
        return grad
    launch(_plan_bwd(logits, target, (row_max, lse_rel, grad_lse, grad_tgt), grad, ignore_index))
    return grad
