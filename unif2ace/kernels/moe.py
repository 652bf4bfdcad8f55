"""Grouped MoE: gating, routing metadata (histogram, align) and the routed expert MLP.

Experts of all task groups live in one global index space: group ``g`` owns experts
``[offset_g, offset_g + size_g)`` with ``offset_g = sum(group_sizes[:g])`` (docs/model.md §3).
Routing never crosses groups.

Ops and backends (see :mod:`unif2ace.kernels._dispatch` for how one is chosen):

=======================  =====================================================================================
moe_gating               reference, cpu (C++, deterministic statistics), triton (fused top-k + statistics),
                         cuda (warp per token; groups > 128 experts or > 255 groups run the reference)
moe_align                reference, cpu (C++ counting sort), cuda (E <= 1024), triton (cuda's fallback)
moe_expert_histogram     reference, cpu, cuda
moe_expert_mlp           reference, cpu (C++ counting sort + per-expert oneDNN GEMMs), triton (gather-GEMM)
=======================  =====================================================================================

The reference (plain PyTorch, fp32) in :mod:`unif2ace.kernels.reference.moe` defines the
semantics. Every non-reference backend runs through a ``torch.library`` custom op
(``unif2ace::moe_*``) with a fake impl (and, for the differentiable ops, an autograd formula
whose backward is itself a custom op), so calls work under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import types
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _ext
from ._dispatch import Op
from ._validate import FLOAT_DTYPES, INT_DTYPES, check_choice, check_range, check_same_device, check_tensor
from .reference import moe as ref

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
CUDA_ALIGN_MAX_EXPERTS = 1024  # csrc/cuda/moe_routing.cuh kAlignMaxExperts


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
    cpu_order=("cpu",),
    cuda_order=("triton", "cuda"),
    doc="grouped top-k gating + per-group balance statistics",
)
MOE_ALIGN = Op(
    "moe_align",
    cpu_order=("cpu",),
    cuda_order=("cuda", "triton"),
    doc="expert ids -> block-padded per-expert index lists",
)
MOE_HISTOGRAM = Op("moe_expert_histogram", cpu_order=("cpu",), cuda_order=("cuda",), doc="assignments per expert")
MOE_MLP = Op(
    "moe_expert_mlp", cpu_order=("cpu",), cuda_order=("triton", "cuda"), doc="routed expert MLPs combined with gates"
)


# ------------------------------------------------------------------------------------------------
# backend registrations


MOE_GATING.register(
    "reference", types.SimpleNamespace(forward=ref.moe_gating_ref, backward=ref.moe_gating_backward_ref)
)
MOE_MLP.register(
    "reference", types.SimpleNamespace(forward=ref.moe_expert_mlp_ref, backward=ref.moe_expert_mlp_backward_ref)
)
MOE_GATING.register(
    "cpu",
    types.SimpleNamespace(
        forward=lambda *a: tuple(_ext.cpu_ops().moe_gating(*a)),
        backward=lambda *a: _ext.cpu_ops().moe_gating_backward(*a),
    ),
)
MOE_MLP.register(
    "cpu",
    types.SimpleNamespace(
        forward=lambda *a: _ext.cpu_ops().moe_expert_mlp(*a),
        backward=lambda *a: tuple(_ext.cpu_ops().moe_expert_mlp_backward(*a)),
    ),
)

MOE_HISTOGRAM.register("reference", ref.moe_expert_histogram_ref)
MOE_HISTOGRAM.register("cpu", lambda ids, num_experts: _ext.cpu_ops().moe_expert_histogram(ids, num_experts))
MOE_HISTOGRAM.register("cuda", lambda ids, num_experts: _ext.cuda_ops().moe_expert_histogram(ids, num_experts))

MOE_ALIGN.register("reference", ref.moe_align_ref)
MOE_ALIGN.register("cpu", lambda ids, e, bs: tuple(_ext.cpu_ops().moe_align(ids, e, bs)))


@MOE_ALIGN.register("cuda")
def _align_cuda(ids, num_experts, block_size):
    # the single-CTA scan handles E <= 1024; more experts than that run the reference
    if num_experts > CUDA_ALIGN_MAX_EXPERTS:
        return ref.moe_align_ref(ids, num_experts, block_size)
    return tuple(_ext.cuda_ops().moe_align(ids, num_experts, block_size))


def _triton_moe():
    from .triton import moe as k  # imported on first use (Triton's import and JIT decorators are not free)

    return k


MOE_GATING.register(
    "triton",
    types.SimpleNamespace(
        forward=lambda *a: _triton_moe().gating_forward(*a), backward=lambda *a: _triton_moe().gating_backward(*a)
    ),
)
MOE_MLP.register(
    "triton",
    types.SimpleNamespace(
        forward=lambda *a: _triton_moe().expert_mlp_forward(*a),
        backward=lambda *a: _triton_moe().expert_mlp_backward(*a),
    ),
)
MOE_ALIGN.register("triton", lambda ids, e, bs: _triton_moe().align(ids, e, bs))


CUDA_GATING_MAX_GROUP_EXPERTS = 128  # csrc/cuda/moe_gating.cuh kMaxGroupExperts (one warp, 4 columns per lane)
CUDA_GATING_MAX_GROUPS = 255  # csrc/cuda/moe_gating.cuh kMaxGroups (group table passed by value)


def _gating_cuda_fits(group_sizes) -> bool:
    return len(group_sizes) <= CUDA_GATING_MAX_GROUPS and max(group_sizes) <= CUDA_GATING_MAX_GROUP_EXPERTS


def _gating_cuda_forward(router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef):
    # the warp-per-token kernel holds a group's scores in registers (<= 128 experts per group);
    # larger groups (or more than 255 groups) run the reference
    if not _gating_cuda_fits(group_sizes):
        return ref.moe_gating_ref(router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef)
    return tuple(
        _ext.cuda_ops().moe_gating(router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef)
    )


def _gating_cuda_backward(
    grad_gates, grad_prob, grad_loss, router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef
):
    if not _gating_cuda_fits(group_sizes):
        return ref.moe_gating_backward_ref(
            grad_gates,
            grad_prob,
            grad_loss,
            router_logits,
            group_ids,
            group_sizes,
            top_k,
            score,
            renormalize,
            balance_coef,
        )
    return _ext.cuda_ops().moe_gating_backward(
        grad_gates, grad_prob, grad_loss, router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef
    )


MOE_GATING.register("cuda", types.SimpleNamespace(forward=_gating_cuda_forward, backward=_gating_cuda_backward))


# ------------------------------------------------------------------------------------------------
# custom ops (non-reference backends)


@torch.library.custom_op("unif2ace::moe_expert_histogram", mutates_args=())
def _histogram_op(expert_ids: Tensor, num_experts: int, backend: str) -> Tensor:
    return MOE_HISTOGRAM.impl(backend)(expert_ids, num_experts)


@_histogram_op.register_fake
def _(expert_ids, num_experts, backend):
    return expert_ids.new_empty((num_experts,), dtype=torch.int32)


@torch.library.custom_op("unif2ace::moe_align", mutates_args=())
def _align_op(
    expert_ids: Tensor, num_experts: int, block_size: int, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(MOE_ALIGN.impl(backend)(expert_ids, num_experts, block_size))


@_align_op.register_fake
def _(expert_ids, num_experts, block_size, backend):
    max_len = expert_ids.numel() + num_experts * (block_size - 1)
    max_blocks = (max_len + block_size - 1) // block_size
    e = expert_ids.new_empty
    return (
        e((max_len,), dtype=torch.int32),
        e((max_blocks,), dtype=torch.int32),
        e((1,), dtype=torch.int32),
        e((num_experts,), dtype=torch.int32),
    )


@torch.library.custom_op("unif2ace::moe_gating", mutates_args=())
def _gating_op(
    router_logits: Tensor,
    group_ids: Tensor,
    group_sizes: List[int],
    top_k: int,
    score: str,
    renormalize: bool,
    balance_coef: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    outs = MOE_GATING.impl(backend).forward(
        router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef
    )
    return tuple(o.detach().contiguous() for o in outs)


@_gating_op.register_fake
def _(router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef, backend):
    T, E = router_logits.shape
    n = router_logits.new_empty
    return (
        n((T, top_k), dtype=torch.int32),
        n((T, top_k), dtype=torch.float32),
        n((E,), dtype=torch.float32),
        n((E,), dtype=torch.float32),
        n((len(group_sizes),), dtype=torch.float32),
    )


@torch.library.custom_op("unif2ace::moe_gating_backward", mutates_args=())
def _gating_bwd_op(
    grad_gates: Tensor,
    grad_prob: Tensor,
    grad_loss: Tensor,
    router_logits: Tensor,
    group_ids: Tensor,
    group_sizes: List[int],
    top_k: int,
    score: str,
    renormalize: bool,
    balance_coef: float,
    backend: str,
) -> Tensor:
    return MOE_GATING.impl(backend).backward(
        grad_gates, grad_prob, grad_loss, router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef
    )


@_gating_bwd_op.register_fake
def _(grad_gates, grad_prob, grad_loss, router_logits, *args):
    return torch.empty_like(router_logits)


def _gating_setup(ctx, inputs, output):
    router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef, backend = inputs
    ctx.save_for_backward(router_logits, group_ids)
    ctx.args = (list(group_sizes), top_k, score, renormalize, balance_coef, backend)
    ctx.mark_non_differentiable(output[0], output[2])


def _gating_backward(ctx, g_ids, g_gates, g_frac, g_prob, g_loss):
    router_logits, group_ids = ctx.saved_tensors
    group_sizes, top_k, score, renormalize, balance_coef, backend = ctx.args
    T, E = router_logits.shape
    z = router_logits.new_zeros
    g_gates = z((T, top_k), dtype=torch.float32) if g_gates is None else g_gates.float()
    g_prob = z((E,), dtype=torch.float32) if g_prob is None else g_prob.float()
    g_loss = z((len(group_sizes),), dtype=torch.float32) if g_loss is None else g_loss.float()
    gz = _gating_bwd_op(
        g_gates, g_prob, g_loss, router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef, backend
    )
    return gz, None, None, None, None, None, None, None


_gating_op.register_autograd(_gating_backward, setup_context=_gating_setup)


@torch.library.custom_op("unif2ace::moe_expert_mlp", mutates_args=())
def _mlp_op(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    activation: str,
    backend: str,
) -> Tensor:
    return MOE_MLP.impl(backend).forward(x, w1, w2, expert_ids, gates, b1, b2, activation).detach().contiguous()


@_mlp_op.register_fake
def _(x, w1, w2, expert_ids, gates, b1, b2, activation, backend):
    return torch.empty_like(x)


@torch.library.custom_op("unif2ace::moe_expert_mlp_backward", mutates_args=())
def _mlp_bwd_op(
    grad_out: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    activation: str,
    backend: str,
) -> List[Tensor]:
    grads = MOE_MLP.impl(backend).backward(grad_out, x, w1, w2, expert_ids, gates, b1, b2, activation)
    # a missing bias gets an empty placeholder (custom ops return no None)
    return [x.new_empty(0) if g is None else g.detach().contiguous() for g in grads]


@_mlp_bwd_op.register_fake
def _(grad_out, x, w1, w2, expert_ids, gates, b1, b2, activation, backend):
    return [
        torch.empty_like(x),
        torch.empty_like(w1),
        torch.empty_like(w2),
        torch.empty_like(gates),
        x.new_empty(0) if b1 is None else torch.empty_like(b1),
        x.new_empty(0) if b2 is None else torch.empty_like(b2),
    ]


def _mlp_setup(ctx, inputs, output):
    x, w1, w2, expert_ids, gates, b1, b2, activation, backend = inputs
    ctx.save_for_backward(x, w1, w2, expert_ids, gates, b1, b2)
    ctx.args = (activation, backend)


def _mlp_backward(ctx, grad_out):
    x, w1, w2, expert_ids, gates, b1, b2 = ctx.saved_tensors
    activation, backend = ctx.args
    dx, dw1, dw2, dg, db1, db2 = _mlp_bwd_op(grad_out, x, w1, w2, expert_ids, gates, b1, b2, activation, backend)
    return (dx, dw1, dw2, None, dg, db1 if b1 is not None else None, db2 if b2 is not None else None, None, None)


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# ------------------------------------------------------------------------------------------------
# public API


def _select(op_name: str, device: torch.device, backend: Optional[str]) -> str:
    from ._dispatch import OPS

    return OPS[op_name].select(device, backend)


def _check_int(op: str, name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: argument '{name}' must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{op}: argument '{name}' must be >= {low}, got {value}")
    return value


def _check_group_sizes(op: str, group_sizes, E_total: Optional[int], *, what: str) -> List[int]:
    if isinstance(group_sizes, torch.Tensor) or not isinstance(group_sizes, (list, tuple)) or not group_sizes:
        raise TypeError(f"{op}: argument 'group_sizes' must be a non-empty list of ints, got {group_sizes!r}")
    sizes = []
    for g, s in enumerate(group_sizes):
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"{op}: argument 'group_sizes' must hold ints >= 1, got {s!r} for group {g}")
        sizes.append(int(s))
    if E_total is not None and sum(sizes) != E_total:
        raise ValueError(f"{op}: sum(group_sizes) = {sum(sizes)} (group_sizes={sizes}) must equal {what} = {E_total}")
    return sizes


def _check_top_k(op: str, top_k, sizes: Sequence[int]) -> int:
    _check_int(op, "top_k", top_k, 1)
    for g, s in enumerate(sizes):
        if top_k > s:
            raise ValueError(
                f"{op}: argument 'top_k'={top_k} exceeds the size of group {g} ({s} experts); "
                f"top_k must be <= every group size (group_sizes={list(sizes)})"
            )
    return top_k


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
    _check_top_k(op, top_k, sizes)
    check_choice(op, "score", score, SCORES)
    check_range(op, "group_ids", group_ids, 0, len(sizes))
    renormalize, balance_coef = bool(renormalize), float(balance_coef)
    be = _select("moe_gating", dev, backend)
    if be == "reference":
        outs = ref.moe_gating_ref(router_logits, group_ids, sizes, top_k, score, renormalize, balance_coef)
    else:
        outs = _gating_op(router_logits, group_ids, sizes, top_k, score, renormalize, balance_coef, be)
    return MoEGating(*outs)


def _check_ids(op: str, expert_ids) -> None:
    check_tensor(op, "expert_ids", expert_ids, ndim=(1, 2), dtypes=INT_DTYPES)


def moe_expert_histogram(expert_ids: Tensor, num_experts: int, *, backend: Optional[str] = None) -> Tensor:
    """``[E]`` int32 count of entries of ``expert_ids`` equal to each expert.

    ``expert_ids``: ``[T, k]`` or ``[N]`` int32/int64 (any strides). Ids outside
    ``[0, num_experts)`` (e.g. -1 for a null expert) are ignored. Counts must fit int32.
    """
    op = "moe_expert_histogram"
    _check_ids(op, expert_ids)
    _check_int(op, "num_experts", num_experts, 1)
    be = _select("moe_expert_histogram", expert_ids.device, backend)
    if be == "reference":
        return ref.moe_expert_histogram_ref(expert_ids, num_experts)
    return _histogram_op(expert_ids, num_experts, be)


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
    _check_int(op, "num_experts", num_experts, 1)
    _check_int(op, "block_size", block_size, 1)
    max_len, _ = ref.moe_align_size_bound(expert_ids.numel(), num_experts, block_size)
    if max_len >= 2**31:
        raise ValueError(
            f"{op}: expert_ids.numel() + num_experts*(block_size-1) = {max_len} must be < 2**31 "
            f"(int32 index lists); got expert_ids of shape {list(expert_ids.shape)}, num_experts={num_experts}, "
            f"block_size={block_size}"
        )
    be = _select("moe_align", expert_ids.device, backend)
    if be == "reference":
        outs = ref.moe_align_ref(expert_ids, num_experts, block_size)
    else:
        outs = _align_op(expert_ids, num_experts, block_size, be)
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
    be = _select("moe_expert_mlp", dev, backend)
    if be == "reference":
        return ref.moe_expert_mlp_ref(x, w1, w2, expert_ids, gates, b1, b2, activation)
    return _mlp_op(x, w1, w2, expert_ids, gates, b1, b2, activation, be)


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
    pooled = ref.masked_mean_pool_ref(hidden, valid_mask)
    logits = pooled @ router_weight.float().t()
    if router_bias is not None:
        logits = logits + router_bias.float()
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
