"""cpu backend: Python host glue of the C++/OpenMP kernels (csrc/cpu/<stem>.cpp, ``torch.ops.unif2ace_cpu``).

One module per stem (``unif2ace.kernels.cpu.<stem>``), defining the entry points its op records
declare (see :class:`unif2ace.kernels._dispatch.Op`).
"""

from __future__ import annotations

import os
from typing import Tuple

import torch

__all__ = ["LOWP_GEMM_ENV", "lowp_gemm"]

LOWP_GEMM_ENV = "UNIF2ACE_CPU_LOWP_GEMM"
"""``1``: run bf16/fp16 GEMMs in that dtype whatever the CPU; ``0``: always upcast to fp32;
unset: decide from the CPU (:func:`lowp_gemm`)."""

_MATRIX_FEATURES = {  # the instructions that make a 16-bit GEMM faster than an fp32 one
    torch.bfloat16: ("amx_bf16", "avx512_bf16"),
    torch.float16: ("amx_fp16", "avx512_fp16"),
}


def lowp_gemm(dtype: torch.dtype) -> Tuple[bool, str]:
    """(use, why): whether the cpu backend runs the GEMMs of ``dtype`` inputs (bf16/fp16) in that
    dtype -- ``torch.mm`` through oneDNN, on the machine's low-precision matrix instructions, with
    fp32 accumulation -- instead of upcasting the operands to fp32. Decided at run time from the
    CPU's features (AMX or AVX-512 BF16/FP16; without them a 16-bit GEMM is emulated and no
    faster than fp32); :data:`LOWP_GEMM_ENV` overrides it."""
    feats = _MATRIX_FEATURES.get(dtype)
    if feats is None:
        return False, f"{dtype} GEMMs run in fp32"
    env = os.environ.get(LOWP_GEMM_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1", f"{LOWP_GEMM_ENV}={env}"
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except AttributeError:  # an older torch: the public probe of the common case
        caps = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_bf16": torch.cpu._is_amx_tile_supported()}
    have = [f for f in feats if caps.get(f)]
    if have:
        return True, f"{'+'.join(have)} through oneDNN"
    return False, f"no {' / '.join(feats)}"
