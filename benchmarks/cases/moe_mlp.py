"""Benchmark cases of ``moe_expert_mlp`` (family "moe_mlp"), forward and forward+backward.

Shapes (docs/kernels.md §B):
  (c) CPU-sized: T = 2048, D = F = 256, 16 experts, top-4 (quick: T = 256, D = F = 128).
  (a) UniF2ace-sized, CUDA only: T = 8 x 512, D = 2048, F = 1024, 16 experts, top-4.
  (b) Qwen3-30B-A3B-like, CUDA only: H = 2048, I = 768, E = 128, k = 8, T = 32768, SwiGLU.

Peers (benchmarks/peers.py): tokens sorted by expert, then ``torch._grouped_mm`` (where this torch
and device have it) or a per-expert loop of ``torch.mm``; the same gated combine in fp32.
Limit: ``torch.mm`` at the per-expert shapes ([T·k/E, D] x [D, F] and [T·k/E, F] x [F, D], E of
each) in the case's dtype.
"""

from __future__ import annotations

from typing import List

import torch

from benchmarks import peers
from benchmarks.common import Case, Gemm, Limit
from unif2ace.kernels import moe_expert_mlp, moe_gating


def _mlp_case(tag: str, device, T: int, D: int, F: int, E: int, k: int, dtype, activation="gelu") -> Case:
    F1 = 2 * F if activation == "swiglu" else F

    def setup():
        x = (torch.randn(T, D, device=device) * 0.1).to(dtype).requires_grad_(True)
        w1 = (torch.randn(E, D, F1, device=device) * D**-0.5).to(dtype).requires_grad_(True)
        w2 = (torch.randn(E, F, D, device=device) * F**-0.5).to(dtype).requires_grad_(True)
        logits = torch.randn(T, E, device=device)
        r = moe_gating(logits, torch.zeros(T, dtype=torch.long, device=device), [E], k, backend="reference")
        gates = r.gates.requires_grad_(True)
        return {"x": x, "w1": w1, "w2": w2, "expert_ids": r.expert_ids, "gates": gates}

    def mlp(be):
        return lambda i: moe_expert_mlp(
            i["x"], i["w1"], i["w2"], i["expert_ids"], i["gates"], activation=activation, backend=be
        )

    mult = 3 if activation == "swiglu" else 2
    m = -(-T * k // E)  # rows per expert, balanced
    esz = torch.finfo(dtype).bits // 8
    return Case(
        family="moe_mlp",
        op="moe_expert_mlp",
        name=f"{tag} T={T} D={D} F={F} E={E} k={k} {activation}",
        shape={"T": T, "D": D, "F": F, "E": E, "k": k, "activation": activation},
        dtype=dtype,
        setup=setup,
        impls={"reference": mlp("reference"), "cpu": mlp("cpu"), "triton": mlp("triton")},
        backward=lambda out: out.float().square().mean(),
        flops=float(2 * T * k * D * F * mult),
        bytes=float(esz * (2 * T * D + E * D * F1 + E * F * D) + T * k * 8),
        peers=peers.moe_mlp_peers(activation),
        limit=Limit(gemms=(Gemm(m, D, F1, E), Gemm(m, F, D, E)), note="rows per expert if balanced"),
    )


def cases(device: torch.device, quick: bool) -> List[Case]:
    device = torch.device(device)
    T = 256 if quick else 2048
    D = F = 128 if quick else 256
    out = [_mlp_case("(c)", device, T, D, F, 16, 4, torch.float32)]
    if device.type == "cpu" and not quick:  # the bf16 GEMM path (oneDNN) against the fp32 one above
        out.append(_mlp_case("(c)", device, T, D, F, 16, 4, torch.bfloat16))
    if device.type == "cuda":
        out.append(_mlp_case("(a)", device, 8 * 512, 2048, 1024, 16, 4, torch.bfloat16))
        if not quick:
            out.append(_mlp_case("(b)", device, 32768, 2048, 768, 128, 8, torch.bfloat16, activation="swiglu"))
    return out
