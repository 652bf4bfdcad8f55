"""The ``torch.library`` custom ops of the grouped MoE family (``unif2ace::moe_*``): their fake
implementations (shapes from host-known sizes, so no host sync) and autograd formulas, whose
backwards are custom ops themselves. Every non-reference backend of :mod:`unif2ace.kernels.moe`
runs behind them, so the public ops work under ``torch.compile(fullgraph=True)``; the ``backend``
argument names the implementation, reached through the op's registry record as
``OPS[op].kernels(backend).<entry point>`` (the reference's functions carry a ``_ref`` suffix;
running the reference through these ops is how tests check the custom-op plumbing).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _ext
from .._dispatch import OPS

Tensor = torch.Tensor


def _like(t: Tensor) -> Tensor:
    """A fake result shaped and typed like ``t`` but contiguous, as every kernel returns it (never
    ``empty_like``, which copies a transposed input's strides)."""
    return t.new_empty(t.shape)


def _kernel(op_name: str, backend: str, entry_point: str):
    """``entry_point`` of op ``op_name`` on ``backend`` (``<entry_point>_ref`` for the reference)."""
    mod = OPS[op_name].kernels(backend)
    return getattr(mod, entry_point + "_ref" if backend == "reference" else entry_point)


# ------------------------------------------------------------------------------------------------
# routing metadata (not differentiable)


@torch.library.custom_op("unif2ace::moe_expert_histogram", mutates_args=())
def histogram_op(expert_ids: Tensor, num_experts: int, backend: str) -> Tensor:
    return _kernel("moe_expert_histogram", backend, "moe_expert_histogram")(expert_ids, num_experts)


@histogram_op.register_fake
def _(expert_ids, num_experts, backend):
    return expert_ids.new_empty((num_experts,), dtype=torch.int32)


@torch.library.custom_op("unif2ace::moe_align", mutates_args=())
def align_op(
    expert_ids: Tensor, num_experts: int, block_size: int, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_kernel("moe_align", backend, "moe_align")(expert_ids, num_experts, block_size))


@align_op.register_fake
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


# ------------------------------------------------------------------------------------------------
# gating


@torch.library.custom_op("unif2ace::moe_gating", mutates_args=())
def gating_op(
    router_logits: Tensor,
    group_ids: Tensor,
    group_sizes: List[int],
    top_k: int,
    score: str,
    renormalize: bool,
    balance_coef: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    outs = _kernel("moe_gating", backend, "moe_gating")(
        router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef
    )
    return tuple(o.detach().contiguous() for o in outs)


@gating_op.register_fake
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
def gating_backward_op(
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
    dz = _kernel("moe_gating", backend, "moe_gating_backward")(
        grad_gates, grad_prob, grad_loss, router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef
    )
    return dz.detach().contiguous()


@gating_backward_op.register_fake
def _(grad_gates, grad_prob, grad_loss, router_logits, *args):
    return _like(router_logits)


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
    gz = gating_backward_op(
        g_gates, g_prob, g_loss, router_logits, group_ids, group_sizes, top_k, score, renormalize, balance_coef, backend
    )
    return gz, None, None, None, None, None, None, None


gating_op.register_autograd(_gating_backward, setup_context=_gating_setup)


# ------------------------------------------------------------------------------------------------
# expert MLP


# The forward returns (out, saved): ``saved`` is what a backend keeps for its backward (the cpu
# kernel's pre-activations, ``saved_h_meta`` of its module gives shape and dtype), an empty tensor
# for backends that recompute everything. Only ``out`` is differentiable.


def _saved_meta(x, w1, w2, expert_ids, backend):
    """``(shape, dtype)`` of the forward's saved tensor on ``backend``."""
    meta = None if backend == "reference" else getattr(OPS["moe_expert_mlp"].kernels(backend), "saved_h_meta", None)
    return meta(x, w1, w2, expert_ids) if meta is not None else ((0,), x.dtype)


@torch.library.custom_op("unif2ace::moe_expert_mlp", mutates_args=())
def mlp_op(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    activation: str,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    res = _kernel("moe_expert_mlp", backend, "moe_expert_mlp")(x, w1, w2, expert_ids, gates, b1, b2, activation)
    out, saved = res if isinstance(res, (tuple, list)) else (res, x.new_empty(0))
    return out.detach().contiguous(), saved.detach()


@mlp_op.register_fake
def _(x, w1, w2, expert_ids, gates, b1, b2, activation, backend):
    shape, dtype = _saved_meta(x, w1, w2, expert_ids, backend)
    return _like(x), x.new_empty(shape, dtype=dtype)


@torch.library.custom_op("unif2ace::moe_expert_mlp_backward", mutates_args=())
def mlp_backward_op(
    grad_out: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    expert_ids: Tensor,
    gates: Tensor,
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    activation: str,
    saved: Tensor,
    backend: str,
) -> List[Tensor]:
    extra = (saved,) if saved.numel() else ()  # only a backend that saved something takes it back
    grads = _kernel("moe_expert_mlp", backend, "moe_expert_mlp_backward")(
        grad_out, x, w1, w2, expert_ids, gates, b1, b2, activation, *extra
    )
    # a missing bias gets an empty placeholder (custom ops return no None)
    return [x.new_empty(0) if g is None else g.detach().contiguous() for g in grads]


@mlp_backward_op.register_fake
def _(grad_out, x, w1, w2, expert_ids, gates, b1, b2, activation, saved, backend):
    biases = [x.new_empty(0) if b is None else _like(b) for b in (b1, b2)]
    return [_like(x), _like(w1), _like(w2), _like(gates)] + biases


def _mlp_setup(ctx, inputs, output):
    x, w1, w2, expert_ids, gates, b1, b2, activation, backend = inputs
    ctx.save_for_backward(x, w1, w2, expert_ids, gates, b1, b2, output[1])
    ctx.args = (activation, backend)
    ctx.mark_non_differentiable(output[1])


def _mlp_backward(ctx, grad_out, _grad_saved):
    x, w1, w2, expert_ids, gates, b1, b2, saved = ctx.saved_tensors
    activation, backend = ctx.args
    dx, dw1, dw2, dg, db1, db2 = mlp_backward_op(
        grad_out, x, w1, w2, expert_ids, gates, b1, b2, activation, saved, backend
    )
    return (dx, dw1, dw2, None, dg, db1 if b1 is not None else None, db2 if b2 is not None else None, None, None)


mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# ------------------------------------------------------------------------------------------------
# autocast. Like F.linear: inside torch.autocast the GEMM operands (x, w1, w2) go to the autocast
# dtype, through autocast's own cast cache (fp32 weights that require grad are cast once per
# autocast region, not on every call), and the op runs with autocast off; gates and biases stay as
# they are, and the kernels keep fp32 accumulation, activations and combine. The output is in the
# autocast dtype (x's); the casts are recorded by autograd, so fp32 weights get fp32 gradients.
# The backward op casts nothing (its operands are the forward's) but runs with autocast off too, so
# a backward called inside the autocast region computes exactly as one called outside it.

_AUTOCAST_LIB = torch.library.Library("unif2ace", "FRAGMENT")
_MLP_GEMM_ARGS = (0, 1, 2)  # x, w1, w2 of moe_expert_mlp


def _autocast_cast(t: Tensor, dtype: torch.dtype, device_type: str) -> Tensor:
    if not (t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64):
        return t
    if _ext.cpu_status()[0]:
        return _ext.cpu_ops().autocast_cast(t, dtype, device_type)  # at::autocast::cached_cast
    return t.to(dtype)  # without the C++ extension: no cache


def autocast_cast_args(device_type: str, args, cast_args: Tuple[int, ...]) -> list:
    """``args`` with those at positions ``cast_args`` cast as autocast casts a GEMM operand."""
    dtype = torch.get_autocast_dtype(device_type)
    return [_autocast_cast(a, dtype, device_type) if i in cast_args else a for i, a in enumerate(args)]


def autocast_device(t: Tensor) -> Optional[str]:
    """``t``'s device type if autocast is on for it, else None."""
    kind = t.device.type
    return kind if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind) else None


def mlp_ref_autocast(*args) -> Tensor:
    """The reference ``moe_expert_mlp_ref(*args)`` with the custom op's autocast behaviour."""
    ref = OPS["moe_expert_mlp"].kernels("reference").moe_expert_mlp_ref
    kind = autocast_device(args[0])
    if kind is None:
        return ref(*args)
    args = autocast_cast_args(kind, args, _MLP_GEMM_ARGS)  # (in the region: its cast cache)
    with torch.autocast(kind, enabled=False):
        return ref(*args)


def _register_autocast(op, name: str, cast_args: Tuple[int, ...]) -> None:
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, device_type=device_type, keyset=keyset):
            args = autocast_cast_args(device_type, args, cast_args)
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                return op(*args)

        _AUTOCAST_LIB.impl(name, kernel, key)


_register_autocast(mlp_op, "moe_expert_mlp", _MLP_GEMM_ARGS)
_register_autocast(mlp_backward_op, "moe_expert_mlp_backward", ())
