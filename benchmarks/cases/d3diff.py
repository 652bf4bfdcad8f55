"""Benchmark cases for the D3Diff loss from logits (family "d3diff": ``d3diff_loss_from_logits``).
The loss fused with the head, on the same shapes, is benchmarks/cases/d3diff_head.py (family
"d3diff_head"); ``run.py d3diff`` selects both.

(c) CPU-sized: N = 2048 rows (8 samples × 256), D = 512, V = 8192, masking rate 0.5 (about half
    the rows ignored), forward and forward+backward. Quick mode: N = 512.
(a) UniF²ace shape (CUDA only): 8 × 256 rows, D = 2048, V = 8192, rate 0.5.
(b) large-vocabulary cross-entropy (CUDA only): N = 8192, D = 2304, V = 256000, α = 0, every row
    carries loss (plain next-token CE through the same op).

fp32 on CPU, bf16 on CUDA. Bytes per forward: the logits read once (from-logits) or hidden +
weight read once (fused); FLOPs for the fused op: 2·N·D·V.
"""

from __future__ import annotations

import torch

from benchmarks.common import Case
from unif2ace.kernels import BackendUnavailableError, d3diff_loss, d3diff_loss_from_logits

FAMILY = "d3diff"


def shapes(device: torch.device, quick: bool):
    """(label, N, D, V, masking rate, alpha) of every case, and the dtype."""
    cuda = device.type == "cuda"
    out = [("(c)", 512 if quick else 2048, 512, 8192, 0.5, 0.01)]
    if cuda:
        out.append(("(a)", 8 * 256, 2048, 8192, 0.5, 0.01))
        if not quick:
            out.append(("(b)", 8192, 2304, 256000, 1.0, 0.0))
    return out, torch.bfloat16 if cuda else torch.float32


def inputs(device, dtype, N, D, V, rows_per_sample, rate, alpha, fused, seed=0):
    def setup():
        g = torch.Generator().manual_seed(seed)
        B = max(1, N // rows_per_sample)
        target = torch.randint(0, V, (N,), generator=g)
        if rate < 1.0:
            target[torch.rand(N, generator=g) >= rate] = -100
        inp = {
            "target": target.to(device),
            "sample_index": (torch.arange(N) // rows_per_sample).clamp_max(B - 1).to(device),
            "mask_rate": torch.full((B,), rate).to(device) if alpha else None,
            "mask_rate_deriv": (torch.rand(B, generator=g) + 0.5).to(device) if alpha else None,
        }
        if fused:
            inp["hidden"] = (torch.randn(N, D, generator=g)).to(device, dtype).requires_grad_()
            inp["weight"] = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype).requires_grad_()
        else:
            inp["logits"] = (torch.randn(N, V, generator=g) * 2).to(device, dtype).requires_grad_()
        return inp

    return setup


def _call(fused, backend, alpha):
    def fn(inp):
        kw = dict(alpha=alpha, backend=backend)
        if alpha:
            kw.update(
                sample_index=inp["sample_index"], mask_rate=inp["mask_rate"], mask_rate_deriv=inp["mask_rate_deriv"]
            )
        if fused:
            return tuple(d3diff_loss(inp["hidden"], inp["weight"], inp["target"], **kw))
        return tuple(d3diff_loss_from_logits(inp["logits"], inp["target"], **kw))

    return fn


def _interpreter_too_slow(inp):
    raise BackendUnavailableError("triton on CPU runs under the interpreter only; too slow to benchmark")


def impls(device, fused, alpha, backends):
    """backend -> fn(inputs); triton only on CUDA (the interpreter is too slow to time)."""
    out = {}
    for be in backends:
        slow = be == "triton" and device.type != "cuda"
        out[be] = _interpreter_too_slow if slow else _call(fused, be, alpha)
    return out


def family_cases(device: torch.device, quick: bool, family: str, fused: bool, backends):
    """The cases of one op (``fused``: ``d3diff_loss``, else ``d3diff_loss_from_logits``)."""
    sizes, dtype = shapes(device, quick)
    elt = torch.tensor([], dtype=dtype).element_size()
    return [
        Case(
            family=family,
            op="d3diff_loss" if fused else "d3diff_loss_from_logits",
            name=f"{label} N={N} D={D} V={V}" if fused else f"{label} N={N} V={V}",
            shape={"N": N, "D": D, "V": V, "mask_rate": rate, "alpha": alpha},
            dtype=dtype,
            setup=inputs(device, dtype, N, D, V, 256, rate, alpha, fused=fused),
            impls=impls(device, fused, alpha, backends),
            backward=lambda o: o[0],
            flops=2.0 * N * D * V if fused else None,
            bytes=float(((N * D + V * D) if fused else N * V) * elt),
        )
        for label, N, D, V, rate, alpha in sizes
    ]


def cases(device: torch.device, quick: bool):
    # cuda is skipped by the runner where the CUDA extension is absent
    return family_cases(device, quick, FAMILY, False, ("reference", "cpu", "triton", "cuda"))
