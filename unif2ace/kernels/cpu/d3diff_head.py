"""cpu backend of ``d3diff_loss`` (fused with the LM head): row-chunked. Each chunk of rows that
carry loss is one GEMM into a reused ``[chunk, V]`` buffer, then the C++ row kernel of
csrc/cpu/d3diff.cpp (``torch.ops.unif2ace_cpu.lse_gather`` / ``lse_gather_backward_``), so peak
extra memory is O(chunk × V), never [N, V].

GEMM dtype (:func:`gemm_dtype`): fp32 inputs, and bf16/fp16 inputs on a CPU without matrix
instructions for them, run fp32 GEMMs (16-bit operands upcast once per call) into an fp32 chunk.
bf16/fp16 inputs on a CPU with them (AMX, AVX-512 BF16/FP16; see
:func:`unif2ace.kernels.cpu.lowp_gemm`, reported by ``python -m unif2ace info``) run every GEMM in
their own dtype through oneDNN (fp32 accumulation): the logit chunk comes out in that dtype (torch
has no CPU GEMM with 16-bit operands and an fp32 result at oneDNN's speed -- MKL's
``cblas_gemm_bf16bf16f32`` runs at half of it on AMD, brgemm micro-kernels at a fifth -- so each
logit is rounded once to bf16/fp16, as PyTorch's own bf16 ``F.linear``, Cut Cross-Entropy and
Liger do), the row kernel computes the softmax statistics in fp32 and writes dℓ in place in that
dtype (rounded once, no hi/lo split), dH and dW are 16-bit GEMMs on it; dW is accumulated in fp32
across chunks, and chunks are sized by :data:`CHUNK_BYTES` so that one chunk is the common case.

Entry points of the op record (see :data:`unif2ace.kernels.d3diff.OP_HEAD`):

- ``head_lse_gather(hidden, weight, bias, target, ignore_index) -> (row_max, lse_rel, tgt)``
- ``head_lse_gather_backward(hidden, weight, bias, target, row_max, lse_rel, grad_lse, grad_tgt,
  ignore_index) -> (grad_hidden, grad_weight, grad_bias)``: recomputes each chunk's logits;
- ``head_lse_gather_eager_grad(...)``: the gradient of the ``loss`` output computed during the
  forward (3 GEMMs per chunk, none in the backward; see :mod:`unif2ace.kernels._custom_ops.d3diff`),
  with the per-row coefficients of :func:`_loss_row_coefficients`.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .. import _ext
from .._custom_ops.d3diff import schedule_scalars
from . import lowp_gemm

__all__ = [
    "CHUNK_ROWS",
    "CHUNK_BYTES",
    "gemm_dtype",
    "head_lse_gather",
    "head_lse_gather_backward",
    "head_lse_gather_eager_grad",
]

CHUNK_ROWS = 512
"""The fewest rows per chunk GEMM."""

CHUNK_BYTES = 32 << 20
"""Bytes of one ``[chunk, V]`` logit chunk in the GEMM dtype (at least :data:`CHUNK_ROWS` rows):
V = 8192 gives 1024 fp32 or 2048 bf16 rows, so one chunk covers most batches and dW is one GEMM
(no accumulation across chunks). Peak extra memory ≈ this plus the chunk's hidden rows."""


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the chunk GEMMs run in for inputs of ``dtype``."""
    return dtype if dtype != torch.float32 and lowp_gemm(dtype)[0] else torch.float32


class _Plan(NamedTuple):
    """One call's operands in the GEMM dtype and its chunks of masked rows."""

    w: torch.Tensor  # [V, D], GEMM dtype
    b: Optional[torch.Tensor]  # [V] or None, GEMM dtype
    chunks: List[torch.Tensor]  # int64 row indices, only rows that carry loss
    buf: torch.Tensor  # [max chunk, V], GEMM dtype: logits, then dℓ in place


def _plan(hidden, weight, bias, target, ignore_index) -> _Plan:
    dt = gemm_dtype(weight.dtype)
    V = weight.shape[0]
    rows = (target != ignore_index).nonzero().squeeze(1)
    chunk = max(CHUNK_ROWS, CHUNK_BYTES // (V * dt.itemsize))
    chunks = [rows[i : i + chunk] for i in range(0, rows.numel(), chunk)]
    n = min(chunk, rows.numel())
    w = weight if weight.dtype == dt else weight.to(dt)
    b = None if bias is None else (bias if bias.dtype == dt else bias.to(dt))
    return _Plan(w, b, chunks, torch.empty(n, V, dtype=dt))


def _chunk_logits(hidden, p: _Plan, rows):
    """(hidden rows [k, D] in the GEMM dtype, logits [k, V] written into the reused buffer)."""
    h = hidden.index_select(0, rows).to(p.w.dtype)
    x = p.buf[: rows.numel()]
    if p.b is not None:
        torch.addmm(p.b, h, p.w.t(), out=x)
    else:
        torch.mm(h, p.w.t(), out=x)
    return h, x


class _Grads:
    """dH / dW / dbias accumulators: dW and dbias in fp32 across chunks (dW of a single chunk is
    taken straight from its GEMM), dH rows written per chunk."""

    def __init__(self, n, D, V, dt, need_hidden, need_weight, has_bias, n_chunks):
        self.hidden = torch.zeros(n if need_hidden else 0, D, dtype=dt)
        self.weight = torch.zeros(V if need_weight else 0, D, dtype=torch.float32) if n_chunks > 1 else None
        self.V, self.D, self.need_weight = V, D, need_weight
        self.bias = torch.zeros(V if has_bias else 0, dtype=torch.float32)

    def add(self, p: _Plan, rows, h, g):
        """Chunk ``rows`` with hidden rows ``h`` and dℓ ``g`` (both in the GEMM dtype)."""
        if self.hidden.shape[0]:
            self.hidden.index_copy_(0, rows, g @ p.w)
        if self.need_weight:
            if self.weight is None:
                self.weight = g.t() @ h
            elif self.weight.dtype == g.dtype:
                self.weight.addmm_(g.t(), h)
            else:
                self.weight += g.t() @ h
        if self.bias.shape[0]:
            self.bias += g.sum(0, dtype=torch.float32)

    def dweight(self, dtype):
        if self.weight is None:
            return torch.zeros(self.V if self.need_weight else 0, self.D, dtype=dtype)
        return self.weight.to(dtype)


def head_lse_gather(hidden, weight, bias, target, ignore_index):
    n = hidden.shape[0]
    stats = [hidden.new_zeros(n, dtype=torch.float32) for _ in range(3)]
    p = _plan(hidden, weight, bias, target, ignore_index)
    for rows in p.chunks:
        _, logits = _chunk_logits(hidden, p, rows)
        for out, x in zip(stats, _ext.cpu_ops().lse_gather(logits, target.index_select(0, rows), ignore_index)):
            out.index_copy_(0, rows, x)
    return tuple(stats)


def head_lse_gather_backward(hidden, weight, bias, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index):
    p = _plan(hidden, weight, bias, target, ignore_index)
    n, D = hidden.shape
    grads = _Grads(n, D, weight.shape[0], p.w.dtype, True, True, bias is not None, len(p.chunks))
    for rows in p.chunks:
        h, g = _chunk_logits(hidden, p, rows)
        _ext.cpu_ops().lse_gather_backward_(  # g := dlogits, in place
            g,
            target.index_select(0, rows),
            row_max.index_select(0, rows),
            lse_rel.index_select(0, rows),
            grad_lse.index_select(0, rows),
            grad_tgt.index_select(0, rows),
            ignore_index,
        )
        grads.add(p, rows, h, g)
    gb = grads.bias.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return grads.hidden.to(hidden.dtype), grads.dweight(weight.dtype), gb


# ---------------------------------------------------------------------------------------------
# gradient during the forward


def _loss_row_coefficients(args, V, n_valid):
    """The ``loss`` output (reduction mean/sum, upstream 1) as a sum over masked rows of
    a_i·LSE_i + b_i·safe_exp(LSE_i − c_i) − g_i·t_i + const (docs/model.md §2), as a function
    ``coef(samples) -> (a, b, c, g)`` of the rows' samples (fp32 ``[k]`` each), by differentiating
    the closed forms of :func:`unif2ace.kernels._custom_ops.d3diff.assemble` by hand: loss =
    Σ_i wm·(lse_i − tgt_i) + α·ws·σ'·DSE_i with wm = 1/#masked (mean) or 1, ws = 1/B (mean) or 1,
    and σ'·DSE_i as there (the same float64 schedule scalars). The C++ row kernel
    (``lse_gather_grad_``) turns them into grad_lse = a + b·exp(min(LSE − c, SAFE_EXP_MAX)) and
    grad_tgt = −g. torch.autograd / torch.func cannot run here: this runs inside a custom op,
    below the autograd dispatch key (and inside compiled graphs)."""
    mask_rate, alpha, mean = args.mask_rate, args.alpha, args.reduction == "mean"
    wm = 1.0 / max(n_valid, 1) if mean else 1.0
    f32 = torch.float32
    if mask_rate is None or alpha == 0.0:

        def coef(samples, k):
            a = torch.full((k,), wm, dtype=f32)
            return a, torch.zeros(k, dtype=f32), torch.zeros(k, dtype=f32), a

        return coef
    ws = alpha / mask_rate.shape[0] if mean else alpha
    s = schedule_scalars(mask_rate, args.mask_rate_deriv)
    if args.parametrization in ("posterior", "radd"):  # σ'·DSE = (m'/m)·CE + const
        per_sample = ((wm + ws * s.w).float(), torch.zeros_like(s.w, dtype=f32), torch.zeros_like(s.w, dtype=f32))
        per_sample += (per_sample[0],)
    else:  # raw: σ'·DSE = σ'·(safe_exp(lse − c) + r·(log V − 1 − tgt)), c = log V − log r
        kb = (ws * s.dsigma).float()
        per_sample = (torch.full_like(kb, wm), kb, s.raw_shift(V).float(), (wm + ws * s.dsigma * s.r).float())

    def coef(samples, k):
        return tuple(x.index_select(0, samples) for x in per_sample)

    return coef


def head_lse_gather_eager_grad(hidden, weight, bias, target, args, need_hidden, need_weight):
    """(row_max, lse_rel, tgt, dloss/dhidden, dloss/dweight, dloss/dbias): statistics in fp32,
    gradients in the inputs' dtypes (``[0, D]`` / ``[0]`` where not needed / no bias); the chunk
    loop of :func:`head_lse_gather` that also turns
    each chunk's logits into dloss/dlogits in place and accumulates the gradients right away.
    ``args``: the :class:`~unif2ace.kernels._custom_ops.d3diff.LossArgs` with ``sample_index`` =
    the sample of every row (``[N]`` int64, or None)."""
    n, D = hidden.shape
    V = weight.shape[0]
    ops = _ext.cpu_ops()
    stats = [hidden.new_zeros(n, dtype=torch.float32) for _ in range(3)]
    p = _plan(hidden, weight, bias, target, args.ignore_index)
    grads = _Grads(n, D, V, p.w.dtype, need_hidden, need_weight, bias is not None, len(p.chunks))
    ignore_index, sample_rows = args.ignore_index, args.sample_index
    n_valid = sum(r.numel() for r in p.chunks)
    coef = _loss_row_coefficients(args, V, n_valid)
    for rows in p.chunks:
        h, x = _chunk_logits(hidden, p, rows)
        t = target.index_select(0, rows)
        a_b_c_g = coef(None if sample_rows is None else sample_rows.index_select(0, rows), rows.numel())
        row_stats = ops.lse_gather_grad_(x, t, *a_b_c_g, ignore_index)  # x := dloss/dlogits
        for out, v in zip(stats, row_stats):
            out.index_copy_(0, rows, v)
        grads.add(p, rows, h, x)
    gb = grads.bias.to(bias.dtype) if bias is not None else grads.bias
    return (*stats, grads.hidden.to(hidden.dtype), grads.dweight(weight.dtype), gb)
