"""The building blocks of a UniF²ace layer (docs/model.md §1, §3), readable top to bottom.

    h = x + Attn(LN1(x))            omni-attention: causal text, bidirectional image span, pads never attended
    h = h + TokenMoE_g(LN2(h))      per task group g: 1 shared expert + top-k of N routed experts
    h = h + γ·SeqMoE_g(LN3(h))      per task group g: one top-2 route per sequence over copy/zero/noise/CLIP/face

(the sequential layout; ``block_layout="parallel"`` is Phi's: attention and token MoE both read LN1(x)).

Every hot spot calls :mod:`unif2ace.kernels` (gating, routed/shared expert MLPs, sequence gating),
so whichever backend :func:`unif2ace.kernels.use_backend` selects is used.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unif2ace.kernels import moe_expert_mlp, moe_gating, moe_sequence_gating

from .config import TASKS, UniF2aceConfig

__all__ = [
    "attention_mask",
    "omni_attention_mask",
    "image_span_mask",
    "bidirectional_span",
    "rotary_tables",
    "KVCache",
    "Attention",
    "TokenMoE",
    "masked_balance_loss",
    "ResamplerLayer",
    "PerceiverResampler",
    "FeatureExpert",
    "SequenceMoE",
    "Block",
]

NUM_GROUPS = len(TASKS)  # 0 = generation (t2i), 1 = understanding (mmu)


# ------------------------------------------------------------------------------------------------
# omni-attention masks


def attention_mask(q_pos: Tensor, q_span: Tensor, k_valid: Tensor, k_span: Tensor) -> Tensor:
    """Boolean SDPA mask ``[B, 1, Tq, Tk]`` (True = may attend) for keys at positions ``0..Tk-1``.

    Query at position p (``q_pos [B, Tq]``) sees key k iff the key is not padding and either
    ``k <= p`` (causal) or both lie in the sequence's bidirectional span (``q_span [B, Tq]``,
    ``k_span [B, Tk]``, see :func:`bidirectional_span`); and every query sees its own key (a pad
    row, never attended, then has a defined output).
    """
    k_pos = torch.arange(k_valid.shape[1], device=k_valid.device)
    causal = k_pos[None, None, :] <= q_pos[:, :, None]
    bidir = q_span[:, :, None] & k_span[:, None, :]
    # every row also sees its own key: a pad row before any valid token (T2I's leading pads) would
    # otherwise see nothing, and SDPA would return NaN there (which no valid row ever reads)
    own = k_pos[None, None, :] == q_pos[:, :, None]
    return ((k_valid[:, None, :] & (causal | bidir)) | own)[:, None]


def omni_attention_mask(valid: Tensor, span: Tensor) -> Tensor:
    """``[B, 1, S, S]`` omni-attention mask of whole sequences (``valid``, ``span``: ``[B, S]`` bool).

    T2I (image span last): caption rows causal, image rows see every non-pad position.
    MMU (span = <|mmu|> + image prefix): prefix bidirectional, text after it causal.
    """
    pos = torch.arange(valid.shape[1], device=valid.device).expand(valid.shape[0], -1)
    return attention_mask(pos, span, valid, span)


def image_span_mask(image_positions: Tensor, seq_len: int) -> Tensor:
    """``[B, seq_len]`` bool: the image tokens plus the <|soi|> before and <|eoi|> after them."""
    pos = torch.arange(seq_len, device=image_positions.device)
    lo = image_positions[:, :1] - 1
    hi = image_positions[:, -1:] + 1
    return (pos >= lo) & (pos <= hi)


def bidirectional_span(image_positions: Tensor, task: Tensor, seq_len: int) -> Tensor:
    """``[B, seq_len]`` bool, the bidirectional span of each sequence (Show-o's masks).

    T2I (task 0): <|soi|> image... <|eoi|> (:func:`image_span_mask`). MMU (task 1): the whole
    prefix from position 0 (<|mmu|>) to <|eoi|>, so the task token sees the image too.
    """
    span = image_span_mask(image_positions, seq_len)
    pos = torch.arange(seq_len, device=image_positions.device)
    prefix = pos <= image_positions[:, -1:] + 1
    return torch.where((task == 1)[:, None], prefix, span)


# ------------------------------------------------------------------------------------------------
# attention (Phi-1.5: separate q/k/v projections with bias, partial rotary, output "dense")


def rotary_tables(positions: Tensor, rotary_dim: int, theta: float) -> Tuple[Tensor, Tensor]:
    """cos, sin ``[B, 1, T, rotary_dim]`` for ``positions [B, T]`` (HF Phi / GPT-NeoX convention)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim)
    )
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat(((xr * cos + rotated * sin).to(x.dtype), xp), dim=-1)


class KVCache:
    """Per-layer keys/values ``[B, H, capacity, head_dim]`` written at absolute positions, the
    validity and image span of every cached position, and each layer's frozen sequence route."""

    def __init__(self, cfg: UniF2aceConfig, batch: int, capacity: int, device, dtype):
        shape = (batch, cfg.num_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.span = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.routes: List[Optional[Tuple[Tensor, Tensor]]] = [None] * cfg.num_layers

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def write(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        b = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer][b, :, positions] = k.transpose(1, 2)
        self.v[layer][b, :, positions] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg: UniF2aceConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.dense = nn.Linear(D, D)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        cos: Tensor,
        sin: Tensor,
        *,
        cache: Optional[KVCache] = None,
        layer: int = 0,
        positions: Optional[Tensor] = None,
    ) -> Tensor:
        B, T, D = x.shape

        def heads(t):
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        q = _apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = _apply_rotary(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if cache is not None:
            k, v = cache.write(layer, positions, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(y.transpose(1, 2).reshape(B, T, D))


# ------------------------------------------------------------------------------------------------
# token-level grouped MoE


class TokenMoE(nn.Module):
    """Per group: one always-on shared expert + top-k of N routed experts (docs/model.md §3).

    Experts of both groups share one global index space (group g owns ``[g·N, (g+1)·N)``), so one
    :func:`moe_gating` and one :func:`moe_expert_mlp` call serve the whole micro-batch, and routing
    never crosses groups. The shared experts are a second :func:`moe_expert_mlp` call with the
    token's group as its (only) expert and gate 1. Weights are stored as the kernels take them:
    ``w1 [E, D, F]`` (``[E, D, 2F]`` for swiglu), ``w2 [E, F, D]``.
    """

    def __init__(self, cfg: UniF2aceConfig):
        super().__init__()
        D, N, G = cfg.hidden_size, cfg.num_routed_experts, NUM_GROUPS
        mult = 2 if cfg.expert_activation == "swiglu" else 1
        F_, Fs = cfg.expert_width, cfg.shared_expert_width
        self.cfg = cfg
        self.router = nn.Parameter(torch.empty(G * N, D))
        self.w1 = nn.Parameter(torch.empty(G * N, D, mult * F_))
        self.w2 = nn.Parameter(torch.empty(G * N, F_, D))
        self.shared_w1 = nn.Parameter(torch.empty(G, D, mult * Fs))
        self.shared_w2 = nn.Parameter(torch.empty(G, Fs, D))
        if cfg.expert_bias:
            self.b1 = nn.Parameter(torch.zeros(G * N, mult * F_))
            self.b2 = nn.Parameter(torch.zeros(G * N, D))
            self.shared_b1 = nn.Parameter(torch.zeros(G, mult * Fs))
            self.shared_b2 = nn.Parameter(torch.zeros(G, D))
        else:
            self.b1 = self.b2 = self.shared_b1 = self.shared_b2 = None
        for w in (self.router, self.w1, self.w2, self.shared_w1, self.shared_w2):
            nn.init.normal_(w, std=0.02)

    def forward(self, x: Tensor, group: Tensor, valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """x ``[T, D]``, group ``[T]`` -> (output ``[T, D]``, balance loss per group ``[G]``).

        ``valid [T]`` bool (the static-shape form :func:`torch.compile` traces without a host sync):
        every token is routed, only the valid ones count in the balance statistics
        (:func:`masked_balance_loss`), and the others' outputs are 0. Without it every token is valid.
        """
        cfg = self.cfg
        logits = x @ self.router.t().to(x.dtype)
        route = moe_gating(
            logits,
            group,
            [cfg.num_routed_experts] * NUM_GROUPS,
            cfg.top_k,
            score=cfg.router_score,
            renormalize=cfg.gate_renormalize,
            balance_coef=cfg.balance_coef if valid is None else 0.0,
        )
        routed = moe_expert_mlp(
            x, self.w1, self.w2, route.expert_ids, route.gates, b1=self.b1, b2=self.b2, activation=cfg.expert_activation
        )
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        shared = moe_expert_mlp(
            x,
            self.shared_w1,
            self.shared_w2,
            group[:, None],
            ones,
            b1=self.shared_b1,
            b2=self.shared_b2,
            activation=cfg.expert_activation,
        )
        if valid is None:
            return shared + routed, route.balance_loss
        out = (shared + routed) * valid[:, None].to(x.dtype)
        return out, masked_balance_loss(logits, group, valid, route.expert_ids, cfg)


def masked_balance_loss(logits: Tensor, group: Tensor, valid: Tensor, expert_ids: Tensor, cfg) -> Tensor:
    """:func:`moe_gating`'s balance loss ``coef * N * sum_e f_e * P_e`` per group, over the tokens
    where ``valid [T]`` is True only (logits ``[T, G*N]``, group ``[T]``, expert_ids ``[T, k]``): the
    same value the kernel gives for those tokens alone, with static shapes (no host sync)."""
    N, k, G = cfg.num_routed_experts, cfg.top_k, NUM_GROUPS
    T = logits.shape[0]
    z = logits.float().view(T, G, N).gather(1, group.long().view(T, 1, 1).expand(T, 1, N)).squeeze(1)
    p = torch.softmax(z, dim=-1) if cfg.router_score == "softmax" else torch.sigmoid(z)  # own group's scores
    w = valid.to(p.dtype)
    member = (group.long()[:, None] == torch.arange(G, device=group.device)).to(p.dtype) * w[:, None]  # [T, G]
    n = member.sum(0)
    P = member.t() @ p / n.clamp_min(1)[:, None]  # [G, N] mean score over the group's valid tokens
    counts = torch.zeros(G * N, dtype=p.dtype, device=p.device).index_add(
        0, expert_ids.reshape(-1).long(), w.repeat_interleave(k)
    )
    f = counts.view(G, N) / (n * k).clamp_min(1)[:, None]  # fraction of the group's assignments
    return cfg.balance_coef * N * (f * P).sum(1)


# ------------------------------------------------------------------------------------------------
# sequence-level grouped MoE


class ResamplerLayer(nn.Module):
    """One Perceiver layer (IP-Adapter / InstantID ``Resampler``): the queries cross-attend to the
    features, then a pre-LN FFN; both residual. With ``attend_self`` the queries also attend to each
    other (keys/values = features + queries, as IP-Adapter does), which keeps a layer expressive even
    over few feature tokens; per-position queries must not (that would mix sequence positions)."""

    def __init__(self, dim: int, heads: int, ff_mult: int, attend_self: bool):
        super().__init__()
        self.heads, self.attend_self = heads, attend_self
        self.norm_feats = nn.LayerNorm(dim)
        self.norm_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )

    def forward(self, feats: Tensor, q: Tensor) -> Tensor:
        B, Tq, dim = q.shape
        f, qn = self.norm_feats(feats), self.norm_q(q)
        kv_in = torch.cat((f, qn), dim=1) if self.attend_self else f

        def heads(t):
            return t.view(B, t.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(heads(self.to_q(qn)), heads(k), heads(v))
        q = q + self.to_out(y.transpose(1, 2).reshape(B, Tq, dim))
        return q + self.ff(q)


class PerceiverResampler(nn.Module):
    """S(f): ``depth`` Perceiver layers (:class:`ResamplerLayer`) of queries over projected features,
    then a projection to the model width and a LayerNorm (the IP-Adapter / InstantID resampler).

    Features ``[B, Nf, in_dim]``, or with ``in_tokens > 0`` one vector ``[B, in_dim]`` projected to
    ``in_tokens`` feature tokens (the face embedding: a single key would reduce cross-attention to
    an affine map). mode "pooled": learned queries, mean-pooled to ``[B, 1, D]`` and broadcast to
    every position; mode "per_position": the tokens themselves are the queries, ``-> [B, S, D]``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        dim: int,
        num_queries: int,
        heads: int,
        mode: str,
        depth: int = 1,
        ff_mult: int = 4,
        in_tokens: int = 0,
    ):
        super().__init__()
        self.mode, self.in_tokens, self.dim = mode, in_tokens, dim
        self.proj_in = nn.Linear(in_dim, max(in_tokens, 1) * dim)
        if mode == "pooled":
            self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        else:
            self.query_proj = nn.Linear(out_dim, dim)
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads, ff_mult, mode == "pooled") for _ in range(depth))
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, feats: Tensor, x: Tensor) -> Tensor:
        B = feats.shape[0]
        f = self.proj_in(feats.to(x.dtype))
        if self.in_tokens:
            f = f.view(B, self.in_tokens, self.dim)
        q = self.queries.expand(B, -1, -1) if self.mode == "pooled" else self.query_proj(x)
        for layer in self.layers:
            q = layer(f, q)
        y = self.norm_out(self.proj_out(q))
        return y.mean(dim=1, keepdim=True) if self.mode == "pooled" else y


class FeatureExpert(nn.Module):
    """MoE++ constant expert with the constant replaced by resampled features:
    ``E(x) = w0·x + w1·S(f)``, ``[w0, w1] = softmax(W x)`` per token.

    Missing features, one rule: a sample whose features are all zero (what :func:`collate` fills
    for samples without them), or ``feats=None`` (the whole batch), has ``S(f) = 0`` exactly, so
    ``E(x) = w0·x`` whatever the weights have learned.
    """

    def __init__(self, cfg: UniF2aceConfig, in_dim: int, in_tokens: int = 0):
        super().__init__()
        self.mix = nn.Linear(cfg.hidden_size, 2, bias=False)
        self.resampler = PerceiverResampler(
            in_dim,
            cfg.hidden_size,
            cfg.resampler_dim,
            cfg.resampler_queries,
            cfg.resampler_heads,
            cfg.resampler_mode,
            depth=cfg.resampler_depth,
            ff_mult=cfg.resampler_ff_mult,
            in_tokens=in_tokens,
        )

    def forward(self, x: Tensor, feats: Optional[Tensor]) -> Tensor:
        w = torch.softmax(self.mix(x).float(), dim=-1).to(x.dtype)
        out = w[..., :1] * x
        if feats is not None:
            present = feats.reshape(feats.shape[0], -1).ne(0).any(dim=1)[:, None, None]
            s = torch.where(present, self.resampler(feats, x), 0.0)
            out = out + w[..., 1:] * s
        return out


class SequenceMoE(nn.Module):
    """One top-k route per sequence over each group's experts (docs/model.md §3).

    Global expert e < n belongs to the generation group (``cfg.seq_experts_gen[e]``), e >= n to the
    understanding group. Router input: the masked mean of LN3(h) over ``route_mask`` (computed by
    :func:`moe_sequence_gating`). The output is ``Σ_e G[b, e] · E_e(x)`` with the dense per-sequence
    gate matrix G (zero for experts not chosen); copy/zero are exact (``x`` and nothing).
    """

    def __init__(self, cfg: UniF2aceConfig):
        super().__init__()
        self.cfg = cfg
        self.kinds = tuple(cfg.seq_experts_gen) + tuple(cfg.seq_experts_und)
        self.router = nn.Linear(cfg.hidden_size, len(self.kinds))
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        dims = {"clip": cfg.clip_dim, "face": cfg.face_dim, "noise": cfg.noise_dim}
        tokens = {"face": cfg.face_tokens}  # one embedding vector -> face_tokens feature tokens
        self.experts = nn.ModuleDict(
            {str(e): FeatureExpert(cfg, dims[k], tokens.get(k, 0)) for e, k in enumerate(self.kinds) if k in dims}
        )

    def route(self, x: Tensor, route_mask: Tensor, group: Tensor):
        n = len(self.cfg.seq_experts_gen)
        return moe_sequence_gating(
            x,
            route_mask,
            self.router.weight,
            group,
            [n] * NUM_GROUPS,
            self.cfg.seq_top_k,
            router_bias=self.router.bias,
            balance_coef=self.cfg.seq_balance_coef,
        )

    def forward(
        self, x: Tensor, group: Tensor, expert_ids: Tensor, gates: Tensor, features: Dict[str, Optional[Tensor]]
    ) -> Tensor:
        """x ``[B, S, D]``; the route (expert_ids, gates ``[B, k]``) from :meth:`route`."""
        G = torch.zeros(x.shape[0], len(self.kinds), dtype=gates.dtype, device=x.device)
        G = G.scatter(1, expert_ids.long(), gates).to(x.dtype)[:, :, None, None]
        out = torch.zeros_like(x)
        for e, kind in enumerate(self.kinds):
            if kind == "zero":
                continue
            y = x if kind == "copy" else self.experts[str(e)](x, features.get(kind))
            out = out + G[:, e] * y
        return out


# ------------------------------------------------------------------------------------------------
# the block


class Block(nn.Module):
    """One layer; ``γ`` (``seq_gain``, per channel, 1 at init; 0 in a freshly imported model) scales the
    sequence MoE's residual branch.

    sequential (the paper's figure): ``h = x + Attn(LN1 x); h = h + TokenMoE(LN2 h); h = h + γ·SeqMoE(LN3 h)``
    parallel (Phi's block; attention and MLP read the same LN1 x, the sequence MoE follows):
    ``h = x + Attn(a) + TokenMoE(a), a = LN1 x; h = h + γ·SeqMoE(LN3 h)``
    """

    def __init__(self, cfg: UniF2aceConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.ln1 = nn.LayerNorm(D, eps=eps)
        self.attn = Attention(cfg)
        if cfg.block_layout == "sequential":
            self.ln2 = nn.LayerNorm(D, eps=eps)
        self.token_moe = TokenMoE(cfg)
        if cfg.seq_moe:
            self.ln3 = nn.LayerNorm(D, eps=eps)
            self.seq_moe = SequenceMoE(cfg)
            self.seq_gain = nn.Parameter(torch.ones(D))

    def _token_moe(self, a: Tensor, ctx: "BlockContext") -> Tuple[Tensor, Tensor]:
        # pads never count in the balance statistics and get 0. Eager: only the non-pad tokens are
        # routed (gathered by ctx.token_index, a nonzero(): a host sync); static (token_index None,
        # under torch.compile): every position is routed with the pads masked out
        B, T, D = a.shape
        if ctx.token_index is None:
            y, bal = self.token_moe(a.reshape(B * T, D), ctx.token_group, ctx.token_valid)
            return y.view(B, T, D), bal
        y, bal = self.token_moe(a.reshape(B * T, D).index_select(0, ctx.token_index), ctx.token_group)
        out = torch.zeros(B * T, D, dtype=y.dtype, device=y.device).index_copy(0, ctx.token_index, y)
        return out.view(B, T, D), bal

    def _seq_moe(self, a: Tensor, ctx: "BlockContext") -> Tuple[Tensor, Tensor]:
        bal = a.new_zeros(NUM_GROUPS, dtype=torch.float32)
        cache = ctx.cache
        if cache is not None and cache.routes[self.index] is not None:
            ids, gates = cache.routes[self.index]  # decoding: the route frozen at prefill
        else:
            r = self.seq_moe.route(a, ctx.route_mask, ctx.group)
            ids, gates, bal = r.expert_ids, r.gates, r.balance_loss
            if cache is not None:
                cache.routes[self.index] = (ids, gates)
        return self.seq_moe(a, ctx.group, ids, gates, ctx.features), bal

    def forward(self, x: Tensor, ctx: "BlockContext") -> Tuple[Tensor, Tensor, Tensor]:
        """-> (h, token balance ``[G]``, sequence balance ``[G]``)."""
        attn = lambda a: self.attn(
            a,
            ctx.mask,
            ctx.cos,
            ctx.sin,
            cache=ctx.cache,
            layer=self.index,  # noqa: E731
            positions=ctx.positions,
        )
        zero = x.new_zeros(NUM_GROUPS, dtype=torch.float32)
        if self.cfg.block_layout == "parallel":
            a = self.ln1(x)
            t, tb = self._token_moe(a, ctx)
            h = x + attn(a) + t
        else:
            h = x + attn(self.ln1(x))
            t, tb = self._token_moe(self.ln2(h), ctx)
            h = h + t
        if not self.cfg.seq_moe:
            return h, tb, zero
        s, sb = self._seq_moe(self.ln3(h), ctx)
        return h + self.seq_gain.to(s.dtype) * s, tb, sb


class BlockContext:
    """What every block of one forward pass shares (masks, rotary tables, routing inputs, cache)."""

    def __init__(
        self,
        *,
        mask,
        cos,
        sin,
        positions,
        token_index,
        token_group,
        group,
        route_mask,
        features,
        cache,
        token_valid=None,
    ):
        self.mask, self.cos, self.sin, self.positions = mask, cos, sin, positions
        # token MoE inputs: token_index [N] (the non-pad positions of the flattened [B*T]) and their
        # groups [N]; or token_index None, token_group [B*T] and token_valid [B*T] (static shapes)
        self.token_index, self.token_group, self.token_valid = token_index, token_group, token_valid
        self.group = group
        self.route_mask, self.features, self.cache = route_mask, features, cache
