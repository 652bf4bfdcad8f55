"""Command line: ``python -m unif2ace info | train | generate | answer | demo`` (also the ``unif2ace``
console script)."""

from __future__ import annotations

import argparse
import platform
import sys


def info(out=sys.stdout) -> int:
    """Print versions and, per op, which backends are built and usable on CPU and CUDA."""
    import torch

    from unif2ace import __version__
    from unif2ace.kernels import BACKENDS, _ext, backend_usable, registered_ops

    def line(s=""):
        print(s, file=out)

    line(f"unif2ace {__version__}")
    line(f"python   {platform.python_version()} ({sys.executable})")
    line(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    ok, err = _ext.triton_status()
    if ok:
        import triton

        line(f"triton   {triton.__version__}")
    else:
        line(f"triton   not importable: {err}")
    cuda_dev = torch.cuda.is_available()
    line(f"GPU      {torch.cuda.get_device_name(0) if cuda_dev else 'none'}")
    from unif2ace.kernels.cpu import lowp_gemm

    feats = _ext.cpu_features()
    cpu_name = feats["name"] or platform.processor() or "?"
    line(f"CPU      {cpu_name}, {feats['isa']} vectors, {torch.get_num_threads()} threads")
    for dt in (torch.bfloat16, torch.float16):
        use, why = lowp_gemm(dt)
        name = str(dt).replace("torch.", "")
        line(f"cpu {name} GEMMs: {'in ' + name if use else 'in fp32'} ({why})")
    line("")
    line("extensions:")
    for name, (ok, err) in (
        ("unif2ace._C (cpu)", _ext.cpu_status()),
        ("unif2ace._C_cuda (cuda)", _ext._load("unif2ace._C_cuda")),
    ):
        line(f"  {name:26s} {'loaded' if ok else 'missing: ' + err}")
    line("")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    line("backends per op   (x = usable here, - = implemented but not usable here, . = not implemented)")
    head = (
        "  "
        + f"{'op':28s}"
        + "".join(f"{b + '@cpu':>15s}" for b in BACKENDS)
        + "".join(f"{b + '@cuda':>15s}" for b in BACKENDS)
    )
    line(head)
    for name, op in sorted(registered_ops().items()):
        cells = []
        for dev in (cpu, cuda):
            for b in BACKENDS:
                if b not in op.backends:
                    cells.append(".")
                else:
                    cells.append("x" if backend_usable(b, dev)[0] else "-")
        line("  " + f"{name:28s}" + "".join(f"{c:>15s}" for c in cells))
    line("")
    line("reasons a backend is not usable here:")
    for dev in (cpu, cuda):
        for b in BACKENDS:
            ok, why = backend_usable(b, dev)
            if not ok:
                line(f"  {b}@{dev.type}: {why}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unif2ace", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and the backends built/usable per op")
    from unif2ace.train.cli import COMMANDS, add_subcommands, run_subcommand

    add_subcommands(sub)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        return info()
    if args.cmd in COMMANDS:
        return run_subcommand(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
