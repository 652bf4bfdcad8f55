"""The custom ops of the sampling family: every non-reference backend of ``masked_sample_step`` and
``ar_sample`` runs behind one opaque op per public function, so the public functions work under
``torch.compile(fullgraph=True)``. No autograd (integer / confidence outputs). The 64-bit seed
travels as two 32-bit halves (op ints are int64). The kernels are reached through the registry:
``OPS[name].kernels(backend).<entry point>``; the masked step's host scalars are resolved here,
once, into a :class:`~unif2ace.kernels.reference.sampling.StepParams`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._dispatch import OPS
from ..reference.sampling import StepParams, step_scalars

__all__ = ["masked_sample_step_op", "ar_sample_op"]


@torch.library.custom_op("unif2ace::masked_sample_step", mutates_args=())
def masked_sample_step_op(
    cond_logits: Tensor,
    tokens: Tensor,
    is_masked: Tensor,
    uncond_logits: Optional[Tensor],
    sample_ids: Optional[Tensor],
    step: int,
    num_steps: int,
    seed_lo: int,
    seed_hi: int,
    mask_token_id: int,
    guidance_scale: float,
    temperature: float,
    confidence_noise: float,
    schedule: str,
    schedule_exponent: float,
    top_k: Optional[int],
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(tokens int64, is_masked bool, sampled int64, confidence fp32), all [B, L]."""
    scalars = step_scalars(tokens.shape[1], step, num_steps, confidence_noise, schedule, schedule_exponent)
    p = StepParams((seed_hi << 32) | seed_lo, step, mask_token_id, guidance_scale, temperature, top_k, *scalars)
    kernels = OPS["masked_sample_step"].kernels(backend)
    return tuple(kernels.masked_sample_step(cond_logits, tokens, is_masked, uncond_logits, sample_ids, p))


@masked_sample_step_op.register_fake
def _(cond_logits, tokens, is_masked, *args):
    B, L = tokens.shape
    new = cond_logits.new_empty
    return (
        new((B, L), dtype=torch.int64),
        new((B, L), dtype=torch.bool),
        new((B, L), dtype=torch.int64),
        new((B, L), dtype=torch.float32),
    )


@torch.library.custom_op("unif2ace::ar_sample", mutates_args=())
def ar_sample_op(
    logits: Tensor,
    position_t: Optional[Tensor],
    position: int,
    sample_ids: Optional[Tensor],
    seed_lo: int,
    seed_hi: int,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    logprobs: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """(tokens [B] int64, logprobs [B] fp32); ``position_t`` (a [B] tensor) wins over ``position``;
    ``logprobs=False`` lets a backend skip them (its logprobs output is then unspecified)."""
    kernels = OPS["ar_sample"].kernels(backend)
    out = kernels.ar_sample(
        logits,
        seed=(seed_hi << 32) | seed_lo,
        position=position if position_t is None else position_t,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        sample_ids=sample_ids,
        logprobs=logprobs,
    )
    return tuple(out)


@ar_sample_op.register_fake
def _(logits, *args):
    B = logits.shape[0]
    return logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32)
