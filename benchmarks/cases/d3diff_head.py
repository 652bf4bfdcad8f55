"""Benchmark cases for the D3Diff loss fused with the LM head (family "d3diff_head": ``d3diff_loss``),
on the shapes of benchmarks/cases/d3diff.py (see there); bytes per forward: hidden + weight read
once; FLOPs: 2·N·D·V.
"""

from __future__ import annotations

import torch

from benchmarks.cases.d3diff import family_cases

FAMILY = "d3diff_head"


def cases(device: torch.device, quick: bool):
    return family_cases(device, quick, FAMILY, True, ("reference", "cpu", "triton"))
