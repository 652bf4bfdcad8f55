"""Reference (oracle) of the routed expert MLP, in plain PyTorch, fp32 inside: the forward and its
closed-form backward.

These functions define the semantics every fast backend is tested against; they favour clarity
(explicit loops over experts) over speed. No input validation happens here: the public functions in
:mod:`unif2ace.kernels.moe` check inputs first.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _affine(inp: Tensor, w: Tensor, b: Optional[Tensor], e: int) -> Tensor:
    """``inp @ w[e] (+ b[e])`` in fp32."""
    out = inp @ w[e].float()
    if b is not None:
        out = out + b[e].float()
    return out


def _activation(h: Tensor, activation: str, F_: int) -> Tensor:
    if activation == "gelu":
        return F.gelu(h)  # exact (erf) gelu
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "swiglu":
        return F.silu(h[..., :F_]) * h[..., F_:]
    raise ValueError(f"unknown activation {activation!r}")


def moe_expert_mlp_ref(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    activation: str = "gelu",
) -> Tensor:
    """Routed expert MLPs combined with gates.

    Shapes: x ``[T, D]``; w1 ``[E, D, F]`` (gelu) or ``[E, D, 2F]`` (swiglu: columns ``[:F]`` are
    the gate projection, ``[F:]`` the up projection); w2 ``[E, F, D]``; b1 ``[E, F or 2F]``;
    b2 ``[E, D]``; expert_ids ``[T, k]`` integer; gates ``[T, k]`` float.

    ``expert_e(x) = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` with act = exact erf gelu
    (``"gelu"``), tanh-approximated gelu (``"gelu_tanh"``) or ``silu(gate) * up`` (``"swiglu"``).
    ``out[t] = sum_{j=0..k-1} gates[t, j] * expert_{ids[t, j]}(x[t])``, accumulated in fp32 in the
    order j = 0..k-1, returned in x's dtype. Ids outside ``[0, E)`` contribute nothing: their
    slot's gate is never read (a NaN gate there leaves the output finite, its gradient is 0).
    Differentiable (autograd) w.r.t. x, w1, w2, b1, b2 and gates.

    NaN/inf (docs/kernels.md §B): IEEE arithmetic in fp32, nothing is masked or clamped. A NaN
    reaches every output entry that depends on it: a NaN in x[t] or in a valid slot's gate makes
    out[t] NaN, a NaN weight of expert e the entries of e's tokens that it feeds (a gate of 0 does
    not hide it: 0 * NaN = NaN), and so on into the gradients. +-inf inputs give non-finite
    entries in the same places; which of them are NaN and which +-inf follows IEEE through the
    GEMMs.
    """
    T, D = x.shape
    k = expert_ids.shape[1]
    E = w1.shape[0]
    F_ = w2.shape[1]
    xf = x.float()
    ids = expert_ids.long()
    # per-slot expert outputs y[t, j, :] (zero for invalid ids)
    y = xf.new_zeros(T, k, D)
    for e in range(E):
        t_idx, j_idx = torch.nonzero(ids == e, as_tuple=True)
        if t_idx.numel() == 0:
            continue
        a = _activation(_affine(xf[t_idx], w1, b1, e), activation, F_)
        o = _affine(a, w2, b2, e)
        y = y.index_put((t_idx, j_idx), o)
    g = torch.where((ids >= 0) & (ids < E), gates.float(), 0.0)  # invalid slots: gate never read
    # (+ an empty sum: the output stays attached to the inputs when nothing is routed)
    out = xf.new_zeros(T, D) + sum(t[:0].sum() for t in (xf, w1, w2, gates, b1, b2) if t is not None)
    for j in range(k):  # fixed combine order
        out = out + g[:, j : j + 1] * y[:, j]
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# The explicit backward formula. The forward reference above is differentiated by autograd (that
# is the semantics); this closed form is what the custom op's backward runs for the reference
# backend (autograd is unavailable inside a custom op) and the oracle for fused backward kernels.


_SQRT_2_OVER_PI = 0.7978845608028654


def _activation_and_grad(h: Tensor, activation: str, F_: int) -> Tuple[Tensor, Callable]:
    """(act(h), fn mapping d(act) -> d(h))."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
        pdf = torch.exp(-0.5 * h * h) * 0.3989422804014327
        return h * cdf, lambda da: da * (cdf + h * pdf)
    if activation == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (h + 0.044715 * h**3)
        t = torch.tanh(u)
        d = 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * h * h)
        return 0.5 * h * (1 + t), lambda da: da * d
    if activation == "swiglu":
        gate, up = h[..., :F_], h[..., F_:]
        sig = torch.sigmoid(gate)
        silu = gate * sig
        dsilu = sig * (1 + gate * (1 - sig))
        return silu * up, lambda da: torch.cat([da * up * dsilu, da * silu], dim=-1)
    raise ValueError(f"unknown activation {activation!r}")


def moe_expert_mlp_backward_ref(
    grad_out: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    activation: str = "gelu",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(dx, dw1, dw2, dgates, db1, db2) of :func:`moe_expert_mlp_ref` for upstream ``grad_out``
    ``[T, D]``, each in its input's dtype (db1/db2 None when the bias is None). Per expert e and
    routed slot (t, j): ``dgates[t,j] = <grad_out[t], expert_e(x[t])>``, ``do = gates[t,j] *
    grad_out[t]``, then the usual two-layer MLP backward, accumulated over slots in fp32."""
    T, D = x.shape
    E = w1.shape[0]
    F_ = w2.shape[1]
    xf, go, g = x.float(), grad_out.float(), gates.float()
    ids = expert_ids.long()
    dx = torch.zeros_like(xf)
    dw1 = torch.zeros_like(w1, dtype=torch.float32)
    dw2 = torch.zeros_like(w2, dtype=torch.float32)
    dg = torch.zeros_like(g)
    db1 = None if b1 is None else torch.zeros_like(b1, dtype=torch.float32)
    db2 = None if b2 is None else torch.zeros_like(b2, dtype=torch.float32)
    for e in range(E):
        t_idx, j_idx = torch.nonzero(ids == e, as_tuple=True)
        if t_idx.numel() == 0:
            continue
        xe = xf[t_idx]
        a, act_bwd = _activation_and_grad(_affine(xe, w1, b1, e), activation, F_)
        o = _affine(a, w2, b2, e)
        ge = go[t_idx]
        dg[t_idx, j_idx] = (ge * o).sum(dim=-1)
        do = g[t_idx, j_idx].unsqueeze(-1) * ge
        dw2[e] = a.t() @ do
        if db2 is not None:
            db2[e] = do.sum(dim=0)
        dh = act_bwd(do @ w2[e].float().t())
        dw1[e] = xe.t() @ dh
        if db1 is not None:
            db1[e] = dh.sum(dim=0)
        dx.index_add_(0, t_idx, dh @ w1[e].float().t())
    return (
        dx.to(x.dtype),
        dw1.to(w1.dtype),
        dw2.to(w2.dtype),
        dg.to(gates.dtype),
        None if db1 is None else db1.to(b1.dtype),
        None if db2 is None else db2.to(b2.dtype),
    )
