"""D3Diff loss (docs/model.md §2): masked-token cross-entropy + α · SEDD score entropy.

Public ops (stem in brackets: the files of every layer carry it):

- :func:`d3diff_loss_from_logits` [``d3diff``] -- logits already in memory; backends
  ``reference``, ``cpu`` (C++ row kernels), ``triton``, ``cuda`` (row kernels).
- :func:`d3diff_loss` [``d3diff_head``] -- fused with the LM head (``logits = hidden @ weight.T +
  bias``); backends ``reference``, ``triton`` (vocabulary-tiled: logit tiles live only on chip,
  online log-sum-exp, ignored rows skipped via an on-device row order, backward recomputes tiles
  with deterministic fp32 accumulation of dW; auto-selected on CUDA) and ``cpu`` (row-chunked: a
  chunk GEMM, then the C++ row kernel, so peak extra memory is O(chunk × V), never [N, V]; with
  reduction mean/sum and a gradient needed, each chunk's gradient is computed and accumulated
  during the forward (3 GEMMs per chunk, none in the backward); otherwise the backward recomputes
  each chunk's logits).

The fast backends compute two numbers per masked row, LSE_i and the target logit, and the loss is
assembled from them in closed form (:mod:`unif2ace.kernels._custom_ops.d3diff`); the reference
backend computes SEDD's explicit score-vector form instead (:mod:`unif2ace.kernels.reference.d3diff`,
:mod:`unif2ace.kernels.reference.d3diff_head`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ._custom_ops import d3diff as _ops
from ._custom_ops.d3diff import LossArgs, autocast_off
from ._dispatch import Op, device_of
from ._validate import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_choice,
    check_float_range,
    check_int,
    check_range,
    check_real,
    check_same_device,
    check_tensor,
)
from .reference.d3diff import PARAMETRIZATIONS, REDUCTIONS, d3diff_loss_from_logits_ref
from .reference.d3diff_head import d3diff_loss_ref

__all__ = ["D3DiffOutput", "d3diff_loss", "d3diff_loss_from_logits"]


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
    stem="d3diff",
    backends=("reference", "cpu", "triton", "cuda"),
    entry_points=("lse_gather", "lse_gather_backward"),
    cpu_order=("cpu",),
    cuda_order=("triton", "cuda"),
    doc="D3Diff loss (masked CE + SEDD score entropy) from logits",
)
OP_HEAD = Op(
    "d3diff_loss",
    stem="d3diff_head",
    backends=("reference", "cpu", "triton"),
    # cpu also has head_lse_gather_eager_grad (the gradient during the forward; optional)
    entry_points=("head_lse_gather", "head_lse_gather_backward"),
    cpu_order=("cpu",),
    cuda_order=("triton",),
    doc="D3Diff loss fused with the LM head (hidden @ weight.T + bias)",
)


def _validate(op: str, V: int, lead: Tuple[int, ...], device, target, args: LossArgs) -> LossArgs:
    """Common checks; ``lead`` is the inputs' shape[:-1] ([N] or [B, L]). Returns the arguments
    with alpha as a float and ignore_index as an int."""
    sample_index, mask_rate, mask_rate_deriv = args.sample_index, args.mask_rate, args.mask_rate_deriv
    check_choice(op, "parametrization", args.parametrization, PARAMETRIZATIONS)
    check_choice(op, "reduction", args.reduction, REDUCTIONS)
    alpha = check_real(op, "alpha", args.alpha)
    ignore_index = check_int(op, "ignore_index", args.ignore_index)
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
    out = LossArgs(sample_index, mask_rate, mask_rate_deriv, alpha, args.parametrization, args.reduction, ignore_index)
    if mask_rate is None:
        if alpha != 0:
            raise ValueError(
                f"{op}: arguments 'mask_rate' and 'mask_rate_deriv' are required when alpha != 0 (got alpha={alpha}); "
                "pass alpha=0 for plain masked cross-entropy"
            )
        if sample_index is not None:
            check_tensor(op, "sample_index", sample_index, dtypes=INT_DTYPES, shape=[lead[0]])
        check_range(op, "target", target, 0, V, allow=ignore_index)
        return out
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
    return out


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
    args = LossArgs(sample_index, mask_rate, mask_rate_deriv, alpha, parametrization, reduction, ignore_index)
    args = _validate(op, V, tuple(logits.shape[:-1]), logits.device, target, args)
    be = OP_FROM_LOGITS.select(device_of(logits), backend)
    with autocast_off(logits.device):  # no GEMM here: autocast changes nothing
        if be == "reference":
            return D3DiffOutput(*d3diff_loss_from_logits_ref(logits, target, **args._asdict()))
        return D3DiffOutput(*_ops.loss_from_logits(logits, target, args, be))


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

    Under ``torch.autocast`` on the inputs' device the op behaves like ``F.linear``: hidden,
    weight and bias (any float dtypes) are cast to the autocast dtype, which the GEMMs then run
    in (fp32 accumulation; loss and statistics stay fp32), and the gradients come back in the
    inputs' own dtypes. The cast is made once per call and the backward reuses it. (torch keeps
    autocast's weight cast cache to its C++ kernels -- ``torch.library.register_autocast`` casts
    without it -- and the model's code head is a slice of the LM head weight, a view autocast
    would not cache anyway; the cast reads V·D elements once against the 2·N·D·V multiply-adds of
    each of the op's GEMMs.)
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
    if bias is not None:
        check_tensor(op, "bias", bias, shape=[V], dtypes=FLOAT_DTYPES)
    check_same_device(op, hidden=hidden, weight=weight, bias=bias)
    gemm_dtype = _autocast_dtype(hidden.device)
    if gemm_dtype is None:
        for name, x in (("weight", weight), ("bias", bias)):
            if x is not None and x.dtype != hidden.dtype:
                raise TypeError(
                    f"{op}: argument '{name}' must have the dtype of hidden ({hidden.dtype}), got {x.dtype} "
                    "(mixed dtypes are cast only under torch.autocast)"
                )
    args = LossArgs(sample_index, mask_rate, mask_rate_deriv, alpha, parametrization, reduction, ignore_index)
    args = _validate(op, V, tuple(hidden.shape[:-1]), hidden.device, target, args)
    be = OP_HEAD.select(device_of(hidden), backend)
    if gemm_dtype is not None:  # F.linear's autocast: the GEMM operands in the autocast dtype
        hidden, weight, bias = (None if x is None else x.to(gemm_dtype) for x in (hidden, weight, bias))
    with autocast_off(hidden.device):
        if be == "reference":
            return D3DiffOutput(*d3diff_loss_ref(hidden, weight, target, bias=bias, **args._asdict()))
        return D3DiffOutput(*_ops.head_loss(hidden, weight, bias, target, args, be))


def _autocast_dtype(device) -> Optional[torch.dtype]:
    """The autocast dtype if autocast is on for ``device``'s type, else None."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
