"""Benchmark cases for masked token sampling: "masked_sample_step" (one MaskGIT step with
classifier-free guidance) and "ar_sample" (one autoregressive decode step).

Shapes (docs/kernels.md §C):
  (c) CPU-sized: B = 4, L = 256, V = 8192 (quick: B = 2, L = 64, V = 1024); AR: B = 64, V = 32000
      (quick: B = 16).
  (a) CUDA only: B = 16, L = 256, V = 8192 (Show-o / MAGVIT-v2 codebook).
  (b) CUDA only: B = 64, L = 256, V = 126464 (LLaDA-sized vocabulary; target S2).

Every step is the first of T = 18 (all positions masked: every position is sampled), guidance 1.75,
temperature 1, confidence noise 4.5. Logits are fp32 on CPU and bf16 on CUDA. ``bytes`` counts the
logits read (cond + uncond for the masked step).

Baselines ("showo-sampler"): Show-o's ``t2i_generate`` step (models/modeling_showo.py with
models/sampling.py) -- guidance combine, full softmax, ``torch.multinomial``, confidence by gather,
fp32 Gumbel noise, full-row sort and gather of the cut-off; and Show-o's ``mmu_generate`` decode
step (temperature, top-k filter, softmax, ``torch.multinomial``). Written here from that
description; they use torch's global generator and so are not reproducible per sample.

Peers (benchmarks/peers.py): "torch-native", the sampler serving stacks fall back to (temperature,
top-k / top-p by a full sort, exponential-race draw), and FlashInfer's sampling kernels (CUDA);
for the MaskGIT step the same draw inside the step. Limit: the copy bandwidth for reading the
logits (``bytes``).
"""

from __future__ import annotations

import math
from typing import List

import torch

from benchmarks import peers
from benchmarks.common import Case, copy_limit
from unif2ace.kernels import ar_sample, masked_sample_step

T_STEPS = 18
GUIDANCE = 1.75
CONF_NOISE = 4.5
SEED = 20240607


# --------------------------------------------------------------------------------------------
# baselines


def showo_step(cond, uncond, tokens, is_masked, *, step, num_steps, guidance_scale, confidence_noise, mask_token_id):
    """One Show-o t2i step (cosine schedule, multinomial sampling, sort-based re-masking)."""
    B, L, V = cond.shape
    logits = (1 + guidance_scale) * cond.float() - guidance_scale * uncond.float()
    probs = logits.softmax(dim=-1)
    sampled = torch.multinomial(probs.reshape(-1, V), 1)[:, 0].view(B, L)
    sampled = torch.where(is_masked, sampled, tokens)
    ratio = (step + 1) / num_steps
    mask_ratio = math.cos(math.pi * 0.5 * ratio)
    selected = probs.gather(-1, sampled.clamp(max=V - 1)[..., None])[..., 0]
    selected = torch.where(is_masked, selected, torch.finfo(selected.dtype).max)
    mask_len = torch.full((B, 1), math.floor(L * mask_ratio), device=cond.device)
    mask_len = torch.clamp(torch.minimum(is_masked.sum(-1, keepdim=True) - 1, mask_len), min=1)
    temp = confidence_noise * (1.0 - ratio)
    u = torch.zeros_like(selected).uniform_(0, 1)
    gumbel = -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))
    confidence = torch.log(selected.clamp(min=1e-20)) + temp * gumbel
    cut_off = torch.sort(confidence, dim=-1).values.gather(1, mask_len.long())
    masking = confidence < cut_off
    return torch.where(masking, mask_token_id, sampled), masking


def showo_ar(logits, *, temperature, top_k):
    """One Show-o mmu decode step: temperature, top-k filter, softmax, multinomial."""
    x = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return torch.multinomial(x.softmax(dim=-1), 1)[:, 0]


# --------------------------------------------------------------------------------------------
# cases


def _step_case(tag: str, device, B: int, L: int, V: int, dtype) -> Case:
    def setup():
        cond = torch.randn(B, L, V, device=device, dtype=torch.float32).mul_(3).to(dtype)
        uncond = torch.randn(B, L, V, device=device, dtype=torch.float32).mul_(3).to(dtype)
        tokens = torch.full((B, L), V, dtype=torch.long, device=device)
        is_masked = torch.ones(B, L, dtype=torch.bool, device=device)
        return {"cond": cond, "uncond": uncond, "tokens": tokens, "is_masked": is_masked}

    step = dict(step=0, num_steps=T_STEPS, guidance_scale=GUIDANCE, confidence_noise=CONF_NOISE, mask_token_id=V)

    def ours(be):
        return lambda inp: masked_sample_step(
            inp["cond"], inp["tokens"], inp["is_masked"], seed=SEED, uncond_logits=inp["uncond"], backend=be, **step
        )

    def showo(inp):
        return showo_step(inp["cond"], inp["uncond"], inp["tokens"], inp["is_masked"], **step)

    impls = {be: ours(be) for be in ("reference", "cpu", "triton", "cuda")}
    impls["showo-sampler"] = showo
    esize = torch.finfo(dtype).bits // 8
    return Case(
        family="sampling",
        op="masked_sample_step",
        name=f"{tag} B={B} L={L} V={V} cfg",
        shape={"B": B, "L": L, "V": V, "guidance": GUIDANCE, "step": 0, "num_steps": T_STEPS},
        dtype=dtype,
        setup=setup,
        impls=impls,
        bytes=float(2 * B * L * V * esize),
        compile=False,  # the reference loops over row chunks; not a compile target
        peers=peers.masked_step_peers(
            step=0, num_steps=T_STEPS, guidance_scale=GUIDANCE, confidence_noise=CONF_NOISE, mask_token_id=V
        ),
        limit=copy_limit(2 * B * L * V * esize, note="the cond + uncond logits read once"),
    )


def _ar_case(
    tag: str, device, B: int, V: int, dtype, *, temperature=1.0, top_k=None, top_p=None, logprobs=True
) -> Case:
    """``logprobs=False``: tokens only (``return_logprobs=False``, how the model decodes text) --
    what the peers compute too."""

    def setup():
        return {"logits": torch.randn(B, V, device=device, dtype=torch.float32).mul_(3).to(dtype)}

    def ours(be):
        return lambda inp: ar_sample(
            inp["logits"],
            seed=SEED,
            position=7,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            return_logprobs=logprobs,
            backend=be,
        )

    impls = {be: ours(be) for be in ("reference", "cpu", "triton", "cuda")}
    if top_p is None:
        impls["showo-sampler"] = lambda inp: showo_ar(inp["logits"], temperature=temperature, top_k=top_k)
    filt = "".join([f" top_k={top_k}" if top_k else "", f" top_p={top_p}" if top_p else ""])
    filt += "" if logprobs else " tokens only"
    esize = torch.finfo(dtype).bits // 8
    return Case(
        family="sampling",
        op="ar_sample",
        name=f"{tag} B={B} V={V} T={temperature}{filt}",
        shape={"B": B, "V": V, "temperature": temperature, "top_k": top_k, "top_p": top_p, "logprobs": logprobs},
        dtype=dtype,
        setup=setup,
        impls=impls,
        bytes=float(B * V * esize),
        compile=False,
        peers=peers.ar_sample_peers(temperature, top_k, top_p),
        limit=copy_limit(B * V * esize, note="the logits read once"),
    )


def cases(device: torch.device, quick: bool) -> List[Case]:
    out: List[Case] = []
    if device.type == "cuda":
        dt = torch.bfloat16
        out.append(_step_case("(a)", device, 16, 256, 8192, dt))
        if not quick:
            out.append(_step_case("(b)", device, 64, 256, 126464, dt))
            out.append(_ar_case("(c)", device, 64, 32000, dt, top_p=0.9))
        for B in (64,) if quick else (64, 256):
            out.append(_ar_case("(c)", device, B, 32000, dt, top_k=50))
            out.append(_ar_case("(c)", device, B, 32000, dt, temperature=0.8, top_k=50, top_p=0.9))
        return out
    dt = torch.float32
    if quick:
        out.append(_step_case("(c)", device, 2, 64, 1024, dt))
        out.append(_ar_case("(c)", device, 16, 32000, dt, top_k=50))
        out.append(_ar_case("(c)", device, 16, 32000, dt, temperature=0.8, top_k=50, top_p=0.9))
    else:
        out.append(_step_case("(c)", device, 4, 256, 8192, dt))
        out.append(_ar_case("(c)", device, 64, 32000, dt, top_k=50))
        out.append(_ar_case("(c)", device, 64, 32000, dt, temperature=0.8, top_k=50, top_p=0.9))
        out.append(_ar_case("(c)", device, 64, 32000, dt, top_p=0.9))  # a nucleus of most of the row
        out.append(_ar_case("(c)", device, 64, 32000, dt, top_k=50, logprobs=False))
        out.append(_ar_case("(c)", device, 64, 32000, dt, temperature=0.8, top_k=50, top_p=0.9, logprobs=False))
    return out
