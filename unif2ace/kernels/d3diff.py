"""D3Diff loss (docs/model.md §2): masked-token cross-entropy + α · SEDD score entropy.

Public ops:

- :func:`d3diff_loss_from_logits` -- logits already in memory; backends ``reference``, ``cpu``
  (C++ row kernels), ``triton``, ``cuda`` (csrc/cuda/d3diff_loss.cu row kernels).
- :func:`d3diff_loss` -- fused with the LM head (``logits = hidden @ weight.T + bias``);
  backends ``reference``, ``triton`` (vocabulary-tiled: logit tiles live only on chip, online
  log-sum-exp, ignored rows skipped via an on-device row order, backward recomputes tiles with
  deterministic fp32 accumulation of dW; auto-selected on CUDA) and ``cpu`` (row-chunked: a
  chunk GEMM, then the C++ row kernel, so peak extra memory is O(chunk × V), never [N, V]; with
  reduction mean/sum and a gradient needed, each
  chunk's gradient is computed and accumulated during the forward (3 GEMMs per chunk, none in the
  backward); otherwise the backward recomputes each chunk's logits).

Fast path. Both terms need only two numbers per masked row i: LSE_i = logsumexp(ℓ_i) and the
target logit t_i = ℓ_i[x0_i]. The backends implement one differentiable custom op,
``torch.ops.unif2ace.lse_gather(logits, target, ignore_index, backend) -> (lse, tgt)``, whose
backward ``lse_gather_backward`` writes ``grad_lse_i · softmax(ℓ_i) + grad_tgt_i · onehot(x0_i)``.
The loss is assembled here from those ``[N]`` vectors with the closed forms (CE = LSE − t):

- posterior: σ'·DSE = (m'/m)·CE + σ'·(1 − rσ)
- raw:       σ'·DSE = σ'·(safe_exp(LSE − c) + r·(log V − 1 − t)),  c = log V − log r
- radd:      σ'·DSE = (m'/m)·CE

so α, the parametrisation, the reduction and any upstream gradient fold in by the chain rule
(docs/model.md's ``a·LSE + b·exp(LSE − c) − g·ℓ_t + k`` form). The reference backend computes
SEDD's explicit score-vector form instead (:mod:`unif2ace.kernels.reference.d3diff`).
"""

from __future__ import annotations

import math
import types
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _ext
from ._dispatch import Op, device_of
from ._validate import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_choice,
    check_float_range,
    check_range,
    check_same_device,
    check_tensor,
)
from .reference.d3diff import (
    M_CLAMP,
    PARAMETRIZATIONS,
    REDUCTIONS,
    d3diff_loss_from_logits_ref,
    d3diff_loss_ref,
    safe_exp,
)

__all__ = ["D3DiffOutput", "d3diff_loss", "d3diff_loss_from_logits"]

FUSED_CHUNK_ROWS = 512
"""Rows per chunk GEMM in the fused cpu backend (peak extra memory ≈ chunk × V × 4 bytes × 2)."""


class D3DiffOutput(NamedTuple):
    """Result of the D3Diff loss ops (fp32).

    loss:       total = mask_loss + alpha · score_loss (scalar; shaped like target for "none")
    mask_loss:  the MaskGIT term (same reduction)
    score_loss: the SEDD score-entropy term incl. its constant (same reduction); zeros when no
                schedule (mask_rate, mask_rate_deriv) was given
    """

    loss: Tensor
    mask_loss: Tensor
    score_loss: Tensor


OP_FROM_LOGITS = Op(
    "d3diff_loss_from_logits",
    cpu_order=("cpu",),
    cuda_order=("triton", "cuda"),
    doc="D3Diff loss (masked CE + SEDD score entropy) from logits",
)
OP_FUSED = Op(
    "d3diff_loss",
    cpu_order=("cpu",),
    cuda_order=("triton",),
    doc="D3Diff loss fused with the LM head (hidden @ weight.T + bias)",
)


# ---------------------------------------------------------------------------------------------
# backends of the row kernel


def _cpu_lse_gather(logits, target, ignore_index):
    return _ext.cpu_ops().lse_gather(logits, target, ignore_index)


def _cpu_lse_gather_backward(logits, target, lse, grad_lse, grad_tgt, ignore_index):
    return _ext.cpu_ops().lse_gather_backward(logits, target, lse, grad_lse, grad_tgt, ignore_index)


def _triton_lse_gather(logits, target, ignore_index):
    from .triton import d3diff_loss as k

    return k.lse_gather(logits, target, ignore_index)


def _triton_lse_gather_backward(logits, target, lse, grad_lse, grad_tgt, ignore_index):
    from .triton import d3diff_loss as k

    return k.lse_gather_backward(logits, target, lse, grad_lse, grad_tgt, ignore_index)


_CPU_ROWS = types.SimpleNamespace(lse_gather=_cpu_lse_gather, lse_gather_backward=_cpu_lse_gather_backward)
_TRITON_ROWS = types.SimpleNamespace(lse_gather=_triton_lse_gather, lse_gather_backward=_triton_lse_gather_backward)

OP_FROM_LOGITS.register("reference", d3diff_loss_from_logits_ref)
OP_FROM_LOGITS.register("cpu", _CPU_ROWS)
OP_FROM_LOGITS.register("triton", _TRITON_ROWS)


# cuda: csrc/cuda/d3diff_loss.cu (a warp or a CTA per row, 128-bit loads; needs unif2ace._C_cuda)
def _cuda_lse_gather(logits, target, ignore_index):
    return _ext.cuda_ops().lse_gather(logits, target, ignore_index)


def _cuda_lse_gather_backward(logits, target, lse, grad_lse, grad_tgt, ignore_index):
    return _ext.cuda_ops().lse_gather_backward(logits, target, lse, grad_lse, grad_tgt, ignore_index)


OP_FROM_LOGITS.register(
    "cuda", types.SimpleNamespace(lse_gather=_cuda_lse_gather, lse_gather_backward=_cuda_lse_gather_backward)
)


@torch.library.custom_op("unif2ace::lse_gather", mutates_args=())
def _lse_gather_op(logits: Tensor, target: Tensor, ignore_index: int, backend: str) -> Tuple[Tensor, Tensor]:
    """(lse [N] fp32, tgt [N] fp32) of logits [N, V]; 0, 0 on rows with target == ignore_index."""
    return OP_FROM_LOGITS.impl(backend).lse_gather(logits, target, ignore_index)


@_lse_gather_op.register_fake
def _(logits, target, ignore_index, backend):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("unif2ace::lse_gather_backward", mutates_args=())
def _lse_gather_backward_op(
    logits: Tensor, target: Tensor, lse: Tensor, grad_lse: Tensor, grad_tgt: Tensor, ignore_index: int, backend: str
) -> Tensor:
    """grad_logits = grad_lse · softmax(logits) + grad_tgt · onehot(target), logits' dtype."""
    return OP_FROM_LOGITS.impl(backend).lse_gather_backward(logits, target, lse, grad_lse, grad_tgt, ignore_index)


@_lse_gather_backward_op.register_fake
def _(logits, target, lse, grad_lse, grad_tgt, ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _lse_gather_setup(ctx, inputs, output):
    logits, target, ignore_index, backend = inputs
    ctx.save_for_backward(logits, target, output[0])
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _lse_gather_bwd(ctx, grad_lse, grad_tgt):
    logits, target, lse = ctx.saved_tensors
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float()
    grad_tgt = torch.zeros_like(lse) if grad_tgt is None else grad_tgt.float()
    g = _lse_gather_backward_op(logits, target, lse, grad_lse, grad_tgt, ctx.ignore_index, ctx.backend)
    return g, None, None, None


_lse_gather_op.register_autograd(_lse_gather_bwd, setup_context=_lse_gather_setup)


# ---------------------------------------------------------------------------------------------
# fused head, cpu backend: row-chunked GEMM + the C++ row kernel; backward recomputes chunks


def _head_chunks(target: Tensor, ignore_index: int, chunk: int):
    rows = (target != ignore_index).nonzero().squeeze(1)  # only masked rows carry loss
    return [rows[i : i + chunk] for i in range(0, rows.numel(), chunk)]


def _cpu_chunk_logits(hidden, w32, b32, rows, buf):
    """(fp32 hidden rows [k, D], logits [k, V] written into buf[:k], a reused chunk buffer)."""
    h = hidden.index_select(0, rows).float()
    x = buf[: rows.numel()]
    if b32 is not None:
        torch.addmm(b32, h, w32.t(), out=x)
    else:
        torch.mm(h, w32.t(), out=x)
    return h, x


def _chunk_buffer(chunks, chunk, V):
    n = max((r.numel() for r in chunks), default=0)
    return torch.empty(min(chunk, n), V, dtype=torch.float32)


def _cpu_head_lse_gather(hidden, weight, bias, target, ignore_index, chunk):
    n = hidden.shape[0]
    lse = hidden.new_zeros(n, dtype=torch.float32)
    tgt = hidden.new_zeros(n, dtype=torch.float32)
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    chunks = _head_chunks(target, ignore_index, chunk)
    buf = _chunk_buffer(chunks, chunk, weight.shape[0])
    for rows in chunks:
        _, logits = _cpu_chunk_logits(hidden, w32, b32, rows, buf)
        l, t = _ext.cpu_ops().lse_gather(logits, target.index_select(0, rows), ignore_index)
        lse.index_copy_(0, rows, l)
        tgt.index_copy_(0, rows, t)
    return lse, tgt


def _cpu_head_lse_gather_backward(hidden, weight, bias, target, lse, grad_lse, grad_tgt, ignore_index, chunk):
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    g_hidden = torch.zeros(hidden.shape, dtype=torch.float32)
    g_weight = torch.zeros(weight.shape, dtype=torch.float32)  # fp32 accumulation across chunks
    g_bias = torch.zeros(weight.shape[0], dtype=torch.float32)
    chunks = _head_chunks(target, ignore_index, chunk)
    buf = _chunk_buffer(chunks, chunk, weight.shape[0])
    for rows in chunks:
        h, g = _cpu_chunk_logits(hidden, w32, b32, rows, buf)
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


OP_FUSED.register("reference", d3diff_loss_ref)


# fused head, triton backend: vocabulary-tiled kernels (unif2ace/kernels/triton/d3diff_fused.py);
# ``chunk`` is unused (logit tiles live in registers, masked rows are compacted on the device)
def _triton_head_lse_gather(hidden, weight, bias, target, ignore_index, chunk):
    from .triton import d3diff_fused as k

    return k.head_lse_gather(hidden, weight, bias, target, ignore_index)


def _triton_head_lse_gather_backward(hidden, weight, bias, target, lse, grad_lse, grad_tgt, ignore_index, chunk):
    from .triton import d3diff_fused as k

    return k.head_lse_gather_backward(hidden, weight, bias, target, lse, grad_lse, grad_tgt, ignore_index)


OP_FUSED.register(
    "triton",
    types.SimpleNamespace(
        head_lse_gather=_triton_head_lse_gather, head_lse_gather_backward=_triton_head_lse_gather_backward
    ),
)
OP_FUSED.register(
    "cpu",
    types.SimpleNamespace(head_lse_gather=_cpu_head_lse_gather, head_lse_gather_backward=_cpu_head_lse_gather_backward),
)


@torch.library.custom_op("unif2ace::head_lse_gather", mutates_args=())
def _head_lse_gather_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int, chunk: int, backend: str
) -> Tuple[Tensor, Tensor]:
    """lse_gather of logits = hidden @ weight.T + bias without materialising [N, V]."""
    return OP_FUSED.impl(backend).head_lse_gather(hidden, weight, bias, target, ignore_index, chunk)


@_head_lse_gather_op.register_fake
def _(hidden, weight, bias, target, ignore_index, chunk, backend):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("unif2ace::head_lse_gather_backward", mutates_args=())
def _head_lse_gather_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    lse: Tensor,
    grad_lse: Tensor,
    grad_tgt: Tensor,
    ignore_index: int,
    chunk: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; grad_bias is empty without bias."""
    return OP_FUSED.impl(backend).head_lse_gather_backward(
        hidden, weight, bias, target, lse, grad_lse, grad_tgt, ignore_index, chunk
    )


@_head_lse_gather_backward_op.register_fake
def _(hidden, weight, bias, target, lse, grad_lse, grad_tgt, ignore_index, chunk, backend):
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _head_setup(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, chunk, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[0])
    ctx.has_bias = bias is not None
    ctx.args = (ignore_index, chunk, backend)


def _head_bwd(ctx, grad_lse, grad_tgt):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float()
    grad_tgt = torch.zeros_like(lse) if grad_tgt is None else grad_tgt.float()
    gh, gw, gb = _head_lse_gather_backward_op(hidden, weight, bias, target, lse, grad_lse, grad_tgt, *ctx.args)
    return gh, gw, (gb if ctx.has_bias else None), None, None, None, None


_head_lse_gather_op.register_autograd(_head_bwd, setup_context=_head_setup)


# ---------------------------------------------------------------------------------------------
# fused head, cpu backend, gradient during the forward (Liger's FusedLinearCrossEntropy trick)
#
# With reduction mean/sum the ``loss`` output is a sum of per-row terms φ_i(lse_i, tgt_i), so each
# chunk's dloss/dlse_i and dloss/dtgt_i are known as soon as its lse/tgt are: the forward turns the
# chunk logits into dlogits in place and accumulates dhidden rows and dweight (fp32) right away;
# the backward only scales them by the upstream scalar. That saves the backward's recompute GEMM
# (4 → 3 GEMMs). The coefficients are _assemble's closed forms differentiated by hand (same math).
# ``loss`` gets its gradient through ``head_grad_anchor`` (value 0); ``mask_loss`` and
# ``score_loss`` stay differentiable through ``head_lse_gather_attach``, whose backward is the
# recompute path, run only when those outputs receive a gradient.

FUSED_EAGER_GRAD = True
"""cpu fused backend: compute the gradient of ``loss`` during the forward (mean/sum, grad needed)."""


def _loss_row_coefficients(mask_rate, mask_rate_deriv, V, alpha, parametrization, reduction, n_valid):
    """Per-row derivatives of the ``loss`` output (upstream 1) for masked rows, as a function
    ``coef(lse, tgt, samples) -> (dloss/dlse, dloss/dtgt)`` (fp32), by differentiating _assemble's
    closed forms by hand: loss = Σ_i wm·(lse_i − tgt_i) + α·ws·σ'·DSE_i with wm = 1/#masked (mean)
    or 1, ws = 1/B (mean) or 1, and σ'·DSE_i from _assemble (the schedule scalars in float64 as
    there). torch.autograd / torch.func cannot run here: this runs inside a custom op, below the
    autograd dispatch key (and inside compiled graphs)."""
    from .reference.d3diff import SAFE_EXP_MAX

    wm = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    if mask_rate is None or alpha == 0.0:

        def coef(lse, tgt, samples):
            return torch.full_like(lse, wm), torch.full_like(tgt, -wm)

        return coef
    ws = alpha / mask_rate.shape[0] if reduction == "mean" else alpha
    m = mask_rate.detach().double().clamp(M_CLAMP, 1.0 - M_CLAMP)
    dm = mask_rate_deriv.detach().double()
    log_r = torch.log1p(-m) - torch.log(m)
    if parametrization in ("posterior", "radd"):  # σ'·DSE = (m'/m)·CE + const
        k = (wm + ws * (dm / m)).float()

        def coef(lse, tgt, samples):
            ks = k.index_select(0, samples)
            return ks, -ks

        return coef
    # raw: σ'·DSE = σ'·(safe_exp(lse − c) + r·(log V − 1 − tgt)), c = log V − log r,
    # safe_exp'(x) = exp(min(x, SAFE_EXP_MAX)) (the tangent beyond)
    dsigma = dm / (1.0 - m)
    kb = (ws * dsigma).float()
    c = (math.log(V) - log_r).float()
    kt = (wm + ws * dsigma * ((1.0 - m) / m)).float()

    def coef(lse, tgt, samples):
        x = (lse - c.index_select(0, samples)).clamp(max=SAFE_EXP_MAX)
        return wm + kb.index_select(0, samples) * torch.exp(x), -kt.index_select(0, samples)

    return coef


def _cpu_head_eager_grad(
    hidden,
    weight,
    bias,
    target,
    sample_rows,
    mask_rate,
    mask_rate_deriv,
    alpha,
    parametrization,
    reduction,
    ignore_index,
    chunk,
    need_hidden,
    need_weight,
):
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
    chunks = _head_chunks(target, ignore_index, chunk)
    n_valid = sum(r.numel() for r in chunks)
    if n_valid == 0:
        return lse, tgt, g_hidden, g_weight, g_bias
    buf = _chunk_buffer(chunks, chunk, V)  # one chunk of logits, then its dlogits in place
    coef = _loss_row_coefficients(mask_rate, mask_rate_deriv, V, alpha, parametrization, reduction, n_valid)
    for rows in chunks:
        h, x = _cpu_chunk_logits(hidden, w32, b32, rows, buf)
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


@torch.library.custom_op("unif2ace::head_lse_gather_eager_grad", mutates_args=())
def _head_eager_grad_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    sample_rows: Optional[Tensor],
    mask_rate: Optional[Tensor],
    mask_rate_deriv: Optional[Tensor],
    alpha: float,
    parametrization: str,
    reduction: str,
    ignore_index: int,
    chunk: int,
    need_hidden: bool,
    need_weight: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(lse, tgt, dloss/dhidden, dloss/dweight, dloss/dbias): all fp32; the gradients of the
    ``loss`` output (reduction mean/sum, upstream 1), [0, D] / [0] where not needed / no bias."""
    if backend != "cpu":
        raise NotImplementedError(f"head_lse_gather_eager_grad: no {backend!r} implementation")
    return _cpu_head_eager_grad(
        hidden,
        weight,
        bias,
        target,
        sample_rows,
        mask_rate,
        mask_rate_deriv,
        alpha,
        parametrization,
        reduction,
        ignore_index,
        chunk,
        need_hidden,
        need_weight,
    )


@_head_eager_grad_op.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    sample_rows,
    mask_rate,
    mask_rate_deriv,
    alpha,
    parametrization,
    reduction,
    ignore_index,
    chunk,
    need_hidden,
    need_weight,
    backend,
):
    n, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32)
    return (
        hidden.new_empty(n, **f32),
        hidden.new_empty(n, **f32),
        hidden.new_empty(n if need_hidden else 0, D, **f32),
        hidden.new_empty(V if need_weight else 0, D, **f32),
        hidden.new_empty(V if bias is not None else 0, **f32),
    )


@torch.library.custom_op("unif2ace::head_grad_anchor", mutates_args=())
def _head_grad_anchor_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], g_hidden: Tensor, g_weight: Tensor, g_bias: Tensor
) -> Tensor:
    """0.0 (fp32 scalar) whose gradient w.r.t. hidden/weight/bias is upstream · g_* (precomputed fp32)."""
    return hidden.new_zeros((), dtype=torch.float32)


@_head_grad_anchor_op.register_fake
def _(hidden, weight, bias, g_hidden, g_weight, g_bias):
    return hidden.new_empty((), dtype=torch.float32)


def _anchor_setup(ctx, inputs, output):
    hidden, weight, bias, g_hidden, g_weight, g_bias = inputs
    ctx.save_for_backward(g_hidden, g_weight, g_bias)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)


def _anchor_bwd(ctx, grad):
    g_hidden, g_weight, g_bias = ctx.saved_tensors
    dh, dw, db = ctx.dtypes
    gh = (grad * g_hidden).to(dh) if ctx.needs_input_grad[0] else None
    gw = (grad * g_weight).to(dw) if ctx.needs_input_grad[1] else None
    gb = (grad * g_bias).to(db) if db is not None and ctx.needs_input_grad[2] else None
    return gh, gw, gb, None, None, None


_head_grad_anchor_op.register_autograd(_anchor_bwd, setup_context=_anchor_setup)


@torch.library.custom_op("unif2ace::head_lse_gather_attach", mutates_args=())
def _head_attach_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    lse: Tensor,
    tgt: Tensor,
    ignore_index: int,
    chunk: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Copies of (lse, tgt), differentiable w.r.t. hidden/weight/bias (backward: head_lse_gather_backward)."""
    return lse.clone(), tgt.clone()


@_head_attach_op.register_fake
def _(hidden, weight, bias, target, lse, tgt, ignore_index, chunk, backend):
    return torch.empty_like(lse), torch.empty_like(tgt)


def _attach_setup(ctx, inputs, output):
    hidden, weight, bias, target, lse, tgt, ignore_index, chunk, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, target, lse)
    ctx.has_bias = bias is not None
    ctx.args = (ignore_index, chunk, backend)


def _attach_bwd(ctx, grad_lse, grad_tgt):
    return _head_bwd(ctx, grad_lse, grad_tgt)[:3] + (None,) * 6


_head_attach_op.register_autograd(_attach_bwd, setup_context=_attach_setup)


def _use_eager_grad(be, reduction, hidden, weight, bias) -> bool:
    return (
        FUSED_EAGER_GRAD
        and be == "cpu"
        and reduction != "none"
        and torch.is_grad_enabled()
        and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    )


def _head_eager_loss(
    h2,
    weight,
    bias,
    t,
    sample_rows,
    *,
    V,
    out_shape,
    backend,
    mask_rate,
    mask_rate_deriv,
    alpha,
    parametrization,
    reduction,
    ignore_index,
) -> D3DiffOutput:
    def det(x):
        return None if x is None else x.detach()

    lse, tgt, gh, gw, gb = _head_eager_grad_op(
        h2.detach(),
        weight.detach(),
        det(bias),
        t,
        sample_rows,
        det(mask_rate),
        det(mask_rate_deriv),
        float(alpha),
        parametrization,
        reduction,
        ignore_index,
        FUSED_CHUNK_ROWS,
        h2.requires_grad,
        weight.requires_grad,
        backend,
    )
    lse, tgt = _head_attach_op(h2, weight, bias, t, lse, tgt, ignore_index, FUSED_CHUNK_ROWS, backend)
    out = _assemble(
        lse,
        tgt,
        t,
        sample_rows,
        mask_rate,
        mask_rate_deriv,
        V=V,
        alpha=alpha,
        parametrization=parametrization,
        reduction=reduction,
        ignore_index=ignore_index,
        out_shape=out_shape,
    )
    loss = out.loss.detach() + _head_grad_anchor_op(h2, weight, bias, gh, gw, gb)
    return D3DiffOutput(loss, out.mask_loss, out.score_loss)


# ---------------------------------------------------------------------------------------------
# validation and assembly


def _validate(
    op: str,
    V: int,
    lead: Tuple[int, ...],
    device,
    target,
    sample_index,
    mask_rate,
    mask_rate_deriv,
    alpha,
    parametrization,
    reduction,
    ignore_index,
):
    """Common checks; ``lead`` is logits.shape[:-1] ([N] or [B, L]). Returns the number of samples B."""
    check_choice(op, "parametrization", parametrization, PARAMETRIZATIONS)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{op}: argument 'alpha' must be a finite float, got {alpha!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: argument 'ignore_index' must be an int, got {ignore_index!r}")
    check_tensor(op, "target", target, dtypes=INT_DTYPES, shape=list(lead))
    check_same_device(
        op, target=target, sample_index=sample_index, mask_rate=mask_rate, mask_rate_deriv=mask_rate_deriv
    )
    if target.device != device:
        raise ValueError(
            f"{op}: all tensors must be on one device; the inputs are on {device} but 'target' is on {target.device}"
        )
    if (mask_rate is None) != (mask_rate_deriv is None):
        given, missing = ("mask_rate", "mask_rate_deriv") if mask_rate is not None else ("mask_rate_deriv", "mask_rate")
        raise ValueError(f"{op}: argument '{missing}' is required when '{given}' is given")
    if len(lead) == 2 and sample_index is not None:
        raise ValueError(
            f"{op}: argument 'sample_index' must be None for [B, L, V] inputs (row b*L + l belongs to sample b), "
            f"got a tensor of shape {list(sample_index.shape)}"
        )
    if mask_rate is None:
        if alpha != 0:
            raise ValueError(
                f"{op}: arguments 'mask_rate' and 'mask_rate_deriv' are required when alpha != 0 (got alpha={alpha}); "
                "pass alpha=0 for plain masked cross-entropy"
            )
        if sample_index is not None:
            check_tensor(op, "sample_index", sample_index, dtypes=INT_DTYPES, shape=[lead[0]])
        check_range(op, "target", target, 0, V, allow=ignore_index)
        return None
    check_tensor(op, "mask_rate", mask_rate, ndim=1, dtypes=FLOAT_DTYPES)
    B = mask_rate.shape[0]
    if len(lead) == 2:
        check_tensor(op, "mask_rate", mask_rate, shape=[lead[0]])
    else:
        if sample_index is None:
            raise ValueError(
                f"{op}: argument 'sample_index' ([N] int, the sample of every row) is required with [N, V] logits "
                "when mask_rate is given"
            )
        check_tensor(op, "sample_index", sample_index, dtypes=INT_DTYPES, shape=[lead[0]])
    check_tensor(op, "mask_rate_deriv", mask_rate_deriv, dtypes=FLOAT_DTYPES, shape=[B])
    check_range(op, "target", target, 0, V, allow=ignore_index)
    if sample_index is not None:
        check_range(op, "sample_index", sample_index, 0, B)
    check_float_range(op, "mask_rate", mask_rate, 0.0, 1.0, low_open=True)
    check_float_range(op, "mask_rate_deriv", mask_rate_deriv, 0.0, float("inf"))
    return B


def _assemble(
    lse: Tensor,
    tgt: Tensor,
    target: Tensor,
    sample_index: Optional[Tensor],
    mask_rate,
    mask_rate_deriv,
    V: int,
    alpha: float,
    parametrization: str,
    reduction: str,
    ignore_index: int,
    out_shape,
) -> D3DiffOutput:
    """Closed-form D3Diff loss from per-row lse/tgt (fp32 [N]); differentiable through lse, tgt."""
    valid = target != ignore_index
    zero = torch.zeros_like(lse)
    ce = torch.where(valid, lse - tgt, zero)
    if mask_rate is not None:
        # per-sample schedule scalars in float64 ([B], cheap): 1 − rσ and σ'·r = m'/m cancel in fp32
        m = mask_rate.detach().double().clamp(M_CLAMP, 1.0 - M_CLAMP)
        dm = mask_rate_deriv.detach().double()
        log1m = torch.log1p(-m)
        r = (1.0 - m) / m
        log_r = log1m - torch.log(m)
        dsigma = dm / (1.0 - m)
        w = dm / m

        def rows(x):
            return x.float().index_select(0, sample_index)

        if parametrization == "posterior":
            score = rows(w) * ce + rows(dsigma * (1.0 + r * log1m))  # 1 − rσ, σ = −log1p(−m)
        elif parametrization == "radd":
            score = rows(w) * ce
        else:  # raw: c = log V − log r;  −r(t − c) + r(log r − 1) = r(log V − 1 − t)
            c = rows(math.log(V) - log_r)
            score = rows(dsigma) * (safe_exp(lse - c) + rows(r) * ((math.log(V) - 1.0) - tgt))
        score = torch.where(valid, score, zero)
        B = mask_rate.shape[0]
    else:
        score = zero
        B = None

    if reduction == "none":
        mask_loss, score_loss = ce.reshape(out_shape), score.reshape(out_shape)
    elif reduction == "sum":
        mask_loss, score_loss = ce.sum(), score.sum()
    else:
        mask_loss = ce.sum() / valid.sum().clamp_min(1).float()
        score_loss = score.sum() / B if B is not None else score.sum()
    return D3DiffOutput(mask_loss + alpha * score_loss, mask_loss, score_loss)


def _sample_rows(lead, sample_index, device):
    if len(lead) == 2:
        return torch.arange(lead[0], device=device).repeat_interleave(lead[1])
    return None if sample_index is None else sample_index.reshape(-1).long()


def d3diff_loss_from_logits(
    logits: Tensor,
    target: Tensor,
    *,
    sample_index: Optional[Tensor] = None,
    mask_rate: Optional[Tensor] = None,
    mask_rate_deriv: Optional[Tensor] = None,
    alpha: float = 0.01,
    parametrization: str = "posterior",
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: Optional[str] = None,
) -> D3DiffOutput:
    """D3Diff loss from logits: ``mask_loss + alpha · score_loss`` (docs/model.md §2).

    Args:
        logits: ``[N, V]`` or ``[B, L, V]``, fp32/fp16/bf16, over the V image codes.
        target: ``[N]`` (``[B, L]``), int32/int64: the clean code x0 in [0, V) at masked rows,
            ``ignore_index`` at rows without loss (unmasked, padding).
        sample_index: ``[N]`` int in [0, B): the sample of every row. Required with ``[N, V]``
            logits when the schedule is given; must be None with ``[B, L, V]`` logits (row
            ``b·L + l`` belongs to sample b).
        mask_rate: m ``[B]`` float in (0, 1] (clamped into [1e-6, 1 − 1e-6] inside the loss);
        mask_rate_deriv: m' = dm/dτ ``[B]`` float ≥ 0. Both schedule values, no gradient. Both are
            required when ``alpha != 0``; with ``alpha == 0`` they may be None (plain masked /
            next-token cross-entropy; score_loss is then zeros).
        alpha: weight of the score term (paper: 0.01).
        parametrization: ``"posterior"`` (s = softmax/m, UniF²ace), ``"raw"`` (SEDD log-scores
            ℓ − c with the :func:`~unif2ace.kernels.reference.d3diff.safe_exp` overflow guard) or
            ``"radd"`` (s = softmax·r, DSE = r·CE).
        reduction: ``"mean"``: mask = mean CE over masked rows (0 if none), score = Σ σ'·DSE / B;
            ``"sum"``; ``"none"``: per-row tensors shaped like ``target`` (0 at ignored rows).
        ignore_index: target value of rows without loss.
        backend: force ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"`` (default: by device).

    Returns:
        :class:`D3DiffOutput` ``(loss, mask_loss, score_loss)``, fp32. Differentiable w.r.t.
        ``logits`` (gradient in the logits' dtype).

    Raises:
        ValueError / TypeError naming the argument for bad shapes, dtypes, devices or values;
        BackendUnavailableError when a forced backend cannot run here.
    """
    op = "d3diff_loss_from_logits"
    check_tensor(op, "logits", logits, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    V = logits.shape[-1]
    if V < 1:
        raise ValueError(f"{op}: argument 'logits' must have V >= 1 columns, got shape {list(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    _validate(
        op,
        V,
        lead,
        logits.device,
        target,
        sample_index,
        mask_rate,
        mask_rate_deriv,
        alpha,
        parametrization,
        reduction,
        ignore_index,
    )
    be = OP_FROM_LOGITS.select(device_of(logits), backend)
    kw = dict(
        mask_rate=mask_rate,
        mask_rate_deriv=mask_rate_deriv,
        alpha=alpha,
        parametrization=parametrization,
        reduction=reduction,
        ignore_index=ignore_index,
    )
    if be == "reference":
        return D3DiffOutput(*d3diff_loss_from_logits_ref(logits, target, sample_index=sample_index, **kw))
    t = target.reshape(-1).long()
    lse, tgt = _lse_gather_op(logits.reshape(-1, V), t, ignore_index, be)
    return _assemble(lse, tgt, t, _sample_rows(lead, sample_index, logits.device), V=V, out_shape=target.shape, **kw)


def d3diff_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    sample_index: Optional[Tensor] = None,
    mask_rate: Optional[Tensor] = None,
    mask_rate_deriv: Optional[Tensor] = None,
    alpha: float = 0.01,
    parametrization: str = "posterior",
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: Optional[str] = None,
) -> D3DiffOutput:
    """D3Diff loss fused with the LM head: logits = ``hidden @ weight.T + bias`` (never stored whole).

    Args:
        hidden: ``[N, D]`` or ``[B, L, D]``, fp32/fp16/bf16.
        weight: ``[V, D]``, same dtype; bias: ``[V]`` or None, same dtype.
        target ... backend: as :func:`d3diff_loss_from_logits`.

    Returns:
        :class:`D3DiffOutput`, fp32; differentiable w.r.t. hidden, weight and bias (gradients in
        their dtypes; the cpu backend accumulates the weight gradient in fp32 across chunks).
    """
    op = "d3diff_loss"
    check_tensor(op, "hidden", hidden, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    D = hidden.shape[-1]
    check_tensor(op, "weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    if weight.shape[1] != D:
        raise ValueError(f"{op}: argument 'weight' must have shape [V, {D}] (D from hidden), got {list(weight.shape)}")
    V = weight.shape[0]
    if V < 1:
        raise ValueError(f"{op}: argument 'weight' must have V >= 1 rows, got shape {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: argument 'weight' must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        check_tensor(op, "bias", bias, shape=[V])
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{op}: argument 'bias' must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    check_same_device(op, hidden=hidden, weight=weight, bias=bias)
    lead = tuple(hidden.shape[:-1])
    _validate(
        op,
        V,
        lead,
        hidden.device,
        target,
        sample_index,
        mask_rate,
        mask_rate_deriv,
        alpha,
        parametrization,
        reduction,
        ignore_index,
    )
    be = OP_FUSED.select(device_of(hidden), backend)
    kw = dict(
        mask_rate=mask_rate,
        mask_rate_deriv=mask_rate_deriv,
        alpha=alpha,
        parametrization=parametrization,
        reduction=reduction,
        ignore_index=ignore_index,
    )
    if be == "reference":
        return D3DiffOutput(*d3diff_loss_ref(hidden, weight, target, bias=bias, sample_index=sample_index, **kw))
    t = target.reshape(-1).long()
    if _use_eager_grad(be, reduction, hidden, weight, bias):
        return _head_eager_loss(
            hidden.reshape(-1, D),
            weight,
            bias,
            t,
            _sample_rows(lead, sample_index, hidden.device),
            V=V,
            out_shape=target.shape,
            backend=be,
            **kw,
        )
    lse, tgt = _head_lse_gather_op(hidden.reshape(-1, D), weight, bias, t, ignore_index, FUSED_CHUNK_ROWS, be)
    return _assemble(lse, tgt, t, _sample_rows(lead, sample_index, hidden.device), V=V, out_shape=target.shape, **kw)
