"""Loading the compiled extensions and Triton, remembering why one is missing.

The C++ extension ``unif2ace._C`` registers its kernels as ``torch.ops.unif2ace_cpu.*`` and the
CUDA extension ``unif2ace._C_cuda`` as ``torch.ops.unif2ace_cuda.*`` (``TORCH_LIBRARY``), so
importing them is all the loading there is. A missing extension is reported, never a crash at
import: the ops that need it raise :class:`~unif2ace.kernels.BackendUnavailableError` when it is
requested by name, and automatic selection skips it.
"""

from __future__ import annotations

import functools
import importlib
from typing import Tuple

# Test seam, set only by unif2ace.testing.cuda_emu.emulated_cuda(): while it holds the op namespace
# of the test-only CPU emulation of the CUDA kernels (torch.ops.unif2ace_cuda_emu), the cuda
# backend runs those on CPU tensors. Not a backend of its own, never set by the library.
_cuda_emulation = None


def cuda_emulated() -> bool:
    """Whether the cuda backend currently runs the CPU emulation of the CUDA kernels (tests only)."""
    return _cuda_emulation is not None


@functools.lru_cache(maxsize=None)
def _load(module: str) -> Tuple[bool, str]:
    try:
        importlib.import_module(module)
        return True, ""
    except Exception as e:  # ImportError, OSError (bad .so), undefined symbols...
        return False, f"{type(e).__name__}: {e}"


def cpu_status() -> Tuple[bool, str]:
    """(loaded, error) for the C++ CPU extension ``unif2ace._C``."""
    return _load("unif2ace._C")


def cuda_status() -> Tuple[bool, str]:
    """(loaded, error) for the CUDA extension ``unif2ace._C_cuda``; needs a CUDA device too."""
    ok, err = _load("unif2ace._C_cuda")
    if ok:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
    return ok, err


def triton_status() -> Tuple[bool, str]:
    """(importable, error) for Triton."""
    return _load("triton")


def cpu_ops():
    """``torch.ops.unif2ace_cpu`` after loading the extension (raises if it did not load)."""
    ok, err = cpu_status()
    if not ok:
        raise RuntimeError(f"the C++ extension unif2ace._C did not load: {err}")
    import torch

    return torch.ops.unif2ace_cpu


def cuda_ops():
    """``torch.ops.unif2ace_cuda`` after loading the extension (raises if it did not load)."""
    if _cuda_emulation is not None:
        return _cuda_emulation
    ok, err = cuda_status()
    if not ok:
        raise RuntimeError(f"the CUDA extension unif2ace._C_cuda did not load: {err}")
    import torch

    return torch.ops.unif2ace_cuda
