"""Known violations of the sm_90a compile check (scripts/check_triton_sm90.py), to be burnt down.

Each entry names a kernel (optionally narrowed by dtype / config / constexprs / variant), the
rule it breaks (``RULES`` in :mod:`.triton_sm90`), the issue item that fixes it and what was
measured (benchmarks/results/triton_sm90_resources.md has every row). The check passes while
these violate and fails on any other violation -- and on an entry that no longer violates
("stale known violation"): when a fix lands, delete or narrow the entry and regenerate the table
(``--full --write``). This list can only shrink honestly.

Measured 2026 with triton 3.6.0 (the wheel's ptxas), target sm_90a.
"""

from typing import List

from .triton_sm90 import Known

# Every violation found so far (issue 16 item 3: fused-head spills and register caps, MoE gating /
# align spills and the serial dW2 wgmma, the masked-step remask spill) is fixed.
KNOWN: List[Known] = []
