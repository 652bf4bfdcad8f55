"""Reference (oracle) of the grouped MoE gating, in plain PyTorch, fp32 inside: grouped top-k
gating with the per-group balance statistics, its closed-form backward, and sequence-level routing.

These functions define the semantics every fast backend is tested against; they favour clarity
(explicit loops over groups) over speed. No input validation happens here: the public functions in
:mod:`unif2ace.kernels.moe` check inputs first.

Global expert index space: group ``g`` owns experts ``[offset_g, offset_g + size_g)`` with
``offset_g = sum(group_sizes[:g])``; ``E_total = sum(group_sizes)`` (docs/model.md §3).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

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


def _scores(z: Tensor, score: str) -> Tensor:
    """Scores of one group's columns: softmax over them, or an elementwise sigmoid."""
    return torch.softmax(z, dim=-1) if score == "softmax" else torch.sigmoid(z)


def _fraction(idx: Tensor, size: int, n: int, k: int) -> Tensor:
    """f_e = (#assignments to e) / (n * k) over a group's ``[n, k]`` local choices ``idx``."""
    return torch.bincount(idx.flatten(), minlength=size).to(torch.float32) / float(n * k)


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

    NaN/inf (docs/kernels.md §B), exactly as torch computes it in fp32: a softmax row (the token's
    group columns) holding a NaN or a +inf logit, or only -inf logits, is NaN in every column;
    otherwise -inf scores 0. A sigmoid score is NaN for a NaN logit, 1 for +inf, 0 for -inf. The
    top-k ranks NaN above every number (ties by index, as ``torch.sort``), so a chosen NaN gives a
    NaN gate (all k of the token when renormalised). ``P_e`` of a column with a NaN score is NaN
    and so is its group's ``balance_loss`` (``0 * NaN``); ``f`` counts the choices as usual. The
    gradient is NaN where these NaNs feed it (the token's group row, or its NaN columns).
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
    gates = torch.zeros((T, k), dtype=torch.float32, device=dev) + 0.0 * logits[:0].sum()  # attached when T = 0
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
        s = _scores(z, score)
        top_vals, top_idx = _topk_lowest_index(s.detach(), k)
        chosen = torch.gather(s, 1, top_idx)  # differentiable gather of the chosen scores
        if renormalize:
            chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        expert_ids = expert_ids.index_put((rows,), (top_idx + lo).to(torch.int32))
        gates = gates.index_put((rows,), chosen)
        f = _fraction(top_idx, size, n, k)
        P = s.mean(dim=0)
        frac_parts.append(f)
        prob_parts.append(P)
        losses.append(balance_coef * size * (f * P).sum())
    expert_fraction = torch.cat(frac_parts) if G else torch.zeros(E_total, device=dev)
    expert_prob = torch.cat(prob_parts) if G else torch.zeros(E_total, device=dev)
    balance_loss = torch.stack(losses) if G else torch.zeros(0, device=dev)
    return expert_ids, gates, expert_fraction, expert_prob, balance_loss


def masked_mean_pool_ref(hidden: Tensor, valid_mask: Tensor) -> Tensor:
    """``[B, S, D]`` x ``[B, S]`` bool -> ``[B, D]`` fp32 mean over valid positions (0 if none)."""
    m = valid_mask.to(torch.float32)
    s = (hidden.float() * m.unsqueeze(-1)).sum(dim=1)
    n = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    return s / n


def sequence_router_logits_ref(
    hidden: Tensor, valid_mask: Tensor, router_weight: Tensor, router_bias: Optional[Tensor] = None
) -> Tensor:
    """``[B, E_total]`` fp32 router logits of whole sequences: pooled = masked mean of ``hidden``
    over valid positions (fp32), logits = pooled @ router_weight.T (+ router_bias)."""
    pooled = masked_mean_pool_ref(hidden, valid_mask)
    logits = pooled @ router_weight.float().t()
    if router_bias is not None:
        logits = logits + router_bias.float()
    return logits


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
    """Sequence-level routing: :func:`sequence_router_logits_ref`, then :func:`moe_gating_ref` per
    sequence."""
    logits = sequence_router_logits_ref(hidden, valid_mask, router_weight, router_bias)
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
        s = _scores(z, score)
        _, idx = _topk_lowest_index(s, k)
        c = torch.gather(s, 1, idx)
        f = _fraction(idx, size, n, k)
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
