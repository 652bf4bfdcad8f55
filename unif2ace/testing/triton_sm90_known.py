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
    # --- d3diff_head: the fused LM head + loss (one config shared by forward, dH and dW)
    Known(
        "_bwd_dw_kernel",
        "hot-loop-spill",
        _I3,
        "fp32 dW: 6.6-7.7 KB spill stores per thread, ~2700-3100 STL/LDL in its K-loops (both fp32 configs)",
        dtype="fp32",
    ),
    Known(
        "_bwd_atomic_kernel",
        "hot-loop-spill",
        _I3,
        "fp32 atomic backward: 1.4-2.5 KB spill stores, ~500-890 STL/LDL in its K-loops (both fp32 configs)",
        dtype="fp32",
    ),
    Known(
        "_bwd_dh_kernel",
        "hot-loop-spill",
        _I3,
        "fp32 dH, small-D config (BLOCK_M=64 BLOCK_V=64 BLOCK_K=32 w4): 300 B spill stores, 26 STL/LDL in K-loops",
        dtype="fp32",
        config="BLOCK_M=64 BLOCK_V=64 BLOCK_K=32 w4",
    ),
    Known(
        "_bwd_dw_kernel",
        "spill",
        _I3,
        "bf16/fp16 dW spills 20-656 B at 255 registers, both 16-bit configs (most with bias and the hi/lo split)",
    ),
    Known(
        "_bwd_atomic_kernel",
        "spill",
        _I3,
        "bf16/fp16 atomic backward, small-D config (BLOCK_M=64 BLOCK_V=128 BLOCK_K=64 w4): 84-372 B at 255 registers",
        config="BLOCK_M=64 BLOCK_V=128 BLOCK_K=64 w4",
    ),
    Known(
        "_bwd_dh_kernel",
        "reg-cap",
        _I3,
        "bf16/fp16 dH, large-D config (BLOCK_M=128 w8): 252-255 registers x 256 threads, one CTA per SM",
    ),
    Known(
        "_bwd_dw_kernel",
        "reg-cap",
        _I3,
        "bf16/fp16 dW, large-D config (BLOCK_M=128 w8): 255 registers x 256 threads, one CTA per SM",
    ),
    Known(
        "_bwd_atomic_kernel",
        "reg-cap",
        _I3,
        "bf16/fp16 atomic backward with bias, large-D config (BLOCK_M=128 w8): 255 registers x 256 threads",
    ),
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
