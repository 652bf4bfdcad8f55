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
from ..reference import rng as _rng
from ..reference import sampling as _ref
from ._launch import Launch, launch, on_gpu, sm_count
from .rng import FP_OPTIONS, draw_target, element, exp_fixed, gumbel, log_f32, row_keys

__all__ = ["masked_sample_step", "ar_sample", "MAX_L", "MAX_BLOCK_V"]

MAX_BLOCK_V = 4096
MAX_L = 4096
FLT_MAX = _ref.FLT_MAX


def block_v(V: int) -> int:
    return max(16, min(triton.next_power_of_2(V), MAX_BLOCK_V))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _remask_warps(block_l: int) -> int:
    """Warps of the re-mask kernel: at most 8 of a row's positions per thread (each holds its
    64-bit sort key, confidence, mask, token and code: at 32 per thread, L = 4096 on 4 warps, the
    sort spilled at 255 registers)."""
    return max(4, min(16, block_l // 256))


@triton.jit
def _sanitize(x):
    x = tl.where(x != x, float("-inf"), x)
    return tl.where(x == float("inf"), 3.4028234663852886e38, x)


@triton.jit
def _scale(x, temperature):
    """``min(x / T, FLT_MAX)`` with IEEE division."""
    return tl.minimum(tl.math.div_rn(x, temperature), 3.4028234663852886e38)


# --------------------------------------------------------------------------------------------
# the draw: fixed-point softmax and inverse transform over a row streamed in tiles


@triton.jit
def _first_max(m, idx, x, cols):
    """Carry the tile's max and its lowest code into the running (max ``m``, its code ``idx``): only
    a strictly larger max replaces it, so ties keep the lowest code."""
    tmax = tl.max(x, 0)
    tidx = tl.min(tl.where(x == tmax, cols, 2147483647), 0)
    upd = tmax > m
    return tl.where(upd, tmax, m), tl.where(upd, tidx, idx)


@triton.jit
def _find_tile(TSUM, n_tiles, U):
    """The tile holding the draw (the first whose running sum of the tile sums exceeds ``U``) and
    the sum of the tiles before it."""
    sel = n_tiles * 0 - 1
    before = U * 0
    acc = U * 0
    for t in range(0, n_tiles):
        ts = tl.load(TSUM + t)
        hit = (sel < 0) & (acc + ts > U)
        sel = tl.where(hit, t, sel)
        before = tl.where(hit, acc, before)
        acc += ts
    return sel, before


@triton.jit
def _pick_in_tile(q, cols, before, U):
    """The first code of the tile whose running sum ``before + q_0 + ... + q_v`` exceeds ``U``."""
    c = tl.cumsum(q, 0) + before
    return tl.min(tl.where(c > U, cols, 2147483647), 0)


@triton.jit
def _log_p(x_pick, m, S, inv_scale):
    """``(x_pick - m) - lse_rel`` with lse_rel = log_f32(f32(S) 2^-K); -inf where the row had no
    finite value (m = -inf)."""
    finite = m > float("-inf")
    lse = log_f32(tl.where(finite, S, 1 << 50).to(tl.float32) * inv_scale)
    lp = (x_pick - tl.where(finite, m, 0.0)) - lse
    return tl.where(finite, lp, float("-inf")), finite


# --------------------------------------------------------------------------------------------
# kernel A: sample + confidence per (row, position)


@triton.jit
def _step_tile(c_row, u_row, cols, V, a, s, thr, HAS_UNC: tl.constexpr, HAS_THR: tl.constexpr):
    """The guided, sanitised, top-k-filtered fp32 logits of one tile (-inf past V)."""
    inb = cols < V
    x = tl.load(c_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
    if HAS_UNC:
        xu = tl.load(u_row + cols, mask=inb, other=0.0).to(tl.float32)
        x = a * x - s * xu
    x = _sanitize(x)
    x = tl.where(inb, x, float("-inf"))
    if HAS_THR:
        x = tl.where(x >= thr, x, float("-inf"))
    return x


@triton.jit(do_not_specialize=["K0", "K1", "K2", "K3", "kbias"])
def _masked_step_kernel(
    COND,
    UNC,
    TOK,
    MASK,
    SID,
    THR,
    TSUM,
    SAMPLED,
    CONF,
    L,
    V,
    n_tiles,
    stride_c,
    stride_u,
    a,
    s,
    temperature,
    tau,
    K0,
    K1,
    K2,
    K3,
    kbias,
    inv_scale,
    HAS_UNC: tl.constexpr,
    HAS_THR: tl.constexpr,
    GREEDY: tl.constexpr,
    TEMPERED: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    unit = tl.program_id(0).to(tl.int64)
    b = unit // L
    i = unit - b * L
    masked = tl.load(MASK + unit) != 0
    sid = tl.load(SID + b).to(tl.uint32)
    pos = i.to(tl.uint32)
    thr = 0.0
    if HAS_THR:
        thr = tl.load(THR + unit)
    c_row = COND + unit * stride_c
    u_row = UNC + unit * stride_u
    offs = tl.arange(0, BLOCK_V)
    n_cols = tl.where(masked, V, 0)  # unmasked positions skip the sweeps
    # pass 1: the row max (and, greedy, its first code)
    m, pick = float("-inf"), 0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = _step_tile(c_row, u_row, cols, V, a, s, thr, HAS_UNC, HAS_THR)
        m, pick = _first_max(m, pick, x, cols)
    m0 = tl.where(m > float("-inf"), m, 0.0)
    mz = m0
    if TEMPERED:
        mz = _scale(m0, temperature)
    # pass 2: the fixed-point sums at temperature 1 (log p) and of the draw's scores, per tile
    S = n_cols.to(tl.int64) * 0
    Sz = S
    tsum = TSUM + unit * n_tiles
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        x = _step_tile(c_row, u_row, cols, V, a, s, thr, HAS_UNC, HAS_THR)
        ts = tl.sum(exp_fixed(x - m0, kbias), 0)
        S += ts
        if not GREEDY:
            if TEMPERED:
                ts = tl.sum(exp_fixed(_scale(x, temperature) - mz, kbias), 0)
                Sz += ts
            tl.store(tsum + start // BLOCK_V, ts)
    if not TEMPERED:
        Sz = S
    # pass 3: the draw (the tile holding it, then the code within)
    x_pick = m
    if not GREEDY:
        rk_hi, rk_lo = row_keys(K0, K1, sid, pos)  # stream 0: the code's draw
        U = draw_target(rk_hi, rk_lo, Sz)
        n_t = tl.where(masked & (mz > float("-inf")), n_tiles, 0)
        sel, before = _find_tile(tsum, n_t, U)  # sel < 0: every score -inf, code 0
        start = tl.maximum(sel, 0) * BLOCK_V
        for _ in range(0, tl.where(masked, 1, 0)):  # the one tile holding the code
            cols = start + offs
            x = _step_tile(c_row, u_row, cols, V, a, s, thr, HAS_UNC, HAS_THR)
            z = x
            if TEMPERED:
                z = _scale(x, temperature)
            pick = tl.where(sel >= 0, _pick_in_tile(exp_fixed(z - mz, kbias), cols, before, U), 0)
            x_pick = tl.max(tl.where(cols == pick, x, float("-inf")), 0)
    lp, finite = _log_p(x_pick, m, S, inv_scale)
    code = tl.where(finite, pick, 0).to(tl.int64)
    if HAS_NOISE:
        ck_hi, ck_lo = row_keys(K2, K3, sid, pos)  # stream 1: confidence noise, token 0
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
def _ar_tile(x_row, cols, V):
    """The sanitised fp32 logits of one tile (-inf past V)."""
    inb = cols < V
    x = _sanitize(tl.load(x_row + cols, mask=inb, other=float("-inf")).to(tl.float32))
    return tl.where(inb, x, float("-inf"))


@triton.jit
def _ar_scores(x, temperature, thr, TEMPERED: tl.constexpr, HAS_THR: tl.constexpr):
    """The scores the draw is over: ``min(x / T, FLT_MAX)`` (x at T = 1) kept where ``>= thr``."""
    z = x
    if TEMPERED:
        z = _scale(x, temperature)
    if HAS_THR:
        z = tl.where(z >= thr, z, float("-inf"))
    return z


# The rows are split into segments of whole BLOCK_V tiles, one program each, so that a few rows of a
# large vocabulary still fill the GPU (B <= 8 rows of V = 256k on 132 SMs). The exact integer sums
# make the split invisible: any partition of a row sums to the same bits.


@triton.jit
def _ar_max_kernel(X, MAXV, MAXI, V, stride_x, seg_len, n_seg, BLOCK_V: tl.constexpr):
    """Per (row, segment): the segment's max and its first code."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    x_row = X + row * stride_x
    offs = tl.arange(0, BLOCK_V)
    m, idx = float("-inf"), 0
    for start in range(seg * seg_len, tl.minimum(seg * seg_len + seg_len, V), BLOCK_V):
        cols = start + offs
        m, idx = _first_max(m, idx, _ar_tile(x_row, cols, V), cols)
    tl.store(MAXV + row * n_seg + seg, m)
    tl.store(MAXI + row * n_seg + seg, idx)


@triton.jit
def _row_max(MAXV, MAXI, row, n_seg, BLOCK_S: tl.constexpr):
    """The row's max and its first code from the segments' (segments in code order)."""
    segs = tl.arange(0, BLOCK_S)
    mv = tl.load(MAXV + row * n_seg + segs, mask=segs < n_seg, other=float("-inf"))
    mi = tl.load(MAXI + row * n_seg + segs, mask=segs < n_seg, other=2147483647)
    m = tl.max(mv, 0)
    return m, tl.min(tl.where(mv == m, mi, 2147483647), 0)


@triton.jit
def _ar_row(
    X, THR, MAXV, MAXI, row, stride_x, n_seg, HAS_THR: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr
):
    """An AR row: its logits pointer, tile offsets, filter threshold (0.0 without) and max (value, code)."""
    thr = 0.0
    if HAS_THR:
        thr = tl.load(THR + row)
    m, pick = _row_max(MAXV, MAXI, row, n_seg, BLOCK_S)
    return X + row * stride_x, tl.arange(0, BLOCK_V), thr, m, pick


@triton.jit(do_not_specialize=["kbias"])
def _ar_sum_kernel(
    X,
    THR,
    MAXV,
    MAXI,
    TSUM,
    SSUM,
    V,
    stride_x,
    seg_len,
    n_seg,
    n_tiles,
    temperature,
    kbias,
    HAS_THR: tl.constexpr,
    GREEDY: tl.constexpr,
    TEMPERED: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per (row, segment): the fixed-point sums of the logits (logprob) and of the draw's scores,
    per tile (TSUM) and per segment (SSUM)."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    x_row, offs, thr, m, _ = _ar_row(X, THR, MAXV, MAXI, row, stride_x, n_seg, HAS_THR, BLOCK_V, BLOCK_S)
    m0 = tl.where(m > float("-inf"), m, 0.0)
    mz = m0
    if TEMPERED:
        mz = _scale(m0, temperature)  # the top code survives the filters: the max of the scores
    S = row * 0
    Sz = S
    for start in range(seg * seg_len, tl.minimum(seg * seg_len + seg_len, V), BLOCK_V):
        cols = start + offs
        x = _ar_tile(x_row, cols, V)
        ts = tl.sum(exp_fixed(x - m0, kbias), 0)
        S += ts
        if not GREEDY:
            if TEMPERED or HAS_THR:
                ts = tl.sum(exp_fixed(_ar_scores(x, temperature, thr, TEMPERED, HAS_THR) - mz, kbias), 0)
                Sz += ts
            tl.store(TSUM + row * n_tiles + start // BLOCK_V, ts)
    tl.store(SSUM + (row * n_seg + seg) * 2, S)
    tl.store(SSUM + (row * n_seg + seg) * 2 + 1, Sz)


@triton.jit(do_not_specialize=["K0", "K1", "kbias"])
def _ar_pick_kernel(
    X,
    SID,
    POS,
    THR,
    MAXV,
    MAXI,
    TSUM,
    SSUM,
    TOKENS,
    LOGPROBS,
    V,
    stride_x,
    n_seg,
    n_tiles,
    temperature,
    K0,
    K1,
    kbias,
    inv_scale,
    HAS_THR: tl.constexpr,
    GREEDY: tl.constexpr,
    TEMPERED: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per row: the segments' results combined, the draw (the tile holding it, then the code
    within), the logprob."""
    row = tl.program_id(0).to(tl.int64)
    x_row, offs, thr, m, pick = _ar_row(X, THR, MAXV, MAXI, row, stride_x, n_seg, HAS_THR, BLOCK_V, BLOCK_S)
    segs = tl.arange(0, BLOCK_S)
    sums = SSUM + (row * n_seg + segs) * 2
    S = tl.sum(tl.load(sums, mask=segs < n_seg, other=0), 0)
    Sz = S
    if TEMPERED or HAS_THR:
        Sz = tl.sum(tl.load(sums + 1, mask=segs < n_seg, other=0), 0)
    x_pick = m
    if not GREEDY:
        mz = tl.where(m > float("-inf"), m, 0.0)
        if TEMPERED:
            mz = _scale(mz, temperature)
        sid = tl.load(SID + row).to(tl.uint32)
        pos = tl.load(POS + row).to(tl.uint32)
        rk_hi, rk_lo = row_keys(K0, K1, sid, pos)
        U = draw_target(rk_hi, rk_lo, Sz)
        n_t = tl.where(mz > float("-inf"), n_tiles, 0)
        sel, before = _find_tile(TSUM + row * n_tiles, n_t, U)  # sel < 0: every score -inf, code 0
        cols = tl.maximum(sel, 0) * BLOCK_V + offs
        x = _ar_tile(x_row, cols, V)
        z = _ar_scores(x, temperature, thr, TEMPERED, HAS_THR)
        pick = tl.where(sel >= 0, _pick_in_tile(exp_fixed(z - mz, kbias), cols, before, U), 0)
        x_pick = tl.max(tl.where(cols == pick, x, float("-inf")), 0)
    lp, finite = _log_p(x_pick, m, S, inv_scale)
    tl.store(TOKENS + row, tl.where(finite, pick, 0).to(tl.int64))
    tl.store(LOGPROBS + row, lp)


# --------------------------------------------------------------------------------------------
# launch glue (the host pre-passes are shared with the cuda backend)


# AR rows are split into segments when they alone would not fill the GPU: about two programs per SM.
# Under the interpreter one segment per row unless a test sets FORCE_AR_SEGMENTS.
FORCE_AR_SEGMENTS = None


def _ar_segments(B: int, n_tiles: int, device: torch.device) -> int:
    """Segments (programs) per AR row: enough for ~2 programs per SM, at most one per tile."""
    if FORCE_AR_SEGMENTS is not None:
        return max(1, min(n_tiles, FORCE_AR_SEGMENTS))
    if not on_gpu(device):
        return 1
    return max(1, min(n_tiles, triton.cdiv(2 * sm_count(device), B)))


def _signed32(k: int) -> int:
    """A uint32 key as the int32 with its bits (scalar kernel arguments of one type)."""
    return k - (1 << 32) if k >= (1 << 31) else k


def _fixed_args(V: int, blk: int):
    """``(kbias = 127 + K, 2^-K, n_tiles)`` of the fixed-point softmax of a V-code row."""
    K = _rng.sum_bits(V)
    return 127 + K, 2.0**-K, triton.cdiv(V, blk)


def masked_sample_step(cond_logits, tokens, is_masked, uncond_logits, sample_ids, p: _ref.StepParams):
    """One MaskGIT step (``masked_sample_step_ref`` semantics) with the scalars ``p``."""
    B, L, V = cond_logits.shape
    rows = B * L
    conf, sampled = _host.empty_step(B, L, cond_logits.device)
    if rows == 0:
        return _host.remask_in_torch(conf, sampled, tokens, is_masked, p)
    x = _host.masked_step_inputs(cond_logits, tokens, is_masked, uncond_logits, sample_ids, p)
    blk = block_v(V)
    kbias, inv_scale, n_tiles = _fixed_args(V, blk)
    greedy = p.temperature == 0
    tsum = torch.empty(1 if greedy else rows * n_tiles, dtype=torch.int64, device=conf.device)
    args = (x.cond, x.unc if x.unc is not None else x.cond, x.tokens, x.is_masked, x.sample_ids)
    args += (x.thr if x.thr is not None else conf, tsum, sampled, conf, L, V, n_tiles)
    args += (x.cond.stride(0), x.unc.stride(0) if x.unc is not None else 0, x.a, x.s, x.temperature, x.tau)
    args += (*(_signed32(k) for k in x.keys), kbias, inv_scale)
    constexprs = dict(
        HAS_UNC=x.unc is not None,
        HAS_THR=x.thr is not None,
        GREEDY=greedy,
        TEMPERED=not greedy and x.temperature != 1.0,
        HAS_NOISE=p.tau != 0.0,
        BLOCK_V=blk,
    )
    launch(Launch(_masked_step_kernel, (rows,), args, constexprs, dict(num_warps=_num_warps(blk), **FP_OPTIONS)))
    if L > MAX_L:
        return _host.remask_in_torch(conf, sampled, tokens, is_masked, p)
    tok_out = torch.empty(B, L, dtype=torch.int64, device=conf.device)
    new_mask = torch.empty(B, L, dtype=torch.bool, device=conf.device)
    smp_out = torch.empty(B, L, dtype=torch.int64, device=conf.device)
    args = (conf, x.is_masked, x.tokens, sampled, tok_out, new_mask, smp_out, L, p.n_cap, int(p.mask_token_id))
    block_l = max(16, triton.next_power_of_2(L))
    constexprs = dict(LAST=p.last, BLOCK_L=block_l)
    launch(Launch(_remask_kernel, (B,), args, constexprs, dict(num_warps=_remask_warps(block_l), **FP_OPTIONS)))
    return _ref.MaskedStepOutput(tok_out, new_mask, smp_out, conf)


def ar_sample(logits, *, seed, position, temperature=1.0, top_k=None, top_p=None, sample_ids=None, logprobs=True):
    """One autoregressive sampling step (``ar_sample_ref`` semantics); the log-probabilities are
    formed whatever ``logprobs`` says (the public op drops them when they were not asked for)."""
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return _ref.ARSample(tokens, logprobs)
    x = _host.ar_inputs(logits, seed, position, temperature, top_k, top_p, sample_ids)
    blk = block_v(V)
    kbias, inv_scale, n_tiles = _fixed_args(V, blk)
    n_seg = _ar_segments(B, n_tiles, logits.device)
    seg_len = triton.cdiv(n_tiles, n_seg) * blk
    n_seg = triton.cdiv(V, seg_len)
    dev = logits.device
    maxv = torch.empty(B * n_seg, dtype=torch.float32, device=dev)
    maxi = torch.empty(B * n_seg, dtype=torch.int32, device=dev)
    tsum = torch.empty(B * n_tiles, dtype=torch.int64, device=dev)
    ssum = torch.empty(B * n_seg * 2, dtype=torch.int64, device=dev)
    thr = x.thr if x.thr is not None else logprobs
    own = not x.greedy and x.temperature != 1.0
    flags = dict(HAS_THR=x.thr is not None, GREEDY=x.greedy, TEMPERED=own)
    opts = dict(num_warps=_num_warps(blk), **FP_OPTIONS)
    blk_s = max(2, triton.next_power_of_2(n_seg))
    stride = x.logits.stride(0)
    args = (x.logits, maxv, maxi, V, stride, seg_len, n_seg)
    launch(Launch(_ar_max_kernel, (B, n_seg), args, dict(BLOCK_V=blk), opts))
    args = (x.logits, thr, maxv, maxi, tsum, ssum, V, stride, seg_len, n_seg, n_tiles, x.temperature, kbias)
    launch(Launch(_ar_sum_kernel, (B, n_seg), args, dict(**flags, BLOCK_V=blk, BLOCK_S=blk_s), opts))
    args = (x.logits, x.sample_ids, x.positions, thr, maxv, maxi, tsum, ssum, tokens, logprobs, V, stride, n_seg)
    args += (n_tiles, x.temperature, *(_signed32(k) for k in x.keys[:2]), kbias, inv_scale)
    launch(Launch(_ar_pick_kernel, (B,), args, dict(**flags, BLOCK_V=blk, BLOCK_S=blk_s), opts))
    return _ref.ARSample(tokens, logprobs)
