"""Build unif2ace: the C++ CPU extension always, the CUDA extension when torch has CUDA.

    pip install --no-build-isolation -e .

- ``unif2ace._C``       C++ CPU kernels (csrc/cpu/*.cpp, OpenMP), always built.
- ``unif2ace._C_cuda``  CUDA kernels (csrc/cuda/*.cu + *.cpp), built only when the installed torch
                        has CUDA (``torch.version.cuda``) and a CUDA toolkit is found (CUDA_HOME or
                        /usr/local/cuda). Otherwise it is skipped with a printed reason;
                        ``python -m unif2ace info`` reports which backends are present.

Environment knobs: ``UNIF2ACE_NO_CUDA=1`` skips the CUDA extension; ``TORCH_CUDA_ARCH_LIST``
(default "9.0") picks the GPU architectures.

``cuda_extension_spec()`` is the one description of the CUDA extension (sources and flags):
scripts/check_cuda_compile.py compiles exactly that on machines that cannot build it. The test-only
CPU emulation of the CUDA kernels (unif2ace/testing/cuda_emu.py) is never built here.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    return home


# torch.utils.cpp_extension reads CUDA_HOME at import time; without it torch guesses /usr/local and
# the CUDA link fails with "cannot find -lcudart", so set it before the import.
if _cuda_home():
    os.environ.setdefault("CUDA_HOME", _cuda_home())
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension  # noqa: E402


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cuda_extension_spec():
    """unif2ace._C_cuda: its sources (csrc/cuda/*.cu and *.cpp, relative to the repository) and the
    extra flags of its host (cxx) and device (nvcc) compiles; torch adds its defaults to both."""
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    sources = glob.glob(os.path.join(cuda_dir, "*.cu")) + glob.glob(os.path.join(cuda_dir, "*.cpp"))
    return {
        "name": "unif2ace._C_cuda",
        "sources": _rel(sources),
        "include_dirs": [os.path.join(ROOT, "csrc")],
        "cxx": ["-O3", "-g0", "-std=c++17"],
        "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
    }


def extensions():
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++17"]
    exts = [
        CppExtension(
            "unif2ace._C",
            _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    reason = None
    if os.environ.get("UNIF2ACE_NO_CUDA") == "1":
        reason = "UNIF2ACE_NO_CUDA=1"
    elif not torch.version.cuda:
        reason = f"the installed torch {torch.__version__} has no CUDA"
    elif not _cuda_home():
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    if reason is None:
        from torch.utils.cpp_extension import CUDAExtension

        spec = cuda_extension_spec()
        exts.append(
            CUDAExtension(
                spec["name"],
                spec["sources"],
                include_dirs=spec["include_dirs"],
                extra_compile_args={"cxx": spec["cxx"], "nvcc": spec["nvcc"]},
            )
        )
    else:
        print(f"unif2ace: not building the CUDA extension: {reason}", file=sys.stderr)
    return exts


# Package metadata (name, version, dependencies, entry points) lives in pyproject.toml; this file
# only declares the compiled extensions. setuptools runs this file as __main__; the compile check
# imports it for cuda_extension_spec() only.
if __name__ == "__main__":
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )
