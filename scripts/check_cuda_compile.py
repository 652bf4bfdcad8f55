"""CUDA compile check: every source of the CUDA extension compiles, with the real build's flags.

Compiles exactly what setup.py compiles into unif2ace._C_cuda (its ``cuda_extension_spec()``: the
csrc/cuda/*.cu files with nvcc and module.cpp with the host compiler), with setup.py's extra flags
(``-std=c++17`` ...) plus the defaults torch's BuildExtension adds (COMMON_NVCC_FLAGS, -fPIC,
TORCH_EXTENSION_NAME, the -gencode flags of TORCH_CUDA_ARCH_LIST, default "9.0"), against the
installed torch. Runs on machines without a GPU and with a CPU-only torch: it checks host and
device code of each translation unit; linking and running happen on a GPU machine
(scripts/gpu_check.sh). The CPU torch wheel lacks one generated header
(c10/cuda/impl/cuda_cmake_macros.h); a shim directory provides it. Exits 0 with a printed reason
when nvcc is absent, 1 if any file fails.

    python scripts/check_cuda_compile.py [--arch-list 9.0] [-j 2] [files...]
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
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


def cuda_home(nvcc: str) -> str:
    """The toolkit root (its include/ holds cuda_runtime.h); nvcc may be a wrapper script elsewhere."""
    for cand in (
        os.environ.get("CUDA_HOME"),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ):
        if cand and os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
            return cand
    return os.path.dirname(os.path.dirname(nvcc))


def torch_includes():
    import torch.utils.cpp_extension as ce

    # include_paths(device_type=...) in new torch; older took cuda=bool. Plain CPU paths suffice:
    # the CUDA headers come from the toolkit.
    try:
        return ce.include_paths()
    except TypeError:  # pragma: no cover
        return ce.include_paths(False)


def build_spec() -> dict:
    """setup.py's description of the CUDA extension (setup.py runs setup() only as __main__)."""
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="unif2ace_setup")["cuda_extension_spec"]()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="a subset of the extension's sources (default: all)")
    ap.add_argument("--arch-list", default=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)

    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda compile check: SKIPPED (reason: nvcc not found; set CUDA_HOME)")
        return 0
    os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch_list
    home = cuda_home(nvcc)
    os.environ.setdefault("CUDA_HOME", home)
    spec = build_spec()
    files = [os.path.join(ROOT, f) for f in spec["sources"]]
    if args.files:
        want = {os.path.abspath(f) for f in args.files}
        unknown = want - set(files)
        if unknown:
            print(f"cuda compile check: not sources of {spec['name']}: {sorted(unknown)}")
            return 1
        files = [f for f in files if f in want]
    if not files:
        print("cuda compile check: no sources found")
        return 1
    import torch
    import torch.utils.cpp_extension as ce

    shim = tempfile.mkdtemp(prefix="u2a_cuda_shim_")
    os.makedirs(os.path.join(shim, "c10", "cuda", "impl"))
    with open(os.path.join(shim, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_include = os.path.join(home, "include")
    incs = [shim] + spec["include_dirs"] + torch_includes() + [cuda_include, sysconfig.get_paths()["include"]]
    out_dir = tempfile.mkdtemp(prefix="u2a_cuda_obj_")
    ext_name = spec["name"].split(".")[-1]
    # what BuildExtension appends to both compilers' extra flags
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={ext_name}"]
    nvcc_flags = ce.COMMON_NVCC_FLAGS + ["--compiler-options", "-fPIC"] + spec["nvcc"] + defines
    nvcc_flags += ce._get_cuda_arch_flags(spec["nvcc"])
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    cxx_flags = ["-fPIC"] + spec["cxx"] + defines
    inc_flags = [f"-I{p}" for p in incs]

    def command(path, obj):
        if path.endswith(".cu"):
            return [nvcc, "-c", path, "-o", obj] + inc_flags + nvcc_flags
        return cxx.split() + ["-c", path, "-o", obj] + inc_flags + cxx_flags

    def compile_one(path):
        obj = os.path.join(out_dir, os.path.basename(path) + ".o")
        t0 = time.time()
        r = subprocess.run(command(path, obj), capture_output=True, text=True)
        return path, r.returncode, time.time() - t0, (r.stdout + r.stderr).strip()

    print(
        f"cuda compile check: {nvcc}, arch {args.arch_list}, torch {torch.__version__}, {len(files)} file(s) "
        f"of {spec['name']} with setup.py's flags (nvcc {' '.join(spec['nvcc'])}; cxx {' '.join(spec['cxx'])})"
    )
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
