"""cuda backend of the sampling ops: host glue of csrc/cuda/sampling.cu
(``torch.ops.unif2ace_cuda.masked_step_sample`` / ``masked_step_remask`` / ``ar_sample``).

The host pre-passes live here and are shared with the Triton launch glue
(unif2ace/kernels/triton/sampling.py): both fused backends take the same inputs. They are plain
PyTorch built on the reference's helpers, so importing this module needs neither the extension
nor triton:

- :func:`masked_step_inputs`: the seed/stream keys, the guidance factors, the sample ids, and for
  top-k the guided, sanitised fp32 logits materialised once with their per-row k-th largest value
  (the kernels then read those logits and keep ``x >= thr``, so the comparison is bit-identical to
  the reference's); without top-k the kernels read the raw logits once.
- :func:`ar_inputs`: for top-k / top-p the per-row threshold ``thr`` such that the reference keeps
  code v iff ``min(x_v / T, FLT_MAX) >= thr`` (the reference's own filters, then a row minimum).
- :func:`remask_in_torch`: kernel B's fall-back for rows longer than a kernel's limit (and for empty
  inputs): the reference's ranking.

An in-kernel top-k / top-p selection (radix / pivot search) is future work.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _ext
from ..reference import rng as _rng
from ..reference import sampling as _ref

__all__ = [
    "masked_sample_step",
    "ar_sample",
    "StepInputs",
    "masked_step_inputs",
    "empty_step",
    "remask_in_torch",
    "ArInputs",
    "ar_inputs",
    "ar_threshold",
    "MAX_L",
]

MAX_L = 4096  # kMaxL of csrc/cuda/sampling.cuh: the longest row kernel B re-masks


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------
# host pre-passes (shared with the Triton glue)


class StepInputs(NamedTuple):
    """The inputs of the fused masked-step kernels (:func:`masked_step_inputs`)."""

    cond: Tensor
    """``[rows, V]``, unit column stride: the cond logits, or the guided, sanitised fp32 logits
    when ``thr`` is set."""
    unc: Optional[Tensor]
    """``[rows, V]`` unconditional logits (unit column stride) when the kernel combines, else None."""
    thr: Optional[Tensor]
    """``[rows]`` fp32 top-k threshold (None: no filter)."""
    tokens: Tensor
    is_masked: Tensor
    sample_ids: Tensor
    keys: Tuple[int, int, int, int]
    """The call keys of (seed, step), :func:`unif2ace.kernels.reference.rng.call_keys`: scalar
    kernel arguments (no host-to-device copy; CUDA-graph capturable)."""
    a: float
    s: float
    temperature: float
    """The divisor of the scores (1 when greedy: unused)."""
    tau: float
    """fp32-rounded τ."""


def masked_step_inputs(cond_logits, tokens, is_masked, uncond_logits, sample_ids, p: _ref.StepParams) -> StepInputs:
    B, L, V = cond_logits.shape
    device = cond_logits.device
    rows = B * L
    cond = cond_logits.reshape(rows, V)
    unc = _ref.active_uncond(uncond_logits, p.guidance_scale)
    unc = None if unc is None else unc.reshape(rows, V)
    thr = None
    if p.top_k is not None and p.top_k < V and rows > 0:
        cond, unc = _ref.guided_logits(cond, unc, p.guidance_scale).contiguous(), None
        thr = _ref.top_k_threshold(cond, p.top_k)[:, 0].contiguous()
    a, s = _ref.guidance_factors(p.guidance_scale)
    return StepInputs(
        cond=_unit_stride(cond),
        unc=None if unc is None else _unit_stride(unc),
        thr=thr,
        tokens=tokens.contiguous(),
        is_masked=is_masked.contiguous(),
        sample_ids=_ref.row_sample_ids(sample_ids, B, device),
        keys=tuple(_rng.call_keys(p.seed, p.step)),
        a=a,
        s=s,
        temperature=float(p.temperature) if p.temperature > 0 else 1.0,
        tau=float(torch.tensor(p.tau, dtype=torch.float32)),
    )


def empty_step(B: int, L: int, device: torch.device):
    """Uninitialised kernel-A outputs ``(confidence fp32, sampled int64)``, ``[B, L]``."""
    return torch.empty(B, L, dtype=torch.float32, device=device), torch.empty(B, L, dtype=torch.int64, device=device)


def remask_in_torch(conf: Tensor, sampled: Tensor, tokens: Tensor, is_masked: Tensor, p: _ref.StepParams):
    """Kernel B in PyTorch (the reference's ranking): ``MaskedStepOutput`` from kernel A's output."""
    tok_out, new_mask, smp_out = _ref.remask(conf, is_masked, tokens, sampled, p.n_cap, p.mask_token_id)
    return _ref.MaskedStepOutput(tok_out, new_mask, smp_out, conf)


class ArInputs(NamedTuple):
    """The inputs of the fused AR kernels (:func:`ar_inputs`)."""

    logits: Tensor
    """``[B, V]``, unit column stride."""
    sample_ids: Tensor
    positions: Tensor
    keys: Tuple[int, int, int, int]
    """The call keys of (seed, step 0)."""
    thr: Optional[Tensor]
    """``[B]`` fp32 filter threshold on ``min(x / T, FLT_MAX)`` (None: no filter)."""
    temperature: float
    """The divisor of the scores (1 when greedy: unused)."""
    greedy: bool


def ar_threshold(logits: Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> Tensor:
    """Filter pre-pass of ``ar_sample``: ``thr [B]`` fp32 such that the reference keeps code v iff
    ``min(x_v / T, FLT_MAX) >= thr`` (+inf for a row with nothing finite)."""
    z = _ref.ar_scores(_ref.sanitize_logits(logits), temperature, top_k, top_p)
    return torch.where(z > float("-inf"), z, float("inf")).amin(dim=-1).contiguous()


def ar_inputs(logits, seed, position, temperature, top_k, top_p, sample_ids) -> ArInputs:
    B, V = logits.shape
    device = logits.device
    greedy = _ref.ar_greedy(temperature, top_k)
    filt = not greedy and ((top_k is not None and top_k < V) or (top_p is not None and top_p < 1.0))
    return ArInputs(
        logits=_unit_stride(logits),
        sample_ids=_ref.row_sample_ids(sample_ids, B, device),
        positions=_ref.row_positions(position, B, device),
        keys=tuple(_rng.call_keys(seed, 0)),
        thr=ar_threshold(logits, temperature, top_k, top_p) if filt else None,
        temperature=float(temperature) if temperature > 0 else 1.0,
        greedy=greedy,
    )


# --------------------------------------------------------------------------------------------
# entry points


def masked_sample_step(cond_logits, tokens, is_masked, uncond_logits, sample_ids, p: _ref.StepParams):
    """One MaskGIT step (``masked_sample_step_ref`` semantics) with the scalars ``p``: kernel A
    (sample + confidence per position), then kernel B (re-mask per row, L <= MAX_L) or the
    reference's ranking."""
    B, L, _ = cond_logits.shape
    if B * L == 0:
        return remask_in_torch(*empty_step(B, L, cond_logits.device), tokens, is_masked, p)
    x = masked_step_inputs(cond_logits, tokens, is_masked, uncond_logits, sample_ids, p)
    ops = _ext.cuda_ops()
    sampled, conf = ops.masked_step_sample(
        x.cond,
        x.unc,
        x.tokens,
        x.is_masked,
        x.sample_ids,
        x.thr,
        x.a,
        x.s,
        x.temperature,
        x.tau,
        p.temperature == 0,
        p.tau != 0.0,
        *x.keys,
    )
    if L > MAX_L:
        return remask_in_torch(conf, sampled, tokens, is_masked, p)
    tok_out, new_mask, smp_out = ops.masked_step_remask(
        conf, x.is_masked, x.tokens, sampled, p.n_cap, p.last, int(p.mask_token_id)
    )
    return _ref.MaskedStepOutput(tok_out, new_mask, smp_out, conf)


def ar_sample(logits, *, seed, position, temperature=1.0, top_k=None, top_p=None, sample_ids=None, logprobs=True):
    """One autoregressive sampling step (``ar_sample_ref`` semantics); the log-probabilities are
    formed whatever ``logprobs`` says (the public op drops them when they were not asked for)."""
    if logits.shape[0] == 0:
        return _ref.ARSample(logits.new_empty(0, dtype=torch.int64), logits.new_empty(0, dtype=torch.float32))
    x = ar_inputs(logits, seed, position, temperature, top_k, top_p, sample_ids)
    out = _ext.cuda_ops().ar_sample(x.logits, x.sample_ids, x.positions, x.thr, x.temperature, x.greedy, *x.keys[:2])
    return _ref.ARSample(*out)
