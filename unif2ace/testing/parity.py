"""Shared helpers for parity tests: tolerance table, poisoned outputs, fwd+bwd comparison.

Practice (see docs/kernels.md, "Testing practice"): fresh random inputs per test, never zeros; outputs are
poisoned before a kernel writes them and checked for leftovers; every backend is compared with the
reference in fp32 (or the reference run on fp32 copies of low-precision inputs).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

# (atol, rtol) per compute dtype: fp32 tight; bf16/fp16 as Liger-Kernel's tests use.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float32: (1e-5, 5e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (5e-3, 5e-2),
}

# sizes chosen to miss every power of two and block size
ODD_SIZES = (1, 33, 222, 423, 511)
ODD_VOCABS = (111, 8192)

POISON_INT = -0x5EED


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> Tuple[float, float]:
    atol, rtol = TOLERANCES[dtype]
    return atol * scale, rtol * scale


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with a value no correct kernel writes (NaN for floats, a sentinel for ints)."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t  # no poison value exists for bool
    return t.fill_(POISON_INT)


def poisoned_empty(*shape, dtype, device="cpu") -> torch.Tensor:
    return poison_(torch.empty(*shape, dtype=dtype, device=device))


def assert_all_written(t: torch.Tensor, name: str = "output") -> None:
    """Fail when any element still holds the poison value."""
    if t.is_floating_point():
        bad = torch.isnan(t)
    elif t.dtype == torch.bool:
        return
    else:
        bad = t == POISON_INT
    n = int(bad.sum())
    if n:
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {n} of {t.numel()} elements never written (first at {idx})")


def assert_close(
    actual, expected, dtype: torch.dtype = torch.float32, name: str = "", scale: float = 1.0, equal_nan: bool = False
):
    """Compare in fp32 with the tolerance of ``dtype`` (the dtype the kernel computed in).
    ``equal_nan``: NaN must be where the expected NaN is (±inf always must match exactly)."""
    atol, rtol = tolerance(dtype, scale)
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        atol=atol,
        rtol=rtol,
        equal_nan=equal_nan,
        msg=lambda m: f"{name}: {m}" if name else m,
    )


def randn(*shape, dtype=torch.float32, device="cpu", scale: float = 1.0, generator=None) -> torch.Tensor:
    """Fresh random normal tensor (fp32 draw, then cast), never zeros."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float32) * scale
    return x.to(device=device, dtype=dtype)


def fwd_bwd_parity(
    fn_ref: Callable,
    fn_test: Callable,
    inputs: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    grad_outputs: Optional[Sequence[torch.Tensor]] = None,
    names: Optional[Sequence[str]] = None,
    scale: float = 1.0,
    equal_nan: bool = False,
) -> None:
    """Run ``fn_ref`` and ``fn_test`` on independent leaf copies of ``inputs``; compare outputs and
    the gradients of every floating input that requires grad.

    The functions return a tensor or a tuple of tensors. ``grad_outputs`` default to fresh random
    tensors (a non-uniform upstream gradient) for every floating output. ``equal_nan``: outputs
    and gradients must hold NaN exactly where the reference's do (the NaN/inf contract tests).
    """

    def leaves():
        return [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]

    xr, xt = leaves(), leaves()
    outr, outt = fn_ref(*xr), fn_test(*xt)
    outr = outr if isinstance(outr, (tuple, list)) else (outr,)
    outt = outt if isinstance(outt, (tuple, list)) else (outt,)
    assert len(outr) == len(outt), f"output count differs: {len(outr)} vs {len(outt)}"
    for i, (a, b) in enumerate(zip(outt, outr)):
        if isinstance(b, torch.Tensor):
            assert a.shape == b.shape, f"output {i}: shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
            if b.is_floating_point():
                assert_close(a, b, dtype, name=f"output {i}", scale=scale, equal_nan=equal_nan)
            else:
                assert torch.equal(a, b), f"output {i} differs from the reference"
    diff_out = [(a, b) for a, b in zip(outt, outr) if isinstance(b, torch.Tensor) and b.requires_grad]
    if not diff_out:
        return
    if grad_outputs is None:
        grad_outputs = [torch.randn_like(b, dtype=torch.float32).to(b.dtype) for _, b in diff_out]
    want = [i for i, x in enumerate(inputs) if x.requires_grad]
    gr = torch.autograd.grad([b for _, b in diff_out], [xr[i] for i in want], grad_outputs, allow_unused=True)
    gt = torch.autograd.grad(
        [a for a, _ in diff_out],
        [xt[i] for i in want],
        [g.to(a.dtype) for g, (a, _) in zip(grad_outputs, diff_out)],
        allow_unused=True,
    )
    for j, i in enumerate(want):
        label = names[i] if names else f"input {i}"
        if gr[j] is None:
            assert gt[j] is None or not gt[j].any(), f"grad of {label}: reference has none"
            continue
        assert gt[j] is not None, f"grad of {label}: backend returned none"
        assert_close(gt[j], gr[j], dtype, name=f"grad of {label}", scale=scale, equal_nan=equal_nan)
