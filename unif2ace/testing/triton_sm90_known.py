"""Known violations of the sm_90a compile check (scripts/check_triton_sm90.py), to be burnt down.

Each entry names a kernel (optionally narrowed by dtype / config / constexprs / variant), the
rule it breaks (``RULES`` in :mod:`.triton_sm90`), the issue item that fixes it and what was
measured (benchmarks/results/triton_sm90_resources.md has every row). The check passes while
these violate and fails on any other violation -- and on an entry that no longer violates
("stale known violation"): when a fix lands, delete or narrow the entry and regenerate the table
(``--full --write``). This list can only shrink honestly.

Measured 2026 with triton 3.6.0 (the wheel's ptxas), target sm_90a.
"""

from .triton_sm90 import Known

_I3 = "issue 16 item 3"

KNOWN = [
    # --- moe_mlp
    Known(
        "_grouped_xty_kernel",
        "serial-wgmma",
        _I3,
        "dW2 (gate-scaled grad_out operand rebuilt in registers each step): every 16-bit config waits for its "
        "wgmma in the same iteration",
        consts="Y_BY_TOKEN_GATED=1",
    ),
    # --- moe_gating (found by this check)
    Known(
        "_gating_fwd_kernel",
        "spill",
        _I3,
        "bf16/fp16 gating forward: 152-164 B at 255 registers with 64-expert groups (BLOCK_E=64), 4-8 B at 64 "
        "registers with 8-expert groups (softmax+renorm, sigmoid)",
    ),
    Known(
        "_gating_bwd_kernel",
        "spill",
        _I3,
        "bf16/fp16 gating backward, sigmoid with 8-expert groups: 4-8 B at 56-72 registers",
    ),
    # --- moe_routing: align with >= 64 experts (BLOCK_E=64; found by this check)
    Known(
        "_align_blocks_kernel",
        "spill",
        _I3,
        "BLOCK_B=256 x BLOCK_E=64 tile: 2.9-5.9 KB spill stores at 32 registers",
        config="BLOCK_E=64",
    ),
    Known(
        "_align_count_kernel", "spill", _I3, "BLOCK_N=256 x BLOCK_E=64 tile: 96 B at 255 registers", config="BLOCK_E=64"
    ),
    Known(
        "_align_scatter_kernel",
        "spill",
        _I3,
        "BLOCK_N=256 x BLOCK_E=64 tile: 44-448 B at 255 registers (int64 ids worst)",
        config="BLOCK_E=64",
    ),
]
