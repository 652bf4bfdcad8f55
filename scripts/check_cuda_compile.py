"""CUDA compile check: every csrc/**/*.cu compiles with nvcc for sm_90 against the installed torch.

Runs on machines without a GPU (and with a CPU-only torch): it checks host and device code of each
translation unit; linking and running happen on a GPU machine (scripts/gpu_check.sh). The CPU
torch wheel lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h); a shim directory
provides it. Exits 0 with a printed reason when nvcc is absent, 1 if any file fails.

    python scripts/check_cuda_compile.py [--arch 90] [-j 2] [files...]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc():
    for cand in (
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if cand and os.path.exists(cand):
            return cand
    return None


def torch_includes():
    import torch.utils.cpp_extension as ce

    # include_paths(device_type=...) in new torch; older took cuda=bool. Plain CPU paths suffice:
    # the CUDA headers come from the toolkit.
    try:
        return ce.include_paths()
    except TypeError:  # pragma: no cover
        return ce.include_paths(False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--arch", default="90")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)

    files = args.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda compile check: SKIPPED (reason: nvcc not found; set CUDA_HOME)")
        return 0
    if not files:
        print("cuda compile check: no .cu files found")
        return 1
    import torch

    shim = tempfile.mkdtemp(prefix="u2a_cuda_shim_")
    os.makedirs(os.path.join(shim, "c10", "cuda", "impl"))
    with open(os.path.join(shim, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [shim, os.path.join(ROOT, "csrc")] + torch_includes()
    out_dir = tempfile.mkdtemp(prefix="u2a_cuda_obj_")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    base = [
        nvcc,
        "-c",
        f"-gencode=arch=compute_{args.arch},code=sm_{args.arch}",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-O2",
        "-Xcompiler",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DTORCH_EXTENSION_NAME=_C_cuda",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + [f"-I{p}" for p in incs]

    def compile_one(path):
        obj = os.path.join(out_dir, os.path.basename(path) + ".o")
        t0 = time.time()
        r = subprocess.run(base + [path, "-o", obj], capture_output=True, text=True)
        return path, r.returncode, time.time() - t0, (r.stdout + r.stderr).strip()

    print(f"cuda compile check: {nvcc}, sm_{args.arch}, torch {torch.__version__}, {len(files)} file(s)")
    failed = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        for path, rc, dt, log in ex.map(compile_one, files):
            rel = os.path.relpath(path, ROOT)
            if rc == 0:
                print(f"  ok    {rel} ({dt:.1f} s)")
            else:
                failed += 1
                print(f"  FAIL  {rel} ({dt:.1f} s)\n{log}")
    shutil.rmtree(shim, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"cuda compile check: {len(files) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
