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
    fp32 accumulation -- instead of upcasting the operands to fp32. One rule for every cpu kernel:
    ``low_precision_gemm`` in csrc/cpu/cpu_features.h, decided at run time from the CPU's features
    (AMX or AVX-512 BF16/FP16 and oneDNN; without them a 16-bit GEMM is emulated and no faster than
    fp32); :data:`LOWP_GEMM_ENV` overrides it. ``why`` says what decided."""
    from .. import _ext

    feats = _MATRIX_FEATURES.get(dtype)
    if feats is None:
        return False, f"{dtype} GEMMs run in fp32"
    ok, err = _ext.cpu_status()
    if not ok:
        return False, f"the C++ extension did not load: {err}"
    use = bool(_ext.cpu_ops().low_precision_gemm(dtype))
    env = os.environ.get(LOWP_GEMM_ENV, "").strip()
    if env in ("0", "1"):
        return use, f"{LOWP_GEMM_ENV}={env}"
    caps = _ext.cpu_features()
    have = [f for f in feats if caps.get(f)]
    if use:
        return True, f"{'+'.join(have)} through oneDNN"
    return False, f"no {' / '.join(feats)}" if not have else "oneDNN is off in this torch"
