"""Helpers of the sampling test files (tests/test_sampling*.py)."""

import math

import torch

# The settings of a deterministic masked step: every masked position takes its argmax code, and its
# confidence is that code's log-probability (no Gumbel noise), so every backend must agree exactly.
GREEDY = dict(temperature=0.0, confidence_noise=0.0)


def special_rows(B: int, L: int, V: int) -> torch.Tensor:
    """Random logits ``[B, L, V]`` (V >= 6) whose sample 0 holds the special rows: at position 1 every
    other code NaN, at 2 all NaN, at 4 all -inf, at 3 code 5 +inf."""
    c = torch.randn(B, L, V)
    c[0, 1, ::2] = float("nan")  # partially NaN: NaN codes act as -inf
    c[0, 2] = float("nan")  # all NaN
    c[0, 4] = float("-inf")  # all -inf
    c[0, 3, 5] = math.inf  # +inf acts as FLT_MAX: always drawn, log p = 0
    return c
