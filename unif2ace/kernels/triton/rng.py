"""The counter-based RNG of the sampling ops as Triton device functions: bit for bit the reference
(unif2ace/kernels/reference/rng.py, whose docstring is the contract) with uint32 arithmetic.

- :func:`mix32`, :func:`row_key`, :func:`element`: the uint32 word generator (``row_key`` takes the
  host part ``k = mix32(mix32(seed_hi ^ ...) ^ seed_lo)``, :func:`~unif2ace.kernels.reference.rng.seed_stream_keys`);
  :func:`row_keys`: both words' row keys of a stream from the kernels' ``KEYS`` argument.
- :func:`gumbel`: fp32 Gumbel(0, 1) from the 64 random bits ``(hi, lo)`` with no fp64 and no
  libdevice. The uniform is built from the two words with the reference's two-branch construction;
  ``-log1p(-w)`` in the lower half uses the ``log(v)·x/(v − 1)`` identity (v = fl(1 + x)),
  ``-log(w')`` the upper half; ``g = -log(E)``. Tails reach the full 64-bit range (g up to
  ~45.05). The fp32 ``g`` agrees with the reference's float64-then-rounded value to a few ulp
  (tests/test_rng.py measures it), so token choices can only differ on near-ties of ``x/T + g``.
- :func:`gumbel_from_words`: the kernels' Gumbel of given words, on the host side (for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import Launch, launch

__all__ = ["mix32", "row_key", "row_keys", "element", "gumbel", "gumbel_from_words"]


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
    """rng.row_key given the host part ``k`` = mix32(mix32(seed_hi ^ ...) ^ seed_lo) (all uint32)."""
    return mix32(mix32(k ^ sample) ^ position)


@triton.jit
def row_keys(KEYS, stream: tl.constexpr, sample, position):
    """The row keys (hi, lo) of ``stream`` for (sample, position), from the host's per-call keys
    ``KEYS`` (int64 ``[4]``, :func:`~unif2ace.kernels.reference.rng.seed_stream_keys`)."""
    k_hi = tl.load(KEYS + 2 * stream).to(tl.uint32)
    k_lo = tl.load(KEYS + 2 * stream + 1).to(tl.uint32)
    return row_key(k_hi, sample, position), row_key(k_lo, sample, position)


@triton.jit
def element(key, token):
    return mix32(mix32(key ^ token) + 0x632BE5AB)


@triton.jit
def gumbel(hi, lo):
    """fp32 Gumbel(0, 1) from the 64 random bits (hi, lo) (uint32), see the module docstring."""
    low_half = hi < 0x80000000
    h = tl.where(low_half, hi, 0xFFFFFFFF - hi)
    l = tl.where(low_half, lo, 0xFFFFFFFF - lo)
    s32 = 2.3283064365386963e-10  # 2^-32
    u = (h.to(tl.float32) + (l.to(tl.float32) + 0.5) * s32) * s32  # w (lower) or w' = 1 - w (upper)
    v = 1.0 - u
    # log1p(-u) = log(v) * (-u) / (v - 1) when v != 1, else -u
    log1p_neg = tl.where(v == 1.0, -u, tl.log(v) * (-u) / tl.where(v == 1.0, -1.0, v - 1.0))
    e = tl.where(low_half, -log1p_neg, -tl.log(u))
    return -tl.log(e)


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
        launch(Launch(_gumbel_words_kernel, grid, (hi, lo, out, hi.numel()), dict(BLOCK=blk)))
    return out
