"""Triton kernels for masked token sampling (one fused MaskGIT step) and autoregressive sampling.

Semantics: :mod:`unif2ace.kernels.reference.sampling` (the oracle) and the counter-based RNG of
:mod:`unif2ace.kernels.reference.rng`, reimplemented here bit for bit with uint32 arithmetic.

Kernels
-------
- ``_masked_step_kernel`` (kernel A): one program per (row, position) unit. Unmasked positions
  write ``sampled = token``, ``confidence = +inf`` and skip the sweep. Masked positions stream the
  vocabulary once in ``BLOCK_V`` tiles: load cond (+ uncond) -> fp32 -> guidance combine
  ``a·cond − s·uncond`` -> sanitise (NaN -> -inf, +inf -> FLT_MAX) -> optional top-k threshold ->
  online max / sum-exp (for ``log p`` of the sample) and Gumbel-max (best perturbed score, its
  code, its raw logit) carried across tiles, ties -> lowest code. Temperature 0 is an exact
  argmax. Writes the sampled code and ``log p + τ·g'`` (stream-1 Gumbel).
- ``_remask_kernel`` (kernel B): one program per row (L <= ``MAX_L`` = 4096): per-row masked count
  and re-mask count ``n`` from the host's schedule value, the ``n`` lowest confidences found with
  one ``tl.sort`` of unique 64-bit keys ``(order-preserving bits of the confidence) << 32 | position``
  (ties -> lowest position, as the reference's stable sort), writes tokens / new mask / sampled.
  Rows longer than ``MAX_L`` use the same ranking in PyTorch (a stable sort), documented fallback.
- ``_ar_kernel``: one program per row: online max / sum-exp of the untempered logits for the
  logprob, Gumbel-max over ``min(x / T, FLT_MAX)`` (IEEE division, ``tl.math.div_rn``) or argmax.

Gumbel noise in fp32 (no fp64, no libdevice): the uniform is built from the two 32-bit words with
the reference's two-branch construction; ``-log1p(-w)`` in the lower half uses the
``log(v)·x/(v − 1)`` identity (v = fl(1 + x)), ``-log(w')`` in the upper half; ``g = -log(E)``.
Tails reach the full 64-bit range (g up to ~45.05). The fp32 ``g`` agrees with the reference's
float64-then-rounded value to a few ulp (tests measure it), so token choices can only differ on
near-ties of ``x/T + g`` (none observed in the tests).

Top-k / top-p filters: the per-row threshold is found by a PyTorch pre-pass (``torch.topk``, and
for top-p the reference's sort + prefix-sum definition) and the kernels apply ``x >= threshold``.
For the masked step with top-k the pre-pass materialises the guided, sanitised fp32 logits once and
the kernel reads those (so the comparison is bit-identical to the reference); without top-k the
logits are read once. An in-kernel selection (radix / pivot search) is future work.

Launch cost: the interpreter runs ~1 ms per program; tests keep B·L small and ``BLOCK_V`` large.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import rng as _rng
from ..reference import sampling as _ref

__all__ = [
    "masked_sample_step",
    "ar_sample",
    "masked_sample_step_cuda",
    "ar_sample_cuda",
    "gumbel_from_words",
    "seed_stream_keys",
    "masked_step_threshold",
    "ar_threshold",
    "MAX_L",
    "MAX_BLOCK_V",
]

MAX_BLOCK_V = 4096
MAX_L = 4096
FLT_MAX = _ref.FLT_MAX


def block_v(V: int) -> int:
    return max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


# --------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0xD35A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def _row_key(k, sample, position):
    """rng.row_key given the host part ``k`` = mix32(mix32(seed_hi ^ ...) ^ seed_lo) (all uint32)."""
    return _mix32(_mix32(k ^ sample) ^ position)


@triton.jit
def _element(key, token):
    return _mix32(_mix32(key ^ token) + 0x632BE5AB)


@triton.jit
def _gumbel(hi, lo):
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
def _sanitize(x):
    x = tl.where(x != x, float("-inf"), x)
    return tl.where(x == float("inf"), 3.4028234663852886e38, x)


@triton.jit
def _gumbel_words_kernel(HI, LO, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    hi = tl.load(HI + offs, mask=m, other=0).to(tl.uint32)
    lo = tl.load(LO + offs, mask=m, other=0).to(tl.uint32)
    tl.store(OUT + offs, _gumbel(hi, lo), mask=m)


# --------------------------------------------------------------------------------------------
# kernel A: sample + confidence per (row, position)


@triton.jit
def _masked_step_kernel(
    COND,
    UNC,
    TOK,
    MASK,
    SID,
    KEYS,
    THR,
    SAMPLED,
    CONF,
    L,
    V,
    stride_c,
    stride_u,
    a,
    s,
    temperature,
    tau,
    HAS_UNC: tl.constexpr,
    HAS_THR: tl.constexpr,
    GREEDY: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    unit = tl.program_id(0).to(tl.int64)
    b = unit // L
    i = unit - b * L
    masked = tl.load(MASK + unit) != 0
    sid = tl.load(SID + b).to(tl.uint32)
    pos = i.to(tl.uint32)
    k0_hi = tl.load(KEYS + 0).to(tl.uint32)
    k0_lo = tl.load(KEYS + 1).to(tl.uint32)
    rk_hi = _row_key(k0_hi, sid, pos)
    rk_lo = _row_key(k0_lo, sid, pos)
    if HAS_THR:
        thr = tl.load(THR + unit)
    c_row = COND + unit * stride_c
    u_row = UNC + unit * stride_u
    offs = tl.arange(0, BLOCK_V)
    n_cols = tl.where(masked, V, 0)  # unmasked positions skip the sweep
    m = float("-inf")
    ssum = 0.0
    best = float("-inf")
    best_idx = 0
    best_x = float("-inf")
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        inb = cols < V
        x = tl.load(c_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        if HAS_UNC:
            xu = tl.load(u_row + cols, mask=inb, other=0.0).to(tl.float32)
            x = a * x - s * xu
        x = _sanitize(x)
        x = tl.where(inb, x, float("-inf"))
        if HAS_THR:
            x = tl.where(x >= thr, x, float("-inf"))
        # online max / sum-exp
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        ssum = ssum * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m = m_new
        # Gumbel-max (or argmax) on this tile
        if GREEDY:
            score = x
        else:
            z = tl.minimum(tl.math.div_rn(x, temperature), 3.4028234663852886e38)
            t = cols.to(tl.uint32)
            g = _gumbel(_element(rk_hi, t), _element(rk_lo, t))
            score = z + g
        tmax = tl.max(score, 0)
        tidx = tl.min(tl.where(score == tmax, cols, 2147483647), 0)
        tx = tl.max(tl.where(cols == tidx, x, float("-inf")), 0)
        upd = tmax > best
        best_idx = tl.where(upd, tidx, best_idx)
        best_x = tl.where(upd, tx, best_x)
        best = tl.where(upd, tmax, best)
    finite = m > float("-inf")
    lp = (best_x - tl.where(finite, m, 0.0)) - tl.log(tl.where(finite, ssum, 1.0))
    lp = tl.where(finite, lp, float("-inf"))
    code = tl.where(finite, best_idx, 0).to(tl.int64)
    if HAS_NOISE:
        k1_hi = tl.load(KEYS + 2).to(tl.uint32)
        k1_lo = tl.load(KEYS + 3).to(tl.uint32)
        zero = pos * 0
        g1 = _gumbel(_element(_row_key(k1_hi, sid, pos), zero), _element(_row_key(k1_lo, sid, pos), zero))
        lp = lp + tau * g1
    tok = tl.load(TOK + unit).to(tl.int64)
    tl.store(SAMPLED + unit, tl.where(masked, code, tok))
    tl.store(CONF + unit, tl.where(masked, lp, float("inf")))


# --------------------------------------------------------------------------------------------
# kernel B: per-row re-mask selection


@triton.jit
def _remask_kernel(
    CONF,
    MASK,
    TOK,
    SAMPLED,
    TOK_OUT,
    MASK_OUT,
    SAMPLED_OUT,
    L,
    n_sched,
    mask_token_id,
    LAST: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    inb = offs < L
    base = row * L
    conf = tl.load(CONF + base + offs, mask=inb, other=float("inf")) + 0.0  # -0.0 -> +0.0
    msk = tl.load(MASK + base + offs, mask=inb, other=0) != 0
    tok = tl.load(TOK + base + offs, mask=inb, other=0).to(tl.int64)
    smp = tl.load(SAMPLED + base + offs, mask=inb, other=0).to(tl.int64)
    count = tl.sum(msk.to(tl.int32), 0)
    if LAST:
        n = count * 0
    else:
        n = tl.maximum(tl.minimum(count - 1, n_sched), 0)
    bits = conf.to(tl.uint32, bitcast=True)
    k32 = tl.where((bits & 0x80000000) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    key = (k32.to(tl.uint64) << 32) | offs.to(tl.uint64)
    key = tl.where(inb, key, 0xFFFFFFFFFFFFFFFF)
    srt = tl.sort(key)
    kth = tl.max(tl.where(offs == n - 1, srt, 0), 0)
    new_mask = msk & (key <= kth) & (n > 0)
    smp_out = tl.where(msk, smp, tok)
    tok_out = tl.where(new_mask, mask_token_id, smp_out).to(tl.int64)
    tl.store(SAMPLED_OUT + base + offs, smp_out, mask=inb)
    tl.store(TOK_OUT + base + offs, tok_out, mask=inb)
    tl.store(MASK_OUT + base + offs, new_mask.to(tl.int8), mask=inb)


# --------------------------------------------------------------------------------------------
# autoregressive sampling


@triton.jit
def _ar_kernel(
    X,
    SID,
    POS,
    KEYS,
    THR,
    TOKENS,
    LOGPROBS,
    V,
    stride_x,
    temperature,
    HAS_THR: tl.constexpr,
    GREEDY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sid = tl.load(SID + row).to(tl.uint32)
    pos = tl.load(POS + row).to(tl.uint32)
    rk_hi = _row_key(tl.load(KEYS + 0).to(tl.uint32), sid, pos)
    rk_lo = _row_key(tl.load(KEYS + 1).to(tl.uint32), sid, pos)
    if HAS_THR:
        thr = tl.load(THR + row)
    x_row = X + row * stride_x
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    ssum = 0.0
    best = float("-inf")
    best_idx = 0
    best_x = float("-inf")
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        x = _sanitize(tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32))
        x = tl.where(inb, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        ssum = ssum * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m = m_new
        if GREEDY:
            score = x
        else:
            z = tl.minimum(tl.math.div_rn(x, temperature), 3.4028234663852886e38)
            if HAS_THR:
                z = tl.where(z >= thr, z, float("-inf"))
            t = cols.to(tl.uint32)
            score = z + _gumbel(_element(rk_hi, t), _element(rk_lo, t))
        tmax = tl.max(score, 0)
        tidx = tl.min(tl.where(score == tmax, cols, 2147483647), 0)
        tx = tl.max(tl.where(cols == tidx, x, float("-inf")), 0)
        upd = tmax > best
        best_idx = tl.where(upd, tidx, best_idx)
        best_x = tl.where(upd, tx, best_x)
        best = tl.where(upd, tmax, best)
    finite = m > float("-inf")
    lp = (best_x - tl.where(finite, m, 0.0)) - tl.log(tl.where(finite, ssum, 1.0))
    tl.store(TOKENS + row, tl.where(finite, best_idx, 0).to(tl.int64))
    tl.store(LOGPROBS + row, tl.where(finite, lp, float("-inf")))


# --------------------------------------------------------------------------------------------
# host side (shared with the cuda backend: the pre-passes are plain PyTorch)


def seed_stream_keys(seed: int, device) -> Tensor:
    """int64 ``[4]``: the (seed, stream, word) part of ``rng.row_key`` for (stream 0, word 0),
    (0, 1), (1, 0), (1, 1), each in [0, 2^32)."""
    keys = [_rng._seed_stream_key(seed, st, w) for st in (0, 1) for w in (0, 1)]
    return torch.tensor(keys, dtype=torch.int64).to(device, non_blocking=True)


def masked_step_threshold(cond: Tensor, unc: Optional[Tensor], a: float, s: float, top_k: int):
    """Top-k pre-pass of the masked step: ``(x, thr)`` with ``x`` the guided, sanitised fp32
    logits ``[rows, V]`` (exactly the reference's) and ``thr [rows]`` its k-th largest value."""
    if unc is not None:
        at = torch.tensor(a, dtype=torch.float32, device=cond.device)
        st = torch.tensor(s, dtype=torch.float32, device=cond.device)
        x = at * cond.float() - st * unc.float()
    else:
        x = cond.float()
    x = _ref.sanitize_logits(x).contiguous()
    thr = x.topk(top_k, dim=-1, sorted=True).values[:, -1].contiguous()
    return x, thr


def ar_threshold(logits: Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> Tensor:
    """Filter pre-pass of ``ar_sample``: ``thr [B]`` fp32 such that the reference keeps code v iff
    ``min(x_v / T, FLT_MAX) >= thr`` (+inf for a row with nothing finite)."""
    z = _ref.top_p_filter(_ref.top_k_filter(_ref._scale(_ref.sanitize_logits(logits), temperature), top_k), top_p)
    return torch.where(z > float("-inf"), z, float("inf")).amin(dim=-1).contiguous()


def _remask_torch(conf, is_masked, tokens, sampled, n_sched, last, mask_token_id):
    """Kernel B in PyTorch (rows longer than MAX_L): same ranking as the reference."""
    B, L = conf.shape
    count = is_masked.sum(dim=-1)
    n = torch.zeros_like(count) if last else torch.clamp(torch.clamp(count - 1, max=n_sched), min=0)
    order = torch.sort(conf, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=conf.device).expand(B, L).contiguous())
    new_mask = is_masked & (rank < n[:, None])
    tok = tokens.to(torch.int64)
    smp = torch.where(is_masked, sampled, tok)
    return torch.where(new_mask, torch.full_like(tok, mask_token_id), smp), new_mask, smp


def _n_sched(L, step, num_steps, schedule, exponent):
    last = step == num_steps - 1
    n_raw = 0 if last else _ref.num_to_keep_masked(L, step, num_steps, schedule, exponent)
    return max(n_raw, 1), last


def _cuda_ops():
    from .. import _ext

    return _ext.cuda_ops()


def masked_sample_step(*args, **kwargs):
    """Triton backend of ``masked_sample_step`` (signature of ``masked_sample_step_ref``)."""
    return _masked_step("triton", *args, **kwargs)


def masked_sample_step_cuda(*args, **kwargs):
    """CUDA backend of ``masked_sample_step`` (csrc/cuda/sampling.cu; same host pre-passes)."""
    return _masked_step("cuda", *args, **kwargs)


def _masked_step(
    backend: str,
    cond_logits: Tensor,
    tokens: Tensor,
    is_masked: Tensor,
    *,
    step: int,
    num_steps: int,
    seed: int,
    mask_token_id: int,
    uncond_logits: Optional[Tensor] = None,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    confidence_noise: float = 4.5,
    schedule: str = "cosine",
    schedule_exponent: float = 2.0,
    top_k: Optional[int] = None,
    sample_ids: Optional[Tensor] = None,
):
    B, L, V = cond_logits.shape
    device = cond_logits.device
    rows = B * L
    guided = uncond_logits is not None and guidance_scale != 0.0
    a = float(torch.tensor(1.0 + guidance_scale, dtype=torch.float32))
    s = float(torch.tensor(guidance_scale, dtype=torch.float32))
    if sample_ids is None:
        sample_ids = torch.arange(B, device=device)
    sample_ids = sample_ids.to(device=device, dtype=torch.int64).contiguous()
    cond = cond_logits.reshape(rows, V)
    unc = uncond_logits.reshape(rows, V) if guided else None
    thr = None
    if top_k is not None and top_k < V and rows > 0:
        cond, thr = masked_step_threshold(cond, unc, a, s, top_k)
        unc = None
    if cond.stride(-1) != 1:
        cond = cond.contiguous()
    if unc is not None and unc.stride(-1) != 1:
        unc = unc.contiguous()
    tok = tokens.contiguous()
    msk = is_masked.contiguous()
    sampled = torch.empty(B, L, dtype=torch.int64, device=device)
    conf = torch.empty(B, L, dtype=torch.float32, device=device)
    tau = confidence_noise * (1.0 - (step + 1) / num_steps)
    tau32 = float(torch.tensor(tau, dtype=torch.float32))
    if rows > 0 and backend == "cuda":
        sampled, conf = _cuda_ops().masked_step_sample(
            cond,
            unc,
            tok,
            msk,
            sample_ids,
            seed_stream_keys(seed, device),
            thr,
            a,
            s,
            float(temperature) if temperature > 0 else 1.0,
            tau32,
            temperature == 0,
            tau != 0.0,
        )
    elif rows > 0:
        blk = block_v(V)
        _masked_step_kernel[(rows,)](
            cond,
            unc if unc is not None else cond,
            tok,
            msk,
            sample_ids,
            seed_stream_keys(seed, device),
            thr if thr is not None else conf,
            sampled,
            conf,
            L,
            V,
            cond.stride(0),
            unc.stride(0) if unc is not None else 0,
            a,
            s,
            float(temperature) if temperature > 0 else 1.0,
            tau32,
            HAS_UNC=unc is not None,
            HAS_THR=thr is not None,
            GREEDY=temperature == 0,
            HAS_NOISE=tau != 0.0,
            BLOCK_V=blk,
            num_warps=_num_warps(blk),
        )
    n_sched, last = _n_sched(L, step, num_steps, schedule, schedule_exponent)
    if L > MAX_L or rows == 0:
        tok_out, new_mask, smp_out = _remask_torch(conf, is_masked, tokens, sampled, n_sched, last, mask_token_id)
        return _ref.MaskedStepOutput(tok_out, new_mask, smp_out, conf)
    if backend == "cuda":
        tok_out, new_mask, smp_out = _cuda_ops().masked_step_remask(
            conf, msk, tok, sampled, n_sched, last, int(mask_token_id)
        )
        return _ref.MaskedStepOutput(tok_out, new_mask, smp_out, conf)
    tok_out = torch.empty(B, L, dtype=torch.int64, device=device)
    new_mask = torch.empty(B, L, dtype=torch.bool, device=device)
    smp_out = torch.empty(B, L, dtype=torch.int64, device=device)
    _remask_kernel[(B,)](
        conf,
        msk,
        tok,
        sampled,
        tok_out,
        new_mask,
        smp_out,
        L,
        n_sched,
        int(mask_token_id),
        LAST=last,
        BLOCK_L=max(16, triton.next_power_of_2(L)),
        num_warps=4,
    )
    return _ref.MaskedStepOutput(tok_out, new_mask, smp_out, conf)


def ar_sample(*args, **kwargs):
    """Triton backend of ``ar_sample`` (signature of ``ar_sample_ref``)."""
    return _ar("triton", *args, **kwargs)


def ar_sample_cuda(*args, **kwargs):
    """CUDA backend of ``ar_sample`` (csrc/cuda/sampling.cu; same host pre-passes)."""
    return _ar("cuda", *args, **kwargs)


def _ar(
    backend: str,
    logits: Tensor,
    *,
    seed: int,
    position: Union[int, Tensor],
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    sample_ids: Optional[Tensor] = None,
):
    B, V = logits.shape
    device = logits.device
    if sample_ids is None:
        sample_ids = torch.arange(B, device=device)
    sample_ids = sample_ids.to(device=device, dtype=torch.int64).contiguous()
    if isinstance(position, Tensor):
        pos = position.to(device=device, dtype=torch.int64).expand(B).contiguous()
    else:
        pos = torch.full((B,), int(position), dtype=torch.int64, device=device)
    greedy = temperature == 0 or top_k == 1
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    tokens = torch.empty(B, dtype=torch.int64, device=device)
    logprobs = torch.empty(B, dtype=torch.float32, device=device)
    if B == 0:
        return _ref.ARSample(tokens, logprobs)
    filt = not greedy and ((top_k is not None and top_k < V) or (top_p is not None and top_p < 1.0))
    thr = ar_threshold(logits, temperature, top_k, top_p) if filt else None
    if backend == "cuda":
        tokens, logprobs = _cuda_ops().ar_sample(
            x,
            sample_ids,
            pos,
            seed_stream_keys(seed, device),
            thr,
            float(temperature) if temperature > 0 else 1.0,
            greedy,
        )
        return _ref.ARSample(tokens, logprobs)
    blk = block_v(V)
    _ar_kernel[(B,)](
        x,
        sample_ids,
        pos,
        seed_stream_keys(seed, device),
        thr if thr is not None else logprobs,
        tokens,
        logprobs,
        V,
        x.stride(0),
        float(temperature) if temperature > 0 else 1.0,
        HAS_THR=thr is not None,
        GREEDY=greedy,
        BLOCK_V=blk,
        num_warps=_num_warps(blk),
    )
    return _ref.ARSample(tokens, logprobs)


def gumbel_from_words(hi: Tensor, lo: Tensor) -> Tensor:
    """The kernels' fp32 Gumbel of int64 words ``hi``, ``lo`` in [0, 2^32) (for tests)."""
    hi = hi.to(torch.int64).contiguous().flatten()
    lo = lo.to(torch.int64).contiguous().flatten()
    out = torch.empty(hi.numel(), dtype=torch.float32, device=hi.device)
    if hi.numel():
        blk = 1024
        _gumbel_words_kernel[(triton.cdiv(hi.numel(), blk),)](hi, lo, out, hi.numel(), BLOCK=blk)
    return out
