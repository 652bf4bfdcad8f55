"""Reference D3Diff loss from logits (docs/model.md §2): masked-token cross-entropy + SEDD score
entropy. The fused-head oracle (logits = hidden @ weight.T + bias) is :mod:`.d3diff_head`.

Plain PyTorch, fp32 internally, gradients by autograd. The score term is computed in SEDD's
explicit *score-vector* form -- build the log-score vector ``log s`` over the vocabulary, then
``Σ_v exp(log s_v) − r·log s[x0] + r(log r − 1)`` -- and deliberately not through the closed forms
the fast backends use (posterior: ``r·CE + 1 − rσ``), so this module is an independent oracle.

Per-sample schedule quantities (m = masking rate, m' = dm/dτ, both per sample b):

- m is clamped into [1e-6, 1 − 1e-6] (σ' and the constant diverge as m → 1, r as m → 0);
- σ = −log(1 − m)  (SEDD's total noise),  σ' = m'/(1 − m)  (its rate),  r = (1 − m)/m;
- the per-token weight σ'·r is computed directly as m'/m.

m and m' are schedule values: they receive no gradient.

NaN / ±inf contract (docs/kernels.md §A, every backend follows it):

- a row whose target is ``ignore_index`` is never read: it contributes 0 to every output and gets
  exactly 0 gradient whatever it holds (NaN, ±inf);
- a masked row holding NaN anywhere, +inf anywhere, or no value above −inf gives a NaN loss term
  (mask and score, every parametrisation) and a NaN gradient row, and NaN wherever the row feeds:
  the reduced losses, and every entry of dW and dbias of the fused head;
- −inf entries of an otherwise finite row are classes of probability 0 (gradient 0 there); a −inf
  target logit gives CE = +inf (and a +inf score term) with a finite gradient.

Large common offsets cost no accuracy: the row max is subtracted before anything is rounded at
the offset's scale (log_softmax; :func:`_logsumexp`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "D3DiffRefOutput",
    "M_CLAMP",
    "SAFE_EXP_MAX",
    "safe_exp",
    "schedule_terms",
    "d3diff_loss_from_logits_ref",
]

M_CLAMP = 1e-6
"""m is clamped into [M_CLAMP, 1 − M_CLAMP] inside the loss."""

SAFE_EXP_MAX = 60.0
""":func:`safe_exp` is exp(x) up to this point and linear beyond it."""

PARAMETRIZATIONS = ("posterior", "raw", "radd")
REDUCTIONS = ("mean", "sum", "none")


class D3DiffRefOutput(NamedTuple):
    loss: Tensor
    mask_loss: Tensor
    score_loss: Tensor


def safe_exp(x: Tensor) -> Tensor:
    """Overflow guard for the raw parametrisation's ``exp(LSE − c)``.

    ``exp(x)`` for ``x <= 60``; beyond, the tangent line ``exp(60)·(1 + x − 60)``. Value and first
    derivative are continuous at 60 and stay finite in fp32 for any finite x (exp(60) ≈ 1.1e26),
    so an untrained raw head early in training gives a huge but finite loss and gradient instead
    of inf/NaN. Every backend applies exactly this guard.
    """
    e = torch.exp(x.clamp(max=SAFE_EXP_MAX))
    return torch.where(x <= SAFE_EXP_MAX, e, math.exp(SAFE_EXP_MAX) * (1.0 + (x - SAFE_EXP_MAX)))


def schedule_terms(mask_rate: Tensor, mask_rate_deriv: Tensor) -> dict:
    """Per-sample fp32 schedule quantities from m ``[B]`` and m' ``[B]`` (no gradient).

    Returns a dict of ``[B]`` fp32 tensors: ``m`` (clamped), ``r = (1−m)/m``, ``log_r``,
    ``sigma = −log1p(−m)``, ``dsigma = m'/(1−m)``, ``w = m'/m`` (= σ'·r).
    """
    m = mask_rate.detach().float().clamp(M_CLAMP, 1.0 - M_CLAMP)
    dm = mask_rate_deriv.detach().float()
    one_minus = 1.0 - m
    return {
        "m": m,
        "r": one_minus / m,
        "log_r": torch.log1p(-m) - torch.log(m),
        "sigma": -torch.log1p(-m),
        "dsigma": dm / one_minus,
        "w": dm / m,
    }


def _logsumexp(x: Tensor) -> Tensor:
    """log Σ_v exp(x_v) over the last dim as ``max + log Σ exp(x − max)``, like log_softmax:
    NaN for a row whose max is not finite (+inf, or no value above −inf), unlike torch.logsumexp
    (which returns ±inf there); the contract treats such rows alike in every term."""
    m = x.amax(dim=-1, keepdim=True).detach()
    return (m + torch.log(torch.exp(x - m).sum(dim=-1, keepdim=True))).squeeze(-1)


def _per_row(x: Tensor, sample_index: Tensor) -> Tensor:
    return x.index_select(0, sample_index.reshape(-1).long())


def d3diff_loss_from_logits_ref(
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
) -> D3DiffRefOutput:
    """D3Diff loss from logits, explicit score-vector form (the oracle).

    Args:
        logits: ``[N, V]`` or ``[B, L, V]``, fp32/fp16/bf16 (upcast to fp32 here). The V columns
            are the image-code vocabulary the score is defined over.
        target: ``[N]`` (or ``[B, L]``), int32/int64: the clean code x0 in [0, V) at masked rows,
            ``ignore_index`` at rows that carry no loss (unmasked, padding).
        sample_index: ``[N]`` int, the sample b in [0, B) of every row (2-D logits only; for
            ``[B, L, V]`` logits row ``b·L + l`` belongs to sample b). Needed when the score term
            is computed.
        mask_rate: m ``[B]`` in (0, 1]; mask_rate_deriv: m' ``[B]`` ≥ 0. Both may be None when
            ``alpha == 0`` (the score term is then reported as zeros).
        alpha: weight of the score term: ``loss = mask_loss + alpha · score_loss``.
        parametrization: the score s over the V codes at a masked row with sample b:
            ``"posterior"``: log s = log_softmax(ℓ) − log m (UniF²ace);
            ``"raw"``: log s_v = ℓ_v − c_b, c_b = log(expm1(σ_b)) + log V (SEDD's scale_by_sigma),
            with Σ_v s_v = exp(LSE − c) evaluated through :func:`safe_exp`;
            ``"radd"``: s = softmax(ℓ)·r (RADD; DSE = r·CE).
        reduction: ``"mean"``: mask_loss = Σ CE / #masked rows (0 when no row is masked),
            score_loss = (1/B) Σ_b Σ_{i∈M_b} σ'_b·DSE_i; ``"sum"``: Σ CE and Σ σ'·DSE;
            ``"none"``: per-row tensors shaped like ``target`` (CE_i, σ'_b·DSE_i, 0 at ignored rows).
        ignore_index: target value marking rows without loss.

    Returns:
        ``(loss, mask_loss, score_loss)``, fp32, where per masked row
        CE_i = LSE(ℓ_i) − ℓ_i[x0_i] and
        DSE_i = Σ_v s_{i,v} − r_b·log s_{i,x0} + r_b(log r_b − 1).

    Only basic checks here; the public op validates its inputs.
    """
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            "d3diff_loss_from_logits_ref: argument 'parametrization' must be one of "
            f"{list(PARAMETRIZATIONS)}, got {parametrization!r}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"d3diff_loss_from_logits_ref: argument 'reduction' must be one of {list(REDUCTIONS)}, got {reduction!r}"
        )
    out_shape = target.shape
    V = logits.shape[-1]
    if logits.dim() == 3:
        B, L = logits.shape[0], logits.shape[1]
        sample_index = torch.arange(B, device=logits.device).repeat_interleave(L)
    x = logits.reshape(-1, V).float()
    t = target.reshape(-1).long()
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    # ignored rows are never read: whatever they hold (NaN, inf), 0 loss and exactly 0 gradient
    x = torch.where(valid[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))

    logp = torch.log_softmax(x, dim=-1)
    ce = -logp.gather(1, t_safe[:, None]).squeeze(1)
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    n_masked = valid.sum()

    have_schedule = mask_rate is not None and mask_rate_deriv is not None
    if have_schedule:
        if sample_index is None:
            raise ValueError("d3diff_loss_from_logits_ref: 'sample_index' is required for 2-D logits")
        B = mask_rate.shape[0]
        s = schedule_terms(mask_rate, mask_rate_deriv)
        r = _per_row(s["r"], sample_index)[:, None]
        log_r = _per_row(s["log_r"], sample_index)[:, None]
        dsigma = _per_row(s["dsigma"], sample_index)
        if parametrization == "posterior":
            log_s = logp - torch.log(_per_row(s["m"], sample_index))[:, None]
            pos = torch.exp(_logsumexp(log_s))
        elif parametrization == "radd":
            log_s = logp + log_r
            pos = torch.exp(_logsumexp(log_s))
        else:  # raw
            c = torch.log(torch.expm1(s["sigma"])) + math.log(V)
            log_s = x - _per_row(c, sample_index)[:, None]
            pos = safe_exp(_logsumexp(log_s))
        neg = (r * log_s.gather(1, t_safe[:, None])).squeeze(1)
        const = (r * (log_r - 1.0)).squeeze(1)
        dse = pos - neg + const
        score_rows = torch.where(valid, dsigma * dse, torch.zeros_like(dse))
    else:
        B = None
        score_rows = torch.zeros_like(ce)

    if reduction == "none":
        mask_loss = ce.reshape(out_shape)
        score_loss = score_rows.reshape(out_shape)
    elif reduction == "sum":
        mask_loss = ce.sum()
        score_loss = score_rows.sum()
    else:
        mask_loss = ce.sum() / n_masked.clamp_min(1).float()
        score_loss = score_rows.sum() / B if B is not None else score_rows.sum()
    return D3DiffRefOutput(mask_loss + alpha * score_loss, mask_loss, score_loss)
