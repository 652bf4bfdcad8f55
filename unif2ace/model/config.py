"""Model configuration: one dataclass, every [choice] of docs/model.md a field, four presets.

Vocabulary layout (docs/model.md §1), ids in this order (Show-o's: its tokenizer adds ``[PAD]``
first, then the nine task/boundary tokens, so ``[PAD]`` = 50295, ``<|soi|>`` = 50296, ...,
``<|t2i|>`` = 50300, ``<|mmu|>`` = 50301 in the paper preset)::

    [0, text_vocab_size)                      text tokens (bos/eos among them)
    text_vocab_size + i, i < 10               special tokens, SPECIAL_TOKENS[i]
    image_token_offset + c, c < codebook_size image code c
    vocab_size - 1                            [MASK]

so ``vocab_size = text_vocab_size + 10 + codebook_size + 1`` (58,498 for the paper preset).

Sequence layout (Show-o's ``UniversalPrompting``; both tasks have the same length
``seq_len = text_len + image_tokens + 2``, 129 + 256 + 2 = 387 in the paper preset, Show-o's
``max_seq_length = 128`` plus its task token)::

    T2I: [PAD]... <|t2i|> <bos> caption <eos> <|soi|> image... <|eoi|>   (text_len tokens before <|soi|>)
    MMU: <|mmu|> <|soi|> image... <|eoi|> <bos> question answer <eos> [PAD]...

Parameters (:meth:`UniF2aceConfig.parameter_counts`, nothing allocated) of the ``paper`` preset,
which the paper reports as about 1.8B::

    embedding + LM head              239.7M   58,498 x 2048 twice, + head bias
    attention                        402.8M   24 x (q, k, v, dense: 2048 x 2048 + bias)
    routed experts                   806.3M   24 layers x 2 groups x 8 experts, 2048 -> 512 -> 2048
    shared experts                   201.5M   24 x 2 groups, 2048 -> 1024 -> 2048
    feature experts (resamplers)     174.3M   24 x (Noise, CLIP, Face): depth 2, width 256, FFN x4
    token routers                      0.8M   24 x 2 x 8 x 2048
    sequence routers + gains           0.4M
    layer norms                        0.3M
    total                          1,826.1M

The ``showo`` preset (the same model in the form a Phi-1.5 / Show-o checkpoint imports into
exactly: parallel block, shared experts 8192 wide = the dense MLP) has 1,611.1M in shared experts,
3,235.6M in total.

Attention (Show-o's masks): text rows causal; in T2I the <|soi|>...<|eoi|> rows see every non-pad
position; in MMU every row sees the whole prefix <|mmu|> <|soi|> image <|eoi|> (so the <|mmu|> row
sees the image, as in Show-o). Pads are never attended.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, Tuple

__all__ = ["SPECIAL_TOKENS", "TASKS", "MODEL_FORMAT", "UniF2aceConfig", "preset", "PRESETS"]

SPECIAL_TOKENS = (
    "[PAD]",
    "<|soi|>",
    "<|eoi|>",
    "<|sov|>",
    "<|eov|>",
    "<|t2i|>",
    "<|mmu|>",
    "<|t2v|>",
    "<|v2v|>",
    "<|lvg|>",
)
"""Special tokens in id order: Show-o's order (``[PAD]`` first), so the ids equal Show-o's."""
MODEL_FORMAT = 2
"""Version of the model's parameters and token layout, stored with every config (checkpoints).
2: Show-o's special-token ids and T2I layout, seq_gain, LN3 in both layouts, deep resamplers."""

TASKS = ("t2i", "mmu")
"""Task of a sample; its index is also the MoE group: 0 = generation (t2i), 1 = understanding (mmu)."""

SEQ_EXPERT_KINDS = ("copy", "zero", "noise", "clip", "face")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"UniF2aceConfig: field '{name}' must be one of {list(allowed)}, got {value!r}")


def require_int_field(obj: object, owner: str, name: str, lo: int, note: str = "") -> None:
    """Raises ValueError unless field ``name`` of config ``obj`` is an int (not a bool) ``>= lo``;
    ``owner`` names the config in the message, ``note`` follows the bound."""
    v = getattr(obj, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{owner}: field '{name}' must be an int >= {lo}{note}, got {v!r}")


@dataclass
class UniF2aceConfig:
    # -- vocabulary (docs/model.md §1)
    text_vocab_size: int = 50295
    codebook_size: int = 8192
    bos_token_id: int = 50256  # Phi's <|endoftext|> is both bos and eos
    eos_token_id: int = 50256
    # -- sequence layout
    # tokens before <|soi|> in T2I (pads, <|t2i|>, <bos> caption <eos>); the MMU text part is text_len - 1.
    # 129 = Show-o's max_seq_length 128 + its task token
    text_len: int = 129
    image_grid: int = 16  # image tokens = image_grid ** 2 (256 at 256 px with 16x down-sampling) [choice]
    # -- backbone (Phi-1.5-like)
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    mlp_width: int = 8192  # width of the dense MLP the experts are carved from
    rotary_fraction: float = 0.5  # partial rotary: this fraction of each head dim
    rope_theta: float = 10000.0
    # [choice, not in the paper / Show-o] a learned absolute position embedding per image-grid cell, added to the
    # image tokens' embeddings (T2I and MMU alike). Rotary positions alone leave a small model guessing where a
    # [MASK] token sits in the grid (every masked token has the same embedding); the demo's tiny model turns it
    # on. Zero after a Phi / Show-o import, so the import stays exact
    image_pos_embedding: bool = False
    layer_norm_eps: float = 1e-5
    block_layout: str = "sequential"  # [choice] "sequential" (LN1/LN2/LN3, the paper figure) | "parallel" (Phi)
    # -- token-level MoE (docs/model.md §3), per group
    num_routed_experts: int = 8
    top_k: int = 4
    # [choice, revised] routed experts MLP/16 wide and shared experts MLP/8 wide: the paper's ~1.8B (512 and
    # 1024 in the paper preset; MLP/8 for both gave 2.6B). A model imported from Phi / Show-o needs
    # shared_width = mlp_width (its shared experts start as the dense MLP): preset "showo"
    routed_width: int = 0  # 0 -> mlp_width // 16
    shared_width: int = 0  # 0 -> mlp_width // 8
    # [choice] "gelu_tanh" (Phi's gelu_new: the paper's experts come from Phi / Show-o) | "gelu" | "swiglu"
    expert_activation: str = "gelu_tanh"
    expert_bias: bool = True
    gate_renormalize: bool = False  # [choice] gates = softmax probs (False) or renormalised over top-k
    router_score: str = "softmax"
    balance_coef: float = 0.01  # λ [choice]
    # -- sequence-level MoE (docs/model.md §3)
    seq_moe: bool = True
    seq_experts_gen: Tuple[str, ...] = ("copy", "zero", "noise", "copy")
    seq_experts_und: Tuple[str, ...] = ("clip", "face", "copy", "copy")
    seq_top_k: int = 2
    seq_balance_coef: float = 0.0  # [choice] the paper has no sequence-level balance loss; > 0 adds one
    # [choice] what the sequence router pools (a mean of LN3(h)): "prompt": T2I all non-pad positions, MMU the
    # prompt only (image + question, never the answer: training stays causal and matches decoding);
    # "prefix": MMU the image prefix only; "nonpad": every non-pad position (MMU answers leak backwards)
    seq_router_pool: str = "prompt"
    # the Perceiver resampler S of each feature expert (IP-Adapter / InstantID form: depth layers of
    # cross-attention + FFN; InstantID uses depth 4, dim 1280, ff_mult 4 for one SDXL adapter)
    resampler_queries: int = 16
    resampler_dim: int = 256
    resampler_heads: int = 4
    resampler_depth: int = 2
    resampler_ff_mult: int = 4
    resampler_mode: str = "pooled"  # [choice] "pooled" (queries mean-pooled, broadcast) | "per_position"
    clip_dim: int = 1024  # precomputed CLIP image features [B, clip_tokens, clip_dim]
    clip_tokens: int = 257
    face_dim: int = 512  # face-identity embedding [B, face_dim] (ArcFace / AntelopeV2)
    face_tokens: int = 4  # the embedding is projected to this many feature tokens (IP-Adapter-FaceID style)
    noise_tokens: int = 16  # Gaussian "features" of the Noise expert [B, noise_tokens, noise_dim]
    noise_dim: int = 512
    # -- D3Diff loss (docs/model.md §2)
    alpha: float = 0.01  # weight of the score-entropy term (0: the paper's "Only Mask" ablation)
    mask_weight: float = 1.0  # weight of the mask (MaskGIT CE) term (0: the paper's "Only Score" ablation)
    parametrization: str = "posterior"  # "posterior" | "raw" | "radd"
    train_schedule: str = "cosine"  # [choice] "cosine" (exact count) | "loglinear" (Bernoulli)
    loglinear_eps: float = 1e-3
    clamp_mask_rate: bool = True  # [choice] cosine m clamped to >= 1/L
    d3diff_vocab: str = "codebook"  # [choice] "codebook" | "full" (full vocabulary for the mask term only)
    cond_dropout_prob: float = 0.1  # caption dropped -> unconditional branch for CFG
    # -- generation defaults (docs/model.md §4, §5) [choice]
    gen_steps: int = 18
    guidance_scale: float = 1.75
    temperature: float = 1.0
    # confidence noise: τ0 and how it shrinks over the T steps. "showo" (Show-o's t2i_generate): τ_t =
    # τ0·Π_{s<=t}(1 − (s+1)/T), τ0 = 1.0; "maskgit": τ_t = τ0·(1 − (t+1)/T), MaskGIT uses τ0 = 4.5
    confidence_noise: float = 1.0
    confidence_schedule: str = "showo"
    gen_schedule: str = "cosine"
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        self.seq_experts_gen = tuple(self.seq_experts_gen)
        self.seq_experts_und = tuple(self.seq_experts_und)
        self.validate()

    # -- derived quantities
    @property
    def num_special_tokens(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def image_token_offset(self) -> int:
        return self.text_vocab_size + len(SPECIAL_TOKENS)

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + len(SPECIAL_TOKENS) + self.codebook_size + 1

    @property
    def image_tokens(self) -> int:
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_tokens + 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction) // 2 * 2

    @property
    def expert_width(self) -> int:
        return self.routed_width or self.mlp_width // 16

    @property
    def shared_expert_width(self) -> int:
        return self.shared_width or self.mlp_width // 8

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters per part, computed from the config alone (nothing allocated); equal to
        :meth:`UniF2ace.parameter_counts` of a model built from it. Keys: the parts, and "total"."""
        D, L, V, G = self.hidden_size, self.num_layers, self.vocab_size, len(TASKS)
        N, F, Fs = self.num_routed_experts, self.expert_width, self.shared_expert_width
        mult = 2 if self.expert_activation == "swiglu" else 1
        bias = self.expert_bias
        ln = 2 * D
        lns_per_layer = 1 + (self.block_layout == "sequential") + self.seq_moe
        parts = {
            "embedding + LM head": 2 * V * D + V + (self.image_tokens * D if self.image_pos_embedding else 0),
            "attention": L * 4 * (D * D + D),
            "layer norms": L * lns_per_layer * ln + ln,
            "token routers": L * G * N * D,
            "routed experts": L * G * N * (D * mult * F + F * D + bias * (mult * F + D)),
            "shared experts": L * G * (D * mult * Fs + Fs * D + bias * (mult * Fs + D)),
            "sequence routers + gains": 0,
            "feature experts (resamplers)": 0,
        }
        if self.seq_moe:
            kinds = tuple(self.seq_experts_gen) + tuple(self.seq_experts_und)
            parts["sequence routers + gains"] = L * (len(kinds) * D + len(kinds) + D)
            d, Q, depth, ff = self.resampler_dim, self.resampler_queries, self.resampler_depth, self.resampler_ff_mult
            layer = 2 * (2 * d) + 4 * d * d + (2 * d + 2 * ff * d * d)  # 2 LNs, q/kv/out, FFN (LN + 2 linears)
            queries = Q * d if self.resampler_mode == "pooled" else D * d + d
            fixed = queries + depth * layer + (d * D + D) + ln + 2 * D  # + proj_out, norm_out, mix
            ins = {"clip": (self.clip_dim, 1), "face": (self.face_dim, self.face_tokens), "noise": (self.noise_dim, 1)}
            per_layer = 0
            for k in kinds:
                if k in ins:
                    in_dim, t = ins[k]
                    per_layer += fixed + in_dim * t * d + t * d
            parts["feature experts (resamplers)"] = L * per_layer
        parts["total"] = sum(parts.values())
        return parts

    def special_token_id(self, name: str) -> int:
        return self.text_vocab_size + SPECIAL_TOKENS.index(name)

    @property
    def pad_token_id(self) -> int:
        return self.special_token_id("[PAD]")

    def validate(self) -> None:
        c = "UniF2aceConfig"
        for f in (
            "text_vocab_size",
            "codebook_size",
            "text_len",
            "image_grid",
            "hidden_size",
            "num_layers",
            "num_heads",
            "mlp_width",
            "num_routed_experts",
            "top_k",
            "seq_top_k",
            "resampler_queries",
            "resampler_dim",
            "resampler_heads",
            "resampler_depth",
            "resampler_ff_mult",
            "face_tokens",
            "clip_dim",
            "clip_tokens",
            "face_dim",
            "noise_tokens",
            "noise_dim",
            "gen_steps",
        ):
            require_int_field(self, c, f, 1)
        for f in ("routed_width", "shared_width"):
            require_int_field(self, c, f, 0, " (0: derived from mlp_width)")
        if self.expert_width < 1 or self.shared_expert_width < 1:
            raise ValueError(
                f"{c}: mlp_width={self.mlp_width} is too small for the derived expert widths (mlp_width // 16, "
                "mlp_width // 8); set routed_width / shared_width"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{c}: hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.resampler_dim % self.resampler_heads:
            raise ValueError(
                f"{c}: resampler_dim={self.resampler_dim} must be divisible by resampler_heads={self.resampler_heads}"
            )
        if self.text_len < 4:
            raise ValueError(f"{c}: field 'text_len' must be >= 4 (<|t2i|> <bos> <eos> + 1), got {self.text_len}")
        for f in ("bos_token_id", "eos_token_id"):
            v = getattr(self, f)
            if not 0 <= v < self.text_vocab_size:
                raise ValueError(f"{c}: field '{f}'={v} must be a text token id in [0, {self.text_vocab_size})")
        if self.top_k > self.num_routed_experts:
            raise ValueError(f"{c}: top_k={self.top_k} exceeds num_routed_experts={self.num_routed_experts}")
        if len(self.seq_experts_gen) != len(self.seq_experts_und):
            raise ValueError(
                f"{c}: seq_experts_gen and seq_experts_und must have the same length, got "
                f"{self.seq_experts_gen} and {self.seq_experts_und}"
            )
        for f in ("seq_experts_gen", "seq_experts_und"):
            for kind in getattr(self, f):
                _choice(f, kind, SEQ_EXPERT_KINDS)
        if self.seq_top_k > len(self.seq_experts_gen):
            raise ValueError(
                f"{c}: seq_top_k={self.seq_top_k} exceeds the {len(self.seq_experts_gen)} sequence experts"
            )
        _choice("block_layout", self.block_layout, ("sequential", "parallel"))
        _choice("expert_activation", self.expert_activation, ("gelu", "gelu_tanh", "swiglu"))
        _choice("router_score", self.router_score, ("softmax", "sigmoid"))
        _choice("seq_router_pool", self.seq_router_pool, ("prompt", "prefix", "nonpad"))
        _choice("resampler_mode", self.resampler_mode, ("pooled", "per_position"))
        _choice("parametrization", self.parametrization, ("posterior", "raw", "radd"))
        _choice("train_schedule", self.train_schedule, ("cosine", "loglinear"))
        _choice("d3diff_vocab", self.d3diff_vocab, ("codebook", "full"))
        _choice("gen_schedule", self.gen_schedule, ("cosine", "linear", "pow", "sigmoid"))
        _choice("confidence_schedule", self.confidence_schedule, ("showo", "maskgit"))
        for f in ("alpha", "mask_weight", "balance_coef", "seq_balance_coef", "confidence_noise"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{c}: field '{f}' must be a finite number >= 0, got {v!r}")
        for f in ("expert_bias", "gate_renormalize", "seq_moe", "clamp_mask_rate", "image_pos_embedding"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{c}: field '{f}' must be true or false, got {getattr(self, f)!r}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"{c}: field 'rotary_fraction' must be in (0, 1], got {self.rotary_fraction}")
        if not 0.0 <= self.cond_dropout_prob <= 1.0:
            raise ValueError(f"{c}: field 'cond_dropout_prob' must be in [0, 1], got {self.cond_dropout_prob}")
        if not 0.0 < self.loglinear_eps < 1.0:
            raise ValueError(f"{c}: field 'loglinear_eps' must be in (0, 1), got {self.loglinear_eps}")

    # -- (de)serialisation for checkpoints
    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "model_format": MODEL_FORMAT}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UniF2aceConfig":
        d = json.loads(text)
        fmt = d.pop("model_format", 1)
        if fmt != MODEL_FORMAT:
            raise ValueError(
                f"UniF2aceConfig.from_json: the config (and its checkpoint) has model format {fmt}, this unif2ace "
                f"reads format {MODEL_FORMAT}. Format 1 (before issue 23) had other special-token ids and T2I "
                "layout, other block and resampler parameters; its checkpoints cannot be loaded: train again"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"UniF2aceConfig.from_json: unknown fields {unknown}")
        return cls(**d)


PRESETS = {
    # CPU tests and the demo: S = 16 + 64 + 2 = 82 tokens, ~1.3M parameters
    "tiny": dict(
        text_vocab_size=96,
        codebook_size=64,
        bos_token_id=94,
        eos_token_id=95,
        text_len=16,
        image_grid=8,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        mlp_width=512,
        routed_width=64,
        shared_width=64,
        expert_activation="gelu",
        resampler_queries=4,
        resampler_dim=64,
        resampler_heads=4,
        clip_dim=32,
        clip_tokens=5,
        noise_tokens=4,
        noise_dim=32,
        gen_steps=8,
    ),
    # CPU benchmarks: S = 32 + 256 + 2 = 290 tokens
    "small": dict(
        text_vocab_size=2048,
        codebook_size=1024,
        bos_token_id=2046,
        eos_token_id=2047,
        text_len=32,
        image_grid=16,
        hidden_size=512,
        num_layers=6,
        num_heads=8,
        mlp_width=2048,
        routed_width=256,
        shared_width=256,
        expert_activation="gelu",
        resampler_queries=8,
        resampler_dim=256,
        resampler_heads=4,
        clip_dim=256,
        clip_tokens=17,
        noise_tokens=8,
        noise_dim=128,
    ),
    # docs/model.md §1: Phi-1.5 backbone, 256 image tokens, 8192 codes, 58,498-token vocabulary, ~1.8B
    "paper": dict(),
    # the paper preset in the form a Phi-1.5 / Show-o checkpoint imports into exactly
    # (load_phi_state_dict): Phi's parallel block, shared experts as wide as the dense MLP (~3.2B)
    "showo": dict(block_layout="parallel", shared_width=8192),
}


def preset(name: str, **overrides) -> UniF2aceConfig:
    """``preset("tiny" | "small" | "paper" | "showo", **field_overrides)``."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; expected one of {list(PRESETS)}")
    return UniF2aceConfig(**{**PRESETS[name], **overrides, "name": name})
