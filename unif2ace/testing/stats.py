"""Goodness-of-fit statistics for the sampling tests (scipy is not a dependency)."""

from __future__ import annotations

import math

import torch


def chi2_sf(x: float, k: int) -> float:
    """Survival function of the chi-squared distribution with k degrees of freedom, i.e. the
    regularised upper incomplete gamma Q(k/2, x/2) (series / continued fraction)."""
    a, z = 0.5 * k, 0.5 * x
    if z <= 0:
        return 1.0
    lg = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:  # series for P, then Q = 1 - P
        term = s = 1.0 / a
        n = a
        for _ in range(10000):
            n += 1
            term *= z / n
            s += term
            if abs(term) < abs(s) * 1e-15:
                break
        return max(0.0, 1.0 - s * math.exp(lg))
    b = z + 1 - a  # Lentz continued fraction for Q
    c, d = 1e300, 1.0 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(lg) * h


def chi2_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """χ² goodness of fit of ``samples`` (codes) against ``probs`` over the bins with p > 0; a code
    drawn where p == 0 fails outright."""
    V = probs.numel()
    counts = torch.bincount(samples.flatten(), minlength=V).double()
    zero = probs == 0
    assert counts[zero].sum() == 0, f"codes with probability 0 were drawn: {zero.nonzero().flatten().tolist()}"
    n = counts.sum()
    exp = probs[~zero].double() * n
    assert float(exp.min()) >= 5, "test design: expected counts too small for χ²"
    stat = float(((counts[~zero] - exp) ** 2 / exp).sum())
    return chi2_sf(stat, int((~zero).sum()) - 1)
