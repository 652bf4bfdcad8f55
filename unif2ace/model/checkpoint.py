"""Checkpoints: safetensors save/load of a :class:`UniF2ace`, and the Phi-1.5 / Show-o importer.

``save_checkpoint(model, path)`` writes every parameter and buffer plus the config (JSON, in the
safetensors metadata). ``load_checkpoint(path)`` rebuilds the model from that config, or loads
into a given model; missing keys, unexpected keys and shape mismatches raise
:class:`CheckpointError` listing all of them.

``load_phi_state_dict(model, source)`` imports a dense Phi-1.5 (HF ``PhiForCausalLM``) or Show-o
(the same keys under ``showo.``) state dict. Key mapping, for every layer i::

    model.embed_tokens.weight                    -> embed.weight            (rows, see below)
    model.layers.i.input_layernorm.{weight,bias} -> blocks.i.ln1 and blocks.i.ln2 (copied; no ln2 when parallel)
    model.layers.i.self_attn.{q,k,v}_proj.*      -> blocks.i.attn.{q,k,v}_proj.*
    model.layers.i.self_attn.dense.*             -> blocks.i.attn.dense.*
    model.layers.i.mlp.fc1.{weight,bias}         -> blocks.i.token_moe.{w1,b1,shared_w1,shared_b1}  (up-cycled)
    model.layers.i.mlp.fc2.{weight,bias}         -> blocks.i.token_moe.{w2,b2,shared_w2,shared_b2}  (up-cycled)
    model.final_layernorm.{weight,bias}          -> ln_f
    lm_head.{weight,bias}                        -> lm_head                 (rows, see below)

Vocabulary rows: a checkpoint with exactly ``cfg.vocab_size`` rows (Show-o) is copied whole;
otherwise (Phi: 51,200 padded text rows) the first ``text_vocab_size`` rows are copied and the
special, image-code and [MASK] rows keep their initialisation.

Up-cycling the dense MLP (width M, hidden units u): with N routed experts of width F = M / N
(required), routed expert e of *both* groups gets units ``[e·F, (e+1)·F)`` (fc1 rows and bias,
fc2 columns) and a zero output bias; the shared expert of both groups gets units ``[0, Fs)`` and
the dense fc2 bias. (Phi's MLP is the tanh gelu: use ``expert_activation="gelu_tanh"`` for an
exact copy of its functions; swiglu experts cannot be up-cycled from it.)
Not in the checkpoint, left at their initialisation: LN3, the routers, the sequence MoE.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor

from .config import UniF2aceConfig
from .model import UniF2ace

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_phi_state_dict", "phi_key_map"]


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
    if model is None:
        if "config" not in meta:
            raise CheckpointError(f"load_checkpoint: {path} has no stored config; pass the model to load into")
        model = UniF2ace(UniF2aceConfig.from_json(meta["config"]))
    tensors = st.load_file(str(path), device=str(map_location))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_match(f"load_checkpoint({os.fspath(path)!r})", expected, tensors)
    model.load_state_dict(tensors)
    return model


# ------------------------------------------------------------------------------------------------
# Phi-1.5 / Show-o import


def phi_key_map(num_layers: int, sequential: bool = True) -> Dict[str, List[str]]:
    """Phi key -> the model keys it fills (MLP keys map to the token MoE, handled by up-cycling)."""
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
            m[f"{src}input_layernorm.{p}"] = [f"{dst}ln1.{p}"] + ([f"{dst}ln2.{p}"] if sequential else [])
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


def load_phi_state_dict(model: UniF2ace, source) -> Dict[str, List[str]]:
    """Import a Phi-1.5 / Show-o state dict (a mapping, or a ``.safetensors`` / ``torch.save`` file)
    into ``model`` (see the module docstring for the mapping). Raises :class:`CheckpointError` listing
    every missing key, unexpected key and shape mismatch. Returns ``{"loaded": [...],
    "initialised": [...]}`` (model keys filled from the checkpoint / left at their init)."""
    cfg = model.cfg
    sd = _read_state_dict(source)
    if sd and all(k.startswith("showo.") for k in sd):
        sd = {k[len("showo.") :]: v for k, v in sd.items()}
    kmap = phi_key_map(cfg.num_layers, cfg.block_layout == "sequential")
    D, N, F, Fs = cfg.hidden_size, cfg.num_routed_experts, cfg.expert_width, cfg.shared_expert_width
    M = None
    fc1 = sd.get("model.layers.0.mlp.fc1.weight")
    if fc1 is not None:
        M = fc1.shape[0]
    # the shapes the Phi checkpoint must have for this model
    V_ckpt = sd["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in sd else cfg.vocab_size
    expected: Dict[str, torch.Size] = {
        "model.embed_tokens.weight": torch.Size([V_ckpt, D]),
        "lm_head.weight": torch.Size([V_ckpt, D]),
        "lm_head.bias": torch.Size([V_ckpt]),
        "model.final_layernorm.weight": torch.Size([D]),
        "model.final_layernorm.bias": torch.Size([D]),
    }
    Mx = M if M is not None else N * F
    for i in range(cfg.num_layers):
        s = f"model.layers.{i}."
        for p in ("weight", "bias"):
            expected[f"{s}input_layernorm.{p}"] = torch.Size([D])
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            expected[f"{s}self_attn.{proj}.weight"] = torch.Size([D, D])
            expected[f"{s}self_attn.{proj}.bias"] = torch.Size([D])
        expected[f"{s}mlp.fc1.weight"] = torch.Size([Mx, D])
        expected[f"{s}mlp.fc1.bias"] = torch.Size([Mx])
        expected[f"{s}mlp.fc2.weight"] = torch.Size([D, Mx])
        expected[f"{s}mlp.fc2.bias"] = torch.Size([D])
    assert set(expected) == set(kmap)
    _check_match("load_phi_state_dict", expected, sd)
    problems = []
    if V_ckpt != cfg.vocab_size and V_ckpt < cfg.text_vocab_size:
        problems.append(
            f"the checkpoint vocabulary has {V_ckpt} rows, fewer than text_vocab_size="
            f"{cfg.text_vocab_size} (and not the full vocab_size={cfg.vocab_size})"
        )
    if Mx != N * F:
        problems.append(
            f"dense MLP width {Mx} != num_routed_experts x expert_width = {N} x {F}; "
            "up-cycling splits the dense MLP into the routed experts exactly"
        )
    if Fs > Mx:
        problems.append(f"shared expert width {Fs} exceeds the dense MLP width {Mx}")
    if cfg.expert_activation == "swiglu":
        problems.append("expert_activation='swiglu' experts cannot be up-cycled from Phi's gelu MLP")
    if problems:
        raise CheckpointError("load_phi_state_dict: " + "; ".join(problems))

    own = model.state_dict()
    new: Dict[str, Tensor] = {}
    rows = cfg.vocab_size if V_ckpt == cfg.vocab_size else cfg.text_vocab_size
    for k in ("embed.weight", "lm_head.weight", "lm_head.bias"):
        src = "model.embed_tokens.weight" if k == "embed.weight" else k
        t = own[k].clone()
        t[:rows] = sd[src][:rows].to(t.dtype)
        new[k] = t
    for src, dsts in kmap.items():
        if "mlp." in src or src in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            continue
        for d in dsts:
            new[d] = sd[src].to(own[d].dtype).clone()
    for i in range(cfg.num_layers):
        s, d = f"model.layers.{i}.mlp.", f"blocks.{i}.token_moe."
        w1, b1 = sd[s + "fc1.weight"].float(), sd[s + "fc1.bias"].float()  # [M, D], [M]
        w2, b2 = sd[s + "fc2.weight"].float(), sd[s + "fc2.bias"].float()  # [D, M], [D]
        routed_w1 = w1.view(N, F, D).transpose(1, 2)  # [N, D, F]
        routed_w2 = w2.t().reshape(N, F, D)  # [N, F, D]
        G = own[d + "w1"].shape[0] // N
        dt = own[d + "w1"].dtype
        new[d + "w1"] = routed_w1.repeat(G, 1, 1).to(dt)
        new[d + "w2"] = routed_w2.repeat(G, 1, 1).to(dt)
        new[d + "shared_w1"] = w1[:Fs].t()[None].repeat(G, 1, 1).to(dt)
        new[d + "shared_w2"] = w2[:, :Fs].t()[None].repeat(G, 1, 1).to(dt)
        if cfg.expert_bias:
            new[d + "b1"] = b1.view(N, F).repeat(G, 1).to(dt)
            new[d + "b2"] = torch.zeros(G * N, D, dtype=dt)
            new[d + "shared_b1"] = b1[:Fs][None].repeat(G, 1).to(dt)
            new[d + "shared_b2"] = b2[None].repeat(G, 1).to(dt)
    model.load_state_dict(new, strict=False)
    return {"loaded": sorted(new), "initialised": sorted(set(own) - set(new))}
