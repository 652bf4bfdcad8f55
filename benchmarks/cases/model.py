"""Benchmark cases for the model layer: family "model_step", one training step of UniF²ace.

Each case times ``model(batch)`` (forward: every loss part) and forward + ``loss.backward()`` with
every kernel op forced to the reference (``model.set_backend("reference")``, impl "reference")
and with the fastest backend of each op (``set_backend("auto")``, impl "fused"). The batch mixes
T2I and MMU samples half and half. Tokens per step are in ``shape["tokens"]``: tokens/s =
tokens / median time. ``flops`` is an estimate (2 x active parameters per token x tokens, the
attention score/value products and the codebook/vocabulary heads), so TFLOP/s is approximate.

Shapes: ``tiny`` (B = 4 in quick mode, 8 otherwise) and ``small`` (B = 4, full mode only: a
reference step takes seconds on 2 cores) on CPU; ``small`` with B = 16 on CUDA.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from benchmarks.common import Case
from unif2ace.model import Sample, UniF2ace, collate, preset

_MODELS: Dict[tuple, UniF2ace] = {}


def _model(name: str, device) -> UniF2ace:
    key = (name, str(device))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = UniF2ace(preset(name)).to(device)
    return _MODELS[key]


def _batch(cfg, B: int, device):
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(B):
        codes = torch.randint(0, cfg.codebook_size, (cfg.image_tokens,), generator=g)
        text = torch.randint(0, cfg.text_vocab_size - 2, (cfg.text_len // 2 - 2,), generator=g).tolist()
        if i % 2 == 0:
            samples.append(Sample("t2i", codes, text))
        else:
            ans = torch.randint(0, cfg.text_vocab_size - 2, (cfg.text_len // 2 - 2,), generator=g).tolist()
            samples.append(
                Sample(
                    "mmu",
                    codes,
                    text,
                    ans,
                    clip_features=torch.randn(cfg.clip_tokens, cfg.clip_dim, generator=g),
                    face_embedding=torch.randn(cfg.face_dim, generator=g),
                )
            )
    b = collate(cfg, samples, generator=g, device=device)
    b.noise_features = torch.randn(B, cfg.noise_tokens, cfg.noise_dim, generator=g).to(device)
    return b.validate(cfg)


def _flops(cfg, tokens: int, B: int) -> float:
    D, S = cfg.hidden_size, cfg.seq_len
    active = 4 * D * D + (cfg.top_k * cfg.expert_width + cfg.shared_expert_width) * D * (
        3 if cfg.expert_activation == "swiglu" else 2
    )
    attn = 4 * S * D  # QK^T and PV per token
    per_layer = 2 * active * tokens + attn * tokens
    heads = 2 * D * (cfg.codebook_size * cfg.image_tokens * B // 2 + cfg.vocab_size * S * B // 2)
    return float(cfg.num_layers * per_layer + heads)


def _case(name: str, B: int, device) -> Case:
    cfg = preset(name)

    def setup():
        model = _model(name, device)
        model.zero_grad(set_to_none=True)
        return {"model": model, "batch": _batch(cfg, B, device)}

    def step(backend):
        def run(inp):
            model = inp["model"].set_backend(backend)
            return model(inp["batch"], validate=False)

        return run

    tokens = B * cfg.seq_len
    return Case(
        family="model_step",
        op="UniF2ace.forward",
        name=f"{name} B={B} S={cfg.seq_len}",
        shape={
            "preset": name,
            "B": B,
            "S": cfg.seq_len,
            "tokens": tokens,
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size,
        },
        dtype=torch.float32,
        setup=setup,
        impls={"reference": step("reference"), "fused": step("auto")},
        backward=lambda out: out.loss,
        flops=_flops(cfg, tokens, B),
        compile=False,
    )


def cases(device: torch.device, quick: bool) -> List[Case]:
    device = torch.device(device)
    if device.type == "cuda":
        return [_case("small", 16, device)]
    if quick:
        return [_case("tiny", 4, device)]
    return [_case("tiny", 8, device), _case("small", 4, device)]
