"""Grouped MoE: gating, routing metadata (histogram, align) and the routed expert MLP.

Experts of all task groups live in one global index space: group ``g`` owns experts
``[offset_g, offset_g + size_g)`` with ``offset_g = sum(group_sizes[:g])`` (docs/model.md §3).
Routing never crosses groups.

Ops, their stems and backends (see :mod:`unif2ace.kernels._dispatch` for how one is chosen; the
implementation of an op on backend ``b`` is ``unif2ace.kernels.<b>.<stem>``):

=======================  ============  =======================================================================
moe_gating               moe_gating    reference, cpu (C++, deterministic statistics), triton (fused top-k +
                                       statistics), cuda (warp per token; groups > 128 experts or > 255 groups
                                       run the reference)
moe_align                moe_routing   reference, cpu (C++ counting sort), cuda (E <= 1024), triton (cuda's
                                       fallback)
moe_expert_histogram     moe_routing   reference, cpu, cuda
moe_expert_mlp           moe_mlp       reference, cpu (C++ counting sort + per-expert oneDNN GEMMs), triton
                                       (gather-GEMM)
=======================  ============  =======================================================================

``moe_sequence_gating`` and ``moe_shared_expert`` are plain wrappers of ``moe_gating`` and
``moe_expert_mlp``. The reference (plain PyTorch, fp32) in :mod:`unif2ace.kernels.reference`
defines the semantics. Every non-reference backend runs through a ``torch.library`` custom op
(:mod:`unif2ace.kernels._custom_ops.moe`) with a fake impl (and, for the differentiable ops, an
autograd formula whose backward is itself a custom op), so calls work under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch

from ._custom_ops import moe as _ops
from ._dispatch import BACKENDS, Op
from ._validate import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_bool,
    check_choice,
    check_int_at_least,
    check_int_list,
    check_range,
    check_real,
    check_same_device,
    check_tensor,
)
from .reference import moe_gating as ref_gating
from .reference import moe_routing as ref_routing

Tensor = torch.Tensor

__all__ = [
    "MoEGating",
    "MoEAlignment",
    "moe_gating",
    "moe_align",
    "moe_expert_histogram",
    "moe_expert_mlp",
    "moe_shared_expert",
    "moe_sequence_gating",
]

SCORES = ("softmax", "sigmoid")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


class MoEGating(NamedTuple):
    """Result of :func:`moe_gating` / :func:`moe_sequence_gating`."""

    expert_ids: Tensor  # [T, k] int32 global expert ids, descending score, ties -> lowest index
    gates: Tensor  # [T, k] fp32 chosen scores (renormalised to sum 1 when renormalize=True)
    expert_fraction: Tensor  # [E_total] fp32 f_e: fraction of the group's T_g*k assignments to e
    expert_prob: Tensor  # [E_total] fp32 P_e: mean over the group's tokens of the score of e
    balance_loss: Tensor  # [G] fp32 coef * size_g * sum_e f_e * P_e (0 for a group with no tokens)


class MoEAlignment(NamedTuple):
    """Result of :func:`moe_align` (the vLLM/SGLang ``moe_align_block_size`` contract)."""

    sorted_token_ids: Tensor  # [N + E*(bs-1)] int32 flat indices t*k+j grouped by expert; sentinel N pads
    block_expert_ids: Tensor  # [cdiv(N + E*(bs-1), bs)] int32 expert of each block, -1 past the total
    num_tokens_post_padded: Tensor  # [1] int32 padded total (on device)
    expert_counts: Tensor  # [E] int32 assignments per expert before padding


MOE_GATING = Op(
    "moe_gating",
    stem="moe_gating",
    backends=BACKENDS,
    entry_points=("moe_gating", "moe_gating_backward"),
    cpu_order=("cpu",),
    cuda_order=("triton", "cuda"),
    doc="grouped top-k gating + per-group balance statistics",
)
MOE_ALIGN = Op(
    "moe_align",
    stem="moe_routing",
    backends=BACKENDS,
    entry_points=("moe_align",),
    cpu_order=("cpu",),
    cuda_order=("cuda", "triton"),
    doc="expert ids -> block-padded per-expert index lists",
)
MOE_HISTOGRAM = Op(
    "moe_expert_histogram",
    stem="moe_routing",
    backends=("reference", "cpu", "cuda"),
    entry_points=("moe_expert_histogram",),
    cpu_order=("cpu",),
    cuda_order=("cuda",),
    doc="assignments per expert",
)
MOE_MLP = Op(
    "moe_expert_mlp",
    stem="moe_mlp",
    backends=("reference", "cpu", "triton"),
    entry_points=("moe_expert_mlp", "moe_expert_mlp_backward"),
    cpu_order=("cpu",),
    cuda_order=("triton", "cuda"),
    doc="routed expert MLPs combined with gates",
)


# ------------------------------------------------------------------------------------------------
# validation


def _check_group_sizes(op: str, group_sizes, E_total: Optional[int], *, what: str) -> List[int]:
    sizes = check_int_list(op, "group_sizes", group_sizes, low=1)
    if E_total is not None and sum(sizes) != E_total:
        raise ValueError(f"{op}: sum(group_sizes) = {sum(sizes)} (group_sizes={sizes}) must equal {what} = {E_total}")
    return sizes


def _check_top_k(op: str, top_k, sizes: Sequence[int]) -> int:
    top_k = check_int_at_least(op, "top_k", top_k, 1)
    for g, s in enumerate(sizes):
        if top_k > s:
            raise ValueError(
                f"{op}: argument 'top_k'={top_k} exceeds the size of group {g} ({s} experts); "
                f"top_k must be <= every group size (group_sizes={list(sizes)})"
            )
    return top_k


def _check_ids(op: str, expert_ids) -> None:
    check_tensor(op, "expert_ids", expert_ids, ndim=(1, 2), dtypes=INT_DTYPES)


# ------------------------------------------------------------------------------------------------
# public API


def moe_gating(
    router_logits: Tensor,
    group_ids: Tensor,
    group_sizes: Sequence[int],
    top_k: int,
    *,
    score: str = "softmax",
    renormalize: bool = False,
    balance_coef: float = 0.01,
    backend: Optional[str] = None,
) -> MoEGating:
    """Grouped top-k gating with per-group load-balance statistics.

    Args:
        router_logits: ``[T, E_total]`` float32/float16/bfloat16 (computed in fp32).
        group_ids: ``[T]`` int32/int64, values in ``[0, G)``: each token's task group.
        group_sizes: ``G`` Python ints, experts per group; ``sum(group_sizes) == E_total``.
        top_k: experts per token; must be ``<=`` every group's size.
        score: ``"softmax"`` over the token's group columns, or ``"sigmoid"`` per column.
        renormalize: divide the k chosen scores by their sum.
        balance_coef: ``lambda`` in ``coef * size_g * sum_e f_e * P_e``.
        backend: force a backend (see ``_dispatch``).

    Returns :class:`MoEGating` (see its fields). ``gates``, ``expert_prob`` and ``balance_loss``
    are differentiable w.r.t. ``router_logits``. Experts are chosen in descending score order,
    ties broken towards the lowest expert index; routing never crosses groups.
    """
    op = "moe_gating"
    check_tensor(op, "router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES)
    T, E_total = router_logits.shape
    check_tensor(op, "group_ids", group_ids, shape=(T,), dtypes=INT_DTYPES)
    dev = check_same_device(op, router_logits=router_logits, group_ids=group_ids)
    sizes = _check_group_sizes(op, group_sizes, E_total, what="router_logits.shape[1]")
    top_k = _check_top_k(op, top_k, sizes)
    check_choice(op, "score", score, SCORES)
    renormalize = check_bool(op, "renormalize", renormalize)
    balance_coef = check_real(op, "balance_coef", balance_coef)
    check_range(op, "group_ids", group_ids, 0, len(sizes))
    be = MOE_GATING.select(dev, backend)
    if be == "reference":
        outs = ref_gating.moe_gating_ref(router_logits, group_ids, sizes, top_k, score, renormalize, balance_coef)
    else:
        outs = _ops.gating_op(router_logits, group_ids, sizes, top_k, score, renormalize, balance_coef, be)
    return MoEGating(*outs)


def moe_expert_histogram(expert_ids: Tensor, num_experts: int, *, backend: Optional[str] = None) -> Tensor:
    """``[E]`` int32 count of entries of ``expert_ids`` equal to each expert.

    ``expert_ids``: ``[T, k]`` or ``[N]`` int32/int64 (any strides). Ids outside
    ``[0, num_experts)`` (e.g. -1 for a null expert) are ignored. Counts must fit int32.
    """
    op = "moe_expert_histogram"
    _check_ids(op, expert_ids)
    num_experts = check_int_at_least(op, "num_experts", num_experts, 1)
    be = MOE_HISTOGRAM.select(expert_ids.device, backend)
    if be == "reference":
        return ref_routing.moe_expert_histogram_ref(expert_ids, num_experts)
    return _ops.histogram_op(expert_ids, num_experts, be)


def moe_align(expert_ids: Tensor, num_experts: int, block_size: int, *, backend: Optional[str] = None) -> MoEAlignment:
    """Sort assignment indices by expert, padding each expert's segment to ``block_size``.

    The vLLM/SGLang ``moe_align_block_size`` contract, sized by the host-computable bound
    ``N + E*(block_size-1)`` (``N = T*k``) so no host sync is needed:

    - ``expert_ids``: ``[T, k]`` (or ``[N]``) int32/int64; entry ``(t, j)`` has flat index
      ``t*k + j``. Ids outside ``[0, E)`` are null/invalid: dropped (never listed, not counted).
    - ``sorted_token_ids`` ``[N + E*(block_size-1)]`` int32: each expert's flat indices in
      ascending order, segments in expert order, each padded to a multiple of ``block_size``
      with the sentinel ``N``; the unused tail is ``N`` too.
    - ``block_expert_ids`` ``[cdiv(N + E*(block_size-1), block_size)]`` int32: expert of each
      block, ``-1`` past the padded total. Experts with no assignments get no block.
    - ``num_tokens_post_padded`` ``[1]`` int32 (device): the padded total.
    - ``expert_counts`` ``[E]`` int32: assignments per expert before padding.

    Deterministic on every backend. Requires ``N + E*(block_size-1) < 2**31``.
    """
    op = "moe_align"
    _check_ids(op, expert_ids)
    num_experts = check_int_at_least(op, "num_experts", num_experts, 1)
    block_size = check_int_at_least(op, "block_size", block_size, 1)
    max_len, _ = ref_routing.moe_align_size_bound(expert_ids.numel(), num_experts, block_size)
    if max_len >= 2**31:
        raise ValueError(
            f"{op}: expert_ids.numel() + num_experts*(block_size-1) = {max_len} must be < 2**31 "
            f"(int32 index lists); got expert_ids of shape {list(expert_ids.shape)}, num_experts={num_experts}, "
            f"block_size={block_size}"
        )
    be = MOE_ALIGN.select(expert_ids.device, backend)
    if be == "reference":
        outs = ref_routing.moe_align_ref(expert_ids, num_experts, block_size)
    else:
        outs = _ops.align_op(expert_ids, num_experts, block_size, be)
    return MoEAlignment(*outs)


def moe_expert_mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    *,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    activation: str = "gelu",
    backend: Optional[str] = None,
) -> Tensor:
    """Routed expert MLPs, gated and combined: ``out[t] = sum_j gates[t,j] * expert_{ids[t,j]}(x[t])``.

    Shapes: x ``[T, D]``; w1 ``[E, D, F]`` for ``"gelu"``/``"gelu_tanh"`` or ``[E, D, 2F]`` for
    ``"swiglu"`` (first F columns = gate projection, last F = up; ``h = silu(gate) * up``);
    w2 ``[E, F, D]``; b1 ``[E, F or 2F]``; b2 ``[E, D]``; expert_ids ``[T, k]`` int32/int64;
    gates ``[T, k]`` float. All float tensors any of fp32/fp16/bf16; computed in fp32; the k-way
    combine is in fp32 in the fixed order j = 0..k-1; output ``[T, D]`` in x's dtype.
    ``"gelu"`` is the exact erf gelu; ``"gelu_tanh"`` the tanh approximation.
    Ids outside ``[0, E)`` contribute nothing. Differentiable w.r.t. x, w1, w2, b1, b2, gates.

    Under ``torch.autocast`` on x's device the op behaves like ``F.linear``: the GEMM operands x,
    w1 and w2 are cast to the autocast dtype (through autocast's cast cache: a weight that is a
    leaf requiring grad is cast once per autocast region), which the kernels' GEMMs then run in,
    forward and backward, with fp32 accumulation, activations and combine; gates and biases keep
    their dtypes. The output is in the autocast dtype; gradients come back in the inputs' dtypes.
    """
    op = "moe_expert_mlp"
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    T, D = x.shape
    check_choice(op, "activation", activation, ACTIVATIONS)
    check_tensor(op, "w1", w1, ndim=3, dtypes=FLOAT_DTYPES)
    E, _, F1 = w1.shape
    check_tensor(op, "w1", w1, shape=(E, D, F1))
    check_tensor(op, "w2", w2, ndim=3, dtypes=FLOAT_DTYPES)
    Fw = w2.shape[1]
    check_tensor(op, "w2", w2, shape=(E, Fw, D))
    want_f1 = 2 * Fw if activation == "swiglu" else Fw
    if F1 != want_f1:
        raise ValueError(
            f"{op}: argument 'w1' must have shape [{E}, {D}, {want_f1}] for activation={activation!r} "
            f"(w2 is {list(w2.shape)}, so F={Fw}), got {list(w1.shape)}"
        )
    check_tensor(op, "expert_ids", expert_ids, ndim=2, dtypes=INT_DTYPES)
    k = expert_ids.shape[1]
    check_tensor(op, "expert_ids", expert_ids, shape=(T, k))
    check_tensor(op, "gates", gates, shape=(T, k), dtypes=FLOAT_DTYPES)
    if b1 is not None:
        check_tensor(op, "b1", b1, shape=(E, F1), dtypes=FLOAT_DTYPES)
    if b2 is not None:
        check_tensor(op, "b2", b2, shape=(E, D), dtypes=FLOAT_DTYPES)
    dev = check_same_device(op, x=x, w1=w1, w2=w2, expert_ids=expert_ids, gates=gates, b1=b1, b2=b2)
    be = MOE_MLP.select(dev, backend)
    if be == "reference":
        return _ops.mlp_ref_autocast(x, w1, w2, expert_ids, gates, b1, b2, activation)
    return _ops.mlp_op(x, w1, w2, expert_ids, gates, b1, b2, activation, be)[0]


def moe_shared_expert(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    *,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    activation: str = "gelu",
    backend: Optional[str] = None,
) -> Tensor:
    """The always-on, ungated shared expert: :func:`moe_expert_mlp` with E = 1, ids 0, gates 1.

    x ``[T, D]``; w1 ``[D, F]`` (``[D, 2F]`` for swiglu); w2 ``[F, D]``; b1 ``[F or 2F]``;
    b2 ``[D]``. Returns ``act(x @ w1 + b1) @ w2 + b2`` in x's dtype.
    """
    op = "moe_shared_expert"
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w1", w1, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "w2", w2, ndim=2, dtypes=FLOAT_DTYPES)
    if b1 is not None:
        check_tensor(op, "b1", b1, ndim=1, dtypes=FLOAT_DTYPES)
    if b2 is not None:
        check_tensor(op, "b2", b2, ndim=1, dtypes=FLOAT_DTYPES)
    T = x.shape[0]
    ids = torch.zeros((T, 1), dtype=torch.int32, device=x.device)
    gates = torch.ones((T, 1), dtype=torch.float32, device=x.device)
    return moe_expert_mlp(
        x,
        w1.unsqueeze(0),
        w2.unsqueeze(0),
        ids,
        gates,
        b1=None if b1 is None else b1.unsqueeze(0),
        b2=None if b2 is None else b2.unsqueeze(0),
        activation=activation,
        backend=backend,
    )


def moe_sequence_gating(
    hidden: Tensor,
    valid_mask: Tensor,
    router_weight: Tensor,
    group_ids: Tensor,
    group_sizes: Sequence[int],
    top_k: int = 2,
    *,
    router_bias: Optional[Tensor] = None,
    score: str = "softmax",
    renormalize: bool = False,
    balance_coef: float = 0.0,
    backend: Optional[str] = None,
) -> MoEGating:
    """Sequence-level routing: one route per sequence (docs/model.md §3).

    hidden ``[B, S, D]`` float; valid_mask ``[B, S]`` bool (non-pad positions); router_weight
    ``[E_total, D]`` float; router_bias ``[E_total]``; group_ids ``[B]`` int in ``[0, G)``.
    ``pooled = masked mean of hidden over valid positions`` (fp32; a row with no valid position
    pools to zeros), ``logits = pooled @ router_weight.T (+ router_bias)``, then
    :func:`moe_gating` on the ``[B, E_total]`` logits (its backend choice applies to that step).
    Differentiable w.r.t. hidden, router_weight and router_bias.
    """
    op = "moe_sequence_gating"
    check_tensor(op, "hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES)
    B, S, D = hidden.shape
    check_tensor(op, "valid_mask", valid_mask, shape=(B, S), dtypes=(torch.bool,))
    sizes = _check_group_sizes(op, group_sizes, None, what="")
    _check_top_k(op, top_k, sizes)
    check_choice(op, "score", score, SCORES)
    check_bool(op, "renormalize", renormalize)
    check_real(op, "balance_coef", balance_coef)
    E_total = sum(sizes)
    check_tensor(op, "router_weight", router_weight, ndim=2, dtypes=FLOAT_DTYPES)
    if tuple(router_weight.shape) != (E_total, D):
        raise ValueError(
            f"{op}: argument 'router_weight' must have shape [sum(group_sizes)={E_total}, D={D}], "
            f"got {list(router_weight.shape)}"
        )
    if router_bias is not None:
        check_tensor(op, "router_bias", router_bias, shape=(E_total,), dtypes=FLOAT_DTYPES)
    check_tensor(op, "group_ids", group_ids, shape=(B,), dtypes=INT_DTYPES)
    check_same_device(
        op,
        hidden=hidden,
        valid_mask=valid_mask,
        router_weight=router_weight,
        router_bias=router_bias,
        group_ids=group_ids,
    )
    logits = ref_gating.sequence_router_logits_ref(hidden, valid_mask, router_weight, router_bias)
    return moe_gating(
        logits,
        group_ids,
        sizes,
        top_k,
        score=score,
        renormalize=renormalize,
        balance_coef=balance_coef,
        backend=backend,
    )
