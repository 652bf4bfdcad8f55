"""Benchmark cases for the D3Diff loss family (family "d3diff_loss").

(c) CPU-sized: N = 2048 rows (8 samples × 256), D = 512, V = 8192, masking rate 0.5 (about half
    the rows ignored); ``d3diff_loss_from_logits`` (logits given) and ``d3diff_loss`` (fused with
    the head), forward and forward+backward. Quick mode: N = 512.
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

FAMILY = "d3diff_loss"


def _inputs(device, dtype, N, D, V, rows_per_sample, rate, alpha, fused, seed=0):
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


def _cases_for(device, label, N, D, V, rate, alpha, dtype):
    elt = torch.tensor([], dtype=dtype).element_size()
    shape = {"N": N, "D": D, "V": V, "mask_rate": rate, "alpha": alpha}
    out = []
    # from logits
    impls = {"reference": _call(False, "reference", alpha), "cpu": _call(False, "cpu", alpha)}
    impls["triton"] = _call(False, "triton", alpha) if device.type == "cuda" else _interpreter_too_slow
    impls["cuda"] = _call(False, "cuda", alpha)  # skipped by the runner where the CUDA extension is absent
    out.append(
        Case(
            family=FAMILY,
            op="d3diff_loss_from_logits",
            name=f"{label} N={N} V={V}",
            shape=dict(shape),
            dtype=dtype,
            setup=_inputs(device, dtype, N, D, V, 256, rate, alpha, fused=False),
            impls=impls,
            backward=lambda o: o[0],
            bytes=float(N * V * elt),
        )
    )
    # fused with the head
    impls = {"reference": _call(True, "reference", alpha), "cpu": _call(True, "cpu", alpha)}
    impls["triton"] = _call(True, "triton", alpha) if device.type == "cuda" else _interpreter_too_slow
    out.append(
        Case(
            family=FAMILY,
            op="d3diff_loss",
            name=f"{label} N={N} D={D} V={V}",
            shape=dict(shape),
            dtype=dtype,
            setup=_inputs(device, dtype, N, D, V, 256, rate, alpha, fused=True),
            impls=impls,
            backward=lambda o: o[0],
            flops=2.0 * N * D * V,
            bytes=float((N * D + V * D) * elt),
        )
    )
    return out


def cases(device: torch.device, quick: bool):
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    out = _cases_for(device, "(c)", 512 if quick else 2048, 512, 8192, 0.5, 0.01, dtype)
    if cuda:
        out += _cases_for(device, "(a)", 8 * 256, 2048, 8192, 0.5, 0.01, dtype)
        if not quick:
            out += _cases_for(device, "(b)", 8192, 2304, 256000, 1.0, 0.0, dtype)
    return out
