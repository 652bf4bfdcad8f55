"""Reference (oracle) implementations of the grouped MoE ops, in plain PyTorch, fp32 inside.

These functions define the semantics every fast backend is tested against; they favour clarity
(explicit loops over groups and experts) over speed. No input validation happens here: the
public functions in :mod:`unif2ace.kernels.moe` check inputs first.

Global expert index space: group ``g`` owns experts ``[offset_g, offset_g + size_g)`` with
``offset_g = sum(group_sizes[:g])``; ``E_total = sum(group_sizes)``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def group_offsets(group_sizes: Sequence[int]) -> List[int]:
    """[0, s0, s0+s1, ...] (length G + 1)."""
    out = [0]
    for s in group_sizes:
        out.append(out[-1] + int(s))
    return out


def _topk_lowest_index(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k along the last dim in descending order, ties broken towards the lowest index.

    ``torch.topk`` makes no tie-order promise; a stable descending sort keeps equal scores in
    index order, so the first k entries are exactly the contract.
    """
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def moe_gating_ref(
    router_logits: Tensor,
    group_ids: Tensor,
    group_sizes: Sequence[int],
    top_k: int,
    score: str = "softmax",
    renormalize: bool = False,
    balance_coef: float = 0.01,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grouped top-k gating with per-group balance statistics.

    Args:
        router_logits: ``[T, E_total]`` float (any float dtype; computed in fp32).
        group_ids: ``[T]`` integer, values in ``[0, G)``: the task group of each token.
        group_sizes: ``G`` Python ints, experts per group (``sum == E_total``).
        top_k: experts chosen per token, ``<= min(group_sizes)``.
        score: ``"softmax"`` (softmax over the token's own group's ``size_g`` columns) or
            ``"sigmoid"`` (elementwise sigmoid of those columns).
        renormalize: divide the chosen k scores by their sum.
        balance_coef: ``lambda`` of the balance loss.

    Returns ``(expert_ids, gates, expert_fraction, expert_prob, balance_loss)``:
        expert_ids: ``[T, k]`` int32 global ids, descending score, ties -> lowest index.
        gates: ``[T, k]`` fp32 chosen scores (renormalised when asked).
        expert_fraction: ``[E_total]`` fp32 ``f_e = (#assignments to e) / (T_g * k)``.
        expert_prob: ``[E_total]`` fp32 ``P_e = mean over the group's tokens of score_e``.
        balance_loss: ``[G]`` fp32 ``coef * size_g * sum_{e in g} f_e * P_e`` (0 for an empty
            group). Differentiable through ``P`` (``f`` is a count, constant).
    Routing never crosses groups: a token's scores and choices use its group's columns only.
    """
    T = router_logits.shape[0]
    dev = router_logits.device
    logits = router_logits.float()
    offs = group_offsets(group_sizes)
    E_total = offs[-1]
    G = len(group_sizes)
    k = int(top_k)
    gid = group_ids.long()

    expert_ids = torch.full((T, k), -1, dtype=torch.int32, device=dev)
    gates = torch.zeros((T, k), dtype=torch.float32, device=dev)
    frac_parts, prob_parts, losses = [], [], []
    for g in range(G):
        lo, hi = offs[g], offs[g + 1]
        size = hi - lo
        rows = torch.nonzero(gid == g).flatten()
        n = rows.numel()
        if n == 0:
            frac_parts.append(torch.zeros(size, dtype=torch.float32, device=dev))
            prob_parts.append(logits.new_zeros(size) + 0.0 * logits[:0].sum())
            losses.append(logits.new_zeros(()) + 0.0 * logits[:0].sum())
            continue
        z = logits[rows, lo:hi]
        s = torch.softmax(z, dim=-1) if score == "softmax" else torch.sigmoid(z)
        top_vals, top_idx = _topk_lowest_index(s.detach(), k)
        chosen = torch.gather(s, 1, top_idx)  # differentiable gather of the chosen scores
        if renormalize:
            chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        expert_ids = expert_ids.index_put((rows,), (top_idx + lo).to(torch.int32))
        gates = gates.index_put((rows,), chosen)
        counts = torch.bincount(top_idx.flatten(), minlength=size).to(torch.float32)
        f = counts / float(n * k)
        P = s.mean(dim=0)
        frac_parts.append(f)
        prob_parts.append(P)
        losses.append(balance_coef * size * (f * P).sum())
    expert_fraction = torch.cat(frac_parts) if G else torch.zeros(E_total, device=dev)
    expert_prob = torch.cat(prob_parts) if G else torch.zeros(E_total, device=dev)
    balance_loss = torch.stack(losses) if G else torch.zeros(0, device=dev)
    return expert_ids, gates, expert_fraction, expert_prob, balance_loss


def moe_expert_histogram_ref(expert_ids: Tensor, num_experts: int) -> Tensor:
    """``[E]`` int32: how many entries of ``expert_ids`` (any shape) equal each e in ``[0, E)``.

    Ids outside ``[0, E)`` (e.g. -1, the null expert) are ignored.
    """
    flat = expert_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    return torch.bincount(flat[valid], minlength=num_experts).to(torch.int32)


def moe_align_size_bound(numel: int, num_experts: int, block_size: int) -> Tuple[int, int]:
    """(length of sorted_token_ids, length of block_expert_ids): host-computable worst case."""
    max_len = numel + num_experts * (block_size - 1)
    return max_len, (max_len + block_size - 1) // block_size


def moe_align_ref(expert_ids: Tensor, num_experts: int, block_size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group assignment indices by expert, each expert's segment padded to ``block_size``.

    ``expert_ids``: ``[T, k]`` (or ``[N]``) integer; the flat assignment index of entry
    ``(t, j)`` is ``t * k + j``; ``N = T * k``. Ids outside ``[0, E)`` are dropped.

    Returns ``(sorted_token_ids, block_expert_ids, num_tokens_post_padded, expert_counts)``:
        sorted_token_ids: ``[N + E*(block_size-1)]`` int32. Expert e's segment starts at
            ``off_e = sum_{e' < e} ceil(c_e' / block_size) * block_size`` and lists its flat
            indices in ascending order, then sentinel ``N`` up to the padded length; everything
            past the padded total is ``N`` too.
        block_expert_ids: ``[ceil((N + E*(block_size-1)) / block_size)]`` int32: the expert of
            each block of ``block_size`` entries; ``-1`` for blocks past the padded total.
            Experts with no assignments own no block.
        num_tokens_post_padded: ``[1]`` int32, the padded total ``sum_e ceil(c_e/bs)*bs``.
        expert_counts: ``[E]`` int32 ``c_e`` (before padding).
    """
    dev = expert_ids.device
    flat = expert_ids.reshape(-1).long()
    N = flat.numel()
    max_len, max_blocks = moe_align_size_bound(N, num_experts, block_size)
    sorted_ids = torch.full((max_len,), N, dtype=torch.int32, device=dev)
    block_ids = torch.full((max_blocks,), -1, dtype=torch.int32, device=dev)
    counts = moe_expert_histogram_ref(expert_ids, num_experts)
    off = 0
    for e in range(num_experts):
        members = torch.nonzero(flat == e).flatten()  # ascending
        c = members.numel()
        if c == 0:
            continue
        padded = (c + block_size - 1) // block_size * block_size
        sorted_ids[off : off + c] = members.to(torch.int32)
        block_ids[off // block_size : (off + padded) // block_size] = e
        off += padded
    total = torch.tensor([off], dtype=torch.int32, device=dev)
    return sorted_ids, block_ids, total, counts


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
    order j = 0..k-1, returned in x's dtype. Ids outside ``[0, E)`` contribute nothing.
    Differentiable (autograd) w.r.t. x, w1, w2, b1, b2 and gates.
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
        h = xf[t_idx] @ w1[e].float()
        if b1 is not None:
            h = h + b1[e].float()
        a = _activation(h, activation, F_)
        o = a @ w2[e].float()
        if b2 is not None:
            o = o + b2[e].float()
        y = y.index_put((t_idx, j_idx), o)
    g = gates.float()
    out = xf.new_zeros(T, D)
    for j in range(k):  # fixed combine order
        out = out + g[:, j : j + 1] * y[:, j]
    return out.to(x.dtype)


def masked_mean_pool_ref(hidden: Tensor, valid_mask: Tensor) -> Tensor:
    """``[B, S, D]`` x ``[B, S]`` bool -> ``[B, D]`` fp32 mean over valid positions (0 if none)."""
    m = valid_mask.to(torch.float32)
    s = (hidden.float() * m.unsqueeze(-1)).sum(dim=1)
    n = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    return s / n


def moe_sequence_gating_ref(
    hidden: Tensor,
    valid_mask: Tensor,
    router_weight: Tensor,
    group_ids: Tensor,
    group_sizes: Sequence[int],
    top_k: int = 2,
    router_bias: Optional[Tensor] = None,
    score: str = "softmax",
    renormalize: bool = False,
    balance_coef: float = 0.0,
):
    """Sequence-level routing: pooled = masked mean of ``hidden`` over valid positions (fp32),
    logits = pooled @ router_weight.T (+ router_bias), then :func:`moe_gating_ref` per sequence."""
    pooled = masked_mean_pool_ref(hidden, valid_mask)
    logits = pooled @ router_weight.float().t()
    if router_bias is not None:
        logits = logits + router_bias.float()
    return moe_gating_ref(logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef)


# ------------------------------------------------------------------------------------------------
# Explicit backward formulas. The forward references above are differentiated by autograd (that
# is the semantics); these closed forms are what the custom ops' backward runs for the reference
# backend (autograd is unavailable inside a custom op) and the oracle for fused backward kernels.


def moe_gating_backward_ref(
    grad_gates: Tensor,
    grad_prob: Tensor,
    grad_loss: Tensor,
    router_logits: Tensor,
    group_ids: Tensor,
    group_sizes: Sequence[int],
    top_k: int,
    score: str = "softmax",
    renormalize: bool = False,
    balance_coef: float = 0.01,
) -> Tensor:
    """d(router_logits) given upstream grads of ``gates [T,k]``, ``expert_prob [E]`` and
    ``balance_loss [G]`` (``f`` is a count: no gradient). Returns router_logits' dtype/shape.

    Per token of group g with scores s (size_g) and chosen set c = s[idx]:
    ``dP_e = grad_prob_e + grad_loss_g * coef * size_g * f_e``; ``ds = dP / T_g`` plus, scattered
    to idx, ``dc = grad_gates`` (or ``(grad_gates - <grad_gates, gates>) / sum(c)`` when
    renormalised); ``dz = s * (ds - <ds, s>)`` (softmax) or ``ds * s * (1 - s)`` (sigmoid).
    """
    logits = router_logits.float()
    dz = torch.zeros_like(logits)
    offs = group_offsets(group_sizes)
    gid = group_ids.long()
    k = int(top_k)
    for g in range(len(group_sizes)):
        lo, hi = offs[g], offs[g + 1]
        size = hi - lo
        rows = torch.nonzero(gid == g).flatten()
        n = rows.numel()
        if n == 0:
            continue
        z = logits[rows, lo:hi]
        s = torch.softmax(z, dim=-1) if score == "softmax" else torch.sigmoid(z)
        _, idx = _topk_lowest_index(s, k)
        c = torch.gather(s, 1, idx)
        counts = torch.bincount(idx.flatten(), minlength=size).to(torch.float32)
        f = counts / float(n * k)
        dP = grad_prob[lo:hi].float() + grad_loss[g].float() * balance_coef * size * f
        gg = grad_gates[rows].float()
        if renormalize:
            S = c.sum(dim=-1, keepdim=True)
            gates = c / S
            dc = (gg - (gg * gates).sum(dim=-1, keepdim=True)) / S
        else:
            dc = gg
        ds = dP.unsqueeze(0).expand(n, size) / n
        ds = ds.scatter_add(1, idx, dc)
        if score == "softmax":
            dzg = s * (ds - (ds * s).sum(dim=-1, keepdim=True))
        else:
            dzg = ds * s * (1 - s)
        dz[rows, lo:hi] = dzg
    return dz.to(router_logits.dtype)


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
        h = xe @ w1[e].float()
        if b1 is not None:
            h = h + b1[e].float()
        a, act_bwd = _activation_and_grad(h, activation, F_)
        o = a @ w2[e].float()
        if b2 is not None:
            o = o + b2[e].float()
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
