"""The Triton interpreter bf16 patch (root conftest applies it when there is no GPU)."""

import numpy as np
import pytest
import torch

from unif2ace.kernels._dispatch import triton_interpreter_enabled
from unif2ace.testing.triton_interp import bf16_to_f32, f32_to_bf16_rtne

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


def test_rtne_rounding_matches_torch():
    x = torch.randn(4096) * 100
    ours = f32_to_bf16_rtne(x.numpy())
    ref = x.to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint16)
    assert np.array_equal(ours, ref)
    back = bf16_to_f32(ours)
    assert np.array_equal(back, x.to(torch.bfloat16).float().numpy())


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, d_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)
    # bf16 elementwise arithmetic and a fp32 -> bf16 cast at the store
    s = a.to(tl.float32) * 3.0
    tl.store(d_ptr + rm[:, None] * K + rk[None, :], s.to(tl.bfloat16) + a)


def test_bf16_dot_and_arithmetic_are_faithful():
    if torch.cuda.is_available() or not triton_interpreter_enabled():
        pytest.skip("checks the CPU interpreter patch")
    M, N, K = 16, 32, 64
    a = torch.randn(M, K).to(torch.bfloat16)
    b = torch.randn(K, N).to(torch.bfloat16)
    c = torch.full((M, N), float("nan"))
    d = torch.full((M, K), float("nan"), dtype=torch.bfloat16)
    _dot_kernel[(1,)](a, b, c, d, M, N, K)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-4, rtol=1e-4)
    expect = ((a.float() * 3.0).to(torch.bfloat16).float() + a.float()).to(torch.bfloat16)
    assert torch.equal(d, expect)
