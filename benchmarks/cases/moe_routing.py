"""Benchmark cases of ``moe_align`` (family "moe_routing"): the expert ids of the routing shapes of
benchmarks/cases/moe_gating.py (docs/kernels.md §B) sorted into block-padded per-expert lists; a
routing step is the gating row plus this one."""

from __future__ import annotations

from typing import List

import torch

from benchmarks.cases.moe_gating import routing_setup, shapes
from benchmarks.common import Case, copy_limit
from unif2ace.kernels import moe_align

BLOCK_M = 64


def _align_case(tag: str, device, T: int, sizes: List[int], k: int, dtype) -> Case:
    E = sum(sizes)

    def align(be):
        return lambda inp: moe_align(inp["expert_ids"], E, BLOCK_M, backend=be)

    return Case(
        family="moe_routing",
        op="moe_align",
        name=f"{tag} align T={T} E={E} k={k}",
        shape={"T": T, "groups": sizes, "k": k, "block_m": BLOCK_M},
        dtype=torch.int32,
        setup=routing_setup(device, T, sizes, k, dtype),
        impls={be: align(be) for be in ("reference", "cpu", "cuda", "triton")},
        bytes=float(T * k * 4 * 2 + (T * k + E * (BLOCK_M - 1)) * 4),
        compile=False,
        limit=copy_limit(T * k * 4 * 2 + (T * k + E * (BLOCK_M - 1)) * 4),
    )


def cases(device: torch.device, quick: bool) -> List[Case]:
    device = torch.device(device)
    return [_align_case(tag, device, T, sizes, k, dtype) for tag, T, sizes, k, dtype in shapes(device, quick)]
