"""Benchmark cases of ``moe_gating`` (family "moe_gating").

Shapes (docs/kernels.md §B):
  (c) CPU-sized: T = 2048 (quick: 256), 2 groups x 8 experts, top-4.
  (a) UniF2ace-sized, CUDA only: T = 8 x 512, 2 groups x 8 experts, top-4.
  (b) Qwen3-30B-A3B-like, CUDA only: E = 128, k = 8, T = 32768.
"""

from __future__ import annotations

from typing import List

import torch

from benchmarks.common import Case, copy_limit
from unif2ace.kernels import moe_gating

# (tag, T, group sizes, k, dtype) for the CPU, then the CUDA-only and the CUDA full-size shapes
SHAPES_CPU = [("(c)", 2048, [8, 8], 4, torch.float32)]
SHAPES_CUDA = [("(a)", 8 * 512, [8, 8], 4, torch.bfloat16)]
SHAPES_CUDA_FULL = [("(b)", 32768, [128], 8, torch.bfloat16)]


def shapes(device: torch.device, quick: bool):
    """The routing shapes of this device (shared with the moe_routing cases)."""
    out = [(tag, 256 if quick else T, sizes, k, dtype) for tag, T, sizes, k, dtype in SHAPES_CPU]
    if device.type == "cuda":
        out += SHAPES_CUDA + ([] if quick else SHAPES_CUDA_FULL)
    return out


def routing_setup(device, T: int, sizes: List[int], k: int, dtype):
    """Inputs of the routing cases: router logits, group ids and the reference gating's expert ids."""

    def setup():
        logits = torch.randn(T, sum(sizes), device=device, dtype=dtype)
        gid = torch.randint(0, len(sizes), (T,), device=device)
        ids = moe_gating(logits, gid, sizes, k, backend="reference").expert_ids
        return {"router_logits": logits, "group_ids": gid, "expert_ids": ids}

    return setup


def _gating_case(tag: str, device, T: int, sizes: List[int], k: int, dtype) -> Case:
    E = sum(sizes)

    def gating(be):
        return lambda inp: moe_gating(inp["router_logits"], inp["group_ids"], sizes, k, backend=be)

    return Case(
        family="moe_gating",
        op="moe_gating",
        name=f"{tag} gating T={T} E={E} k={k}",
        shape={"T": T, "groups": sizes, "k": k, "block_m": 64},  # block_m: moe_routing's align block
        dtype=dtype,
        setup=routing_setup(device, T, sizes, k, dtype),
        impls={be: gating(be) for be in ("reference", "cpu", "triton", "cuda")},
        bytes=float(T * E * torch.finfo(dtype).bits // 8 + T * k * 8),
        limit=copy_limit(T * E * torch.finfo(dtype).bits // 8 + T * k * 8, note="logits read, ids + gates written"),
    )


def cases(device: torch.device, quick: bool) -> List[Case]:
    device = torch.device(device)
    return [_gating_case(tag, device, T, sizes, k, dtype) for tag, T, sizes, k, dtype in shapes(device, quick)]
