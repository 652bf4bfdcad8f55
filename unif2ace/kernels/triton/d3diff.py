"""Triton row kernels for the D3Diff loss: per-row log-sum-exp and target logit, and their gradient.

The whole D3Diff loss (mask CE + SEDD score entropy, every parametrisation and reduction) is
assembled in PyTorch from the two ``[N]`` vectors these kernels produce; see
``unif2ace/kernels/_custom_ops/d3diff.py``.

- :func:`lse_gather`: logits ``[N, V]`` (fp32/fp16/bf16, unit column stride), target ``[N]`` int
  -> ``lse [N]`` fp32, ``tgt [N]`` fp32. One program per row; the row is read once in BLOCK_V
  tiles with an online max / sum-exp in fp32. Rows with ``target == ignore_index`` skip the sweep
  and get 0, 0; a target outside [0, V) gives ``tgt = NaN`` (never an out-of-bounds read).
- :func:`lse_gather_backward`: ``grad[i, v] = grad_lse[i]·exp(ℓ[i, v] − lse[i]) + grad_tgt[i]·[v = t_i]``
  in the logits' dtype (0 on ignored rows), one program per row, recomputing the softmax from the
  saved lse.

Everything is computed in fp32 right after the load and cast at the store (the interpreter's bf16
arithmetic is broken, see docs/testing.md); offsets are int64.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import Launch, launch

__all__ = ["lse_gather", "lse_gather_backward", "block_v"]

MAX_BLOCK_V = 4096


def block_v(V: int) -> int:
    """Vocabulary tile: a power of two >= 16, at most MAX_BLOCK_V."""
    return max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _lse_gather_fwd_kernel(
    X,
    T,
    LSE,
    TGT,
    V,
    stride_x,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    t = tl.load(T + row).to(tl.int64)
    valid = t != ignore_index
    x_row = X + row.to(tl.int64) * stride_x
    offs = tl.arange(0, BLOCK_V)
    n_cols = tl.where(valid, V, 0)  # ignored rows skip the sweep
    m = float("-inf")
    s = 0.0
    tg = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        tg += tl.sum(tl.where(cols == t, x, 0.0), 0)
        m = m_new
    # ignored rows: m = -inf, s = 0 -> keep log() away from 0
    lse = tl.where(valid, m, 0.0) + tl.log(tl.where(valid, s, 1.0))
    in_range = (t >= 0) & (t < V)
    tg = tl.where(in_range, tg, float("nan"))
    tl.store(LSE + row, tl.where(valid, lse, 0.0))
    tl.store(TGT + row, tl.where(valid, tg, 0.0))


@triton.jit
def _lse_gather_bwd_kernel(
    X,
    T,
    LSE,
    GL,
    GT,
    G,
    V,
    stride_x,
    stride_g,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    t = tl.load(T + row).to(tl.int64)
    valid = t != ignore_index
    lse = tl.load(LSE + row).to(tl.float32)
    gl = tl.load(GL + row).to(tl.float32)
    gt = tl.load(GT + row).to(tl.float32)
    x_row = X + row.to(tl.int64) * stride_x
    g_row = G + row.to(tl.int64) * stride_g
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        x = tl.load(x_row + cols, mask=in_row & valid, other=0.0).to(tl.float32)
        g = gl * tl.exp(x - lse) + tl.where(cols == t, gt, 0.0)
        g = tl.where(valid, g, 0.0)
        tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=in_row)


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _plan_fwd(logits, target, lse, tgt, ignore_index) -> Launch:
    N, V = logits.shape
    blk = block_v(V)
    return Launch(
        _lse_gather_fwd_kernel,
        (N,),
        (logits, target, lse, tgt, V, logits.stride(0), int(ignore_index)),
        dict(BLOCK_V=blk),
        dict(num_warps=_num_warps(blk)),
    )


def _plan_bwd(logits, target, lse, grad_lse, grad_tgt, grad, ignore_index) -> Launch:
    N, V = logits.shape
    blk = block_v(V)
    return Launch(
        _lse_gather_bwd_kernel,
        (N,),
        (
            logits,
            target,
            lse.contiguous(),
            grad_lse.contiguous(),
            grad_tgt.contiguous(),
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
    lse_out: Optional[torch.Tensor] = None,
    tgt_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row (lse, target logit) of ``logits [N, V]``; optional preallocated fp32 ``[N]`` outputs."""
    logits = _rows(logits)
    N, V = logits.shape
    lse = torch.empty(N, dtype=torch.float32, device=logits.device) if lse_out is None else lse_out
    tgt = torch.empty(N, dtype=torch.float32, device=logits.device) if tgt_out is None else tgt_out
    if N == 0:
        return lse, tgt
    launch(_plan_fwd(logits, target, lse, tgt, ignore_index))
    return lse, tgt


def lse_gather_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_tgt: torch.Tensor,
    ignore_index: int,
    *,
    grad_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` (contiguous, logits' dtype); optional preallocated output."""
    logits = _rows(logits)
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device) if grad_out is None else grad_out
    if N == 0 or V == 0:
        return grad
    launch(_plan_bwd(logits, target, lse, grad_lse, grad_tgt, grad, ignore_index))
    return grad
