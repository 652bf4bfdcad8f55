"""The counter-based RNG and the exactly defined fp32 math of the sampling ops as Triton device
functions: bit for bit the reference (unif2ace/kernels/reference/rng.py, whose docstring is the
contract).

- :func:`mix32`, :func:`row_key`, :func:`element`: the uint32 word generator; :func:`row_keys`
  takes a stream's two call keys (:func:`~unif2ace.kernels.reference.rng.call_keys`, passed to the
  kernels as 32-bit scalars, see :func:`key_args`); :func:`draw_target` the inverse-transform
  target ``floor(r S / 2^64)`` of the 64-bit draw ``r``.
- :func:`log_f32`, :func:`atanh2`, :func:`gumbel`, :func:`exp_fixed`: the fp32 definitions. Every
  operation is one IEEE fp32 operation as written: the kernels that call them are launched with
  ``enable_fp_fusion=False`` (no FMA contraction) and divide with ``div_rn`` (Triton's ``/`` is an
  approximate division on the GPU); no ``tl.exp``/``tl.log`` (approximate on the GPU). So the
  kernels compute the reference's bits on the card as in the interpreter
  (tests/test_sampling_ptx.py checks the generated PTX).
- :func:`gumbel_from_words`: the kernels' Gumbel of given words, on the host side (for tests).
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import rng as _ref_rng
from ._launch import Launch, launch

__all__ = [
    "mix32",
    "row_key",
    "row_keys",
    "element",
    "log_f32",
    "atanh2",
    "gumbel",
    "exp_fixed",
    "draw_target",
    "key_args",
    "gumbel_from_words",
    "FP_OPTIONS",
]

# the launch options every kernel that calls these functions uses
FP_OPTIONS = {"enable_fp_fusion": False}

LN2_HI = _ref_rng.LN2_HI
LN2_LO = _ref_rng.LN2_LO
LOG2E = _ref_rng.LOG2E
C5, C4, C3, C2, C1 = _ref_rng.EXP_COEFFS


def key_args(seed: int, step: int) -> List[int]:
    """The four call keys of (seed, step) as signed 32-bit ints (the kernels reinterpret them as
    uint32): scalar kernel arguments of one type whatever their value, so no host-to-device copy
    and no recompilation per seed."""
    return [k - (1 << 32) if k >= (1 << 31) else k for k in _ref_rng.call_keys(seed, step)]


@triton.jit
def mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0xD35A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def row_key(k, sample, position):
    """rng.row_key given the call key ``k`` (all uint32)."""
    return mix32(mix32(k ^ sample) ^ position)


@triton.jit
def row_keys(k_hi, k_lo, sample, position):
    """The row keys (hi, lo) of a stream for (sample, position), from its two call keys (int32
    kernel scalars holding uint32 values)."""
    return (
        row_key(k_hi.to(tl.uint32, bitcast=True), sample, position),
        row_key(k_lo.to(tl.uint32, bitcast=True), sample, position),
    )


@triton.jit
def element(key, token):
    return mix32(mix32(key ^ token) + 0x632BE5AB)


@triton.jit
def atanh2(f):
    """2 atanh(f), |f| <= 1/3."""
    t = f * f
    p = 0.07692307978868484  # fl32(1/13) ... fl32(1/3)
    p = p * t + 0.09090909361839294
    p = p * t + 0.1111111119389534
    p = p * t + 0.1428571492433548
    p = p * t + 0.20000000298023224
    p = p * t + 0.3333333432674408
    p = p * t + 1.0
    return (f + f) * p


@triton.jit
def log_f32(x):
    """log of positive normal fp32 values (exponent split, 2 atanh of the mantissa)."""
    ix = x.to(tl.int32, bitcast=True)
    e = (ix - 0x3F3504F3) >> 23
    m = (ix - e * 8388608).to(tl.float32, bitcast=True)
    f = tl.math.div_rn(m - 1.0, m + 1.0)
    ef = e.to(tl.float32)
    return ef * 0.693145751953125 + (ef * 1.428606765330187e-06 + atanh2(f))


@triton.jit
def gumbel(hi, lo):
    """fp32 Gumbel(0, 1) from the 64 random bits (hi, lo) (uint32)."""
    low_half = hi < 0x80000000
    h = tl.where(low_half, hi, 0xFFFFFFFF - hi)
    l = tl.where(low_half, lo, 0xFFFFFFFF - lo)
    s32 = 2.3283064365386963e-10  # 2^-32
    u = (h.to(tl.float32) + (l.to(tl.float32) + 0.5) * s32) * s32  # w (lower) or w' = 1 - w (upper)
    e_low = atanh2(tl.math.div_rn(u, 2.0 - u))
    e_high = -log_f32(u)
    return -log_f32(tl.where(low_half, e_low, e_high))


@triton.jit
def exp_fixed(d, kbias):
    """trunc(exp(d) 2^K) as int64 for fp32 d <= 0 (or -inf), kbias = 127 + K."""
    d = tl.maximum(d, -87.0)
    t = d * 1.4426950216293335 + 12582912.0
    k = t - 12582912.0
    r = (d - k * 0.693145751953125) - k * 1.428606765330187e-06
    p = 0.008290314115583897
    p = p * r + 0.04189793020486832
    p = p * r + 0.1666763573884964
    p = p * r + 0.4999915063381195
    p = p * r + 0.9999997019767761
    p = p * r + 1.0
    ki = t.to(tl.int32, bitcast=True) - 0x4B400000
    scale = ((ki + kbias) * 8388608).to(tl.float32, bitcast=True)
    return (p * scale).to(tl.int64)


@triton.jit
def draw_target(rk_hi, rk_lo, S):
    """floor(r S / 2^64) with r = element(rk_hi, 0) 2^32 + element(rk_lo, 0) (the row's draw) and
    S in [0, 2^63) (int64): the high word of the 128-bit product from 32-bit limbs."""
    zero = rk_hi * 0
    a1 = element(rk_hi, zero).to(tl.uint64)
    a0 = element(rk_lo, zero).to(tl.uint64)
    s = S.to(tl.uint64)
    b1 = s >> 32
    b0 = s & 0xFFFFFFFF
    p00 = a0 * b0
    p01 = a0 * b1
    p10 = a1 * b0
    mid = (p00 >> 32) + (p01 & 0xFFFFFFFF) + (p10 & 0xFFFFFFFF)
    return (a1 * b1 + (p01 >> 32) + (p10 >> 32) + (mid >> 32)).to(tl.int64)


@triton.jit
def _gumbel_words_kernel(HI, LO, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    hi = tl.load(HI + offs, mask=m, other=0).to(tl.uint32)
    lo = tl.load(LO + offs, mask=m, other=0).to(tl.uint32)
    tl.store(OUT + offs, gumbel(hi, lo), mask=m)


def gumbel_from_words(hi: Tensor, lo: Tensor) -> Tensor:
    """The kernels' fp32 Gumbel of int64 words ``hi``, ``lo`` in [0, 2^32) (for tests)."""
    hi = hi.to(torch.int64).contiguous().flatten()
    lo = lo.to(torch.int64).contiguous().flatten()
    out = torch.empty(hi.numel(), dtype=torch.float32, device=hi.device)
    if hi.numel():
        blk = 1024
        grid = (triton.cdiv(hi.numel(), blk),)
        launch(Launch(_gumbel_words_kernel, grid, (hi, lo, out, hi.numel()), dict(BLOCK=blk), dict(FP_OPTIONS)))
    return out
