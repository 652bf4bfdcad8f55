"""Masked token sampling (one MaskGIT / Show-o generation step) and autoregressive sampling.

Public ops:

- :func:`masked_sample_step` -- guidance combine -> top-k -> temperature -> Gumbel-max sample ->
  confidence (log p of the sample + annealed Gumbel) -> per-row re-mask count from the schedule ->
  re-mask the lowest-confidence positions (docs/model.md §4).
- :func:`ar_sample` -- temperature / top-k / top-p sampling of one decode step (§5).
- :func:`mask_schedule`, :func:`num_to_keep_masked` -- the schedule arithmetic (host side).

Randomness is a stateless counter-based RNG keyed by (seed, step, sample id, position, token)
(:mod:`unif2ace.kernels.reference.rng`): results do not depend on batch composition or order,
nothing is captured from a generator, every MaskGIT step draws fresh noise, and the noise has 64
random bits (no fp32 tail truncation). The exact semantics are in
:mod:`unif2ace.kernels.reference.sampling`; every backend computes the same bits (sampled codes,
confidences, log-probabilities) for a seed.

Backends (stem ``sampling``; the RNG's stem is ``rng``): ``reference``; ``cpu`` (C++/OpenMP,
csrc/cpu/sampling.cpp behind unif2ace/kernels/cpu/sampling.py); ``triton`` and ``cuda`` (fused
kernels, unif2ace/kernels/triton/sampling.py and csrc/cuda/sampling.cu behind
unif2ace/kernels/cuda/sampling.py). The fast backends run behind
the custom ops ``unif2ace::masked_sample_step`` / ``unif2ace::ar_sample``
(unif2ace/kernels/_custom_ops/sampling.py), so they work under torch.compile. Inputs are checked at
the boundary with errors naming the argument.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._custom_ops import sampling as _ops
from ._dispatch import Op
from ._validate import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_choice,
    check_int,
    check_range,
    check_real,
    check_same_device,
    check_tensor,
)
from .reference import sampling as _ref
from .reference.sampling import ARSample, MaskedStepOutput, mask_schedule, num_to_keep_masked

__all__ = [
    "MaskedStepOutput",
    "ARSample",
    "masked_sample_step",
    "ar_sample",
    "mask_schedule",
    "num_to_keep_masked",
    "SCHEDULES",
]

SCHEDULES = _ref.SCHEDULES

# both ops of the family: kernels in unif2ace/kernels/<backend>/sampling.py, C++ on CPU tensors, on
# CUDA tensors Triton first
_FAMILY = dict(
    stem="sampling", backends=("reference", "cpu", "triton", "cuda"), cpu_order=("cpu",), cuda_order=("triton", "cuda")
)

MASKED_SAMPLE_STEP = Op(
    "masked_sample_step",
    entry_points=("masked_sample_step",),
    doc="one MaskGIT step: guidance, sample, confidence, re-mask",
    **_FAMILY,
)
AR_SAMPLE = Op(
    "ar_sample",
    entry_points=("ar_sample",),
    doc="autoregressive temperature / top-k / top-p sampling",
    **_FAMILY,
)


# --------------------------------------------------------------------------------------------
# argument checks (the scalar rules are _validate's check_int / check_real)


def _seed_arg(op: str, seed) -> int:
    return check_int(op, "seed", seed, low=0, high=1 << 64)


def _top_k_arg(op: str, top_k, V: int) -> Optional[int]:
    """``top_k`` checked (>= 1, any size); None when it filters nothing (``top_k >= V``), so the
    custom ops only ever see a k < V."""
    if top_k is None:
        return None
    k = check_int(op, "top_k", top_k, low=1)
    return None if k >= V else k


def _sample_ids_arg(op: str, sample_ids, B: int, device: torch.device) -> Optional[Tensor]:
    if sample_ids is None:
        return None
    check_tensor(op, "sample_ids", sample_ids, shape=(B,), dtypes=INT_DTYPES, device=device)
    check_range(op, "sample_ids", sample_ids, 0, 1 << 63)
    return sample_ids


# --------------------------------------------------------------------------------------------
# public ops


def masked_sample_step(
    cond_logits: Tensor,
    tokens: Tensor,
    is_masked: Tensor,
    *,
    step: int,
    num_steps: int,
    seed: int,
    mask_token_id: int,
    uncond_logits: Optional[Tensor] = None,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    confidence_noise: float = 4.5,
    schedule: str = "cosine",
    schedule_exponent: float = 2.0,
    top_k: Optional[int] = None,
    sample_ids: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> MaskedStepOutput:
    """One MaskGIT step (docs/model.md §4): sample a code at every masked position, score it, and
    re-mask the lowest-confidence positions per the schedule.

    Args:
        cond_logits: ``[B, L, V]`` fp32/bf16/fp16 logits over the V image codes.
        tokens: ``[B, L]`` int32/int64 current tokens (read at non-masked positions).
        is_masked: ``[B, L]`` bool, the positions still masked before this step.
        step, num_steps: ``0 <= step < num_steps < 2^63``; the schedule ratio is
            ``(step+1)/num_steps``. The step is part of the RNG key: every step draws fresh noise.
        seed: int in [0, 2^64), the RNG key together with the step, sample id and position; keep
            one seed for all the steps of a generation.
        mask_token_id: the id written at re-masked positions.
        uncond_logits: ``[B, L, V]`` unconditional logits for classifier-free guidance.
        guidance_scale: s; ``(1 + s)·cond − s·uncond`` when s != 0 (needs ``uncond_logits``).
        temperature: >= 0; 0 is greedy (exact argmax, ties -> lowest code).
        confidence_noise: >= 0, τ₀ of the annealed confidence noise ``τ₀·(1 − (step+1)/T)·Gumbel``.
        schedule: "cosine" (default), "linear", "pow" (uses ``schedule_exponent`` > 0), "sigmoid".
        top_k: >= 1 (any size); keep the codes >= the k-th largest combined logit (ties kept);
            None or >= V: all.
        sample_ids: ``[B]`` int, the RNG sample id of each row (default ``arange(B)``); permuting
            rows together with their ids permutes the results exactly.
        backend: force a backend (see ``unif2ace.kernels.use_backend``).

    Returns:
        :class:`MaskedStepOutput` ``(tokens, is_masked, sampled, confidence)``, all ``[B, L]``.

    Integer arguments may be Python or numpy integers, real ones Python or numpy reals.

    Defined edge cases: NaN logits act as -inf, +inf as FLT_MAX; a position whose combined row has
    no finite value samples code 0 with confidence -inf (the lowest, so it is re-masked first).
    Exactly tied confidences are re-masked lowest position first, on every backend.
    """
    op = "masked_sample_step"
    check_tensor(op, "cond_logits", cond_logits, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, V = cond_logits.shape
    if V < 1:
        raise ValueError(
            f"{op}: argument 'cond_logits' must have a non-empty last (vocabulary) dimension, "
            f"got shape {list(cond_logits.shape)}"
        )
    check_tensor(op, "tokens", tokens, shape=(B, L), dtypes=INT_DTYPES)
    check_tensor(op, "is_masked", is_masked, shape=(B, L), dtypes=(torch.bool,))
    if uncond_logits is not None:
        check_tensor(op, "uncond_logits", uncond_logits, shape=(B, L, V), dtypes=FLOAT_DTYPES)
    device = check_same_device(
        op, cond_logits=cond_logits, tokens=tokens, is_masked=is_masked, uncond_logits=uncond_logits
    )
    num_steps = check_int(op, "num_steps", num_steps, low=1, high=1 << 63)
    step = check_int(op, "step", step, low=0, high=num_steps)
    seed = _seed_arg(op, seed)
    mask_token_id = check_int(op, "mask_token_id", mask_token_id, low=-(1 << 63), high=1 << 63)
    guidance_scale = check_real(op, "guidance_scale", guidance_scale)
    if guidance_scale != 0.0 and uncond_logits is None:
        raise ValueError(
            f"{op}: argument 'guidance_scale' is {guidance_scale} but 'uncond_logits' is None; "
            "pass the unconditional logits or guidance_scale=0"
        )
    temperature = check_real(op, "temperature", temperature, low=0.0)
    confidence_noise = check_real(op, "confidence_noise", confidence_noise, low=0.0)
    check_choice(op, "schedule", schedule, SCHEDULES)
    schedule_exponent = check_real(op, "schedule_exponent", schedule_exponent, low=0.0, low_open=True)
    top_k = _top_k_arg(op, top_k, V)
    sample_ids = _sample_ids_arg(op, sample_ids, B, device)

    be = MASKED_SAMPLE_STEP.select(device, backend)
    if be != "reference":
        out = _ops.masked_sample_step_op(
            cond_logits,
            tokens,
            is_masked,
            uncond_logits,
            sample_ids,
            step,
            num_steps,
            seed & 0xFFFFFFFF,
            seed >> 32,
            mask_token_id,
            guidance_scale,
            temperature,
            confidence_noise,
            schedule,
            schedule_exponent,
            top_k,
            be,
        )
        return MaskedStepOutput(*out)
    out = _ref.masked_sample_step_ref(
        cond_logits,
        tokens,
        is_masked,
        step=step,
        num_steps=num_steps,
        seed=seed,
        mask_token_id=mask_token_id,
        uncond_logits=uncond_logits,
        guidance_scale=guidance_scale,
        temperature=temperature,
        confidence_noise=confidence_noise,
        schedule=schedule,
        schedule_exponent=schedule_exponent,
        top_k=top_k,
        sample_ids=sample_ids,
    )
    return MaskedStepOutput(*out)


def ar_sample(
    logits: Tensor,
    *,
    seed: int,
    position: Union[int, Tensor],
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    sample_ids: Optional[Tensor] = None,
    return_logprobs: bool = True,
    backend: Optional[str] = None,
) -> ARSample:
    """Sample one token per row from ``logits`` ``[B, V]`` (fp32/bf16/fp16) with temperature,
    top-k and top-p (docs/model.md §5).

    Args:
        seed: int in [0, 2^64).
        position: int or ``[B]`` int tensor in [0, 2^32): the decode step, part of the RNG key (use
            a new position for every step, or the same noise is drawn again).
        temperature: >= 0; 0 (or ``top_k == 1``) is greedy argmax, ties -> lowest index.
        top_k: >= 1 (any size); keep the tokens >= the k-th largest logit (ties kept); None or
            >= V: all.
        top_p: in (0, 1]; keep token v iff the probability mass of the tokens strictly more likely
            than v is < top_p (on the tempered, top-k-filtered distribution; tie-symmetric, needs no
            sort); None or 1: all.
        sample_ids: ``[B]`` int RNG sample ids (default ``arange(B)``).
        return_logprobs: False when only the tokens are wanted (decoding text): ``logprobs`` is then
            None and the tokens are the same. The cpu backend then skips its costliest pass, the
            exact temperature-1 sum of every code's exponential, unless the draw itself is that
            sum's (unfiltered at temperature 1); greedy and top-k gain the most.

    Returns:
        :class:`ARSample` ``(tokens [B] int64, logprobs [B] fp32 or None)``; ``logprobs`` is
        ``log_softmax(logits)[token]`` of the unfiltered, temperature-1 distribution. NaN logits act
        as -inf; a row with no finite logit gives token 0 and logprob -inf.
    """
    op = "ar_sample"
    check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    B, V = logits.shape
    if V < 1:
        raise ValueError(
            f"{op}: argument 'logits' must have a non-empty last (vocabulary) dimension, got shape {list(logits.shape)}"
        )
    device = logits.device
    seed = _seed_arg(op, seed)
    if isinstance(position, Tensor):
        check_tensor(op, "position", position, shape=(B,), dtypes=INT_DTYPES, device=device)
        check_range(op, "position", position, 0, 1 << 32)
    else:
        position = check_int(op, "position", position, low=0, high=1 << 32)
    temperature = check_real(op, "temperature", temperature, low=0.0)
    top_k = _top_k_arg(op, top_k, V)
    if top_p is not None:
        top_p = check_real(op, "top_p", top_p, low=0.0, low_open=True, high=1.0)
    sample_ids = _sample_ids_arg(op, sample_ids, B, device)
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"{op}: argument 'return_logprobs' must be a bool, got {type(return_logprobs).__name__}")

    be = AR_SAMPLE.select(device, backend)
    if be != "reference":
        pos_t = position if isinstance(position, Tensor) else None
        pos_i = 0 if isinstance(position, Tensor) else position
        out = _ops.ar_sample_op(
            logits,
            pos_t,
            pos_i,
            sample_ids,
            seed & 0xFFFFFFFF,
            seed >> 32,
            temperature,
            top_k,
            top_p,
            return_logprobs,
            be,
        )
    else:
        out = _ref.ar_sample_ref(
            logits,
            seed=seed,
            position=position,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            sample_ids=sample_ids,
        )
    return ARSample(out[0], out[1] if return_logprobs else None)
