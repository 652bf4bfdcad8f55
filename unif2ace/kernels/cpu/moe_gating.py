"""cpu backend of ``moe_gating``: host glue of csrc/cpu/moe_gating.cpp (``torch.ops.unif2ace_cpu``).

Arguments and results are those of ``moe_gating_ref`` / ``moe_gating_backward_ref`` (positional,
the op schemas in the .cpp)."""

from __future__ import annotations

from .. import _ext


def moe_gating(*args):
    """``(expert_ids, gates, expert_fraction, expert_prob, balance_loss)``, as ``moe_gating_ref``."""
    return tuple(_ext.cpu_ops().moe_gating(*args))


def moe_gating_backward(*args):
    """d router_logits, as ``moe_gating_backward_ref``."""
    return _ext.cpu_ops().moe_gating_backward(*args)
