"""The ``torch.library`` custom ops of the D3Diff family (stems ``d3diff`` and ``d3diff_head``) and
the closed-form assembly of the loss that every fast backend shares (docs/model.md §2).

Both public ops need only two numbers per masked row i: LSE_i = logsumexp(ℓ_i) and the target
logit t_i = ℓ_i[x0_i]. The kernels return LSE_i split as the row max m_i and r_i = log Σ_v
exp(ℓ_iv − m_i), so that CE_i = r_i − (t_i − m_i) and the softmax exp((ℓ_iv − m_i) − r_i) lose
nothing at large common offsets (LSE = m + r alone would round r away at the offset's scale).
The backends implement them as differentiable custom ops,

- ``unif2ace::lse_gather(logits, target, ignore_index, backend) -> (row_max, lse_rel, tgt)`` (stem
  ``d3diff``), whose backward ``lse_gather_backward`` writes ``grad_lse_i · softmax(ℓ_i) +
  grad_tgt_i · onehot(x0_i)`` (``grad_lse`` is the gradient of ``lse_rel``; ``row_max`` is a
  shift, not differentiated -- every quantity built from the three is shift-invariant);
- ``unif2ace::head_lse_gather(hidden, weight, bias, target, ignore_index, backend)`` (stem
  ``d3diff_head``): the same for ``ℓ = hidden @ weight.T + bias`` without materialising ``[N, V]``,
  backward ``head_lse_gather_backward`` -> (grad_hidden, grad_weight, grad_bias);

and :func:`assemble` builds the loss from those ``[N]`` vectors with the closed forms (CE = LSE − t):

- posterior: σ'·DSE = (m'/m)·CE + σ'·(1 − rσ)
- raw:       σ'·DSE = σ'·(safe_exp(LSE − c) + r·(log V − 1 − t)),  c = log V − log r
- radd:      σ'·DSE = (m'/m)·CE

so α, the parametrisation, the reduction and any upstream gradient fold in by the chain rule
(docs/model.md's ``a·LSE + b·exp(LSE − c) − g·ℓ_t + k`` form). The per-sample schedule scalars of
these closed forms come from one function, :func:`schedule_scalars` (also used by the cpu
backend's hand-derived gradient). The reference backend computes SEDD's explicit score-vector
form instead and shares none of this (:mod:`unif2ace.kernels.reference.d3diff`).

Gradient during the forward (fused head, Liger's FusedLinearCrossEntropy trick): with reduction
mean/sum the ``loss`` output is a sum of per-row terms φ_i(lse_i, tgt_i), so a backend whose
``d3diff_head`` module provides ``head_lse_gather_eager_grad`` (cpu) computes dloss/dhidden,
dweight, dbias chunk by chunk in the forward (``unif2ace::head_lse_gather_eager_grad``); the
backward only scales them by the upstream scalar (``unif2ace::head_grad_anchor``, value 0).
``mask_loss`` and ``score_loss`` stay differentiable through ``unif2ace::head_lse_gather_attach``,
whose backward is the recompute path, run only when those outputs receive a gradient.

Every op reaches its kernels through the op records of :mod:`unif2ace.kernels.d3diff` (looked up
in the registry: that module imports this one): ``OP.kernels(backend).<entry point>(...)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._dispatch import OPS
from ..reference.d3diff import M_CLAMP, safe_exp

__all__ = [
    "HEAD_EAGER_GRAD",
    "LossArgs",
    "RowStats",
    "Schedule",
    "assemble",
    "autocast_off",
    "head_loss",
    "loss_from_logits",
    "schedule_scalars",
]

FROM_LOGITS = "d3diff_loss_from_logits"  # op record names (unif2ace/kernels/d3diff.py)
HEAD = "d3diff_loss"

HEAD_EAGER_GRAD = True
"""Fused head: compute the gradient of ``loss`` during the forward (reduction mean/sum, a gradient
needed) on the backends that have a kernel for it (``head_lse_gather_eager_grad``: cpu)."""


class LossArgs(NamedTuple):
    """The loss arguments of both public ops besides the inputs and the target, validated; the
    field names are the keyword arguments of the reference functions."""

    sample_index: Optional[Tensor]
    mask_rate: Optional[Tensor]
    mask_rate_deriv: Optional[Tensor]
    alpha: float
    parametrization: str
    reduction: str
    ignore_index: int


# ---------------------------------------------------------------------------------------------
# closed-form assembly


class Schedule(NamedTuple):
    """Per-sample schedule scalars of the closed forms, float64 ``[B]`` (``1 − rσ`` and
    ``σ'·r = m'/m`` cancel in fp32), from m clamped into [M_CLAMP, 1 − M_CLAMP] and m'."""

    r: Tensor  # (1 − m)/m
    log_r: Tensor  # log r
    log1m: Tensor  # log(1 − m) = −σ
    dsigma: Tensor  # σ' = m'/(1 − m)
    w: Tensor  # σ'·r = m'/m

    def raw_shift(self, V: int) -> Tensor:
        """The raw parametrisation's c = log V − log r."""
        return math.log(V) - self.log_r


def schedule_scalars(mask_rate: Tensor, mask_rate_deriv: Tensor) -> Schedule:
    """The per-sample schedule scalars from m ``[B]`` and m' ``[B]`` (no gradient)."""
    m = mask_rate.detach().double().clamp(M_CLAMP, 1.0 - M_CLAMP)
    dm = mask_rate_deriv.detach().double()
    log1m = torch.log1p(-m)
    return Schedule(r=(1.0 - m) / m, log_r=log1m - torch.log(m), log1m=log1m, dsigma=dm / (1.0 - m), w=dm / m)


class RowStats(NamedTuple):
    """The per-row numbers every fast kernel returns (fp32 ``[N]``; 0, 0, 0 at ignored rows):
    ``row_max`` m_i (a shift, never differentiated), ``lse_rel`` r_i = log Σ_v exp(ℓ_iv − m_i)
    and ``tgt`` t_i = ℓ_i[x0_i].

    A row whose max is not finite (NaN -- where a kernel's max caught it --, +inf, or no value
    above −inf) is a NaN row of the contract (docs/kernels.md §A): its LSE and CE are NaN here,
    whatever r is (kernels differ there), and the backward kernels' exp((ℓ − m) − r) is NaN on
    it. NaN that a kernel's max skips reaches r through the sum."""

    row_max: Tensor
    lse_rel: Tensor
    tgt: Tensor

    def _finite_max(self, x: Tensor) -> Tensor:
        return torch.where(torch.isfinite(self.row_max), x, torch.full_like(x, float("nan")))

    def lse(self) -> Tensor:
        return self._finite_max(self.row_max + self.lse_rel)

    def ce(self) -> Tensor:
        """r − (t − m): no rounding at the scale of the row max (t − m is exact near the max)."""
        return self._finite_max(self.lse_rel - (self.tgt - self.row_max))


def assemble(
    stats: RowStats, target: Tensor, sample_rows: Optional[Tensor], args: LossArgs, V: int, out_shape
) -> Tuple[Tensor, Tensor, Tensor]:
    """Closed-form ``(loss, mask_loss, score_loss)`` from the per-row :class:`RowStats` (target
    ``[N]`` int64, sample_rows ``[N]`` the sample of every row); differentiable through
    ``lse_rel`` and ``tgt``."""
    valid = target != args.ignore_index
    zero = torch.zeros_like(stats.lse_rel)
    ce = torch.where(valid, stats.ce(), zero)
    if args.mask_rate is not None:
        s = schedule_scalars(args.mask_rate, args.mask_rate_deriv)

        def rows(x):
            return x.float().index_select(0, sample_rows)

        if args.parametrization == "posterior":
            score = rows(s.w) * ce + rows(s.dsigma * (1.0 + s.r * s.log1m))  # 1 − rσ, σ = −log1p(−m)
        elif args.parametrization == "radd":
            score = rows(s.w) * ce
        else:  # raw: −r(t − c) + r(log r − 1) = r(log V − 1 − t)
            lse, tgt = stats.lse(), stats.tgt
            score = rows(s.dsigma) * (safe_exp(lse - rows(s.raw_shift(V))) + rows(s.r) * ((math.log(V) - 1.0) - tgt))
        score = torch.where(valid, score, zero)
        B = args.mask_rate.shape[0]
    else:
        score = zero
        B = None

    if args.reduction == "none":
        mask_loss, score_loss = ce.reshape(out_shape), score.reshape(out_shape)
    elif args.reduction == "sum":
        mask_loss, score_loss = ce.sum(), score.sum()
    else:
        mask_loss = ce.sum() / valid.sum().clamp_min(1).float()
        score_loss = score.sum() / B if B is not None else score.sum()
    return mask_loss + args.alpha * score_loss, mask_loss, score_loss


def _rows(target: Tensor, sample_index: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """(target [N] int64, the sample of every row [N] int64 or None); target is [N] or [B, L]."""
    t = target.reshape(-1).long()
    if target.dim() == 2:
        return t, torch.arange(target.shape[0], device=target.device).repeat_interleave(target.shape[1])
    return t, None if sample_index is None else sample_index.reshape(-1).long()


def loss_from_logits(logits: Tensor, target: Tensor, args: LossArgs, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``d3diff_loss_from_logits`` on a fast backend (inputs validated)."""
    V = logits.shape[-1]
    t, sample_rows = _rows(target, args.sample_index)
    stats = RowStats(*_lse_gather_op(logits.reshape(-1, V), t, args.ignore_index, backend))
    return assemble(stats, t, sample_rows, args, V, target.shape)


def head_loss(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, args: LossArgs, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    """``d3diff_loss`` on a fast backend (inputs validated, GEMM operands in one dtype)."""
    V = weight.shape[0]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t, sample_rows = _rows(target, args.sample_index)
    if _use_eager_grad(backend, args.reduction, hidden, weight, bias):
        return _head_eager_loss(h2, weight, bias, t, sample_rows, args, V, target.shape, backend)
    stats = RowStats(*_head_lse_gather_op(h2, weight, bias, t, args.ignore_index, backend))
    return assemble(stats, t, sample_rows, args, V, target.shape)


def _grads_or_zeros(like: Tensor, grad_lse: Optional[Tensor], grad_tgt: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    def f32(g):
        return torch.zeros_like(like) if g is None else g.float()

    return f32(grad_lse), f32(grad_tgt)


def _row_stats_like(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Fake of the kernels' :class:`RowStats`: three fp32 [N] for an [N, ·] input."""
    return tuple(x.new_empty(x.shape[0], dtype=torch.float32) for _ in range(3))


def _contiguous_like(x: Tensor) -> Tensor:
    """Fake of a kernel output shaped and typed like ``x``: the kernels return contiguous tensors,
    whatever the layout of ``x`` (``empty_like`` would copy a transposed input's strides)."""
    return x.new_empty(x.shape)


def autocast_off(device: torch.device):
    """The kernels compute in their operands' dtypes: autocast (if on) must not re-cast the torch
    ops inside them (the fast paths' GEMMs, the reference's F.linear)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# stem d3diff: the row kernels


@torch.library.custom_op("unif2ace::lse_gather", mutates_args=())
def _lse_gather_op(logits: Tensor, target: Tensor, ignore_index: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """:class:`RowStats` (row_max, lse_rel, tgt), fp32 [N], of logits [N, V]; 0, 0, 0 on rows with
    target == ignore_index."""
    with autocast_off(logits.device):
        return tuple(OPS[FROM_LOGITS].kernels(backend).lse_gather(logits, target, ignore_index))


@_lse_gather_op.register_fake
def _(logits, target, ignore_index, backend):
    return _row_stats_like(logits)


@torch.library.custom_op("unif2ace::lse_gather_backward", mutates_args=())
def _lse_gather_backward_op(
    logits: Tensor,
    target: Tensor,
    row_max: Tensor,
    lse_rel: Tensor,
    grad_lse: Tensor,
    grad_tgt: Tensor,
    ignore_index: int,
    backend: str,
) -> Tensor:
    """grad_logits = grad_lse · softmax(logits) + grad_tgt · onehot(target), contiguous, logits' dtype."""
    k = OPS[FROM_LOGITS].kernels(backend)
    with autocast_off(logits.device):
        return k.lse_gather_backward(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index)


@_lse_gather_backward_op.register_fake
def _(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index, backend):
    return _contiguous_like(logits)


def _lse_gather_setup(ctx, inputs, output):
    logits, target, ignore_index, backend = inputs
    ctx.mark_non_differentiable(output[0])  # row_max: a shift
    ctx.save_for_backward(logits, target, output[0], output[1])
    ctx.ignore_index = ignore_index
    ctx.backend = backend


def _lse_gather_bwd(ctx, grad_max, grad_lse, grad_tgt):
    logits, target, row_max, lse_rel = ctx.saved_tensors
    grad_lse, grad_tgt = _grads_or_zeros(lse_rel, grad_lse, grad_tgt)
    g = _lse_gather_backward_op(logits, target, row_max, lse_rel, grad_lse, grad_tgt, ctx.ignore_index, ctx.backend)
    return g, None, None, None


_lse_gather_op.register_autograd(_lse_gather_bwd, setup_context=_lse_gather_setup)


# ---------------------------------------------------------------------------------------------
# stem d3diff_head: fused with the LM head


@torch.library.custom_op("unif2ace::head_lse_gather", mutates_args=())
def _head_lse_gather_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    """lse_gather of logits = hidden @ weight.T + bias without materialising [N, V]."""
    with autocast_off(hidden.device):
        return tuple(OPS[HEAD].kernels(backend).head_lse_gather(hidden, weight, bias, target, ignore_index))


@_head_lse_gather_op.register_fake
def _(hidden, weight, bias, target, ignore_index, backend):
    return _row_stats_like(hidden)


@torch.library.custom_op("unif2ace::head_lse_gather_backward", mutates_args=())
def _head_lse_gather_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    row_max: Tensor,
    lse_rel: Tensor,
    grad_lse: Tensor,
    grad_tgt: Tensor,
    ignore_index: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias), contiguous, in the inputs' dtypes; grad_bias is empty
    without bias."""
    k = OPS[HEAD].kernels(backend)
    with autocast_off(hidden.device):
        stats = (row_max, lse_rel)
        return k.head_lse_gather_backward(hidden, weight, bias, target, *stats, grad_lse, grad_tgt, ignore_index)


@_head_lse_gather_backward_op.register_fake
def _(hidden, weight, bias, target, row_max, lse_rel, grad_lse, grad_tgt, ignore_index, backend):
    gb = _contiguous_like(bias) if bias is not None else hidden.new_empty(0)
    return _contiguous_like(hidden), _contiguous_like(weight), gb


def _head_setup(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, backend = inputs
    ctx.mark_non_differentiable(output[0])
    ctx.save_for_backward(hidden, weight, bias, target, output[0], output[1])
    ctx.has_bias = bias is not None
    ctx.args = (ignore_index, backend)


def _head_input_grads(ctx, grad_lse, grad_tgt):
    """(grad_hidden, grad_weight, grad_bias or None) by the recompute path (ctx from _head_setup)."""
    hidden, weight, bias, target, row_max, lse_rel = ctx.saved_tensors
    grad_lse, grad_tgt = _grads_or_zeros(lse_rel, grad_lse, grad_tgt)
    gh, gw, gb = _head_lse_gather_backward_op(
        hidden, weight, bias, target, row_max, lse_rel, grad_lse, grad_tgt, *ctx.args
    )
    return gh, gw, (gb if ctx.has_bias else None)


def _head_bwd(ctx, grad_max, grad_lse, grad_tgt):
    return _head_input_grads(ctx, grad_lse, grad_tgt) + (None,) * 3


_head_lse_gather_op.register_autograd(_head_bwd, setup_context=_head_setup)


# ---------------------------------------------------------------------------------------------
# stem d3diff_head: the gradient of ``loss`` during the forward


@torch.compiler.assume_constant_result
def _has_eager_grad(backend: str) -> bool:
    return callable(getattr(OPS[HEAD].kernels(backend), "head_lse_gather_eager_grad", None))


def _use_eager_grad(backend, reduction, hidden, weight, bias) -> bool:
    return (
        HEAD_EAGER_GRAD
        and reduction != "none"
        and torch.is_grad_enabled()
        and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
        and _has_eager_grad(backend)
    )


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
    need_hidden: bool,
    need_weight: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(row_max, lse_rel, tgt, dloss/dhidden, dloss/dweight, dloss/dbias), contiguous: the
    statistics in fp32, the gradients of the ``loss`` output (reduction mean/sum, upstream 1) in
    the dtypes of hidden / weight / bias; [0, D] / [0] where not needed / no bias."""
    args = LossArgs(sample_rows, mask_rate, mask_rate_deriv, alpha, parametrization, reduction, ignore_index)
    k = OPS[HEAD].kernels(backend)
    with autocast_off(hidden.device):
        return tuple(k.head_lse_gather_eager_grad(hidden, weight, bias, target, args, need_hidden, need_weight))


@_head_eager_grad_op.register_fake
def _(hidden, weight, bias, target, *rest):
    need_hidden, need_weight = rest[-3], rest[-2]
    n, D = hidden.shape
    V = weight.shape[0]
    return (
        *_row_stats_like(hidden),
        hidden.new_empty(n if need_hidden else 0, D),
        weight.new_empty(V if need_weight else 0, D),
        bias.new_empty(V) if bias is not None else hidden.new_empty(0, dtype=torch.float32),
    )


@torch.library.custom_op("unif2ace::head_grad_anchor", mutates_args=())
def _head_grad_anchor_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], g_hidden: Tensor, g_weight: Tensor, g_bias: Tensor
) -> Tensor:
    """0.0 (fp32 scalar) whose gradient w.r.t. hidden/weight/bias is upstream · g_* (precomputed)."""
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
    row_max: Tensor,
    lse_rel: Tensor,
    tgt: Tensor,
    ignore_index: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Copies of (row_max, lse_rel, tgt), differentiable w.r.t. hidden/weight/bias (backward:
    head_lse_gather_backward)."""
    return row_max.clone(), lse_rel.clone(), tgt.clone()


@_head_attach_op.register_fake
def _(hidden, weight, bias, target, row_max, lse_rel, tgt, ignore_index, backend):
    return _contiguous_like(row_max), _contiguous_like(lse_rel), _contiguous_like(tgt)


def _attach_setup(ctx, inputs, output):
    hidden, weight, bias, target, row_max, lse_rel, tgt, ignore_index, backend = inputs
    _head_setup(ctx, (hidden, weight, bias, target, ignore_index, backend), output)


def _attach_bwd(ctx, grad_max, grad_lse, grad_tgt):
    return _head_input_grads(ctx, grad_lse, grad_tgt) + (None,) * 6


_head_attach_op.register_autograd(_attach_bwd, setup_context=_attach_setup)


def _head_eager_loss(h2, weight, bias, t, sample_rows, args: LossArgs, V, out_shape, backend):
    def det(x):
        return None if x is None else x.detach()

    *stats, gh, gw, gb = _head_eager_grad_op(
        h2.detach(),
        weight.detach(),
        det(bias),
        t,
        sample_rows,
        det(args.mask_rate),
        det(args.mask_rate_deriv),
        float(args.alpha),
        args.parametrization,
        args.reduction,
        args.ignore_index,
        h2.requires_grad,
        weight.requires_grad,
        backend,
    )
    stats = RowStats(*_head_attach_op(h2, weight, bias, t, *stats, args.ignore_index, backend))
    loss, mask_loss, score_loss = assemble(stats, t, sample_rows, args, V, out_shape)
    return loss.detach() + _head_grad_anchor_op(h2, weight, bias, gh, gw, gb), mask_loss, score_loss
