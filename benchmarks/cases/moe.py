"""Benchmark cases for the grouped MoE: "moe_routing" (gating + align) and "moe_mlp".

Shapes (docs/kernels.md §B):
  (c) CPU-sized: T = 2048, D = 256, 2 groups x 8 experts of width 256, top-4
      (quick: T = 256, and D = F = 128 for the MLP).
  (a) UniF2ace-sized, CUDA only: T = 8 x 512, D = 2048, 2 groups x 8 experts of width 1024, top-4.
  (b) Qwen3-30B-A3B-like, CUDA only: H = 2048, I = 768, E = 128, k = 8, T = 32768.
"""

from __future__ import annotations

from typing import List

import torch

from benchmarks.common import Case
from unif2ace.kernels import moe_align, moe_expert_mlp, moe_gating

BLOCK_M = 64


def _routing_cases(tag: str, device, T: int, sizes: List[int], k: int, dtype) -> List[Case]:
    E = sum(sizes)
    G = len(sizes)

    def setup():
        logits = torch.randn(T, E, device=device, dtype=dtype)
        gid = torch.randint(0, G, (T,), device=device)
        ids = moe_gating(logits, gid, sizes, k, backend="reference").expert_ids
        return {"router_logits": logits, "group_ids": gid, "expert_ids": ids}

    def gating(be):
        return lambda inp: moe_gating(inp["router_logits"], inp["group_ids"], sizes, k, backend=be)

    def align(be):
        return lambda inp: moe_align(inp["expert_ids"], E, BLOCK_M, backend=be)

    gating_impls = {
        "reference": gating("reference"),
        "cpu": gating("cpu"),
        "triton": gating("triton"),
        "cuda": gating("cuda"),
    }
    align_impls = {
        "reference": align("reference"),
        "cpu": align("cpu"),
        "cuda": align("cuda"),
        "triton": align("triton"),
    }
    shape = {"T": T, "groups": sizes, "k": k, "block_m": BLOCK_M}
    nbytes_align = T * k * 4 * 2 + (T * k + E * (BLOCK_M - 1)) * 4
    return [
        Case(
            family="moe_routing",
            op="moe_gating",
            name=f"{tag} gating T={T} E={E} k={k}",
            shape=shape,
            dtype=dtype,
            setup=setup,
            impls=gating_impls,
            bytes=float(T * E * torch.finfo(dtype).bits // 8 + T * k * 8),
        ),
        Case(
            family="moe_routing",
            op="moe_align",
            name=f"{tag} align T={T} E={E} k={k}",
            shape=shape,
            dtype=torch.int32,
            setup=setup,
            impls=align_impls,
            bytes=float(nbytes_align),
            compile=False,
        ),
    ]


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
    )


def cases(device: torch.device, quick: bool) -> List[Case]:
    device = torch.device(device)
    out: List[Case] = []
    T = 256 if quick else 2048
    out += _routing_cases("(c)", device, T, [8, 8], 4, torch.float32)
    D = F = 128 if quick else 256
    out.append(_mlp_case("(c)", device, T, D, F, 16, 4, torch.float32))
    if device.type == "cuda":
        out += _routing_cases("(a)", device, 8 * 512, [8, 8], 4, torch.bfloat16)
        out.append(_mlp_case("(a)", device, 8 * 512, 2048, 1024, 16, 4, torch.bfloat16))
        if not quick:
            out += _routing_cases("(b)", device, 32768, [128], 8, torch.bfloat16)
            out.append(_mlp_case("(b)", device, 32768, 2048, 768, 128, 8, torch.bfloat16, activation="swiglu"))
    return out
