"""Self-test cases for benchmarks/run.py (tests/test_benchmarks.py); not run by default.

A row softmax with every kind of implementation the runner must handle: the reference, a second
working implementation ("cpu" here stands in for a kernel backend), one the dispatcher says cannot
run on CPU ("cuda"), one raising BackendUnavailableError on its first call, one raising
NotImplementedError, and one that fails with an unexpected error; two peers (one that runs, one
"not installed"); a copy-bandwidth limit (fp32 case) and a stand-in GEMM limit (bf16 case).
"""

import torch

from benchmarks.common import Case, Gemm, Limit, copy_limit
from unif2ace.kernels import BackendUnavailableError


def _reference(inp):
    return torch.softmax(inp["x"].float(), dim=-1).to(inp["x"].dtype)


def _manual(inp):
    x = inp["x"].float()
    e = (x - x.amax(dim=-1, keepdim=True)).exp()
    return (e / e.sum(dim=-1, keepdim=True)).to(inp["x"].dtype)


def _unavailable(inp):
    raise BackendUnavailableError("selftest: this baseline is never installed")


def _not_implemented(inp):
    raise NotImplementedError("selftest: no such kernel yet")


def _broken(inp):
    raise RuntimeError("selftest: a deliberately broken implementation")


def _peer_missing(inp):
    raise BackendUnavailableError("selftest-peer not installed (pip install --no-deps -r requirements-peers.txt)")


def cases(device, quick):
    rows, cols = (64, 1000) if quick else (1024, 8192)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        elt = torch.tensor([], dtype=dtype).element_size()

        def setup(dtype=dtype):
            return {"x": torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)}

        out.append(
            Case(
                family="_selftest",
                op="softmax",
                name=f"N={rows} V={cols}",
                shape={"N": rows, "V": cols},
                dtype=dtype,
                setup=setup,
                impls={
                    "reference": _reference,
                    "cpu": _manual,
                    "cuda": _manual,
                    "missing-baseline": _unavailable,
                    "triton": _not_implemented if device.type == "cuda" else _manual,
                    "todo": _not_implemented,
                    "broken": _broken,
                },
                backward=lambda y: (y.float() * y.float()).sum(),
                flops=5.0 * rows * cols,
                bytes=2.0 * rows * cols * elt,
                compile=dtype == torch.float32,
                peers={"peer-torch": lambda inp: torch.softmax(inp["x"], dim=-1), "peer-missing": _peer_missing},
                limit=copy_limit(2.0 * rows * cols * elt, 3.0 * rows * cols * elt)
                if dtype == torch.float32
                else Limit(gemms=(Gemm(rows, 64, cols),), note="selftest: a stand-in GEMM"),
            )
        )
    return out
