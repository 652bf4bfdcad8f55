"""Training batches: the T2I and MMU sequence layouts (docs/model.md §1) and the D3Diff corruption (§2).

A :class:`Batch` is what ``model(batch)`` takes. Build one from :class:`Sample` records with
:func:`collate` (which masks the image tokens of T2I samples with :func:`mask_image_tokens` and
drops captions for classifier-free guidance), or fill the fields yourself and call
:meth:`Batch.validate`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import TASKS, UniF2aceConfig

__all__ = [
    "IGNORE_INDEX",
    "Sample",
    "Batch",
    "t2i_sequence",
    "mmu_sequence",
    "mask_image_tokens",
    "collate",
    "task_ids",
]

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One training sample before collation.

    task: "t2i" or "mmu". image_codes: ``[L]`` int codes in [0, codebook_size).
    text: caption (t2i) or question (mmu) as text-token ids, without bos/eos.
    answer: the MMU answer's text-token ids (loss is on these and the final eos); None for t2i.
    clip_features ``[clip_tokens, clip_dim]`` / face_embedding ``[face_dim]``: optional precomputed
    encoder outputs for the understanding group's CLIP and Face sequence experts.
    """

    task: str
    image_codes: Union[Tensor, Sequence[int]]
    text: Sequence[int] = ()
    answer: Optional[Sequence[int]] = None
    clip_features: Optional[Tensor] = None
    face_embedding: Optional[Tensor] = None


@dataclass
class Batch:
    """Input of ``model(batch)``; B samples of ``cfg.seq_len`` tokens, L = ``cfg.image_tokens``.

    input_ids:        ``[B, S]`` int64 token ids in [0, vocab); the image span of a T2I sample holds
                      the corrupted tokens (``[MASK]`` at masked positions).
    valid:            ``[B, S]`` bool, False at ``[PAD]`` (pads are never attended).
    task:             ``[B]`` int64, index into ``TASKS``: 0 = t2i (generation group), 1 = mmu
                      (understanding group).
    image_positions:  ``[B, L]`` int64 sequence positions of the image tokens (contiguous span,
                      between <|soi|> and <|eoi|>).
    image_codes:      ``[B, L]`` int64 clean codes x0 in [0, codebook_size).
    is_masked:        ``[B, L]`` bool, masked image positions (only T2I samples; False for MMU).
    mask_rate:        ``[B]`` float32 m in (0, 1] (1 for MMU samples, unused).
    mask_rate_deriv:  ``[B]`` float32 m' = dm/dτ >= 0 (0 for MMU samples).
    labels:           ``[B, S]`` int64: the token id at MMU answer positions (incl. its <eos>),
                      ``IGNORE_INDEX`` elsewhere. Unshifted: the model predicts labels[p] from
                      position p - 1.
    clip_features:    optional ``[B, clip_tokens, clip_dim]`` float. Missing features, one rule:
                      None (the whole batch) or a sample's all-zero rows (what :func:`collate`
                      fills) -> that sample's CLIP expert outputs w0·x only (S(f) = 0 exactly).
    face_embeddings:  optional ``[B, face_dim]`` float (projected to ``cfg.face_tokens`` tokens by
                      the Face expert); missing -> None or all-zero rows, likewise.
    noise_features:   optional ``[B, noise_tokens, noise_dim]`` for the Noise expert; missing ->
                      drawn from ``torch.randn`` (the global generator) at every forward.
    """

    input_ids: Tensor
    valid: Tensor
    task: Tensor
    image_positions: Tensor
    image_codes: Tensor
    is_masked: Tensor
    mask_rate: Tensor
    mask_rate_deriv: Tensor
    labels: Tensor
    clip_features: Optional[Tensor] = None
    face_embeddings: Optional[Tensor] = None
    noise_features: Optional[Tensor] = None

    def to(self, device) -> "Batch":
        return Batch(
            **{
                f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                for f in fields(self)
            }
        )

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def validate(self, cfg: UniF2aceConfig) -> "Batch":
        """Check shapes, dtypes and value ranges; errors name the field. Returns self."""
        S, L = cfg.seq_len, cfg.image_tokens
        if not isinstance(self.input_ids, Tensor) or self.input_ids.dim() != 2:
            raise ValueError(
                f"batch.input_ids: expected a [B, {S}] tensor, got "
                f"{getattr(self.input_ids, 'shape', type(self.input_ids).__name__)}"
            )
        B = self.input_ids.shape[0]
        want = {
            "input_ids": (B, S),
            "valid": (B, S),
            "task": (B,),
            "image_positions": (B, L),
            "image_codes": (B, L),
            "is_masked": (B, L),
            "mask_rate": (B,),
            "mask_rate_deriv": (B,),
            "labels": (B, S),
        }
        ints, floats = (torch.int32, torch.int64), (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        kinds = {
            "input_ids": ints,
            "valid": (torch.bool,),
            "task": ints,
            "image_positions": ints,
            "image_codes": ints,
            "is_masked": (torch.bool,),
            "mask_rate": floats,
            "mask_rate_deriv": floats,
            "labels": ints,
        }
        dev = self.input_ids.device
        for name, shape in want.items():
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"batch.{name}: expected a tensor of shape {list(shape)}, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"batch.{name}: expected shape {list(shape)} (B={B}, S=seq_len={S}, "
                    f"L=image_tokens={L}), got {list(t.shape)}"
                )
            if t.dtype not in kinds[name]:
                raise TypeError(f"batch.{name}: expected dtype in {[str(d) for d in kinds[name]]}, got {t.dtype}")
            if t.device != dev:
                raise ValueError(f"batch.{name}: on {t.device}, but input_ids is on {dev}")
        opt = {
            "clip_features": (B, cfg.clip_tokens, cfg.clip_dim),
            "face_embeddings": (B, cfg.face_dim),
            "noise_features": (B, cfg.noise_tokens, cfg.noise_dim),
        }
        for name, shape in opt.items():
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype not in floats:
                raise ValueError(
                    f"batch.{name}: expected a float tensor of shape {list(shape)}, got "
                    f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}"
                )
            if t.device != dev:
                raise ValueError(f"batch.{name}: on {t.device}, but input_ids is on {dev}")

        def in_range(name, t, lo, hi, allow=None):
            bad = (t < lo) | (t >= hi)
            if allow is not None:
                bad &= t != allow
            if bool(bad.any()):
                v = t[bad][0].item()
                extra = f" or {allow}" if allow is not None else ""
                raise ValueError(f"batch.{name}: values must be in [{lo}, {hi}){extra}, found {v}")

        in_range("input_ids", self.input_ids, 0, cfg.vocab_size)
        if bool(((self.task < 0) | (self.task >= len(TASKS))).any()):
            v = self.task[(self.task < 0) | (self.task >= len(TASKS))][0].item()
            raise ValueError(f"batch.task: unknown task id {v}; expected 0..{len(TASKS) - 1} for {list(TASKS)}")
        in_range("image_positions", self.image_positions, 0, S)
        in_range("image_codes", self.image_codes, 0, cfg.codebook_size)
        in_range("labels", self.labels, 0, cfg.vocab_size, allow=IGNORE_INDEX)
        if L > 1 and bool((self.image_positions.diff(dim=1) != 1).any()):
            raise ValueError("batch.image_positions: each row must be a contiguous increasing span")
        if bool(((self.mask_rate <= 0) | (self.mask_rate > 1) | ~torch.isfinite(self.mask_rate)).any()):
            raise ValueError("batch.mask_rate: values must be in (0, 1]")
        if bool(((self.mask_rate_deriv < 0) | ~torch.isfinite(self.mask_rate_deriv)).any()):
            raise ValueError("batch.mask_rate_deriv: values must be finite and >= 0")
        if bool((self.is_masked & (self.task != 0)[:, None]).any()):
            raise ValueError("batch.is_masked: only T2I samples (task 0) may have masked image tokens")
        if not bool(self.valid.gather(1, self.image_positions.long()).all()):
            raise ValueError("batch.valid: image positions must be valid (not [PAD]) in every sample")
        return self


def task_ids(tasks: Sequence[str], device=None) -> Tensor:
    """``["t2i", "mmu", ...]`` -> ``[B]`` int64 task ids; unknown names raise naming the field."""
    out = []
    for i, t in enumerate(tasks):
        if t not in TASKS:
            raise ValueError(f"batch.task: unknown task {t!r} for sample {i}; expected one of {list(TASKS)}")
        out.append(TASKS.index(t))
    return torch.tensor(out, dtype=torch.int64, device=device)


def _ids(x, what: str, lo: int, hi: int) -> List[int]:
    vals = x.tolist() if isinstance(x, Tensor) else list(x)
    for v in vals:
        if not isinstance(v, int) or not lo <= v < hi:
            raise ValueError(f"{what}: token ids must be ints in [{lo}, {hi}), found {v!r}")
    return vals


def t2i_sequence(
    cfg: UniF2aceConfig, caption: Sequence[int], image_tokens: Sequence[int]
) -> Tuple[List[int], List[bool]]:
    """``[PAD]... <|t2i|> <bos> caption <eos> <|soi|> image <|eoi|>`` (Show-o's T2I layout: the pads
    come first, so the text part always ends right before <|soi|>).

    ``image_tokens`` are vocabulary ids (codes already offset, or ``[MASK]``). A caption longer
    than ``text_len - 3`` tokens is truncated to its first ``text_len - 3`` tokens (the closing
    <eos> kept, as Show-o does) with a warning. Returns (ids, valid).
    """
    caption = _ids(caption, "t2i_sequence: caption", 0, cfg.text_vocab_size)
    room = cfg.text_len - 3
    if len(caption) > room:
        warnings.warn(
            f"t2i_sequence: caption has {len(caption)} tokens, only text_len - 3 = {room} fit; truncated",
            stacklevel=2,
        )
        caption = caption[:room]
    if len(image_tokens) != cfg.image_tokens:
        raise ValueError(f"t2i_sequence: expected {cfg.image_tokens} image tokens, got {len(image_tokens)}")
    pad = room - len(caption)
    ids = (
        [cfg.pad_token_id] * pad
        + [cfg.special_token_id("<|t2i|>"), cfg.bos_token_id]
        + caption
        + [cfg.eos_token_id, cfg.special_token_id("<|soi|>")]
        + list(image_tokens)
        + [cfg.special_token_id("<|eoi|>")]
    )
    valid = [False] * pad + [True] * (len(ids) - pad)
    return ids, valid


def mmu_sequence(
    cfg: UniF2aceConfig, image_tokens: Sequence[int], question: Sequence[int], answer: Optional[Sequence[int]] = None
) -> Tuple[List[int], List[bool], List[int]]:
    """``<|mmu|> <|soi|> image <|eoi|> <bos> question answer <eos> [PAD]...``.

    Returns (ids, valid, labels); labels hold the answer ids and the closing <eos> (nothing else).
    With ``answer=None`` (a prompt for decoding) no <eos> is written and the rest is padding.
    """
    question = _ids(question, "mmu_sequence: question", 0, cfg.text_vocab_size)
    ans = None if answer is None else _ids(answer, "mmu_sequence: answer", 0, cfg.text_vocab_size)
    if len(image_tokens) != cfg.image_tokens:
        raise ValueError(f"mmu_sequence: expected {cfg.image_tokens} image tokens, got {len(image_tokens)}")
    head = (
        [cfg.special_token_id("<|mmu|>"), cfg.special_token_id("<|soi|>")]
        + list(image_tokens)
        + [cfg.special_token_id("<|eoi|>"), cfg.bos_token_id]
        + question
    )
    tail = [] if ans is None else ans + [cfg.eos_token_id]
    if len(head) + len(tail) > cfg.seq_len:
        raise ValueError(
            f"mmu_sequence: question ({len(question)}) + answer ({len(ans or [])}) + <eos> take "
            f"{len(question) + len(tail)} tokens, at most text_len - 2 = {cfg.text_len - 2} fit"
        )
    ids = head + tail
    labels = [IGNORE_INDEX] * len(head) + tail
    pad = cfg.seq_len - len(ids)
    return ids + [cfg.pad_token_id] * pad, [True] * len(ids) + [False] * pad, labels + [IGNORE_INDEX] * pad


def mask_image_tokens(
    cfg: UniF2aceConfig, codes: Tensor, *, schedule: Optional[str] = None, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-time corruption of clean codes ``[B, L]`` (docs/model.md §2).

    cosine (Show-o): u ~ U(0, 1), m = cos(πu/2), clamped to >= 1/L when ``cfg.clamp_mask_rate``;
    exactly n = max(1, round(L·m)) positions masked, chosen uniformly. τ = 1 − u, so
    m' = dm/dτ = (π/2)·sin(πu/2).
    loglinear (SEDD): t ~ U(ε, 1), m = (1 − ε)t, each position masked i.i.d. with probability m;
    m' = 1 − ε.

    Returns ``(tokens, is_masked, m, m')``: tokens ``[B, L]`` int64 vocabulary ids (code + offset,
    ``[MASK]`` where masked), is_masked ``[B, L]`` bool, m and m' ``[B]`` float32.
    """
    schedule = schedule or cfg.train_schedule
    B, L = codes.shape
    dev = codes.device
    u = torch.rand(B, generator=generator, dtype=torch.float64).to(dev)
    scores = torch.rand(B, L, generator=generator).to(dev)
    if schedule == "cosine":
        m = torch.cos(math.pi / 2 * u)
        if cfg.clamp_mask_rate:
            m = m.clamp(min=1.0 / L)
        dm = (math.pi / 2) * torch.sin(math.pi / 2 * u)
        n = torch.round(L * m).clamp(min=1).long()  # exactly n masked: the n lowest random scores
        rank = scores.argsort(dim=1).argsort(dim=1)
        is_masked = rank < n[:, None]
    elif schedule == "loglinear":
        eps = cfg.loglinear_eps
        t = eps + (1 - eps) * u
        m = (1 - eps) * t
        dm = torch.full_like(m, 1 - eps)
        is_masked = scores < m[:, None].float()
    else:
        raise ValueError(f"mask_image_tokens: argument 'schedule' must be 'cosine' or 'loglinear', got {schedule!r}")
    tokens = torch.where(is_masked, cfg.mask_token_id, codes.long() + cfg.image_token_offset)
    return tokens, is_masked, m.float(), dm.float()


def collate(
    cfg: UniF2aceConfig,
    samples: Sequence[Sample],
    *,
    generator: Optional[torch.Generator] = None,
    drop_caption_prob: Optional[float] = None,
    device=None,
) -> Batch:
    """Samples -> :class:`Batch`: T2I image tokens masked by :func:`mask_image_tokens`, captions
    dropped (empty prompt) with probability ``drop_caption_prob`` (default ``cfg.cond_dropout_prob``),
    MMU answers labelled. Features are stacked when some sample has them; samples without them get
    zeros, which the feature experts treat exactly as missing (see :class:`Batch`).
    """
    if not samples:
        raise ValueError("collate: 'samples' is empty")
    p_drop = cfg.cond_dropout_prob if drop_caption_prob is None else drop_caption_prob
    B, L = len(samples), cfg.image_tokens
    task = task_ids([s.task for s in samples])
    codes = torch.stack(
        [
            torch.as_tensor(s.image_codes, dtype=torch.int64).reshape(-1)
            if len(s.image_codes) == L
            else _bad_len(i, s, L)
            for i, s in enumerate(samples)
        ]
    )
    if bool(((codes < 0) | (codes >= cfg.codebook_size)).any()):
        raise ValueError(f"batch.image_codes: codes must be in [0, {cfg.codebook_size})")
    tokens, is_masked, m, dm = mask_image_tokens(cfg, codes, generator=generator)
    is_t2i = task == 0
    is_masked &= is_t2i[:, None]
    m = torch.where(is_t2i, m, torch.ones_like(m))
    dm = torch.where(is_t2i, dm, torch.zeros_like(dm))
    drop = torch.rand(B, generator=generator) < p_drop
    ids, valid, labels, pos = [], [], [], []
    for i, s in enumerate(samples):
        if s.task == "t2i":
            if s.answer is not None:
                raise ValueError(f"batch.labels: sample {i} is t2i but has an answer (only mmu samples are labelled)")
            caption = [] if bool(drop[i]) else s.text
            x, v = t2i_sequence(cfg, caption, tokens[i].tolist())
            y = [IGNORE_INDEX] * cfg.seq_len
            start = cfg.text_len + 1
        else:
            if s.answer is None:
                raise ValueError(f"batch.labels: mmu sample {i} has no answer")
            x, v, y = mmu_sequence(cfg, (codes[i] + cfg.image_token_offset).tolist(), s.text, s.answer)
            start = 2
        ids.append(x), valid.append(v), labels.append(y), pos.append(list(range(start, start + L)))

    def stack_opt(attr, shape):
        have = [getattr(s, attr) for s in samples]
        if all(h is None for h in have):
            return None
        out = torch.zeros((B, *shape))
        for i, h in enumerate(have):
            if h is not None:
                if tuple(h.shape) != shape:
                    raise ValueError(f"batch.{attr}: sample {i} has shape {list(h.shape)}, expected {list(shape)}")
                out[i] = h
        return out

    batch = Batch(
        input_ids=torch.tensor(ids),
        valid=torch.tensor(valid),
        task=task,
        image_positions=torch.tensor(pos),
        image_codes=codes,
        is_masked=is_masked,
        mask_rate=m,
        mask_rate_deriv=dm,
        labels=torch.tensor(labels),
        clip_features=stack_opt("clip_features", (cfg.clip_tokens, cfg.clip_dim)),
        face_embeddings=stack_opt("face_embedding", (cfg.face_dim,)),
    )
    return batch.to(device) if device is not None else batch


def _bad_len(i, s, L):
    raise ValueError(f"batch.image_codes: sample {i} has {len(s.image_codes)} image codes, expected {L}")
