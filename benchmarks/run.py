#!/usr/bin/env python
"""Run the unif2ace benchmarks and print a table (optionally write JSON).

    python benchmarks/run.py [OP ...] [--device cpu|cuda] [--quick] [--json PATH] [--dtype bf16 ...]

OP filters the cases by family (``moe_routing``), public op name (``moe_align``), case file
(``moe_routing`` for benchmarks/cases/moe_routing.py) or family prefix (``moe`` for every
benchmarks/cases/moe_*.py); none = every case file not starting with ``_``. Each case
file ``benchmarks/cases/<name>.py`` defines ``cases(device, quick) -> list[Case]`` (see
``benchmarks/common.py``); a file that fails to import is reported and skipped.

For every case and implementation ("reference", "cpu", "triton", "cuda", baselines...) and every
peer (``Case.peers``: what a user would install instead, benchmarks/peers.py) the forward is
timed, then forward+backward when the case has ``backward``; ``torch.compile`` of the reference
is timed too as "torch.compile(reference)" (off in quick mode on CPU unless ``--compile``).
Implementations that cannot run here (``BackendUnavailableError``, ``NotImplementedError``; a peer
that is not installed) are listed as skipped rows. Speedups are against the reference and
torch.compile rows of the same run; ``% limit`` is against the machine limit of the case
(``Case.limit``: ``torch.mm`` at the op's GEMM shapes, or the copy bandwidth) measured in the same
run, which is also printed as a "limit" row. ``--plot DIR`` writes one PNG per op
(benchmarks/plot.py, needs matplotlib). Exit status: 0 (also with skipped or failed rows;
``--strict`` makes failed rows exit 1), 2 for bad arguments.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Case,
    MachineLimits,
    call_with_cpu_peak,
    cuda_peak_mb,
    device_name,
    device_peak,
    synchronize,
    time_fn,
    versions,
)

try:
    from unif2ace.kernels import BACKENDS, BackendUnavailableError, backend_usable
    from unif2ace.kernels._dispatch import triton_interpreter_enabled
except Exception as _e:  # noqa: BLE001 - the runner still works for baselines without the package
    print(f"warning: unif2ace.kernels failed to import ({type(_e).__name__}: {_e})", file=sys.stderr)
    BACKENDS = ()

    class BackendUnavailableError(RuntimeError):  # type: ignore[no-redef]
        pass

    def backend_usable(backend, device):  # type: ignore[no-redef]
        return True, ""

    def triton_interpreter_enabled():  # type: ignore[no-redef]
        return False


CASES_DIR = ROOT / "benchmarks" / "cases"
COMPILE = "torch.compile(reference)"
LIMIT = "limit"
# kinds of rows: our reference, torch.compile of it, our kernel backends, other implementations a
# case file brings (e.g. the model's own sampler), peers (other libraries / plain torch), the limit
KINDS = ("reference", "compile", "ours", "baseline", "peer", "limit")
SKIPPABLE = (BackendUnavailableError, NotImplementedError)

FIELDS = (
    "op", "family", "case", "backend", "kind", "shape", "dtype", "device", "device_name", "threads",
    "torch", "triton", "date", "quick", "mode", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "reps", "first_call_ms", "peak_mem_mb", "timer", "l2_flush",
    "gbps", "tflops", "pct_peak_bw", "pct_peak_tflops",
    "speedup_vs_reference", "speedup_vs_compile", "limit", "limit_ms", "pct_limit",
)  # fmt: skip

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
}  # fmt: skip


def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# discovery


def discover(cases_dir: Path = CASES_DIR) -> Tuple[List[Tuple[str, object]], List[Tuple[str, str]]]:
    """Import every ``*.py`` in ``cases_dir`` (not ``__init__``): ([(stem, module)], [(stem, error)])."""
    modules, errors = [], []
    for path in sorted(Path(cases_dir).glob("*.py")):
        stem = path.stem
        if stem.startswith("__"):
            continue
        modname = f"benchmarks.cases.{stem}" if Path(cases_dir).resolve() == CASES_DIR else f"_bench_cases_{stem}"
        try:
            spec = importlib.util.spec_from_file_location(modname, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[modname] = mod
            spec.loader.exec_module(mod)
            if not callable(getattr(mod, "cases", None)):
                raise AttributeError(f"{path.name} defines no cases(device, quick) function")
            modules.append((stem, mod))
        except BaseException as e:  # noqa: BLE001 - SyntaxError, ImportError, SystemExit, ...
            if isinstance(e, KeyboardInterrupt):
                raise
            sys.modules.pop(modname, None)
            errors.append((stem, f"{type(e).__name__}: {e}"))
    return modules, errors


def collect(modules, device: torch.device, quick: bool):
    """Call each module's ``cases(device, quick)``: ([(stem, Case)], [(stem, error)])."""
    out, errors = [], []
    for stem, mod in modules:
        try:
            cs = list(mod.cases(device, quick))
            for c in cs:
                if not isinstance(c, Case) and not all(hasattr(c, a) for a in ("family", "op", "setup", "impls")):
                    raise TypeError(f"cases() returned a {type(c).__name__}, not a benchmarks.common.Case")
                if "reference" not in c.impls:
                    raise ValueError(f"case {c.op} {c.name!r} has no 'reference' implementation")
            out.extend((stem, c) for c in cs)
        except Exception as e:  # noqa: BLE001
            errors.append((stem, f"cases() failed: {type(e).__name__}: {e}"))
    return out, errors


def select(cases, ops: Sequence[str], dtypes: Optional[Sequence[torch.dtype]]):
    def wanted(stem, c):
        if ops:
            # a family ("moe") selects every stem of it (moe_gating, moe_routing, moe_mlp)
            return any(o in (c.family, c.op, stem) or stem.startswith(o + "_") for o in ops)
        return not stem.startswith("_")

    return [(s, c) for s, c in cases if wanted(s, c) and (not dtypes or c.dtype in dtypes)]


# --------------------------------------------------------------------------------------------
# measuring one implementation


def _grad_leaves(obj, acc):
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad and obj.is_leaf:
            acc.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _grad_leaves(v, acc)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _grad_leaves(v, acc)
    return acc


def _why(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


class Measured:
    """The outcome of one (implementation, mode): ok with timings, skipped or error."""

    def __init__(self, status="ok", reason=None):
        self.status, self.reason = status, reason
        self.timing = None
        self.first_ms = None
        self.peak_mb = None


def _measure_mode(run: Callable[[], object], device, quick, prepare, eager: bool, timing: dict) -> Measured:
    m = Measured()
    try:
        if prepare:
            prepare()
        synchronize(device)
        t0 = time.perf_counter()
        if device.type == "cpu" and eager:
            _, m.peak_mb = call_with_cpu_peak(run)
        else:
            run()
        synchronize(device)
        m.first_ms = (time.perf_counter() - t0) * 1e3
    except SKIPPABLE as e:
        return Measured("skipped", _why(e))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(limit=-3, file=sys.stderr)
        return Measured("error", _why(e))
    try:
        m.timing = time_fn(run, device, quick, prepare, **timing)
        if device.type == "cuda":
            m.peak_mb = cuda_peak_mb(run, prepare)
        elif not eager:
            if prepare:
                prepare()
            _, m.peak_mb = call_with_cpu_peak(run)
    except Exception as e:  # noqa: BLE001 - worked once, failed later: report it
        traceback.print_exc(limit=-3, file=sys.stderr)
        return Measured("error", "during timing: " + _why(e))
    return m


def skip_reason(label: str, kind: str, device: torch.device) -> Optional[str]:
    """Why one of our rows cannot run here before trying it (None: try it)."""
    backend = "reference" if label == COMPILE else label
    if kind in ("reference", "compile", "ours") and backend in BACKENDS:
        ok, why = backend_usable(backend, device)
        if not ok:
            return why
        if backend == "triton" and device.type == "cpu" and triton_interpreter_enabled():
            return "TRITON_INTERPRET=1: interpreter timings are meaningless, unset it to benchmark"
    return None


def compiled(fn):
    """``torch.compile(fn)`` for the "torch.compile(reference)" row: static shapes per case."""
    torch._dynamo.reset()  # no recompile limit across cases
    return torch.compile(fn, dynamic=False)


def measure_impl(
    case: Case,
    label: str,
    fn,
    device: torch.device,
    quick: bool,
    kind: Optional[str] = None,
    flush_l2: bool = True,
    cuda_graph: bool = False,
) -> Dict[str, Measured]:
    """{"fwd": Measured, "fwd+bwd": Measured (when the case has backward)}. ``kind``: the row's
    kind (default: from the label); only our own rows go through ``backend_usable``.
    On CUDA the L2 cache is flushed before every timed call unless ``flush_l2=False``;
    ``cuda_graph`` times the forward through a CUDA graph."""
    modes = ["fwd"] + (["fwd+bwd"] if case.backward is not None else [])
    kind = kind or row_kind(case, label)
    reason = skip_reason(label, kind, device)
    if reason is not None:
        return {mode: Measured("skipped", reason) for mode in modes}

    if label == COMPILE:
        try:
            fn = compiled(fn)
        except Exception as e:  # noqa: BLE001
            return {mode: Measured("skipped", "torch.compile failed: " + _why(e)) for mode in modes}

    def fail_as(status_reason):
        return {mode: Measured(*status_reason) for mode in modes}

    try:
        torch.manual_seed(0)
        inputs = case.setup()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(limit=-3, file=sys.stderr)
        return fail_as(("error", "setup() failed: " + _why(e)))

    out: Dict[str, Measured] = {}
    eager = label != COMPILE
    timing = {"flush_l2": flush_l2}
    m = _measure_mode(lambda: fn(inputs), device, quick, None, eager, dict(timing, graph=cuda_graph))
    if label == COMPILE and m.status != "ok":
        m = Measured("skipped", "torch.compile failed: " + (m.reason or ""))
    out["fwd"] = m
    if case.backward is None:
        return out
    if m.status != "ok":
        out["fwd+bwd"] = Measured(m.status, m.reason)
        return out
    leaves = _grad_leaves(inputs, [])

    def prepare():
        for t in leaves:
            t.grad = None

    def fwd_bwd():
        case.backward(fn(inputs)).backward()

    mb = _measure_mode(fwd_bwd, device, quick, prepare, eager, timing)
    if label == COMPILE and mb.status == "error":
        mb = Measured("skipped", "torch.compile failed: " + (mb.reason or ""))
    out["fwd+bwd"] = mb
    return out


# --------------------------------------------------------------------------------------------
# one case -> records


def row_kind(case: Case, label: str) -> str:
    if label == "reference":
        return "reference"
    if label == COMPILE:
        return "compile"
    if label == LIMIT:
        return "limit"
    if label in case.impls:
        return "ours" if label in BACKENDS else "baseline"
    return "peer"


def case_labels(case: Case, compile_on: bool, backends=None, peers: bool = True) -> List[Tuple[str, str, Callable]]:
    """[(label, kind, fn)] of one case, in table order: reference, torch.compile(reference), the
    case's implementations, then its peers. ``backends`` (a set of labels or None) filters all but
    the reference; ``peers=False`` leaves the peers out. One list for run.py and pytest-benchmark."""
    out = [("reference", "reference", case.impls["reference"])]
    if compile_on and case.compile:
        out.append((COMPILE, "compile", case.impls["reference"]))
    for name, fn in case.impls.items():
        if name != "reference" and (backends is None or name in backends):
            out.append((name, row_kind(case, name), fn))
    if peers:
        for name, fn in case.peers.items():
            if name not in case.impls and (backends is None or name in backends):
                out.append((name, "peer", fn))
    return out


def _base_record(case: Case, device, env, opts) -> dict:
    r = {k: None for k in FIELDS}
    r.update(
        op=case.op,
        family=case.family,
        case=case.name,
        shape=dict(case.shape),
        dtype=dtype_name(case.dtype),
        device=device.type,
        device_name=env["device_name"],
        threads=env["threads"],
        torch=env["torch"],
        triton=env["triton"],
        date=env["date"],
        quick=bool(opts.quick),
        l2_flush=env.get("l2_flush"),
    )
    return r


def case_limits(case: Case, modes: Sequence[str], limits: Optional[MachineLimits]) -> Dict[str, Tuple[float, str]]:
    """{mode: (limit_ms, description)} of a case (empty without ``Case.limit`` or ``limits``)."""
    out = {}
    if case.limit is None or limits is None:
        return out
    for mode in modes:
        try:
            ms, desc = limits.limit_ms(case.limit, mode, case.dtype)
        except Exception as e:  # noqa: BLE001 - a limit that cannot be measured leaves the rows without it
            print(f"warning: limit of {case.op} {case.name} ({mode}) not measured: {_why(e)}", file=sys.stderr)
            continue
        if ms is not None and ms > 0:
            out[mode] = (ms, desc)
    return out


def run_case(case: Case, device: torch.device, env: dict, opts) -> List[dict]:
    labels = case_labels(case, env["compile"], opts.backends, not getattr(opts, "no_peers", False))
    flush = env.get("l2_flush") is not False
    graph = bool(getattr(opts, "cuda_graph", False)) and device.type == "cuda"
    results: Dict[str, Dict[str, Measured]] = {}
    for label, kind, fn in labels:
        results[label] = measure_impl(case, label, fn, device, opts.quick, kind, flush, graph)

    modes = ["fwd"] + (["fwd+bwd"] if case.backward is not None else [])
    lim = case_limits(case, modes, env.get("limits"))
    peaks = device_peak(env["device_name"]) if device.type == "cuda" else None
    records = []
    for label, kind, _ in labels:
        for mode, m in results[label].items():
            r = _base_record(case, device, env, opts)
            r.update(backend=label, kind=kind, mode=mode, status=m.status, reason=m.reason)
            if mode in lim:
                r["limit_ms"], r["limit"] = lim[mode]
            if m.status == "ok":
                t = m.timing
                r.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps,
                         first_call_ms=m.first_ms, peak_mem_mb=m.peak_mb, timer=t.timer or None)  # fmt: skip
                sec = t.median_ms / 1e3
                if mode == "fwd" and sec > 0:
                    if case.bytes:
                        r["gbps"] = case.bytes / sec / 1e9
                    if case.flops:
                        r["tflops"] = case.flops / sec / 1e12
                    if peaks:
                        if r["gbps"] is not None:
                            r["pct_peak_bw"] = 100 * r["gbps"] * 1e9 / peaks[0]
                        if r["tflops"] is not None and case.dtype in (torch.bfloat16, torch.float16):
                            r["pct_peak_tflops"] = 100 * r["tflops"] * 1e12 / peaks[1]
                for key, base in (("speedup_vs_reference", "reference"), ("speedup_vs_compile", COMPILE)):
                    b = results.get(base, {}).get(mode)
                    if b is not None and b.status == "ok" and t.median_ms > 0:
                        r[key] = b.timing.median_ms / t.median_ms
                if r["limit_ms"] is not None and t.median_ms > 0:
                    r["pct_limit"] = 100 * r["limit_ms"] / t.median_ms
            records.append(r)
    for mode, (ms, desc) in lim.items():  # the limit itself, one row per mode
        r = _base_record(case, device, env, opts)
        r.update(backend=LIMIT, kind="limit", mode=mode, status="ok", median_ms=ms, limit=desc, limit_ms=ms,
                 pct_limit=100.0, timer="cuda-events" if device.type == "cuda" else "perf_counter")  # fmt: skip
        records.append(r)
    return records


# --------------------------------------------------------------------------------------------
# output


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _t(r) -> str:
    if r is None or r["status"] != "ok":
        return "-"
    return f"{_ms(r['median_ms'])} [{_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}]"


def _num(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def pct(x) -> str:
    """A percentage with two significant digits below 10 % (0.31%, 4.2%, 57%)."""
    if x is None:
        return "-"
    return f"{x:.2g}%" if x < 10 else f"{x:.0f}%"


def _pair(a, b, fmt) -> str:
    return _num(a, fmt) if b is None else f"{_num(a, fmt)}/{_num(b, fmt)}"


def table_columns(cuda: bool, op_w: int = 24, case_w: int = 26, backend_w: int = 24):
    cols = [("op", op_w), ("case", case_w), ("backend", backend_w), ("kind", 9), ("dtype", 8),
            ("fwd ms [p20-p80]", 24), ("fwd+bwd ms [p20-p80]", 24), ("peak MB f/fb", 14), ("GB/s", 7),
            ("TFLOP/s", 7), ("vs ref f/fb", 12), ("vs compile f/fb", 15), ("% limit f/fb", 12)]  # fmt: skip
    if cuda:
        cols += [("%peak BW", 8), ("%peak TF", 8)]
    return cols


def format_rows(records: List[dict], cols) -> List[str]:
    cuda = cols[-1][0] == "%peak TF"
    lines, seen = [], {}
    for r in records:
        seen.setdefault((r["op"], r["case"], r["backend"]), {})[r["mode"]] = r
    for (op, case, backend), modes in seen.items():
        f, fb = modes.get("fwd"), modes.get("fwd+bwd")
        first = f or fb
        lead = [op or "-", case or "-", backend or "-", first.get("kind") or "-", first["dtype"] or "-"]
        if first.get("kind") == "limit":
            cells = lead + [_ms(f and f["median_ms"]), _ms(fb and fb["median_ms"])]
            desc = "; ".join(dict.fromkeys(r["limit"] for r in (f, fb) if r and r.get("limit")))
            lines.append("  ".join(c.ljust(w) for c, (_, w) in zip(cells, cols)) + "  " + desc)
            continue
        if first["status"] != "ok" and (fb is None or fb["status"] != "ok"):
            cells = lead + [f"{first['status']}: {first['reason']}"]
            lines.append("  ".join(c.ljust(w) for c, (_, w) in zip(cells[:-1], cols)) + "  " + cells[-1])
            continue
        if f is None:  # fwd+bwd only (cannot happen with the runner; tolerated for hand-made records)
            f = {k: None for k in FIELDS}
        cells = lead + [
            _t(f) if f["status"] == "ok" else f"{f['status']}",
            _t(fb) if fb is None or fb["status"] == "ok" else f"{fb['status']}: {fb['reason']}",
            _pair(f.get("peak_mem_mb"), fb and fb.get("peak_mem_mb"), "{:.1f}"),
            _num(f.get("gbps")),
            _num(f.get("tflops"), "{:.2f}"),
            _pair(f.get("speedup_vs_reference"), fb and fb.get("speedup_vs_reference"), "{:.2f}x"),
            _pair(f.get("speedup_vs_compile"), fb and fb.get("speedup_vs_compile"), "{:.2f}x"),
            "/".join(pct(x) for x in ([f.get("pct_limit")] + ([fb.get("pct_limit")] if fb else []))),
        ]
        if cuda:
            cells += [_num(f.get("pct_peak_bw")), _num(f.get("pct_peak_tflops"))]
        lines.append("  ".join(c.ljust(w) for c, (_, w) in zip(cells, cols)).rstrip())
    return lines


def write_json(path: str, records: List[dict]) -> None:
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, p)


def _error_record(env, device, family, reason) -> dict:
    r = {k: None for k in FIELDS}
    r.update(family=family, device=device.type, device_name=env["device_name"], threads=env["threads"],
             torch=env["torch"], triton=env["triton"], date=env["date"], status="error", reason=reason)  # fmt: skip
    return r


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ops", nargs="*", metavar="OP", help="case family, public op name or case file stem")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="small shapes, few reps (a smoke run)")
    p.add_argument("--json", metavar="PATH", help="write the records here (rewritten after every case)")
    p.add_argument("--dtype", nargs="+", metavar="DTYPE", help=f"only cases of these dtypes ({', '.join(DTYPES)})")
    p.add_argument("--backends", metavar="A,B", help="only these implementations (reference always runs)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", action="store_true", help="time torch.compile(reference) in quick CPU mode too")
    g.add_argument("--no-compile", action="store_true", help="never time torch.compile(reference)")
    p.add_argument("--time-limit", type=float, metavar="S", help="skip the remaining cases after S seconds")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--cases-dir", default=str(CASES_DIR), help=argparse.SUPPRESS)
    p.add_argument("--strict", action="store_true", help="exit 1 if any row failed (not skipped)")
    p.add_argument("--plot", metavar="DIR", help="write one PNG per op here (needs matplotlib)")
    p.add_argument("--no-peers", action="store_true", help="leave out the peer rows (other libraries)")
    p.add_argument("--no-limits", action="store_true", help="do not measure the machine limits")
    p.add_argument("--no-flush-l2", action="store_true", help="CUDA: do not flush the L2 cache between timed calls")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA: time forwards as CUDA graph replays")
    return p.parse_args(argv)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    opts = parse_args(argv)
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})", file=sys.stderr)  # fmt: skip
        return 2
    dtypes = None
    if opts.dtype:
        bad = [d for d in opts.dtype if d.lower() not in DTYPES]
        if bad:
            print(f"error: --dtype: unknown {', '.join(bad)}; expected one of {', '.join(DTYPES)}", file=sys.stderr)
            return 2
        dtypes = [DTYPES[d.lower()] for d in opts.dtype]
    opts.backends = None if opts.backends is None else {b.strip() for b in opts.backends.split(",") if b.strip()}
    device = torch.device(opts.device)

    v = versions()
    env = {
        "device_name": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": v["torch"],
        "triton": v["triton"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "l2_flush": (not opts.no_flush_l2) if device.type == "cuda" else None,
    }
    env["limits"] = None if opts.no_limits else MachineLimits(device, opts.quick, flush_l2=env["l2_flush"] is not False)
    if opts.no_compile:
        env["compile"], why = False, "off (--no-compile)"
    elif device.type == "cpu" and opts.quick and not opts.compile:
        env["compile"], why = False, "skipped in quick CPU mode (pass --compile)"
    else:
        env["compile"], why = True, "on"

    modules, import_errors = discover(Path(opts.cases_dir))
    cases, case_errors = collect(modules, device, opts.quick)
    selected = select(cases, opts.ops, dtypes)
    known = sorted({c.family for _, c in cases} | {c.op for _, c in cases} | {s for s, _ in modules})
    # a family prefix ("moe") is known when it selects a case file (moe_gating.py, ...)
    unknown = [o for o in opts.ops if o not in known and not any(s.startswith(o + "_") for s, _ in modules)]

    records: List[dict] = []
    for stem, err in import_errors + case_errors:
        print(f"warning: case file benchmarks/cases/{stem}.py skipped: {err}", file=sys.stderr)
        records.append(_error_record(env, device, stem, f"case file {stem}.py skipped: {err}"))
    if unknown and not selected:
        print(f"error: no case matches {' '.join(unknown)}; known: {', '.join(known) or '(no case files)'}",
              file=sys.stderr)  # fmt: skip
        return 2
    if unknown:
        print(f"warning: no case matches {' '.join(unknown)}", file=sys.stderr)

    if opts.list:
        for stem, c in selected:
            peers = f" peers: {','.join(c.peers)}" if c.peers else ""
            lim = f" limit: {c.limit.kind}" if c.limit else ""
            print(f"{stem:12s} {c.family:20s} {c.op:28s} {c.name:30s} {dtype_name(c.dtype):9s} "
                  f"{','.join(c.impls)}{' +bwd' if c.backward else ''}{peers}{lim}")  # fmt: skip
        return 0

    if not selected:
        print(f"no cases selected (case files: {', '.join(s for s, _ in modules) or 'none'})")
    dev_desc = env["device_name"] + (f", {env['threads']} threads" if env["threads"] else "")
    print(f"unif2ace benchmarks | {device.type}: {dev_desc} | torch {env['torch']} triton {env['triton']} | "
          f"{'quick' if opts.quick else 'full'} | torch.compile baseline: {why} | {len(selected)} cases")  # fmt: skip
    if device.type == "cuda":
        print(f"  (CUDA timing: events, L2 {'flushed' if env['l2_flush'] else 'NOT flushed'} before every call"
              f"{', forwards through CUDA graphs where capturable' if opts.cuda_graph else ''})")  # fmt: skip
    if device.type == "cpu":
        print("  (CPU peak MB = approximate extra RSS during one call)")
    cuda = device.type == "cuda"
    widths = {
        "op_w": max([2] + [len(c.op) for _, c in selected]),
        "case_w": max([4] + [len(c.name) for _, c in selected]),
        "backend_w": max(
            [7]
            + [len(k) for _, c in selected for k in list(c.impls) + list(c.peers)]
            + [len(COMPILE) if env["compile"] else 0]
        ),
    }
    cols = table_columns(cuda, **widths)
    print("  ".join(n.ljust(w) for n, w in cols).rstrip())
    print("  ".join("-" * w for _, w in cols))
    sys.stdout.flush()

    for _stem, case in selected:
        if opts.time_limit is not None and time.perf_counter() - t_start > opts.time_limit:
            recs = []
            for label, kind, _ in case_labels(case, False, opts.backends, not opts.no_peers):
                r = _base_record(case, device, env, opts)
                r.update(backend=label, kind=kind, mode="fwd", status="skipped",
                         reason=f"--time-limit {opts.time_limit:g} s reached")  # fmt: skip
                recs.append(r)
        else:
            recs = run_case(case, device, env, opts)
        records.extend(recs)
        for line in format_rows(recs, cols):
            print(line)
        sys.stdout.flush()
        if opts.json:
            write_json(opts.json, records)

    if opts.json:
        write_json(opts.json, records)
    if opts.plot:
        try:
            from benchmarks.plot import plot_records

            paths = plot_records(records, opts.plot)
            print(f"plots: {len(paths)} PNG files in {opts.plot}")
        except ImportError as e:
            print(f"warning: --plot needs matplotlib ({e}); pip install matplotlib", file=sys.stderr)
    n = {s: sum(1 for r in records if r["status"] == s and r["kind"] != "limit") for s in ("ok", "skipped", "error")}
    print(f"{len(selected)} cases, {n['ok']} measurements, {n['skipped']} skipped, {n['error']} failed "
          f"in {time.perf_counter() - t_start:.1f} s" + (f"; JSON: {opts.json}" if opts.json else ""))  # fmt: skip
    return 1 if opts.strict and n["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
