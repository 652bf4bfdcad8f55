"""cpu backend of ``d3diff_loss`` (fused with the LM head): row-chunked. Each chunk of at most
:data:`CHUNK_ROWS` rows that carry loss is one GEMM into a reused fp32 ``[chunk, V]`` buffer, then
the C++ row kernel of csrc/cpu/d3diff.cpp (``torch.ops.unif2ace_cpu.lse_gather`` /
``lse_gather_backward_``), so peak extra memory is O(chunk × V), never [N, V].

Entry points of the op record (see :data:`unif2ace.kernels.d3diff.OP_HEAD`):

- ``head_lse_gather(hidden, weight, bias, target, ignore_index) -> (lse, tgt)``
- ``head_lse_gather_backward(hidden, weight, bias, target, lse, grad_lse, grad_tgt, ignore_index)
  -> (grad_hidden, grad_weight, grad_bias)``: recomputes each chunk's logits (fp32 accumulation of
  the weight gradient across chunks);
- ``head_lse_gather_eager_grad(...)``: the gradient of the ``loss`` output computed during the
  forward (3 GEMMs per chunk, none in the backward; see :mod:`unif2ace.kernels._custom_ops.d3diff`),
  with the per-row coefficients of :func:`_loss_row_coefficients`.
"""

from __future__ import annotations

import torch

from .. import _ext
from .._custom_ops.d3diff import schedule_scalars
from ..reference.d3diff import SAFE_EXP_MAX

__all__ = ["CHUNK_ROWS", "head_lse_gather", "head_lse_gather_backward", "head_lse_gather_eager_grad"]

CHUNK_ROWS = 512
"""Rows per chunk GEMM (peak extra memory ≈ chunk × V × 4 bytes × 2)."""


def _head_chunks(target, ignore_index):
    rows = (target != ignore_index).nonzero().squeeze(1)  # only masked rows carry loss
    chunk = CHUNK_ROWS
    return [rows[i : i + chunk] for i in range(0, rows.numel(), chunk)]


def _chunk_logits(hidden, w32, b32, rows, buf):
    """(fp32 hidden rows [k, D], logits [k, V] written into buf[:k], a reused chunk buffer)."""
    h = hidden.index_select(0, rows).float()
    x = buf[: rows.numel()]
    if b32 is not None:
        torch.addmm(b32, h, w32.t(), out=x)
    else:
        torch.mm(h, w32.t(), out=x)
    return h, x


def _chunk_buffer(chunks, V):
    n = max((r.numel() for r in chunks), default=0)
    return torch.empty(min(CHUNK_ROWS, n), V, dtype=torch.float32)


def head_lse_gather(hidden, weight, bias, target, ignore_index):
    n = hidden.shape[0]
    lse = hidden.new_zeros(n, dtype=torch.float32)
    tgt = hidden.new_zeros(n, dtype=torch.float32)
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    chunks = _head_chunks(target, ignore_index)
    buf = _chunk_buffer(chunks, weight.shape[0])
    for rows in chunks:
        _, logits = _chunk_logits(hidden, w32, b32, rows, buf)
        l, t = _ext.cpu_ops().lse_gather(logits, target.index_select(0, rows), ignore_index)
        lse.index_copy_(0, rows, l)
        tgt.index_copy_(0, rows, t)
    return lse, tgt


def head_lse_gather_backward(hidden, weight, bias, target, lse, grad_lse, grad_tgt, ignore_index):
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    g_hidden = torch.zeros(hidden.shape, dtype=torch.float32)
    g_weight = torch.zeros(weight.shape, dtype=torch.float32)  # fp32 accumulation across chunks
    g_bias = torch.zeros(weight.shape[0], dtype=torch.float32)
    chunks = _head_chunks(target, ignore_index)
    buf = _chunk_buffer(chunks, weight.shape[0])
    for rows in chunks:
        h, g = _chunk_logits(hidden, w32, b32, rows, buf)
        _ext.cpu_ops().lse_gather_backward_(  # g := dlogits, in place
            g,
            target.index_select(0, rows),
            lse.index_select(0, rows),
            grad_lse.index_select(0, rows),
            grad_tgt.index_select(0, rows),
            ignore_index,
        )
        g_hidden.index_copy_(0, rows, g @ w32)
        g_weight.addmm_(g.t(), h)
        if bias is not None:
            g_bias += g.sum(0)
    gb = g_bias.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return g_hidden.to(hidden.dtype), g_weight.to(weight.dtype), gb


# ---------------------------------------------------------------------------------------------
# gradient during the forward


def _loss_row_coefficients(args, V, n_valid):
    """Per-row derivatives of the ``loss`` output (upstream 1) for masked rows, as a function
    ``coef(lse, tgt, samples) -> (dloss/dlse, dloss/dtgt)`` (fp32), by differentiating the closed
    forms of :func:`unif2ace.kernels._custom_ops.d3diff.assemble` by hand: loss = Σ_i wm·(lse_i − tgt_i)
    + α·ws·σ'·DSE_i with wm = 1/#masked (mean) or 1, ws = 1/B (mean) or 1, and σ'·DSE_i as there
    (the same float64 schedule scalars). torch.autograd / torch.func cannot run here: this runs
    inside a custom op, below the autograd dispatch key (and inside compiled graphs)."""
    mask_rate, alpha, mean = args.mask_rate, args.alpha, args.reduction == "mean"
    wm = 1.0 / max(n_valid, 1) if mean else 1.0
    if mask_rate is None or alpha == 0.0:

        def coef(lse, tgt, samples):
            return torch.full_like(lse, wm), torch.full_like(tgt, -wm)

        return coef
    ws = alpha / mask_rate.shape[0] if mean else alpha
    s = schedule_scalars(mask_rate, args.mask_rate_deriv)
    if args.parametrization in ("posterior", "radd"):  # σ'·DSE = (m'/m)·CE + const
        k = (wm + ws * s.w).float()

        def coef(lse, tgt, samples):
            ks = k.index_select(0, samples)
            return ks, -ks

        return coef
    # raw: σ'·DSE = σ'·(safe_exp(lse − c) + r·(log V − 1 − tgt)), c = log V − log r,
    # safe_exp'(x) = exp(min(x, SAFE_EXP_MAX)) (the tangent beyond)
    kb = (ws * s.dsigma).float()
    c = s.raw_shift(V).float()
    kt = (wm + ws * s.dsigma * s.r).float()

    def coef(lse, tgt, samples):
        x = (lse - c.index_select(0, samples)).clamp(max=SAFE_EXP_MAX)
        return wm + kb.index_select(0, samples) * torch.exp(x), -kt.index_select(0, samples)

    return coef


def head_lse_gather_eager_grad(hidden, weight, bias, target, args, need_hidden, need_weight):
    """(lse, tgt, dloss/dhidden, dloss/dweight, dloss/dbias), all fp32 (``[0, D]`` / ``[0]`` where
    not needed / no bias): the chunk loop of :func:`head_lse_gather` that also turns each chunk's
    logits into dloss/dlogits in place and accumulates the gradients right away. ``args``: the
    :class:`~unif2ace.kernels._custom_ops.d3diff.LossArgs` with ``sample_index`` = the sample of
    every row (``[N]`` int64, or None)."""
    n, D = hidden.shape
    V = weight.shape[0]
    ops = _ext.cpu_ops()
    lse = hidden.new_zeros(n, dtype=torch.float32)
    tgt = hidden.new_zeros(n, dtype=torch.float32)
    g_hidden = torch.zeros(n if need_hidden else 0, D, dtype=torch.float32)
    g_weight = torch.zeros(V if need_weight else 0, D, dtype=torch.float32)  # fp32 accumulation
    g_bias = torch.zeros(V if bias is not None else 0, dtype=torch.float32)
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    ignore_index, sample_rows = args.ignore_index, args.sample_index
    chunks = _head_chunks(target, ignore_index)
    n_valid = sum(r.numel() for r in chunks)
    if n_valid == 0:
        return lse, tgt, g_hidden, g_weight, g_bias
    buf = _chunk_buffer(chunks, V)  # one chunk of logits, then its dlogits in place
    coef = _loss_row_coefficients(args, V, n_valid)
    for rows in chunks:
        h, x = _chunk_logits(hidden, w32, b32, rows, buf)
        t = target.index_select(0, rows)
        l, tg = ops.lse_gather(x, t, ignore_index)
        lse.index_copy_(0, rows, l)
        tgt.index_copy_(0, rows, tg)
        gl, gt = coef(l, tg, None if sample_rows is None else sample_rows.index_select(0, rows))
        ops.lse_gather_backward_(x, t, l, gl, gt, ignore_index)  # x := dloss/dlogits
        if need_hidden:
            g_hidden.index_copy_(0, rows, x @ w32)
        if need_weight:
            g_weight.addmm_(x.t(), h)
        if bias is not None:
            g_bias += x.sum(0)
    return lse, tgt, g_hidden, g_weight, g_bias
