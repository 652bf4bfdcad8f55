"""Build unif2ace: the C++ CPU extension always, the CUDA extension when torch has CUDA.

    pip install --no-build-isolation -e .

- ``unif2ace._C``       C++ CPU kernels (csrc/cpu/*.cpp, OpenMP), always built.
- ``unif2ace._C_cuda``  CUDA kernels (csrc/cuda/*.cu + *.cpp), built only when the installed torch
                        has CUDA (``torch.version.cuda``) and a CUDA toolkit is found (CUDA_HOME or
                        /usr/local/cuda). Otherwise it is skipped with a printed reason;
                        ``python -m unif2ace info`` reports which backends are present.

Environment knobs: ``UNIF2ACE_NO_CUDA=1`` skips the CUDA extension; ``TORCH_CUDA_ARCH_LIST``
(default "9.0") picks the GPU architectures.
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

        sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(
            os.path.join(ROOT, "csrc", "cuda", "*.cpp")
        )
        exts.append(
            CUDAExtension(
                "unif2ace._C_cuda",
                _rel(sources),
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={
                    "cxx": ["-O3", "-g0", "-std=c++17"],
                    "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
                },
            )
        )
    else:
        print(f"unif2ace: not building the CUDA extension: {reason}", file=sys.stderr)
    return exts


# Package metadata (name, version, dependencies, entry points) lives in pyproject.toml; this file
# only declares the compiled extensions.
setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
