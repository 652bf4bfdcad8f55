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

CE-equivalent cases ("CE", α = 0: mean cross-entropy over the rows whose target is not -100, the
math every peer computes -- benchmarks/peers.py): shape (c) with every row carrying loss and with
half the rows ignored, fp32 and bf16 on CPU (quick: fp32, half the rows ignored); (a) both ways on CUDA, bf16; and
(b), which is CE already. Peers: Cut Cross-Entropy, Liger-Kernel, eager PyTorch.

Limits (benchmarks/common.py): the fused op is judged against ``torch.mm`` at [rows that carry
loss, D] x [D, V] in the case's dtype (forward; forward+backward adds dX and dW); the from-logits
op against the copy bandwidth for reading the logits of those rows (forward; forward+backward
also writes the [N, V] gradient).
"""

from __future__ import annotations

import torch

from benchmarks import peers
from benchmarks.common import Case, Gemm, Limit, copy_limit
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


def ce_shapes(device: torch.device, quick: bool):
    """(label, N, D, V, rate, dtype) of the CE-equivalent cases (α = 0) that the peers run."""
    if device.type == "cuda":
        return [("(a) CE", 8 * 256, 2048, 8192, r, torch.bfloat16) for r in (1.0, 0.5)]
    if quick:  # one case keeps quick runs short: the masked-row one
        return [("(c) CE", 512, 512, 8192, 0.5, torch.float32)]
    return [("(c) CE", 2048, 512, 8192, r, dt) for dt in (torch.float32, torch.bfloat16) for r in (1.0, 0.5)]


def _targets(g, N, V, rate):
    target = torch.randint(0, V, (N,), generator=g)
    if rate < 1.0:
        target[torch.rand(N, generator=g) >= rate] = -100
    return target


def rows_with_loss(N, V, rate, seed=0) -> int:
    """How many rows of the case's target carry loss (the rest are -100)."""
    return int((_targets(torch.Generator().manual_seed(seed), N, V, rate) != -100).sum())


def inputs(device, dtype, N, D, V, rows_per_sample, rate, alpha, fused, seed=0):
    def setup():
        g = torch.Generator().manual_seed(seed)
        B = max(1, N // rows_per_sample)
        target = _targets(g, N, V, rate)
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


def limit(fused, N, D, V, rate, dtype) -> Limit:
    """The work the op cannot avoid: only the rows that carry loss need logits."""
    M = rows_with_loss(N, V, rate)
    note = f"{M} of {N} rows carry loss"
    if fused:
        return Limit(gemms=(Gemm(M, D, V),), note=note)
    elt = torch.tensor([], dtype=dtype).element_size()
    return copy_limit(M * V * elt, (M + N) * V * elt, note=note + "; fwd+bwd also writes the gradient")


def _case(device, family, fused, backends, label, N, D, V, rate, alpha, dtype) -> Case:
    elt = torch.tensor([], dtype=dtype).element_size()
    ce = alpha == 0  # plain masked cross-entropy: the peers compute the same
    name = f"{label} N={N} D={D} V={V}" if fused else f"{label} N={N} V={V}"
    if ce and rate < 1.0:
        name += f" rate={rate:g}"
    return Case(
        family=family,
        op="d3diff_loss" if fused else "d3diff_loss_from_logits",
        name=name,
        shape={"N": N, "D": D, "V": V, "mask_rate": rate, "alpha": alpha},
        dtype=dtype,
        setup=inputs(device, dtype, N, D, V, 256, rate, alpha, fused=fused),
        impls=impls(device, fused, alpha, backends),
        backward=lambda o: o[0],
        flops=2.0 * N * D * V if fused else None,
        bytes=float(((N * D + V * D) if fused else N * V) * elt),
        peers=peers.loss_peers(fused) if ce else {},
        limit=limit(fused, N, D, V, rate, dtype),
    )


def family_cases(device: torch.device, quick: bool, family: str, fused: bool, backends):
    """The cases of one op (``fused``: ``d3diff_loss``, else ``d3diff_loss_from_logits``)."""
    sizes, dtype = shapes(device, quick)
    out = [_case(device, family, fused, backends, *size, dtype) for size in sizes]
    for label, N, D, V, rate, dt in ce_shapes(device, quick):
        out.append(_case(device, family, fused, backends, label, N, D, V, rate, 0.0, dt))
    return out


def cases(device: torch.device, quick: bool):
    # cuda is skipped by the runner where the CUDA extension is absent
    return family_cases(device, quick, FAMILY, False, ("reference", "cpu", "triton", "cuda"))
