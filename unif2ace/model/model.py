"""The UniF²ace model: one embedding table over text + special + image-code + [MASK] ids, L blocks
(omni-attention, token MoE, sequence MoE), a final LayerNorm and an LM head; and its losses.

    loss = L_MMU + L_D3Diff + Σ_g token balance_g + Σ_g sequence balance_g

L_D3Diff = mask_weight · L_mask + α · L_score (``cfg.mask_weight`` 1 and ``cfg.alpha`` 0.01 by
default; the paper's "Only Mask" ablation is α = 0, its "Only Score" ablation mask_weight = 0).
The sequence balance is 0 unless ``cfg.seq_balance_coef`` > 0 (the paper has none).

- L_D3Diff (docs/model.md §2) on the masked image tokens of T2I samples, with the head restricted to
  the image-code rows (``cfg.d3diff_vocab``): :func:`unif2ace.kernels.d3diff_loss`, fused with the
  LM head, so ``[N, V]`` logits are never formed by the fast backends.
  mask = mean CE over all masked positions; score = Σ_{masked} σ'·DSE / number of T2I samples.
- L_MMU: shifted next-token CE over the answer labels (the same kernel with α = 0).
- balance: :func:`unif2ace.kernels.moe_gating`'s per-group loss, averaged over layers.

Backends: ``model.set_backend("reference")`` forces the plain-PyTorch reference for every kernel
op the model calls; ``model.set_backend("auto")`` (default) lets each op pick its fastest backend
for the device; any backend name works (``"cpu"``, ``"triton"``, ...).
"""

from __future__ import annotations

import contextlib
from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor, nn

from unif2ace.kernels import BACKENDS, d3diff_loss, use_backend

from .batch import IGNORE_INDEX, Batch
from .config import UniF2aceConfig
from .modules import NUM_GROUPS, Block, BlockContext, KVCache, attention_mask, bidirectional_span, rotary_tables

__all__ = ["UniF2ace", "ModelOutput"]


class ModelOutput(NamedTuple):
    """Result of ``model(batch)``; every field fp32, scalars except the ``[G]`` balance vectors."""

    loss: Tensor  # mmu_loss + d3diff_loss + token_balance.sum() + seq_balance.sum()
    mmu_loss: Tensor  # next-token CE over MMU answer tokens (0 without MMU samples)
    d3diff_loss: Tensor  # mask_weight * mask_loss + alpha * score_loss (0 without T2I samples)
    mask_loss: Tensor
    score_loss: Tensor
    token_balance: Tensor  # [G] per group (0 = gen, 1 = und), mean over layers
    seq_balance: Tensor  # [G]


class UniF2ace(nn.Module):
    def __init__(self, cfg: UniF2aceConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # cfg.image_pos_embedding: one learned vector per image-grid cell, added at the image positions
        self.image_pos = (
            nn.Parameter(torch.randn(cfg.image_tokens, cfg.hidden_size) * 0.02) if cfg.image_pos_embedding else None
        )
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.backend: Optional[str] = None
        # True: the token MoE routes every position and masks the pads (static shapes, no host sync),
        # as it always does under torch.compile; False: eager gathers the non-pad tokens first
        self.static_routing = False
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # -- backends
    def set_backend(self, name: str = "auto") -> "UniF2ace":
        """``"auto"``: every op picks its backend by device; ``"reference"`` (or any backend name in
        ``unif2ace.kernels.BACKENDS``): every kernel op the model calls is forced to it."""
        if name != "auto" and name not in BACKENDS:
            raise ValueError(f"set_backend: argument 'name' must be 'auto' or one of {list(BACKENDS)}, got {name!r}")
        self.backend = None if name == "auto" else name
        return self

    def backend_scope(self):
        return use_backend(self.backend) if self.backend else contextlib.nullcontext()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters per part, counted from the model's own tensors (same keys as
        :meth:`UniF2aceConfig.parameter_counts`; works on the meta device)."""
        out = dict.fromkeys(self.cfg.parameter_counts(), 0)
        rules = (
            (("embed.", "lm_head.", "image_pos"), "embedding + LM head"),
            ((".attn.",), "attention"),
            ((".ln1.", ".ln2.", ".ln3.", "ln_f."), "layer norms"),
            ((".token_moe.router",), "token routers"),
            ((".token_moe.shared_",), "shared experts"),
            ((".token_moe.",), "routed experts"),
            ((".seq_moe.router.", ".seq_gain"), "sequence routers + gains"),
            ((".seq_moe.experts.",), "feature experts (resamplers)"),
        )
        for name, p in self.named_parameters():
            part = next(k for keys, k in rules if any(s in name or name.startswith(s) for s in keys))
            out[part] += p.numel()
        out["total"] = sum(v for k, v in out.items() if k != "total")
        return out

    # -- the transformer
    def hidden(
        self,
        input_ids: Tensor,
        valid: Tensor,
        task: Tensor,
        *,
        span: Optional[Tensor] = None,
        route_mask: Optional[Tensor] = None,
        features: Optional[Dict[str, Optional[Tensor]]] = None,
        positions: Optional[Tensor] = None,
        cache: Optional[KVCache] = None,
        image_positions: Optional[Tensor] = None,
    ):
        """Final hidden states ``[B, T, D]`` (after ``ln_f``) and the balance losses.

        input_ids/valid ``[B, T]``; task ``[B]`` (the MoE group); span ``[B, T]`` bool, the
        bidirectional span (:func:`~unif2ace.model.modules.bidirectional_span`; None: all causal);
        route_mask ``[B, T]`` bool, the positions the sequence router pools over (default
        ``valid``; see :meth:`route_mask`); features: {"clip": [B, Nc, Dc], "face": [B, Df],
        "noise": [B, Nn, Dn]} (None, or a sample's all-zero rows: missing, S(f) = 0 at the expert;
        noise drawn when None); positions
        ``[B, T]`` absolute positions (default 0..T-1); cache: a :class:`KVCache` the keys/values
        are written into (attention then runs over the cache); image_positions ``[B, L]``: where the
        image tokens are in ``input_ids``, for ``cfg.image_pos_embedding`` (None: the input holds no
        image tokens, e.g. a decoding step; ignored without ``cfg.image_pos_embedding``).
        Returns (h, token_balance ``[G]``, seq_balance ``[G]``).
        """
        cfg = self.cfg
        B, T = input_ids.shape
        dev = input_ids.device
        if positions is None:
            positions = torch.arange(T, device=dev).expand(B, T)
        if span is None:
            span = torch.zeros_like(valid)
        if route_mask is None:
            route_mask = valid
        features = dict(features or {})
        if cfg.seq_moe and "noise" in self.seq_kinds() and features.get("noise") is None:
            features["noise"] = torch.randn(B, cfg.noise_tokens, cfg.noise_dim, device=dev)
        if cache is None:
            mask = attention_mask(positions, span, valid, span)
        else:
            b = torch.arange(B, device=dev)[:, None]
            cache.valid[b, positions] = valid
            cache.span[b, positions] = span
            mask = attention_mask(positions, span, cache.valid, cache.span)
        cos, sin = rotary_tables(positions, cfg.rotary_dim, cfg.rope_theta)
        token_group = task.repeat_interleave(T)
        token_valid = None
        if self.static_routing or torch.compiler.is_compiling():
            token_index, token_valid = None, valid.reshape(-1)  # every position routed, pads masked
        else:
            token_index = valid.reshape(-1).nonzero().squeeze(1)  # a host sync: only eager
            token_group = token_group.index_select(0, token_index)
        ctx = BlockContext(
            mask=mask,
            cos=cos,
            sin=sin,
            positions=positions,
            token_index=token_index,
            token_group=token_group,
            token_valid=token_valid,
            group=task,
            route_mask=route_mask,
            features=features,
            cache=cache,
        )
        h = self.embed(input_ids)
        if self.image_pos is not None and image_positions is not None:
            idx = image_positions.long()[..., None].expand(-1, -1, h.shape[-1])
            h = h.scatter_add(1, idx, self.image_pos[: idx.shape[1]].to(h.dtype).expand(B, -1, -1))
        token_bal = torch.zeros(NUM_GROUPS, device=dev)
        seq_bal = torch.zeros(NUM_GROUPS, device=dev)
        with self.backend_scope():
            for blk in self.blocks:
                h, tb, sb = blk(h, ctx)
                token_bal = token_bal + tb
                seq_bal = seq_bal + sb
        n = len(self.blocks)
        return self.ln_f(h), token_bal / n, seq_bal / n

    def seq_kinds(self):
        return tuple(self.cfg.seq_experts_gen) + tuple(self.cfg.seq_experts_und) if self.cfg.seq_moe else ()

    def code_head(self):
        """(weight ``[K, D]``, bias ``[K]``): the LM head rows of the K image codes."""
        lo = self.cfg.image_token_offset
        hi = lo + self.cfg.codebook_size
        return self.lm_head.weight[lo:hi], self.lm_head.bias[lo:hi]

    def route_mask(self, valid: Tensor, task: Tensor, span: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """``[B, T]`` bool: the positions the sequence router pools over (``cfg.seq_router_pool``).

        T2I samples: every non-pad position. MMU samples: "prompt" (default) the prompt only, i.e.
        the non-pad positions before the first labelled (answer) position of ``labels`` (all of
        ``valid`` without labels: a decoding prompt); "prefix" the image prefix up to <|eoi|>;
        "nonpad" every non-pad position (answers included: not causal, training differs from decoding).
        """
        mode = self.cfg.seq_router_pool
        if mode == "nonpad":
            return valid
        pos = torch.arange(valid.shape[1], device=valid.device)
        if mode == "prefix":
            end = torch.where(span, pos, -1).amax(dim=1, keepdim=True)
        elif labels is None:
            return valid
        else:
            answer = labels != IGNORE_INDEX
            first = torch.where(answer, pos, valid.shape[1]).amin(dim=1, keepdim=True)
            end = first - 1
        mmu = valid & (pos <= end)
        return torch.where((task == 1)[:, None], mmu, valid)

    @staticmethod
    def batch_features(batch: Batch) -> Dict[str, Optional[Tensor]]:
        return {"clip": batch.clip_features, "face": batch.face_embeddings, "noise": batch.noise_features}

    def batch_hidden(self, batch: Batch):
        """:meth:`hidden` of a training :class:`Batch` (its span, route mask, features and image
        positions): (h, token_balance, seq_balance)."""
        span = bidirectional_span(batch.image_positions, batch.task, self.cfg.seq_len)
        return self.hidden(
            batch.input_ids,
            batch.valid,
            batch.task,
            span=span,
            route_mask=self.route_mask(batch.valid, batch.task, span, batch.labels),
            features=self.batch_features(batch),
            image_positions=batch.image_positions,
        )

    # -- training forward
    def forward(self, batch: Batch, *, validate: bool = True) -> ModelOutput:
        """Total loss and every part for a :class:`Batch` (see :class:`ModelOutput`)."""
        cfg = self.cfg
        if validate:
            batch.validate(cfg)
        h, token_bal, seq_bal = self.batch_hidden(batch)
        with self.backend_scope():
            mask_loss, score_loss = self._d3diff(h, batch)
            mmu = self._mmu(h, batch)
        d3 = cfg.mask_weight * mask_loss + cfg.alpha * score_loss
        total = mmu + d3 + token_bal.sum() + seq_bal.sum()
        return ModelOutput(total, mmu, d3, mask_loss, score_loss, token_bal, seq_bal)

    def _d3diff(self, h: Tensor, batch: Batch):
        cfg = self.cfg
        D = h.shape[-1]
        img_h = h.gather(1, batch.image_positions[..., None].expand(-1, -1, D))  # [B, L, D]
        is_gen = (batch.task == 0)[:, None]
        masked = batch.is_masked & is_gen
        target = torch.where(masked, batch.image_codes, IGNORE_INDEX)
        w, b = self.code_head()
        out = d3diff_loss(
            img_h,
            w,
            target,
            bias=b,
            mask_rate=batch.mask_rate.float(),
            mask_rate_deriv=batch.mask_rate_deriv.float(),
            alpha=cfg.alpha,
            parametrization=cfg.parametrization,
            reduction="sum",
        )
        n_masked = masked.sum().clamp_min(1)
        n_gen = is_gen.sum().clamp_min(1)
        mask_loss = out.mask_loss / n_masked
        if cfg.d3diff_vocab == "full":  # the mask term over the whole vocabulary
            full_target = torch.where(masked, batch.image_codes + cfg.image_token_offset, IGNORE_INDEX)
            mask_loss = (
                d3diff_loss(
                    img_h, self.lm_head.weight, full_target, bias=self.lm_head.bias, alpha=0.0, reduction="sum"
                ).mask_loss
                / n_masked
            )
        return mask_loss, out.score_loss / n_gen

    def _mmu(self, h: Tensor, batch: Batch) -> Tensor:
        target = batch.labels[:, 1:]  # position p predicts the token at p + 1
        return d3diff_loss(
            h[:, :-1],
            self.lm_head.weight,
            target,
            bias=self.lm_head.bias,
            alpha=0.0,
            reduction="mean",
            ignore_index=IGNORE_INDEX,
        ).loss

    # -- generation and understanding (see generate.py)
    def generate_images(self, captions, **kwargs) -> Tensor:
        from .generate import generate_images

        return generate_images(self, captions, **kwargs)

    def answer(self, image_codes, questions, **kwargs):
        from .generate import answer

        return answer(self, image_codes, questions, **kwargs)
