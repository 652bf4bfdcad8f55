"""D3Diff loss (model-spec.md §2): masked-token cross-entropy + α · SEDD score entropy.

Public ops:

- :func:`d3diff_loss_from_logits` -- logits already in memory; backends ``reference``, ``cpu``
  (C++ row kernels), ``triton``.
- :func:`d3diff_loss` -- fused with the LM head (``logits = hidden @ weight.T + bias``);
  backends ``reference`` and ``cpu`` (row-chunked: a chunk GEMM, then the C++ row kernel; the
  backward recomputes each chunk's logits, so peak extra memory is O(chunk × V), never [N, V]).

Fast path. Both terms need only two numbers per masked row i: LSE_i = logsumexp(ℓ_i) and the
target logit t_i = ℓ_i[x0_i]. The backends implement one differentiable custom op,
``torch.ops.unif2ace.lse_gather(logits, target, ignore_index, backend) -> (lse, tgt)``, whose
backward ``lse_gather_backward`` writes ``grad_lse_i · softmax(ℓ_i) + grad_tgt_i · onehot(x0_i)``.
The loss is assembled here from those ``[N]`` vectors with the closed forms (CE = LSE − t):

- posterior: σ'·DSE = (m'/m)·CE + σ'·(1 − rσ)
- raw:       σ'·DSE = σ'·(safe_exp(LSE − c) + r·(log V − 1 − t)),  c = log V − log r
- radd:      σ'·DSE = (m'/m)·CE

so α, the parametrisation, the reduction and any upstream gradient fold in by the chain rule
(the model-spec's ``a·LSE + b·exp(LSE − c) − g·ℓ_t + k`` form). The reference backend computes
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
    "d3diff_loss_from_logits", cpu_order=("cpu",), cuda_order=("triton",),
    doc="D3Diff loss (masked CE + SEDD score entropy) from logits",
)
OP_FUSED = Op(
    "d3diff_loss", cpu_order=("cpu",), cuda_order=(),
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


def _head_logits(hidden: Tensor, w32: Tensor, b32: Optional[Tensor], rows: Tensor) -> Tensor:
    h = hidden.index_select(0, rows).float()
    return torch.addmm(b32, h, w32.t()) if b32 is not None else h @ w32.t()


def _cpu_head_lse_gather(hidden, weight, bias, target, ignore_index, chunk):
    n = hidden.shape[0]
    lse = hidden.new_zeros(n, dtype=torch.float32)
    tgt = hidden.new_zeros(n, dtype=torch.float32)
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    for rows in _head_chunks(target, ignore_index, chunk):
        logits = _head_logits(hidden, w32, b32, rows)
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
    for rows in _head_chunks(target, ignore_index, chunk):
        h = hidden.index_select(0, rows).float()
        logits = torch.addmm(b32, h, w32.t()) if b32 is not None else h @ w32.t()
        g = _ext.cpu_ops().lse_gather_backward(
            logits, target.index_select(0, rows), lse.index_select(0, rows),
            grad_lse.index_select(0, rows), grad_tgt.index_select(0, rows), ignore_index,
        )
        g_hidden.index_copy_(0, rows, g @ w32)
        g_weight.addmm_(g.t(), h)
        if bias is not None:
            g_bias += g.sum(0)
    gb = g_bias.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return g_hidden.to(hidden.dtype), g_weight.to(weight.dtype), gb


OP_FUSED.register("reference", d3diff_loss_ref)
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
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor, grad_lse: Tensor,
    grad_tgt: Tensor, ignore_index: int, chunk: int, backend: str,
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
# validation and assembly


def _validate(
    op: str, V: int, lead: Tuple[int, ...], device, target, sample_index, mask_rate, mask_rate_deriv,
    alpha, parametrization, reduction, ignore_index,
):
    """Common checks; ``lead`` is logits.shape[:-1] ([N] or [B, L]). Returns the number of samples B."""
    check_choice(op, "parametrization", parametrization, PARAMETRIZATIONS)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{op}: argument 'alpha' must be a finite float, got {alpha!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: argument 'ignore_index' must be an int, got {ignore_index!r}")
    check_tensor(op, "target", target, dtypes=INT_DTYPES, shape=list(lead))
    check_same_device(op, target=target, sample_index=sample_index, mask_rate=mask_rate,
                      mask_rate_deriv=mask_rate_deriv)
    if target.device != device:
        raise ValueError(f"{op}: all tensors must be on one device; the inputs are on {device} but 'target' is on {target.device}")
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
    lse: Tensor, tgt: Tensor, target: Tensor, sample_index: Optional[Tensor], mask_rate, mask_rate_deriv,
    V: int, alpha: float, parametrization: str, reduction: str, ignore_index: int, out_shape,
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
    """D3Diff loss from logits: ``mask_loss + alpha · score_loss`` (model-spec.md §2).

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
        backend: force ``"reference"``, ``"cpu"`` or ``"triton"`` (default: by device).

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
    _validate(op, V, lead, logits.device, target, sample_index, mask_rate, mask_rate_deriv, alpha,
              parametrization, reduction, ignore_index)
    be = OP_FROM_LOGITS.select(device_of(logits), backend)
    kw = dict(mask_rate=mask_rate, mask_rate_deriv=mask_rate_deriv, alpha=alpha,
              parametrization=parametrization, reduction=reduction, ignore_index=ignore_index)
    if be == "reference":
        return D3DiffOutput(*d3diff_loss_from_logits_ref(logits, target, sample_index=sample_index, **kw))
    t = target.reshape(-1).long()
    lse, tgt = _lse_gather_op(logits.reshape(-1, V), t, ignore_index, be)
    return _assemble(lse, tgt, t, _sample_rows(lead, sample_index, logits.device), V=V,
                     out_shape=target.shape, **kw)


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
    _validate(op, V, lead, hidden.device, target, sample_index, mask_rate, mask_rate_deriv, alpha,
              parametrization, reduction, ignore_index)
    be = OP_FUSED.select(device_of(hidden), backend)
    kw = dict(mask_rate=mask_rate, mask_rate_deriv=mask_rate_deriv, alpha=alpha,
              parametrization=parametrization, reduction=reduction, ignore_index=ignore_index)
    if be == "reference":
        return D3DiffOutput(*d3diff_loss_ref(hidden, weight, target, bias=bias, sample_index=sample_index, **kw))
    t = target.reshape(-1).long()
    lse, tgt = _head_lse_gather_op(hidden.reshape(-1, D), weight, bias, t, ignore_index, FUSED_CHUNK_ROWS, be)
    return _assemble(lse, tgt, t, _sample_rows(lead, sample_index, hidden.device), V=V,
                     out_shape=target.shape, **kw)
