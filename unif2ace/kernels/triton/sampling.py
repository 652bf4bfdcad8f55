"""Triton kernels for masked token sampling (one fused MaskGIT step) and autoregressive sampling,
and their launch glue (the ``triton`` backend's entry points ``masked_sample_step`` / ``ar_sample``).

Semantics: :mod:`unif2ace.kernels.reference.sampling` (the oracle) and the counter-based RNG of
:mod:`unif2ace.kernels.reference.rng`, whose Triton device functions are in :mod:`.rng`.

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
  and re-mask count ``n`` from the host's cap, the ``n`` lowest confidences found with one
  ``tl.sort`` of unique 64-bit keys ``(order-preserving bits of the confidence) << 32 | position``
  (ties -> lowest position, as the reference's stable sort), writes tokens / new mask / sampled.
  Rows longer than ``MAX_L`` use the reference's ranking in PyTorch, documented fallback.
- ``_ar_kernel``: one program per row: online max / sum-exp of the untempered logits for the
  logprob, Gumbel-max over ``min(x / T, FLT_MAX)`` (IEEE division, ``tl.math.div_rn``) or argmax.

The fp32 Gumbel noise (:func:`.rng.gumbel`) agrees with the reference's float64-then-rounded
value to a few ulp, so token choices can only differ on near-ties of ``x/T + g`` (none observed in
the tests).

Host side: the pre-passes (top-k / top-p thresholds, keys, sample ids) are the CUDA backend's
(:mod:`unif2ace.kernels.cuda.sampling`, plain PyTorch): both fused backends take the same inputs.

Launch cost: the interpreter runs ~1 ms per program; tests keep B·L small and ``BLOCK_V`` large.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cuda import sampling as _host
from ..reference import sampling as _ref
from ._launch import Launch, launch
from .rng import element, gumbel, row_keys

__all__ = ["masked_sample_step", "ar_sample", "MAX_L", "MAX_BLOCK_V"]

MAX_BLOCK_V = 4096
MAX_L = 4096
FLT_MAX = _ref.FLT_MAX


def block_v(V: int) -> int:
    return max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _sanitize(x):
    x = tl.where(x != x, float("-inf"), x)
    return tl.where(x == float("inf"), 3.4028234663852886e38, x)


@triton.jit
def _online_sumexp(m, ssum, x):
    """Fold the tile ``x`` into the running (max ``m``, ``sum exp(x - m)``)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, ssum * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)


@triton.jit
def _scale(x, temperature):
    """``min(x / T, FLT_MAX)`` with IEEE division."""
    return tl.minimum(tl.math.div_rn(x, temperature), 3.4028234663852886e38)


@triton.jit
def _perturb(z, cols, rk_hi, rk_lo):
    """``z + g`` with ``g`` the Gumbel of each code ``cols`` under the row keys (rk_hi, rk_lo)."""
    t = cols.to(tl.uint32)
    return z + gumbel(element(rk_hi, t), element(rk_lo, t))


@triton.jit
def _carry_best(best, best_idx, best_x, score, cols, x):
    """Carry the tile's best (score, its lowest code, that code's ``x``) into the running best: only
    a strictly larger score replaces it, so ties keep the lowest code."""
    tmax = tl.max(score, 0)
    tidx = tl.min(tl.where(score == tmax, cols, 2147483647), 0)
    tx = tl.max(tl.where(cols == tidx, x, float("-inf")), 0)
    upd = tmax > best
    return tl.where(upd, tmax, best), tl.where(upd, tidx, best_idx), tl.where(upd, tx, best_x)


@triton.jit
def _log_p(best_x, m, ssum):
    """``(log softmax of the best code, finite)``: -inf where the row had no finite value."""
    finite = m > float("-inf")
    lp = (best_x - tl.where(finite, m, 0.0)) - tl.log(tl.where(finite, ssum, 1.0))
    return tl.where(finite, lp, float("-inf")), finite


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
    rk_hi, rk_lo = row_keys(KEYS, 0, sid, pos)  # stream 0: token sampling
    if HAS_THR:
        thr = tl.load(THR + unit)
    c_row = COND + unit * stride_c
    u_row = UNC + unit * stride_u
    offs = tl.arange(0, BLOCK_V)
    n_cols = tl.where(masked, V, 0)  # unmasked positions skip the sweep
    m, ssum = float("-inf"), 0.0  # running max and sum of exp(x - max)
    best, best_idx, best_x = float("-inf"), 0, float("-inf")  # running best score, its code, its x
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
        m, ssum = _online_sumexp(m, ssum, x)
        # Gumbel-max (or argmax) on this tile
        if GREEDY:
            score = x
        else:
            score = _perturb(_scale(x, temperature), cols, rk_hi, rk_lo)
        best, best_idx, best_x = _carry_best(best, best_idx, best_x, score, cols, x)
    lp, finite = _log_p(best_x, m, ssum)
    code = tl.where(finite, best_idx, 0).to(tl.int64)
    if HAS_NOISE:
        ck_hi, ck_lo = row_keys(KEYS, 1, sid, pos)  # stream 1: confidence noise, token 0
        zero = pos * 0
        lp = lp + tau * gumbel(element(ck_hi, zero), element(ck_lo, zero))
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
    rk_hi, rk_lo = row_keys(KEYS, 0, sid, pos)
    if HAS_THR:
        thr = tl.load(THR + row)
    x_row = X + row * stride_x
    offs = tl.arange(0, BLOCK_V)
    m, ssum = float("-inf"), 0.0  # running max and sum of exp(x - max)
    best, best_idx, best_x = float("-inf"), 0, float("-inf")  # running best score, its code, its x
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        x = _sanitize(tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32))
        x = tl.where(inb, x, float("-inf"))
        m, ssum = _online_sumexp(m, ssum, x)
        if GREEDY:
            score = x
        else:
            z = _scale(x, temperature)
            if HAS_THR:
                z = tl.where(z >= thr, z, float("-inf"))
            score = _perturb(z, cols, rk_hi, rk_lo)
        best, best_idx, best_x = _carry_best(best, best_idx, best_x, score, cols, x)
    lp, finite = _log_p(best_x, m, ssum)
    tl.store(TOKENS + row, tl.where(finite, best_idx, 0).to(tl.int64))
    tl.store(LOGPROBS + row, lp)


# --------------------------------------------------------------------------------------------
# launch glue (the host pre-passes are shared with the cuda backend)


def masked_sample_step(cond_logits, tokens, is_masked, uncond_logits, sample_ids, p: _ref.StepParams):
    """One MaskGIT step (``masked_sample_step_ref`` semantics) with the scalars ``p``."""
    B, L, V = cond_logits.shape
    rows = B * L
    conf, sampled = _host.empty_step(B, L, cond_logits.device)
    if rows == 0:
        return _host.remask_in_torch(conf, sampled, tokens, is_masked, p)
    x = _host.masked_step_inputs(cond_logits, tokens, is_masked, uncond_logits, sample_ids, p)
    blk = block_v(V)
    args = (x.cond, x.unc if x.unc is not None else x.cond, x.tokens, x.is_masked, x.sample_ids, x.keys)
    args += (x.thr if x.thr is not None else conf, sampled, conf, L, V)
    args += (x.cond.stride(0), x.unc.stride(0) if x.unc is not None else 0, x.a, x.s, x.temperature, x.tau)
    constexprs = dict(
        HAS_UNC=x.unc is not None,
        HAS_THR=x.thr is not None,
        GREEDY=p.temperature == 0,
        HAS_NOISE=p.tau != 0.0,
        BLOCK_V=blk,
    )
    launch(Launch(_masked_step_kernel, (rows,), args, constexprs, dict(num_warps=_num_warps(blk))))
    if L > MAX_L:
        return _host.remask_in_torch(conf, sampled, tokens, is_masked, p)
    tok_out = torch.empty(B, L, dtype=torch.int64, device=conf.device)
    new_mask = torch.empty(B, L, dtype=torch.bool, device=conf.device)
    smp_out = torch.empty(B, L, dtype=torch.int64, device=conf.device)
    args = (conf, x.is_masked, x.tokens, sampled, tok_out, new_mask, smp_out, L, p.n_cap, int(p.mask_token_id))
    constexprs = dict(LAST=p.last, BLOCK_L=max(16, triton.next_power_of_2(L)))
    launch(Launch(_remask_kernel, (B,), args, constexprs, dict(num_warps=4)))
    return _ref.MaskedStepOutput(tok_out, new_mask, smp_out, conf)


def ar_sample(logits, *, seed, position, temperature=1.0, top_k=None, top_p=None, sample_ids=None):
    """One autoregressive sampling step (``ar_sample_ref`` semantics)."""
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return _ref.ARSample(tokens, logprobs)
    x = _host.ar_inputs(logits, seed, position, temperature, top_k, top_p, sample_ids)
    blk = block_v(V)
    args = (x.logits, x.sample_ids, x.positions, x.keys, x.thr if x.thr is not None else logprobs, tokens, logprobs)
    args += (V, x.logits.stride(0), x.temperature)
    constexprs = dict(HAS_THR=x.thr is not None, GREEDY=x.greedy, BLOCK_V=blk)
    launch(Launch(_ar_kernel, (B,), args, constexprs, dict(num_warps=_num_warps(blk))))
    return _ref.ARSample(tokens, logprobs)
