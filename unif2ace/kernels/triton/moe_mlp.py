"""Triton kernels of the routed (grouped) expert MLP, forward and backward, and their launch glue.

Semantics are those of :mod:`unif2ace.kernels.reference.moe_mlp`; this file only makes them fast.

Tokens are never copied: the align index list (:func:`unif2ace.kernels.triton.moe_routing.moe_align`,
padded to BLOCK_M per expert) is read in the GEMM prologues and rows are gathered through
``sorted_token_ids // k``.

forward (:func:`moe_expert_mlp`): up-kernel ``h = act(x[tok] @ w1[e] + b1[e])`` (activation in the
epilogue, h stored per padded position), the gather-GEMM ``y[a] = gate[a] * (h @ w2[e] + b2[e])``
stored per assignment a = t*k + j, and a combine kernel that sums ``y[t*k + j]`` for j = 0..k-1 in
fp32 in that order (deterministic, no atomics; invalid ids are skipped).

backward (:func:`moe_expert_mlp_backward`): one kernel recomputes ``h`` and
``dA = grad_out[tok] @ w2[e]^T`` in a shared loop over D, writes the activation ``a`` and ``dh``
(through the activation derivative, gate applied) and per-F-tile partials of
``dgates = <a, dA> + <grad_out, b2>`` (reduced over tiles in fixed order); dW1/dW2/db1/db2 by one
grouped ``X^T Y`` kernel (one program per (expert, tile), walking that expert's blocks of the index
list in order); dX per assignment by the same gather-GEMM as the forward's down-projection (no
bias, no gate; ``w1[e]^T`` through its strides) and the same fixed-order k-way combine.
``x[tok] @ w1[e]`` is one jitted step (:func:`_x_w1_step`) shared by the up-kernel and the backward.

Numerics: every load is converted to fp32, reductions and epilogues are fp32; bf16/fp16 appear
only as ``tl.dot`` operands (x, w, and the stored h / dh). fp32 dots use ``input_precision="ieee"``
(no TF32, so fp32 parity holds on GPUs) unless TF32 matmuls are allowed on the GPU
(``torch.set_float32_matmul_precision("high")``, i.e. ``torch.backends.cuda.matmul.allow_tf32``), as
``torch.mm`` and the fused head do. All address arithmetic is int64.

Tile configurations live in a small table (``MLP_CONFIGS``) keyed by a shape class, to be tuned on
a GPU; the interpreter gets large tiles (each program costs ~1 ms there).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from ..reference.moe_mlp import moe_expert_mlp_backward_ref, moe_expert_mlp_ref
from ._launch import Launch, interpreting, launch, on_gpu
from .moe_routing import _pow2, moe_align

__all__ = ["MLP_CONFIGS", "mlp_config", "moe_expert_mlp", "moe_expert_mlp_backward"]

Tensor = torch.Tensor
# every output and scratch buffer is allocated through these (tests swap in poisoned allocations)
_empty = torch.empty
_empty_like = torch.empty_like

# tile configuration tables (shape class -> tiles). Values for GPUs are first guesses from the
# vLLM defaults; tune them on the device and edit here.
MLP_CONFIGS: Dict[str, Dict[str, int]] = {
    # BLOCK_M: rows per block (= align block size); BLOCK_F: hidden (F) tile; BLOCK_D: model (D) tile
    "interpret": dict(BLOCK_M=32, BLOCK_F=64, BLOCK_D=64, num_warps=4, num_stages=1),
    "decode": dict(BLOCK_M=16, BLOCK_F=64, BLOCK_D=64, num_warps=4, num_stages=3),  # ~<= 16 rows / expert
    "medium": dict(BLOCK_M=64, BLOCK_F=64, BLOCK_D=64, num_warps=4, num_stages=3),
    "large": dict(BLOCK_M=64, BLOCK_F=128, BLOCK_D=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_M=32, BLOCK_F=64, BLOCK_D=32, num_warps=4, num_stages=2),  # ieee fp32 dots
}


def mlp_config(num_assignments: int, num_experts: int, dtype: torch.dtype) -> Dict[str, int]:
    """Tile config for the grouped MLP from the shape class (rows per expert, dtype)."""
    if interpreting():
        return MLP_CONFIGS["interpret"]
    if dtype == torch.float32:
        return MLP_CONFIGS["fp32"]
    per_expert = num_assignments / max(num_experts, 1)
    if per_expert <= 16:
        return MLP_CONFIGS["decode"]
    if per_expert <= 1024:
        return MLP_CONFIGS["medium"]
    return MLP_CONFIGS["large"]


ACT_GELU, ACT_GELU_TANH, ACT_SWIGLU = 0, 1, 2
_ACT = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "swiglu": ACT_SWIGLU}


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): saturates cleanly to +-1 (exp overflow -> inf -> 0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _act_fwd(h, up, ACT: tl.constexpr):
    if ACT == 0:
        a = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 1:
        a = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    else:
        a = h / (1.0 + tl.exp(-h)) * up
    return a


@triton.jit
def _block_tile(SORTED, pid_m, pid_c, N, C, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # block pid_m of the index list (an expert's block): its padded positions, assignments a, which
    # are real (a < N) and their tokens; and column tile pid_c of width C
    pos = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    a = tl.load(SORTED + pos).to(tl.int64)  # blocks with an expert lie inside the padded total
    valid = a < N
    tok = a // K
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return pos, a, valid, tok, cols, cols < C


@triton.jit
def _x_w1_step(
    X,
    w1e,
    tok,
    valid,
    dc,
    dm,
    fc,
    fm,
    F,
    stride_xt,
    stride_xd,
    stride_w1d,
    stride_w1f,
    h,
    up,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    # one D tile (columns dc) of h += x[tok] @ w1[e][:, fc] and, for swiglu, up += x[tok] @ w1[e][:, F + fc]
    xa = tl.load(
        X + tok[:, None] * stride_xt + dc[None, :].to(tl.int64) * stride_xd,
        mask=valid[:, None] & dm[None, :],
        other=0.0,
    )
    wp = w1e + dc[:, None].to(tl.int64) * stride_w1d
    w = tl.load(wp + fc[None, :].to(tl.int64) * stride_w1f, mask=dm[:, None] & fm[None, :], other=0.0)
    h = tl.dot(xa, w, h, input_precision=PREC)
    if ACT == 2:
        wu = tl.load(wp + (F + fc[None, :]).to(tl.int64) * stride_w1f, mask=dm[:, None] & fm[None, :], other=0.0)
        up = tl.dot(xa, wu, up, input_precision=PREC)
    return h, up


@triton.jit
def _add_b1(B1, e, stride_b1e, fc, fm, F, h, up, ACT: tl.constexpr):
    # h += b1[e][fc] and, for swiglu, up += b1[e][F + fc]
    h += tl.load(B1 + e * stride_b1e + fc, mask=fm, other=0.0).to(tl.float32)[None, :]
    if ACT == 2:
        up += tl.load(B1 + e * stride_b1e + F + fc, mask=fm, other=0.0).to(tl.float32)[None, :]
    return h, up


@triton.jit
def _mlp_up_kernel(
    X,
    W1,
    B1,
    SORTED,
    BEID,
    H,
    N,
    D,
    F,
    stride_xt,
    stride_xd,
    stride_w1e,
    stride_w1d,
    stride_w1f,
    stride_b1e,
    stride_ht,
    K: tl.constexpr,
    ACT: tl.constexpr,
    HAS_B1: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    e = tl.load(BEID + pid_m).to(tl.int64)
    if e < 0:
        return
    pos, a_idx, valid, tok, fc, fm = _block_tile(SORTED, pid_m, pid_f, N, F, K, BLOCK_M, BLOCK_F)
    w1e = W1 + e * stride_w1e
    acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        dm = dc < D
        acc, acc_up = _x_w1_step(
            X, w1e, tok, valid, dc, dm, fc, fm, F, stride_xt, stride_xd, stride_w1d, stride_w1f, acc, acc_up, ACT, PREC
        )
    if HAS_B1:
        acc, acc_up = _add_b1(B1, e, stride_b1e, fc, fm, F, acc, acc_up, ACT)
    act = _act_fwd(acc, acc_up, ACT)
    tl.store(H + pos[:, None] * stride_ht + fc[None, :], act.to(H.dtype.element_ty), mask=fm[None, :])


@triton.jit
def _gather_gemm_kernel(
    A,
    B,
    BIAS,
    GATES,
    SORTED,
    BEID,
    Y,
    N,
    R,
    D,
    stride_at,
    stride_be,
    stride_br,
    stride_bd,
    stride_biase,
    stride_yt,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_GATE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Y[a] = A[pos] @ B[e] (+ BIAS[e]) (* gate[a]) for the assignments a of block pid_m (rows of A
    # are the block's padded positions; B[e] is [R, D] through its strides). The forward's
    # down-projection (A = h, B = w2, bias b2, gated) and dX (A = dh, B = w1^T, neither).
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    e = tl.load(BEID + pid_m).to(tl.int64)
    if e < 0:
        return
    pos, a_idx, valid, tok, dc, dm = _block_tile(SORTED, pid_m, pid_d, N, D, K, BLOCK_M, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_F):
        rc = r0 + tl.arange(0, BLOCK_F)
        rm = rc < R
        a = tl.load(A + pos[:, None] * stride_at + rc[None, :], mask=rm[None, :], other=0.0)
        w = tl.load(
            B + e * stride_be + rc[:, None].to(tl.int64) * stride_br + dc[None, :].to(tl.int64) * stride_bd,
            mask=rm[:, None] & dm[None, :],
            other=0.0,
        )
        acc = tl.dot(a, w, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + e * stride_biase + dc, mask=dm, other=0.0).to(tl.float32)[None, :]
    if APPLY_GATE:
        g = tl.load(GATES + a_idx, mask=valid, other=0.0).to(tl.float32)
        acc = acc * g[:, None]
    tl.store(Y + a_idx[:, None] * stride_yt + dc[None, :], acc, mask=valid[:, None] & dm[None, :])


@triton.jit
def _combine_kernel(
    Y, IDS, OUT, T, D, E, stride_yt, stride_ot, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dc = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rm = rows < T
    dm = dc < D
    out = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):  # fixed order j = 0..k-1, fp32
        a = rows * K + j
        eid = tl.load(IDS + a, mask=rm, other=-1).to(tl.int64)
        ok = rm & (eid >= 0) & (eid < E)
        out += tl.load(Y + a[:, None] * stride_yt + dc[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
    tl.store(
        OUT + rows[:, None] * stride_ot + dc[None, :], out.to(OUT.dtype.element_ty), mask=rm[:, None] & dm[None, :]
    )


@triton.jit
def _mlp_bwd_act_kernel(
    X,
    W1,
    B1,
    W2,
    B2,
    GO,
    GATES,
    SORTED,
    BEID,
    A_OUT,
    DH,
    DGP,
    N,
    D,
    F,
    stride_xt,
    stride_xd,
    stride_w1e,
    stride_w1d,
    stride_w1f,
    stride_b1e,
    stride_w2e,
    stride_w2f,
    stride_w2d,
    stride_b2e,
    stride_got,
    stride_at,
    stride_dht,
    K: tl.constexpr,
    ACT: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    e = tl.load(BEID + pid_m).to(tl.int64)
    if e < 0:
        return
    pos, a_idx, valid, tok, fc, fm = _block_tile(SORTED, pid_m, pid_f, N, F, K, BLOCK_M, BLOCK_F)
    w1e = W1 + e * stride_w1e
    w2e = W2 + e * stride_w2e
    h = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    dA = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)  # grad_out[tok] @ w2[e][fc, :]^T (no gate yet)
    gob = tl.zeros([BLOCK_M], dtype=tl.float32)  # <grad_out[tok], b2[e]>
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        dm = dc < D
        h, up = _x_w1_step(
            X, w1e, tok, valid, dc, dm, fc, fm, F, stride_xt, stride_xd, stride_w1d, stride_w1f, h, up, ACT, PREC
        )
        go = tl.load(GO + tok[:, None] * stride_got + dc[None, :], mask=valid[:, None] & dm[None, :], other=0.0)
        w2t = tl.load(
            w2e + fc[None, :].to(tl.int64) * stride_w2f + dc[:, None].to(tl.int64) * stride_w2d,
            mask=dm[:, None] & fm[None, :],
            other=0.0,
        )
        dA = tl.dot(go, w2t, dA, input_precision=PREC)
        if HAS_B2:
            b2 = tl.load(B2 + e * stride_b2e + dc, mask=dm & (pid_f == 0), other=0.0).to(tl.float32)
            gob += tl.sum(go.to(tl.float32) * b2[None, :], 1)
    if HAS_B1:
        h, up = _add_b1(B1, e, stride_b1e, fc, fm, F, h, up, ACT)
    act = _act_fwd(h, up, ACT)
    act = tl.where(fm[None, :], act, 0.0)
    # dgates partial of this F tile: <act, dA>; the bias term once (tile 0)
    tl.store(DGP + pid_f.to(tl.int64) * N + a_idx, tl.sum(act * dA, 1) + gob, mask=valid)
    g = tl.load(GATES + a_idx, mask=valid, other=0.0).to(tl.float32)
    dA = dA * g[:, None]
    dhp = DH + pos[:, None] * stride_dht
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
        tl.store(dhp + fc[None, :], (dA * (cdf + h * pdf)).to(DH.dtype.element_ty), mask=fm[None, :])
    elif ACT == 1:
        t = _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * h * h)
        tl.store(dhp + fc[None, :], (dA * d).to(DH.dtype.element_ty), mask=fm[None, :])
    else:
        sig = 1.0 / (1.0 + tl.exp(-h))
        silu = h * sig
        dsilu = sig * (1.0 + h * (1.0 - sig))
        tl.store(dhp + fc[None, :], (dA * up * dsilu).to(DH.dtype.element_ty), mask=fm[None, :])
        tl.store(dhp + F + fc[None, :], (dA * silu).to(DH.dtype.element_ty), mask=fm[None, :])
    # gated activations: dW2 = (g * act)^T grad_out reads both GEMM operands straight from memory
    a_out = (act * g[:, None]).to(A_OUT.dtype.element_ty)
    tl.store(A_OUT + pos[:, None] * stride_at + fc[None, :], a_out, mask=fm[None, :])


@triton.jit
def _grouped_xty_kernel(
    X,
    Y,
    GATES,
    SORTED,
    SEG_START,
    COUNTS,
    OUT,
    DBIAS,
    N,
    P,
    Q,
    stride_xr,
    stride_xc,
    stride_yr,
    stride_oe,
    stride_op,
    stride_oq,
    stride_be,
    K: tl.constexpr,
    X_BY_TOKEN: tl.constexpr,
    Y_BY_TOKEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    # OUT[e] = sum over expert e's assignment rows r of X_r^T Y_r ([P, Q]); DBIAS[e] = sum_r Y_r,
    # or sum_r gate_r * Y_r when Y is by token. X rows: x[token] (X_BY_TOKEN) or a per-position
    # buffer; Y rows: grad_out[token] (Y_BY_TOKEN) or a per-position buffer. Walks e's blocks of
    # the index list in order.
    e = tl.program_id(0).to(tl.int64)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    pc = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qc = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pm = pc < P
    qm = qc < Q
    start = tl.load(SEG_START + e).to(tl.int64)
    cnt = tl.load(COUNTS + e)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    bacc = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for r0 in range(0, cnt, BLOCK_M):
        pos = start + r0 + tl.arange(0, BLOCK_M)
        a = tl.load(SORTED + pos).to(tl.int64)
        valid = a < N
        tok = a // K
        if X_BY_TOKEN:
            xr = tok
        else:
            xr = pos
        xt = tl.load(
            X + xr[:, None] * stride_xr + pc[None, :].to(tl.int64) * stride_xc,
            mask=valid[:, None] & pm[None, :],
            other=0.0,
        )
        # the dot's operands come straight from memory (pipelined wgmma); only the bias sum
        # scales the grad_out rows by their gates (fp32)
        if Y_BY_TOKEN:
            yt = tl.load(Y + tok[:, None] * stride_yr + qc[None, :], mask=valid[:, None] & qm[None, :], other=0.0)
        else:
            yt = tl.load(Y + pos[:, None] * stride_yr + qc[None, :], mask=valid[:, None] & qm[None, :], other=0.0)
        acc = tl.dot(tl.trans(xt), yt, acc, input_precision=PREC)
        if HAS_BIAS:
            if Y_BY_TOKEN:
                g = tl.load(GATES + a, mask=valid, other=0.0).to(tl.float32)
                bacc += tl.sum(yt.to(tl.float32) * g[:, None], 0)
            else:
                bacc += tl.sum(yt.to(tl.float32), 0)
    optr = OUT + e * stride_oe + pc[:, None].to(tl.int64) * stride_op + qc[None, :].to(tl.int64) * stride_oq
    tl.store(optr, acc.to(OUT.dtype.element_ty), mask=pm[:, None] & qm[None, :])
    if HAS_BIAS:
        tl.store(DBIAS + e * stride_be + qc, bacc.to(DBIAS.dtype.element_ty), mask=qm & (pid_p == 0))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dts = {t.dtype for t in tensors}
    if len(dts) == 1 and next(iter(dts)) in (torch.bfloat16, torch.float16):
        return next(iter(dts))
    return torch.float32


def _prec(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` of the dots: fp32 operands in IEEE fp32 unless TF32 matmuls are allowed
    on the GPU (as for ``torch.mm``); 16-bit operands ignore it."""
    if dtype == torch.float32 and not (on_gpu(device) and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


class _Routing:
    """Align metadata shared by the forward and backward launches."""

    def __init__(self, expert_ids: Tensor, E: int, block_m: int):
        self.T, self.k = expert_ids.shape
        self.N = self.T * self.k
        self.ids = expert_ids.contiguous()
        self.sorted, self.block_eid, self.total, self.counts, self.seg = moe_align(
            self.ids, E, block_m, with_segments=True
        )
        self.L = self.sorted.numel()
        self.NB = self.block_eid.numel()


class _Launch:
    """What the forward and backward launches share: shapes, the compute dtype and the operands
    cast to it, the tiles and the routing."""

    def __init__(self, x, w1, w2, expert_ids, gates, b1, b2, config: Optional[Dict[str, int]]):
        self.T, self.D = x.shape
        self.E, _, self.F1 = w1.shape
        self.F = w2.shape[1]
        self.k = expert_ids.shape[1]
        self.dev = x.device
        self.cdt = _compute_dtype(x, w1, w2)
        self.prec = _prec(self.cdt, self.dev)
        cfg = dict(config or mlp_config(self.T * self.k, self.E, self.cdt))
        self.BM, self.BF, self.BD = cfg["BLOCK_M"], cfg["BLOCK_F"], cfg["BLOCK_D"]
        self.kw = dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1))
        self.xc, self.w1c, self.w2c = x.to(self.cdt), w1.to(self.cdt), w2.to(self.cdt)
        self.g = gates.contiguous()
        # the kernels index bias columns with unit stride
        self.b1 = None if b1 is None else b1.contiguous()
        self.b2 = None if b2 is None else b2.contiguous()
        self.rt = _Routing(expert_ids.reshape(self.T, self.k), self.E, self.BM)

    def gather_gemm(self, a: Tensor, b: Tensor, bias: Optional[Tensor], apply_gate: bool, R: int) -> Tensor:
        """``[N, D]`` fp32 per assignment: ``a[pos] @ b[e] (+ bias[e]) (* gate)`` (b: ``[E, R, D]``
        by strides, a: ``[L, R]`` per padded position)."""
        rt = self.rt
        y = _empty((rt.N, self.D), dtype=torch.float32, device=self.dev)
        if not rt.N:
            return y
        args = (a, b, a if bias is None else bias, self.g, rt.sorted, rt.block_eid, y, rt.N, R, self.D)
        args += (a.stride(0), b.stride(0), b.stride(1), b.stride(2), 0 if bias is None else bias.stride(0), y.stride(0))
        constexprs = dict(
            K=self.k,
            HAS_BIAS=bias is not None,
            APPLY_GATE=apply_gate,
            PREC=self.prec,
            BLOCK_M=self.BM,
            BLOCK_F=self.BF,
            BLOCK_D=self.BD,
        )
        launch(Launch(_gather_gemm_kernel, (rt.NB, triton.cdiv(self.D, self.BD)), args, constexprs, self.kw))
        return y

    def grouped_xty(
        self,
        X: Tensor,
        Y: Tensor,
        out: Tensor,
        dbias: Optional[Tensor],
        P: int,
        Q: int,
        x_by_token: bool,
        BP: int,
        BQ: int,
    ) -> None:
        """``out[e] = X_e^T Y_e`` ``[P, Q]`` and ``dbias[e] = sum_r Y_e[r]`` over expert e's rows: X
        per token and Y per padded position (x_by_token), or X per position (the gated
        activations) and Y the grad_out rows of the tokens, whose bias sum is gated."""
        rt = self.rt
        args = (X, Y, self.g, rt.sorted, rt.seg, rt.counts, out, out if dbias is None else dbias, rt.N, P, Q)
        args += (X.stride(0), X.stride(1), Y.stride(0), out.stride(0), out.stride(1), out.stride(2))
        args += (0 if dbias is None else dbias.stride(0),)
        constexprs = dict(
            K=self.k,
            X_BY_TOKEN=x_by_token,
            Y_BY_TOKEN=not x_by_token,
            HAS_BIAS=dbias is not None,
            PREC=self.prec,
            BLOCK_M=self.BM,
            BLOCK_P=BP,
            BLOCK_Q=BQ,
        )
        grid = (self.E, triton.cdiv(P, BP), triton.cdiv(Q, BQ))
        launch(Launch(_grouped_xty_kernel, grid, args, constexprs, self.kw))

    def combine(self, y: Tensor, out_dtype: torch.dtype) -> Tensor:
        """``[T, D]``: ``sum_j y[t*k + j]`` over the valid slots, fp32, in the order j = 0..k-1."""
        rt, D = self.rt, self.D
        out = _empty((rt.T, D), dtype=out_dtype, device=y.device)
        if rt.T == 0 or D == 0:
            return out
        BT = min(_pow2(rt.T), 64)
        BD = min(_pow2(D), 128 if interpreting() else 64)
        args = (y, rt.ids, out, rt.T, D, self.E, y.stride(0), out.stride(0))
        grid = (triton.cdiv(rt.T, BT), triton.cdiv(D, BD))
        launch(Launch(_combine_kernel, grid, args, dict(K=rt.k, BLOCK_T=BT, BLOCK_D=BD), dict(num_warps=4)))
        return out


def moe_expert_mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    activation: str = "gelu",
    *,
    config: Optional[Dict[str, int]] = None,
) -> Tensor:
    """Same contract as ``moe_expert_mlp_ref``; ``config`` overrides the tile table (tests)."""
    T, D = x.shape
    if T == 0 or expert_ids.shape[1] == 0:
        return torch.zeros((T, D), dtype=x.dtype, device=x.device)
    if D == 0 or w2.shape[1] == 0:  # no GEMM to run (F = 0: out = sum_j g * b2); the reference
        return moe_expert_mlp_ref(x, w1, w2, expert_ids, gates, b1, b2, activation)
    s = _Launch(x, w1, w2, expert_ids, gates, b1, b2, config)
    rt, b1, b2 = s.rt, s.b1, s.b2
    h = _empty((rt.L, s.F), dtype=s.cdt, device=s.dev)
    args = (s.xc, s.w1c, h if b1 is None else b1, rt.sorted, rt.block_eid, h, rt.N, D, s.F)
    args += (s.xc.stride(0), s.xc.stride(1), s.w1c.stride(0), s.w1c.stride(1), s.w1c.stride(2))
    args += (0 if b1 is None else b1.stride(0), h.stride(0))
    constexprs = dict(
        K=s.k, ACT=_ACT[activation], HAS_B1=b1 is not None, PREC=s.prec, BLOCK_M=s.BM, BLOCK_F=s.BF, BLOCK_D=s.BD
    )
    launch(Launch(_mlp_up_kernel, (rt.NB, triton.cdiv(s.F, s.BF)), args, constexprs, s.kw))
    # y[a] = gate[a] * (h[pos] @ w2[e] + b2[e])
    y = s.gather_gemm(h, s.w2c, b2, True, s.F)
    return s.combine(y, x.dtype)


def moe_expert_mlp_backward(
    grad_out: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    activation: str = "gelu",
    *,
    config: Optional[Dict[str, int]] = None,
):
    """Same contract as ``moe_expert_mlp_backward_ref``: ``(dx, dw1, dw2, dgates, db1, db2)``."""
    if x.shape[1] == 0 or w2.shape[1] == 0:  # D = 0 or F = 0: no GEMM to run
        return moe_expert_mlp_backward_ref(grad_out, x, w1, w2, expert_ids, gates, b1, b2, activation)
    dw1 = _empty_like(w1, memory_format=torch.contiguous_format)
    dw2 = _empty_like(w2, memory_format=torch.contiguous_format)
    db1 = None if b1 is None else _empty_like(b1, memory_format=torch.contiguous_format)
    db2 = None if b2 is None else _empty_like(b2, memory_format=torch.contiguous_format)
    s = _Launch(x, w1, w2, expert_ids, gates, b1, b2, config)
    rt, T, D, F, F1, k, b1, b2 = s.rt, s.T, s.D, s.F, s.F1, s.k, s.b1, s.b2
    BM, BF, BD, kw, prec = s.BM, s.BF, s.BD, s.kw, s.prec
    xc, w1c, w2c, g = s.xc, s.w1c, s.w2c, s.g
    go = grad_out.to(s.cdt).contiguous()
    nF = triton.cdiv(F, BF)
    a_buf = _empty((rt.L, F), dtype=s.cdt, device=s.dev)
    dh = _empty((rt.L, F1), dtype=s.cdt, device=s.dev)
    dgp = torch.zeros((nF, rt.N), dtype=torch.float32, device=s.dev)  # invalid assignments keep 0
    dummy = a_buf
    if rt.N:
        args = (xc, w1c, dummy if b1 is None else b1, w2c, dummy if b2 is None else b2, go, g)
        args += (rt.sorted, rt.block_eid, a_buf, dh, dgp, rt.N, D, F)
        args += (xc.stride(0), xc.stride(1), w1c.stride(0), w1c.stride(1), w1c.stride(2))
        args += (0 if b1 is None else b1.stride(0), w2c.stride(0), w2c.stride(1), w2c.stride(2))
        args += (0 if b2 is None else b2.stride(0), go.stride(0), a_buf.stride(0), dh.stride(0))
        constexprs = dict(
            K=k,
            ACT=_ACT[activation],
            HAS_B1=b1 is not None,
            HAS_B2=b2 is not None,
            PREC=prec,
            BLOCK_M=BM,
            BLOCK_F=BF,
            BLOCK_D=BD,
        )
        launch(Launch(_mlp_bwd_act_kernel, (rt.NB, nF), args, constexprs, kw))
    dgates = dgp.sum(0).view(T, k).to(gates.dtype)  # fixed-order reduction over F tiles
    # dW2[e] = (g * a)_e^T grad_out_e (a_buf holds the gated activations), db2[e] = sum (g * grad_out)_e
    s.grouped_xty(a_buf, go, dw2, db2, F, D, False, BF, BD)
    # dW1[e] = x_e^T dh_e, db1[e] = sum dh_e
    s.grouped_xty(xc, dh, dw1, db1, D, F1, True, BD, BF)
    # dX: per-assignment dh @ w1[e]^T (the gather-GEMM on w1's transposed view), then the
    # fixed-order k-way combine
    dxa = s.gather_gemm(dh, w1c.transpose(1, 2), None, False, F1)
    dx = s.combine(dxa, x.dtype)
    return dx, dw1, dw2, dgates, db1, db2
