"""cpu backend of ``moe_expert_mlp``: host glue of csrc/cpu/moe_mlp.cpp (``torch.ops.unif2ace_cpu``;
counting sort of the slots by expert, per-expert oneDNN GEMMs, vectorised activations).

Arguments and results are those of ``moe_expert_mlp_ref`` / ``moe_expert_mlp_backward_ref``
(positional, the op schemas in the .cpp; a missing bias gradient is None)."""

from __future__ import annotations

from .. import _ext


def moe_expert_mlp(*args):
    """out ``[T, D]`` in x's dtype, as ``moe_expert_mlp_ref``."""
    return _ext.cpu_ops().moe_expert_mlp(*args)


def moe_expert_mlp_backward(*args):
    """``(dx, dw1, dw2, dgates, db1, db2)``, as ``moe_expert_mlp_backward_ref``."""
    return tuple(_ext.cpu_ops().moe_expert_mlp_backward(*args))
