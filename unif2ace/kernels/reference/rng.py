"""Counter-based, stateless random numbers for the sampling ops (reference implementation).

Every random number is a pure function of ``(seed, stream, sample id, position, token)``: no
generator state, no dependence on batch composition or order, nothing to capture in a CUDA graph.
The Triton, CUDA and C++ kernels reimplement this **bit for bit**, so the definition below is
the contract. All words are unsigned 32-bit; every ``+``, ``*`` wraps modulo 2^32 and ``>>`` is a
logical shift.

Mixer (a 32-bit finaliser, "lowbias32"-style)::

    mix32(x):
        x ^= x >> 16
        x  = x * 0x21f0aaad
        x ^= x >> 15
        x  = x * 0xd35a2d97
        x ^= x >> 15
        return x

Keys. ``seed`` is a Python int in [0, 2^64): ``seed_lo = seed & 0xFFFFFFFF``,
``seed_hi = seed >> 32``. ``stream`` selects an independent family of numbers (0: token-sampling
noise, one number per (position, token); 1: confidence noise, token = 0). ``word`` is 0 for the
high and 1 for the low 32 bits of the 64-bit draw. ``sample`` is the sample id (only its low 32
bits, ``sample & 0xFFFFFFFF`` in two's complement, enter), ``position`` a 32-bit word (the
sequence position for a MaskGIT step, the decode step for autoregressive sampling), ``token`` a
32-bit word (the code / vocabulary index)::

    row_key(seed, stream, word, sample, position):
        h = mix32(seed_hi ^ (0x9E3779B9 * (2*stream + word + 1)))     # product mod 2^32
        h = mix32(h ^ seed_lo)
        h = mix32(h ^ sample_lo32)
        h = mix32(h ^ position)
        return h

    element(row_key, token) = mix32(mix32(row_key ^ token) + 0x632BE5AB)

    hi = element(row_key(seed, stream, 0, sample, position), token)
    lo = element(row_key(seed, stream, 1, sample, position), token)

Exponential(1) from the 64 bits ``(hi, lo)``. Let ``w = (hi * 2^32 + lo + 0.5) / 2^64``, a
uniform in (0, 1) that never hits either end; ``E = -log(1 - w)``. To keep full precision in both
tails it is evaluated as::

    if hi < 2^31:  w  = (hi + (lo + 0.5) * 2^-32) * 2^-32;                       E = -log1p(-w)
    else:          w' = ((2^32-1-hi) + ((2^32-1-lo) + 0.5) * 2^-32) * 2^-32;     E = -log(w')

(``w' = 1 - w`` exactly). Small ``w`` -- ``hi`` near 0 -- gives a small ``E`` and a large Gumbel.
The reference computes this in float64, so the tail is exact to ~64 bits: the largest Gumbel
``g = -log(E)`` reachable is ``-log(2^-65) = 65 ln 2 ~= 45.05`` (at ``hi = lo = 0``), the smallest
``-log(65 ln 2) ~= -3.81`` (at ``hi = lo = 2^32 - 1``), far beyond the ~16.6 cap of fp32 uniforms
(arXiv 2409.02908). ``g`` is then cast to fp32 (round to nearest); the samplers compare scores in
fp32. A backend without fp64 may compute ``E`` and ``g`` another way as long as its fp32 ``g``
matches within a few ulp; token choices can then differ only on near-ties.

In PyTorch the uint32 arithmetic is emulated exactly in int64 without overflow: values stay in
[0, 2^32); a product ``x * c`` is formed as ``x * c_lo + ((x * c_hi) & 0xFFFF) << 16`` with the
constant split into 16-bit halves (each partial product < 2^48), then masked with ``0xFFFFFFFF``.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch

__all__ = [
    "MASK32",
    "STREAM_TOKEN",
    "STREAM_CONFIDENCE",
    "mix32",
    "mix32_int",
    "row_key",
    "row_key_int",
    "element",
    "element_int",
    "random_words",
    "exponential_from_words",
    "gumbel_from_words",
    "gumbel",
    "split_seed",
    "seed_stream_keys",
    "GUMBEL_MAX",
]

MASK32 = 0xFFFFFFFF
STREAM_TOKEN = 0
STREAM_CONFIDENCE = 1

_M1 = 0x21F0AAAD
_M2 = 0xD35A2D97
_GOLDEN = 0x9E3779B9
_ELEM_ADD = 0x632BE5AB
_TWO31 = 1 << 31

IntOrTensor = Union[int, torch.Tensor]


# --------------------------------------------------------------------------- pure-Python scalars


def mix32_int(x: int) -> int:
    """``mix32`` on one Python int (taken mod 2^32)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 15
    return x


def split_seed(seed: int) -> Tuple[int, int]:
    """``(seed_lo, seed_hi)`` of a seed in [0, 2^64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 64):
        raise ValueError(f"rng: seed must be a Python int in [0, 2**64), got {seed!r}")
    return seed & MASK32, seed >> 32


def _seed_stream_key(seed: int, stream: int, word: int) -> int:
    """The part of ``row_key`` that depends only on (seed, stream, word): a host scalar."""
    seed_lo, seed_hi = split_seed(seed)
    h = mix32_int(seed_hi ^ ((_GOLDEN * (2 * stream + word + 1)) & MASK32))
    return mix32_int(h ^ seed_lo)


def seed_stream_keys(seed: int, device: torch.device) -> torch.Tensor:
    """int64 ``[4]``: the (seed, stream, word) part of ``row_key`` for (stream 0, word 0), (0, 1),
    (1, 0), (1, 1), each in [0, 2^32) -- the per-call host keys the kernels finish per row."""
    keys = [_seed_stream_key(seed, st, w) for st in (STREAM_TOKEN, STREAM_CONFIDENCE) for w in (0, 1)]
    return torch.tensor(keys, dtype=torch.int64).to(device, non_blocking=True)


def row_key_int(seed: int, stream: int, word: int, sample: int, position: int) -> int:
    h = _seed_stream_key(seed, stream, word)
    h = mix32_int(h ^ (sample & MASK32))
    return mix32_int(h ^ (position & MASK32))


def element_int(key: int, token: int) -> int:
    return mix32_int((mix32_int(key ^ (token & MASK32)) + _ELEM_ADD) & MASK32)


# --------------------------------------------------------------------------- int64 tensors


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """In place: ``x = (x * c) mod 2^32`` for int64 ``x`` in [0, 2^32) and a constant ``c`` < 2^32,
    without int64 overflow (each partial product < 2^48)."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    part = x.bitwise_and(0xFFFF).mul_(c_hi).bitwise_left_shift_(16)
    return x.mul_(c_lo).add_(part).bitwise_and_(MASK32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """In-place ``mix32`` of an int64 tensor (in place keeps the reference's memory traffic low)."""
    x.bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 16)
    _mul32_(x, _M1)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, _M2)
    x.bitwise_xor_(x >> 15)
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` elementwise on an int64 tensor (values taken mod 2^32); returns int64 in [0, 2^32)."""
    if x.dtype != torch.int64:
        raise TypeError(f"mix32: expected an int64 tensor, got {x.dtype}")
    return _mix32_(x.clone())


def _as_word(v: IntOrTensor, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=torch.int64) & MASK32
    return torch.tensor(int(v) & MASK32, dtype=torch.int64, device=device)


def row_key(seed: int, stream: int, word: int, sample: IntOrTensor, position: IntOrTensor) -> torch.Tensor:
    """``row_key`` for broadcastable int tensors (or ints) ``sample`` and ``position``; int64."""
    device = next((t.device for t in (sample, position) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    h = _seed_stream_key(seed, stream, word)
    h = _mix32_(_as_word(sample, device) ^ h)
    return _mix32_(h ^ _as_word(position, device))


def element(key: torch.Tensor, token: IntOrTensor) -> torch.Tensor:
    """``element(row_key, token)`` broadcasting ``key`` against ``token``; int64 in [0, 2^32)."""
    x = _mix32_(key ^ _as_word(token, key.device))
    return _mix32_(x.add_(_ELEM_ADD))


def random_words(
    seed: int, stream: int, sample: IntOrTensor, position: IntOrTensor, token: IntOrTensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 64 random bits ``(hi, lo)`` of (seed, stream, sample, position, token), broadcast over
    ``sample``/``position`` (row keys) and then against ``token``."""
    k_hi = row_key(seed, stream, 0, sample, position)
    k_lo = row_key(seed, stream, 1, sample, position)
    return element(k_hi, token), element(k_lo, token)


def exponential_from_words(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Exponential(1) variate (float64) from the 64 bits ``(hi, lo)`` (see the module docstring)."""
    s = 2.0**-32
    low_half = hi < _TWO31
    # Fold both branches into one pass: in the upper half use the complemented words, so that
    # u = (h + (l + 0.5) 2^-32) 2^-32 is w (lower half) or w' = 1 - w (upper half).
    h = torch.where(low_half, hi, MASK32 - hi).to(torch.float64)
    l = torch.where(low_half, lo, MASK32 - lo).to(torch.float64)
    u = l.add_(0.5).mul_(s).add_(h).mul_(s)
    del h
    e_low = torch.log1p(-u).neg_()  # -log1p(-w)
    e_high = u.log_().neg_()  # -log(w')
    return torch.where(low_half, e_low, e_high)


def gumbel_from_words(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) variate ``-log(E)``, computed in float64 and cast to fp32."""
    return (-torch.log(exponential_from_words(hi, lo))).to(torch.float32)


def gumbel(seed: int, stream: int, sample: IntOrTensor, position: IntOrTensor, token: IntOrTensor) -> torch.Tensor:
    """fp32 Gumbel noise of (seed, stream, sample, position, token), broadcast as in
    :func:`random_words`."""
    hi, lo = random_words(seed, stream, sample, position, token)
    return gumbel_from_words(hi, lo)


# The extreme values reachable (for tests and docs).
GUMBEL_MAX = -math.log(2.0**-65)  # ~= 45.05, at hi = lo = 0
