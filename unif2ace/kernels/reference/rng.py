"""Counter-based, stateless random numbers and the exactly defined fp32 math of the sampling ops
(reference implementation).

Every random number is a pure function of ``(seed, step, stream, sample id, position, token)``: no
generator state, no dependence on batch composition or order, nothing to capture in a CUDA graph.
Every floating-point value the samplers compare (the Gumbel noise, the log-softmax of a sample) is
defined below as a fixed sequence of IEEE fp32 operations -- no libm, no FMA contraction, IEEE
(round-to-nearest) division -- so the Triton, CUDA and C++ kernels reproduce it **bit for bit**
and every backend draws the same tokens and ranks the same confidences for a seed. The definition
below is the contract.

Words. All words are unsigned 32-bit; every ``+``, ``*`` wraps modulo 2^32 and ``>>`` is a logical
shift. Mixer (a 32-bit finaliser, "lowbias32"-style)::

    mix32(x):
        x ^= x >> 16
        x  = x * 0x21f0aaad
        x ^= x >> 15
        x  = x * 0xd35a2d97
        x ^= x >> 15
        return x

Keys. ``seed`` is an int in [0, 2^64) (``seed_lo = seed & 0xFFFFFFFF``, ``seed_hi = seed >> 32``),
``step`` the MaskGIT step, an int in [0, 2^63) (``step_lo``, ``step_hi`` likewise; every step draws
fresh noise; ``ar_sample`` uses step 0, its decode step is the position). ``stream`` selects an
independent family of numbers (0: token-sampling noise, one number per (position, token);
1: confidence noise, token = 0). ``word`` is 0 for the high and 1 for the low 32 bits of the 64-bit
draw. ``sample`` is the sample id (only its low 32 bits, ``sample & 0xFFFFFFFF`` in two's
complement, enter), ``position`` a 32-bit word (the sequence position for a MaskGIT step, the decode
step for autoregressive sampling), ``token`` a 32-bit word (the code / vocabulary index)::

    call_key(seed, step, stream, word):                      # per call: a host scalar
        h = mix32(seed_hi ^ (0x9E3779B9 * (2*stream + word + 1)))
        h = mix32(h ^ seed_lo)
        h = mix32(h ^ step_lo)
        return mix32(h ^ step_hi)

    row_key(call_key, sample, position) = mix32(mix32(call_key ^ sample_lo32) ^ position)
    element(row_key, token)             = mix32(mix32(row_key ^ token) + 0x632BE5AB)

    hi = element(row_key(call_key(seed, step, stream, 0), sample, position), token)
    lo = element(row_key(call_key(seed, step, stream, 1), sample, position), token)

fp32 functions. ``f32(n)`` converts an integer to fp32 rounding to nearest (even); constants are
the fp32 values nearest to the numbers written (``1/3`` is fl32(1/3)); operations are evaluated
one at a time, left to right as written, each rounded to fp32::

    atanh2(f)   = (f + f) * P(f*f),  P(t) = ((((((1/13)t + 1/11)t + 1/9)t + 1/7)t + 1/5)t + 1/3)t + 1
                  (2 atanh f, |f| <= 1/3)
    log_f32(x)  (x a positive normal fp32):
        e  = (bits(x) - 0x3F3504F3) >> 23                    # int32, arithmetic shift
        m  = float_from_bits(bits(x) - e * 2^23)             # in [sqrt(1/2), sqrt(2))
        f  = (m - 1) / (m + 1)
        return f32(e) * LN2_HI + (f32(e) * LN2_LO + atanh2(f))
    exp_fixed(d, K)  (d <= 0 or -inf; K <= 40): trunc(exp(d) 2^K) as an int64:
        d  = max(d, -87)
        t  = d * LOG2E + 12582912                            # 1.5 * 2^23: rounds d / ln 2
        k  = t - 12582912
        r  = (d - k * LN2_HI) - k * LN2_LO
        p  = (((((C5 r + C4) r + C3) r + C2) r + C1) r + 1
        return trunc(p * 2^(k + K))                          # exact: k + K added to p's exponent

with ``LN2_HI = 0.693145751953125``, ``LN2_LO = 1.428606765330187e-06``, ``LOG2E = fl32(log2 e)``
and the degree-5 minimax coefficients of :data:`EXP_COEFFS` (fp32 values; |rel. error| 1.7e-7)
(``exp(d) 2^K`` is ``p 2^(k+K)`` to ~2e-7 relative; below ``d = -K ln 2`` it truncates to 0).

Gumbel noise from the 64 bits ``(hi, lo)``: the uniform ``w = (hi * 2^32 + lo + 0.5) / 2^64``
never hits 0 or 1; ``E = -log(1 - w)`` is Exponential(1) and ``g = -log(E)`` Gumbel(0, 1). Both
tails at full precision::

    if hi < 2^31:  u = (f32(hi) + (f32(lo) + 0.5) * 2^-32) * 2^-32          # u = w
                   E = atanh2(u / (2 - u))                                    # -log1p(-u)
    else:          u = (f32(~hi) + (f32(~lo) + 0.5) * 2^-32) * 2^-32        # u = 1 - w
                   E = -log_f32(u)
    g = -log_f32(E)

(``~x = 2^32 - 1 - x``.) Small ``w`` -- ``hi`` near 0 -- gives a small ``E`` and a large ``g``: the
largest reachable is ``g = 65 ln 2 ~= 45.05`` (``hi = lo = 0``, ``u = 2^-65``), the smallest
``-log(65 ln 2) ~= -3.81`` (``hi = lo = 2^32 - 1``), far beyond the ~16.6 cap of fp32 uniforms
(arXiv 2409.02908). ``g`` is within a few ulp of the exact ``-log(-log1p(-w))``
(:func:`gumbel_exact` computes that in float64; tests/test_rng.py measures the gap).

Fixed-point softmax of a row of scores ``x`` (sanitised fp32, ``m`` = its max, finite): the
exponentials are integers summed exactly, so nothing depends on the order of the terms (a row and
any permutation of it give the same values) or on the backend::

    K       = min(40, 62 - bit_length(V))                    # V * 2^K < 2^63
    q_v     = exp_fixed(x_v - m, K)                          # int64, 0 <= q_v <= 2^K
    S       = sum_v q_v                                      # int64, exact, >= 2^K
    lse_rel = log_f32(f32(S) * 2^-K)                         # log softmax: log p_v = (x_v - m) - lse_rel

Drawing a code from that softmax with one 64-bit draw ``r = hi * 2^32 + lo`` (inverse transform,
exact in integers): ``U = floor(r * S / 2^64)`` (the high word of the 128-bit product,
:func:`mulhi_u64`), and the code is the first ``v`` with ``q_0 + ... + q_v > U``. It has probability
``q_v / S`` (to 2^-64): the softmax to ~2e-7 relative, except that scores more than ``K ln 2``
(27.7 for K = 40) below the max have probability 0 (at most ``V 2^-K`` of the mass, 7.5e-9 for
V = 8192).

In PyTorch the uint32 arithmetic is emulated exactly in int64 without overflow: values stay in
[0, 2^32); a product ``x * c`` is formed as ``x * c_lo + ((x * c_hi) & 0xFFFF) << 16`` with the
constant split into 16-bit halves (each partial product < 2^48), then masked with ``0xFFFFFFFF``.
The fp32 functions are elementwise torch fp32 operations (each one IEEE-rounded).
"""

from __future__ import annotations

import math
from typing import List, Tuple, Union

import torch

__all__ = [
    "MASK32",
    "STREAM_TOKEN",
    "STREAM_CONFIDENCE",
    "mix32",
    "mix32_int",
    "call_key_int",
    "call_keys",
    "row_key",
    "row_key_int",
    "element",
    "element_int",
    "random_words",
    "atanh2",
    "log_f32",
    "sum_bits",
    "exp_fixed",
    "lse_rel",
    "mulhi_u64",
    "gumbel_from_words",
    "gumbel",
    "exponential_exact",
    "gumbel_exact",
    "split_seed",
    "split_step",
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

# fp32 constants of the definition (Python floats holding fp32 values)
LN2_HI = 0.693145751953125
LN2_LO = 1.428606765330187e-06  # fl32(1.428606765330187045e-06)
LOG2E = 1.4426950216293335  # fl32(log2 e)
_ROUND = 12582912.0  # 1.5 * 2^23
EXP_MIN = -87.0
_ATANH = (1 / 13, 1 / 11, 1 / 9, 1 / 7, 1 / 5, 1 / 3)  # rounded to fp32 where used
# exp(r) ~ 1 + r (C1 + r (C2 + r (C3 + r (C4 + r C5)))), |r| <= ln2 / 2: (C5, C4, C3, C2, C1), fp32 values
EXP_COEFFS = (0.008290314115583897, 0.04189793020486832, 0.1666763573884964, 0.4999915063381195, 0.9999997019767761)

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


def _split64(what: str, v: int, high: int) -> Tuple[int, int]:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < high:
        raise ValueError(f"rng: {what} must be a Python int in [0, {high:#x}), got {v!r}")
    return v & MASK32, v >> 32


def split_seed(seed: int) -> Tuple[int, int]:
    """``(seed_lo, seed_hi)`` of a seed in [0, 2^64)."""
    return _split64("seed", seed, 1 << 64)


def split_step(step: int) -> Tuple[int, int]:
    """``(step_lo, step_hi)`` of a step in [0, 2^63)."""
    return _split64("step", step, 1 << 63)


def call_key_int(seed: int, step: int, stream: int, word: int) -> int:
    """``call_key`` (the part of the row key fixed per call): a host scalar in [0, 2^32)."""
    seed_lo, seed_hi = split_seed(seed)
    step_lo, step_hi = split_step(step)
    h = mix32_int(seed_hi ^ ((_GOLDEN * (2 * stream + word + 1)) & MASK32))
    h = mix32_int(h ^ seed_lo)
    h = mix32_int(h ^ step_lo)
    return mix32_int(h ^ step_hi)


def call_keys(seed: int, step: int) -> List[int]:
    """The four call keys of (seed, step) the kernels take as scalars, in the order (stream 0,
    word 0), (0, 1), (1, 0), (1, 1); each in [0, 2^32)."""
    return [call_key_int(seed, step, st, w) for st in (STREAM_TOKEN, STREAM_CONFIDENCE) for w in (0, 1)]


def row_key_int(seed: int, step: int, stream: int, word: int, sample: int, position: int) -> int:
    h = mix32_int(call_key_int(seed, step, stream, word) ^ (sample & MASK32))
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


def row_key(seed: int, step: int, stream: int, word: int, sample: IntOrTensor, position: IntOrTensor) -> torch.Tensor:
    """``row_key`` for broadcastable int tensors (or ints) ``sample`` and ``position``; int64."""
    device = next((t.device for t in (sample, position) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    h = _mix32_(_as_word(sample, device) ^ call_key_int(seed, step, stream, word))
    return _mix32_(h ^ _as_word(position, device))


def element(key: torch.Tensor, token: IntOrTensor) -> torch.Tensor:
    """``element(row_key, token)`` broadcasting ``key`` against ``token``; int64 in [0, 2^32)."""
    x = _mix32_(key ^ _as_word(token, key.device))
    return _mix32_(x.add_(_ELEM_ADD))


def random_words(
    seed: int, step: int, stream: int, sample: IntOrTensor, position: IntOrTensor, token: IntOrTensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 64 random bits ``(hi, lo)`` of (seed, step, stream, sample, position, token), broadcast
    over ``sample``/``position`` (row keys) and then against ``token``."""
    k_hi = row_key(seed, step, stream, 0, sample, position)
    k_lo = row_key(seed, step, stream, 1, sample, position)
    return element(k_hi, token), element(k_lo, token)


# --------------------------------------------------------------------------- exact fp32 math


def _f(v: float) -> float:
    """The fp32 value nearest to ``v``, as a Python float (the constants of the definition)."""
    return float(torch.tensor(v, dtype=torch.float32))


_ATANH_F = tuple(_f(c) for c in _ATANH)


def atanh2(f: torch.Tensor) -> torch.Tensor:
    """``2 atanh(f)`` for fp32 ``f``, |f| <= 1/3 (the series of the definition)."""
    t = f * f
    p = torch.full_like(f, _ATANH_F[0])
    for c in _ATANH_F[1:]:
        p = p * t + c
    p = p * t + 1.0
    return (f + f) * p


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """``log`` of positive normal fp32 values, as defined in the module docstring."""
    ix = x.view(torch.int32)
    e = (ix - 0x3F3504F3) >> 23
    m = (ix - e * (1 << 23)).view(torch.float32)
    f = (m - 1.0) / (m + 1.0)
    ef = e.to(torch.float32)
    return ef * LN2_HI + (ef * LN2_LO + atanh2(f))


def sum_bits(V: int) -> int:
    """``K``, the fixed-point fraction bits of the exponentials of a ``V``-entry row."""
    return min(40, 62 - int(V).bit_length())


def exp_fixed(d: torch.Tensor, K: int) -> torch.Tensor:
    """``q = trunc(exp(d) 2^K)`` (int64) of fp32 ``d <= 0`` (or -inf), as defined in the module
    docstring; 0 below ``d = -K ln 2``."""
    d = torch.clamp(d, min=EXP_MIN)
    t = d * LOG2E + _ROUND
    k = t - _ROUND
    r = (d - k * LN2_HI) - k * LN2_LO
    p = torch.full_like(d, EXP_COEFFS[0])
    for c in EXP_COEFFS[1:] + (1.0,):
        p = p * r + c
    scale = ((k.to(torch.int32) + (127 + K)) * (1 << 23)).view(torch.float32)
    return (p * scale).to(torch.int64)


def lse_rel(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``lse_rel = log(sum_v exp(x_v - m))`` along the last dim of fp32 ``x`` with its row max ``m``
    (``[..., 1]``, finite), by the exact fixed-point sum of the definition. fp32 ``[..., 1]``."""
    K = sum_bits(x.shape[-1])
    s = exp_fixed(x - m, K).sum(dim=-1, keepdim=True)
    return log_f32(s.to(torch.float32) * float(2.0**-K))


def mulhi_u64(hi: torch.Tensor, lo: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``floor((hi 2^32 + lo) s / 2^64)`` elementwise, exactly, for int64 tensors ``hi``, ``lo`` in
    [0, 2^32) and ``s`` in [0, 2^63): the high word of the 128-bit product, in int64 arithmetic
    that never overflows (the products are split so that every partial is below 2^63)."""
    s1, s0 = s >> 32, s & MASK32  # s1 < 2^31
    a, b = s0 >> 16, s0 & 0xFFFF
    ls1 = lo * s1  # < 2^63
    c0 = (lo * a + ((lo * b) >> 16)) >> 16  # floor(lo s0 / 2^32)
    rest = hi * b + (ls1 & MASK32) + c0  # < 2^49
    return hi * s1 + (ls1 >> 32) + ((hi * a + (rest >> 16)) >> 16)


def gumbel_from_words(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """fp32 Gumbel(0, 1) from the 64 bits ``(hi, lo)`` (int64 tensors in [0, 2^32)), as defined in
    the module docstring."""
    low_half = hi < _TWO31
    # the upper half uses the complemented words, so u is w (lower) or 1 - w (upper)
    h = torch.where(low_half, hi, MASK32 - hi).to(torch.float32)
    l = torch.where(low_half, lo, MASK32 - lo).to(torch.float32)
    s = 2.0**-32
    u = (h + (l + 0.5) * s) * s
    del h, l
    e_low = atanh2(u / (2.0 - u))
    e_high = -log_f32(u)
    e = torch.where(low_half, e_low, e_high)
    return -log_f32(e)


def gumbel(
    seed: int, step: int, stream: int, sample: IntOrTensor, position: IntOrTensor, token: IntOrTensor
) -> torch.Tensor:
    """fp32 Gumbel noise of (seed, step, stream, sample, position, token), broadcast as in
    :func:`random_words`."""
    hi, lo = random_words(seed, step, stream, sample, position, token)
    return gumbel_from_words(hi, lo)


# --------------------------------------------------------------------------- exact values (tests)


def exponential_exact(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """float64 ``E = -log(1 - w)`` of the words (``-log1p(-w)`` / ``-log(1 - w)`` in the two halves):
    the value the fp32 definition approximates, to ~1e-16 (for tests and docs)."""
    s = 2.0**-32
    low_half = hi < _TWO31
    h = torch.where(low_half, hi, MASK32 - hi).to(torch.float64)
    l = torch.where(low_half, lo, MASK32 - lo).to(torch.float64)
    u = (l + 0.5) * s
    u = (u + h) * s
    return torch.where(low_half, -torch.log1p(-u), -torch.log(u))


def gumbel_exact(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """float64 ``-log(E)`` of :func:`exponential_exact` (for tests)."""
    return -torch.log(exponential_exact(hi, lo))


# The extreme values reachable (for tests and docs).
GUMBEL_MAX = -math.log(2.0**-65)  # ~= 45.05, at hi = lo = 0
