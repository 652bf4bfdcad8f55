"""Checkpoints: safetensors save/load of a :class:`UniF2ace`, and the Phi-1.5 / Show-o importer.

``save_checkpoint(model, path)`` writes every parameter and buffer plus the config (JSON, in the
safetensors metadata, with the model format version). ``load_checkpoint(path)`` rebuilds the
model from that config, or loads into a given model; missing keys, unexpected keys, shape
mismatches and checkpoints of an older model format raise :class:`CheckpointError` saying so.

``load_phi_state_dict(model, source)`` imports a dense Phi-1.5 (HF ``PhiForCausalLM``) or Show-o
(the same keys under ``showo.``) state dict so that the imported model computes the dense forward
exactly (shared experts = the dense MLP, routed experts and the sequence MoE at zero contribution);
see its docstring for the mapping.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor

from .config import SPECIAL_TOKENS, UniF2aceConfig
from .model import UniF2ace

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "load_phi_state_dict",
    "phi_key_map",
    "SHOWO_SPECIAL_TOKENS",
]


class CheckpointError(ValueError):
    """A checkpoint does not match the model (lists every missing/unexpected/mismatched key)."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("checkpoints need the 'safetensors' package (pip install 'unif2ace[checkpoints]')") from e
    return st


def save_checkpoint(model: UniF2ace, path: Union[str, os.PathLike]) -> None:
    """Write ``model``'s state dict and config to a ``.safetensors`` file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _safetensors().save_file(tensors, str(path), metadata={"format": "unif2ace", "config": model.cfg.to_json()})


def _check_match(what: str, expected: Mapping[str, torch.Size], got: Mapping[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"{k}: checkpoint {list(got[k].shape)} vs model {list(expected[k])}"
        for k in sorted(set(expected) & set(got))
        if tuple(got[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        raise CheckpointError(f"{what}: " + "; ".join(parts))


def load_checkpoint(
    path: Union[str, os.PathLike], model: Optional[UniF2ace] = None, map_location: Union[str, torch.device] = "cpu"
) -> UniF2ace:
    """Load a :func:`save_checkpoint` file into ``model`` (built from the stored config when None)."""
    st = _safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" in meta:
        try:
            stored = UniF2aceConfig.from_json(meta["config"])
        except ValueError as e:
            raise CheckpointError(f"load_checkpoint({os.fspath(path)!r}): {e}") from None
    if model is None:
        if "config" not in meta:
            raise CheckpointError(f"load_checkpoint: {path} has no stored config; pass the model to load into")
        model = UniF2ace(stored)
    tensors = st.load_file(str(path), device=str(map_location))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_match(f"load_checkpoint({os.fspath(path)!r})", expected, tensors)
    model.load_state_dict(tensors)
    return model


# ------------------------------------------------------------------------------------------------
# Phi-1.5 / Show-o import

SHOWO_SPECIAL_TOKENS = SPECIAL_TOKENS
"""Show-o's special tokens in its id order after the text vocabulary (``UniversalPrompting`` adds
``[PAD]`` as the pad token first, then the nine task/boundary tokens)."""


def phi_key_map(num_layers: int) -> Dict[str, List[str]]:
    """Phi key -> the model keys it fills (the MLP keys fill the token MoE, see :func:`load_phi_state_dict`)."""
    m: Dict[str, List[str]] = {
        "model.embed_tokens.weight": ["embed.weight"],
        "model.final_layernorm.weight": ["ln_f.weight"],
        "model.final_layernorm.bias": ["ln_f.bias"],
        "lm_head.weight": ["lm_head.weight"],
        "lm_head.bias": ["lm_head.bias"],
    }
    for i in range(num_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            m[f"{src}input_layernorm.{p}"] = [f"{dst}ln1.{p}"]
            for proj in ("q_proj", "k_proj", "v_proj", "dense"):
                m[f"{src}self_attn.{proj}.{p}"] = [f"{dst}attn.{proj}.{p}"]
            m[f"{src}mlp.fc1.{p}"] = [f"{dst}token_moe"]
            m[f"{src}mlp.fc2.{p}"] = [f"{dst}token_moe"]
    return m


def _read_state_dict(source) -> Dict[str, Tensor]:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if path.endswith(".safetensors"):
        return _safetensors().load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _vocab_rows(cfg: UniF2aceConfig, V_ckpt: int) -> List[tuple]:
    """(model row, checkpoint row) pairs of the vocabulary rows a checkpoint fills."""
    T = cfg.text_vocab_size
    pairs = [(i, i) for i in range(T)]
    if V_ckpt == cfg.vocab_size:  # Show-o: special tokens by name, then image codes and [MASK] as they are
        pairs += [(cfg.special_token_id(n), T + SHOWO_SPECIAL_TOKENS.index(n)) for n in SHOWO_SPECIAL_TOKENS]
        pairs += [(i, i) for i in range(cfg.image_token_offset, cfg.vocab_size)]
    return pairs


def load_phi_state_dict(model: UniF2ace, source) -> Dict[str, List[str]]:
    """Import a Phi-1.5 (HF ``PhiForCausalLM``) or Show-o (the same keys under ``showo.``) state dict
    into ``model`` so that the imported model computes the dense model's forward exactly.

    ``source``: a mapping, or a ``.safetensors`` / ``torch.save`` file. The model must have Phi's
    block (``block_layout="parallel"``), Phi's tanh gelu (``expert_activation="gelu_tanh"``) and
    shared experts as wide as the dense MLP (``shared_width = M``); ``preset("showo")`` is the
    paper model in that form. Key mapping, for every layer i::

        model.embed_tokens.weight                    -> embed.weight            (rows, see below)
        model.layers.i.input_layernorm.{weight,bias} -> blocks.i.ln1
        model.layers.i.self_attn.{q,k,v}_proj.*      -> blocks.i.attn.{q,k,v}_proj.*
        model.layers.i.self_attn.dense.*             -> blocks.i.attn.dense.*
        model.layers.i.mlp.fc1 / fc2                 -> blocks.i.token_moe (below)
        model.final_layernorm.{weight,bias}          -> ln_f
        lm_head.{weight,bias}                        -> lm_head                 (rows, see below)

    Token MoE, both groups: the shared expert *is* the dense MLP (fc1 -> shared_w1/b1, fc2 ->
    shared_w2/b2); routed expert e gets fc1 units ``(e·F + j) mod M`` as its input side and a zero
    output side (w2, b2 = 0), so it contributes nothing until trained while its input features start
    as the dense model's. The routers keep their initialisation. Sequence MoE: every block's
    ``seq_gain`` is set to 0 (no contribution; it and the experts train from there); LN3, the
    routers and the feature experts keep their initialisation.

    Vocabulary rows: the text rows ``[0, text_vocab_size)`` are copied. A checkpoint with exactly
    ``cfg.vocab_size`` rows (Show-o) also fills the special-token rows by name (Show-o's ids:
    :data:`SHOWO_SPECIAL_TOKENS`), the image-code rows and [MASK]; Phi's (51,200 padded rows) fills
    the text rows only. Raises :class:`CheckpointError` listing every missing key, unexpected key
    and shape mismatch, or naming the config fields that keep the import from being exact.
    Returns ``{"loaded": [...], "zeroed": [...], "initialised": [...]}`` (model keys filled from the
    checkpoint, set to zero, left at their initialisation).
    """
    cfg = model.cfg
    sd = _read_state_dict(source)
    if sd and all(k.startswith("showo.") for k in sd):
        sd = {k[len("showo.") :]: v for k, v in sd.items()}
    kmap = phi_key_map(cfg.num_layers)
    D, N, F, Fs = cfg.hidden_size, cfg.num_routed_experts, cfg.expert_width, cfg.shared_expert_width
    fc1 = sd.get("model.layers.0.mlp.fc1.weight")
    M = fc1.shape[0] if fc1 is not None else Fs
    V_ckpt = sd["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in sd else cfg.vocab_size
    expected: Dict[str, torch.Size] = {
        "model.embed_tokens.weight": torch.Size([V_ckpt, D]),
        "lm_head.weight": torch.Size([V_ckpt, D]),
        "lm_head.bias": torch.Size([V_ckpt]),
        "model.final_layernorm.weight": torch.Size([D]),
        "model.final_layernorm.bias": torch.Size([D]),
    }
    for i in range(cfg.num_layers):
        s = f"model.layers.{i}."
        for p in ("weight", "bias"):
            expected[f"{s}input_layernorm.{p}"] = torch.Size([D])
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            expected[f"{s}self_attn.{proj}.weight"] = torch.Size([D, D])
            expected[f"{s}self_attn.{proj}.bias"] = torch.Size([D])
        expected[f"{s}mlp.fc1.weight"] = torch.Size([M, D])
        expected[f"{s}mlp.fc1.bias"] = torch.Size([M])
        expected[f"{s}mlp.fc2.weight"] = torch.Size([D, M])
        expected[f"{s}mlp.fc2.bias"] = torch.Size([D])
    assert set(expected) == set(kmap)
    _check_match("load_phi_state_dict", expected, sd)
    problems = []
    if V_ckpt != cfg.vocab_size and V_ckpt < cfg.text_vocab_size:
        problems.append(
            f"the checkpoint vocabulary has {V_ckpt} rows, fewer than text_vocab_size="
            f"{cfg.text_vocab_size} (and not the full vocab_size={cfg.vocab_size})"
        )
    if cfg.block_layout != "parallel":
        problems.append(
            f"block_layout={cfg.block_layout!r}: Phi's block is parallel (attention and MLP both read LN1 x); "
            "build the model with block_layout='parallel' (preset 'showo')"
        )
    if cfg.expert_activation != "gelu_tanh":
        problems.append(
            f"expert_activation={cfg.expert_activation!r}: Phi's MLP uses the tanh gelu; "
            "build the model with expert_activation='gelu_tanh'"
        )
    if Fs != M:
        problems.append(
            f"shared expert width {Fs} != the dense MLP width {M}: the shared expert starts as the dense MLP; "
            f"build the model with shared_width={M} (preset 'showo')"
        )
    if not cfg.expert_bias:
        problems.append("expert_bias=False: Phi's MLP has biases")
    if problems:
        raise CheckpointError("load_phi_state_dict: " + "; ".join(problems))

    own = model.state_dict()
    loaded: Dict[str, Tensor] = {}
    zeroed: Dict[str, Tensor] = {}
    rows = torch.tensor(_vocab_rows(cfg, V_ckpt))
    for k in ("embed.weight", "lm_head.weight", "lm_head.bias"):
        src = "model.embed_tokens.weight" if k == "embed.weight" else k
        t = own[k].clone()
        t[rows[:, 0]] = sd[src][rows[:, 1]].to(t.dtype)
        loaded[k] = t
    for src, dsts in kmap.items():
        if "mlp." in src or src in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            continue
        for d in dsts:
            loaded[d] = sd[src].to(own[d].dtype).clone()
    units = (torch.arange(N)[:, None] * F + torch.arange(F)[None]) % M  # [N, F] fc1 units of each routed expert
    for i in range(cfg.num_layers):
        s, d = f"model.layers.{i}.mlp.", f"blocks.{i}.token_moe."
        w1, b1 = sd[s + "fc1.weight"], sd[s + "fc1.bias"]  # [M, D], [M]
        w2, b2 = sd[s + "fc2.weight"], sd[s + "fc2.bias"]  # [D, M], [D]
        G = own[d + "shared_w1"].shape[0]
        dt = own[d + "w1"].dtype
        loaded[d + "shared_w1"] = w1.t()[None].repeat(G, 1, 1).to(dt)
        loaded[d + "shared_b1"] = b1[None].repeat(G, 1).to(dt)
        loaded[d + "shared_w2"] = w2.t()[None].repeat(G, 1, 1).to(dt)
        loaded[d + "shared_b2"] = b2[None].repeat(G, 1).to(dt)
        loaded[d + "w1"] = w1[units].transpose(1, 2).repeat(G, 1, 1).to(dt)  # [G·N, D, F]
        loaded[d + "b1"] = b1[units].repeat(G, 1).to(dt)
        zeroed[d + "w2"] = torch.zeros_like(own[d + "w2"])
        zeroed[d + "b2"] = torch.zeros_like(own[d + "b2"])
        if cfg.seq_moe:
            zeroed[f"blocks.{i}.seq_gain"] = torch.zeros_like(own[f"blocks.{i}.seq_gain"])
    if model.image_pos is not None:  # Phi / Show-o have none: zero keeps the import exact
        zeroed["image_pos"] = torch.zeros_like(own["image_pos"])
    model.load_state_dict({**loaded, **zeroed}, strict=False)
    return {
        "loaded": sorted(loaded),
        "zeroed": sorted(zeroed),
        "initialised": sorted(set(own) - set(loaded) - set(zeroed)),
    }
