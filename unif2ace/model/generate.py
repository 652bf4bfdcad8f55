"""Generation (docs/model.md §4) and understanding (§5).

:func:`generate_images`: MaskGIT decoding of the image span of T2I sequences, one forward pass
per step over the conditional and (with guidance) the empty-caption rows together, then the fused
:func:`unif2ace.kernels.masked_sample_step` (guidance combine, sampling, confidence, re-masking).
The Noise sequence expert gets Gaussian features drawn once from ``seed`` (shared by all steps
and by the cond/uncond rows), so a seed fixes the whole run.

:func:`answer`: autoregressive decoding of an MMU answer with :func:`unif2ace.kernels.ar_sample`
over the text vocabulary, with or without a KV cache. The sequence-MoE route of every layer is
computed from the prompt and frozen for the decoded tokens (in both modes), so cached and
uncached decoding compute the same thing. Decoding stops at <eos> or ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from unif2ace.kernels import ar_sample, masked_sample_step

from .batch import mmu_sequence, t2i_sequence
from .modules import KVCache, bidirectional_span, image_span_mask

__all__ = ["GenerationSettings", "generate_images", "answer"]


def _noise(cfg, B: int, seed: int, device) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.noise_tokens, cfg.noise_dim, generator=g).to(device)


@dataclass(frozen=True)
class GenerationSettings:
    """The sampling settings of :func:`generate_images`, its keyword arguments besides ``seed``.

    steps / guidance / temperature / confidence_noise / confidence_schedule / schedule left None
    take the config's generation fields (T = 18, s = 1.75, 1.0, τ0 = 1.0, "showo", cosine);
    top_k None keeps every code. Guidance uses the empty caption as the unconditional branch;
    temperature 0 is greedy.

    Confidence noise at step t (ratio r_t = (t+1)/T): "showo" τ_t = τ0·Π_{s<=t}(1 − r_s) (Show-o's
    ``t2i_generate`` shrinks its noise temperature by (1 − r) at every step, cumulatively);
    "maskgit" τ_t = τ0·(1 − r_t) (MaskGIT, whose τ0 is 4.5). The kernel anneals τ·(1 − r_t)
    itself, so "showo" passes τ0·Π_{s<t}(1 − r_s).
    """

    steps: Optional[int] = None
    guidance: Optional[float] = None
    temperature: Optional[float] = None
    confidence_noise: Optional[float] = None
    confidence_schedule: Optional[str] = None
    schedule: Optional[str] = None
    top_k: Optional[int] = None

    def resolve(self, cfg) -> "GenerationSettings":
        """These settings with the config's generation fields in place of the ones left None."""
        out = replace(
            self,
            steps=cfg.gen_steps if self.steps is None else self.steps,
            guidance=cfg.guidance_scale if self.guidance is None else self.guidance,
            temperature=cfg.temperature if self.temperature is None else self.temperature,
            confidence_noise=cfg.confidence_noise if self.confidence_noise is None else self.confidence_noise,
            confidence_schedule=self.confidence_schedule or cfg.confidence_schedule,
            schedule=self.schedule or cfg.gen_schedule,
        )
        if out.confidence_schedule not in ("showo", "maskgit"):
            raise ValueError(
                "generate_images: argument 'confidence_schedule' must be 'showo' or 'maskgit', "
                f"got {out.confidence_schedule!r}"
            )
        return out


@torch.no_grad()
def generate_images(model, captions: Sequence[Sequence[int]], *, seed: int = 0, **settings) -> Tensor:
    """Image codes ``[B, L]`` int64 in [0, codebook_size) for ``B`` captions (text-token id lists).

    ``settings``: the fields of :class:`GenerationSettings` (steps, guidance, temperature,
    confidence_noise, confidence_schedule, schedule, top_k), each defaulting to the config's.
    Deterministic for a given seed (the sampling RNG is keyed by seed, step, row and position:
    every step draws fresh noise).
    """
    cfg = model.cfg
    gen = GenerationSettings(**settings).resolve(cfg)
    dev = model.embed.weight.device
    B, L = len(captions), cfg.image_tokens
    if B == 0:
        raise ValueError("generate_images: argument 'captions' is empty")
    masks = [cfg.mask_token_id] * L
    rows = [t2i_sequence(cfg, c, masks) for c in captions]
    if gen.guidance != 0:
        rows += [t2i_sequence(cfg, [], masks)] * B
    ids = torch.tensor([r[0] for r in rows], device=dev)
    valid = torch.tensor([r[1] for r in rows], device=dev)
    R = ids.shape[0]
    task = torch.zeros(R, dtype=torch.int64, device=dev)
    img_pos = torch.arange(cfg.text_len + 1, cfg.text_len + 1 + L, device=dev)
    span = image_span_mask(img_pos.expand(R, L), cfg.seq_len)
    noise = _noise(cfg, B, seed, dev)
    features = {"noise": noise.repeat(R // B, 1, 1)}
    w, b = model.code_head()
    tokens = torch.zeros(B, L, dtype=torch.int64, device=dev)
    is_masked = torch.ones(B, L, dtype=torch.bool, device=dev)
    tau = float(gen.confidence_noise)  # what the kernel multiplies by (1 - (step+1)/steps)
    with model.backend_scope():
        for step in range(gen.steps):
            img = torch.where(is_masked, cfg.mask_token_id, tokens + cfg.image_token_offset)
            ids[:, img_pos] = img.repeat(R // B, 1)
            h, _, _ = model.hidden(ids, valid, task, span=span, features=features, image_positions=img_pos.expand(R, L))
            logits = torch.addmm(b, h[:, img_pos].reshape(R * L, -1), w.t()).view(R, L, -1)
            out = masked_sample_step(
                logits[:B],
                tokens,
                is_masked,
                step=step,
                num_steps=gen.steps,
                seed=seed,
                mask_token_id=cfg.mask_token_id,
                uncond_logits=logits[B:] if gen.guidance != 0 else None,
                guidance_scale=gen.guidance,
                temperature=gen.temperature,
                confidence_noise=tau,
                schedule=gen.schedule,
                top_k=gen.top_k,
            )
            tokens, is_masked = out.tokens, out.is_masked
            if gen.confidence_schedule == "showo":
                tau *= 1.0 - (step + 1) / gen.steps
    return tokens


@torch.no_grad()
def answer(
    model,
    image_codes,
    questions: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 0,
    use_cache: bool = True,
    clip_features: Optional[Tensor] = None,
    face_embeddings: Optional[Tensor] = None,
) -> List[List[int]]:
    """Decode an answer for each (image, question): text-token ids, without the final <eos>.

    image_codes ``[B, L]`` int codes; questions: B lists of text-token ids; clip_features
    ``[B, Nc, Dc]`` / face_embeddings ``[B, Df]`` feed the CLIP / Face sequence experts.
    Sampling over the text vocabulary with temperature (default ``cfg.temperature``; 0 = greedy),
    top-k and top-p, keyed by (seed, row, step).
    """
    cfg = model.cfg
    dev = model.embed.weight.device
    image_codes = torch.as_tensor(image_codes, device=dev)
    B = len(questions)
    if image_codes.dim() != 2 or tuple(image_codes.shape) != (B, cfg.image_tokens):
        raise ValueError(
            f"answer: argument 'image_codes' must have shape [{B}, {cfg.image_tokens}], got {list(image_codes.shape)}"
        )
    if bool(((image_codes < 0) | (image_codes >= cfg.codebook_size)).any()):
        raise ValueError(f"answer: argument 'image_codes' must hold codes in [0, {cfg.codebook_size})")
    if max_new_tokens < 1:
        raise ValueError(f"answer: argument 'max_new_tokens' must be >= 1, got {max_new_tokens}")
    temperature = cfg.temperature if temperature is None else temperature
    rows = [mmu_sequence(cfg, (c + cfg.image_token_offset).tolist(), q) for c, q in zip(image_codes, questions)]
    prompt_len = torch.tensor([sum(r[1]) for r in rows], device=dev)
    P = int(prompt_len.max())
    cap = P + max_new_tokens
    ids = torch.full((B, cap), cfg.pad_token_id, dtype=torch.int64, device=dev)
    valid = torch.zeros(B, cap, dtype=torch.bool, device=dev)
    ids[:, :P] = torch.tensor([r[0][:P] for r in rows], device=dev)
    valid[:, :P] = torch.tensor([r[1][:P] for r in rows], device=dev)
    task = torch.ones(B, dtype=torch.int64, device=dev)
    img_pos = torch.arange(2, 2 + cfg.image_tokens, device=dev).expand(B, -1)
    span = bidirectional_span(img_pos, task, cap)
    route_mask = model.route_mask(valid, task, span).clone()  # the prompt only: frozen for the decoded tokens
    features = {"clip": clip_features, "face": face_embeddings}
    b = torch.arange(B, device=dev)
    pos = prompt_len.clone()  # where the next token goes
    out = torch.full((B, max_new_tokens), -1, dtype=torch.int64, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    V = cfg.text_vocab_size

    def prefix_hidden(n: int, **kw) -> Tensor:
        """The hidden states of the first n positions (kw: the cache to fill)."""
        return model.hidden(
            ids[:, :n],
            valid[:, :n],
            task,
            span=span[:, :n],
            route_mask=route_mask[:, :n],
            features=features,
            image_positions=img_pos,
            **kw,
        )[0]

    with model.backend_scope():
        if use_cache:
            cache = KVCache(cfg, B, cap, dev, model.embed.weight.dtype)
            last = prefix_hidden(P, cache=cache)[b, pos - 1]
        for i in range(max_new_tokens):
            if not use_cache:
                last = prefix_hidden(int(pos.max()))[b, pos - 1]
            logits = torch.addmm(model.lm_head.bias[:V], last, model.lm_head.weight[:V].t())
            tok = ar_sample(
                logits,
                seed=seed,
                position=i,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                return_logprobs=False,
            ).tokens
            out[:, i] = torch.where(done, -1, tok)
            done |= tok == cfg.eos_token_id
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            ids[b, pos] = tok
            valid[b, pos] = True
            if use_cache:
                h, _, _ = model.hidden(
                    tok[:, None],
                    torch.ones(B, 1, dtype=torch.bool, device=dev),
                    task,
                    positions=pos[:, None],
                    features=features,
                    cache=cache,
                )
                last = h[:, 0]
            pos = pos + 1
    result = []
    for row in out.tolist():
        toks = [t for t in row if t >= 0]
        result.append(toks[:-1] if toks and toks[-1] == cfg.eos_token_id else toks)
    return result
