"""The benchmark registry (benchmarks/cases) as pytest-benchmark benchmarks:

    pytest benchmarks/ --benchmark-only -q                       # quick sizes, this machine
    pytest benchmarks/ --benchmark-only --benchmark-json out.json --bench-ops d3diff_head
    pytest-benchmark compare out1.json out2.json                 # or --benchmark-compare

One benchmark per case x implementation (reference, torch.compile(reference), our backends,
baselines, peers) x mode (fwd, fwd+bwd), grouped by case and mode; plus one per machine limit the
selected cases use (``torch.mm`` at their GEMM shapes, the copy bandwidth; group "machine limits").
The cases, implementations, skip rules and timing policy are run.py's (one registry, two entry
points): a row run.py reports as skipped is a skipped test here, with the same reason. Every
benchmark's ``extra_info`` records op, case, backend, kind, dtype, mode, shape, device, the timer
and L2 flush, and -- where the case has a limit -- ``limit``, ``limit_ms`` and ``pct_limit``
(against a limit measured in the same session). Options: benchmarks/conftest.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch

from benchmarks import common, run

_LIMITS: Dict[tuple, common.MachineLimits] = {}


@dataclass
class Item:
    id: str
    group: str
    info: dict
    kind: str
    case: Optional[common.Case] = None
    label: str = ""
    fn: Optional[Callable] = None
    mode: str = "fwd"
    machine: Optional[tuple] = None  # ("mm", m, k, n, dtype) or ("copy",)
    error: Optional[str] = None
    settings: dict = field(default_factory=dict)


def _settings(config) -> dict:
    dev = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = not config.getoption("--bench-full")
    dtypes = [run.DTYPES[d.strip().lower()] for d in config.getoption("--bench-dtype").split(",") if d.strip()]
    return {
        "device": torch.device(dev),
        "quick": quick,
        "ops": [o.strip() for o in config.getoption("--bench-ops").split(",") if o.strip()],
        "dtypes": dtypes or None,
        "compile": not (dev == "cpu" and quick and not config.getoption("--bench-compile")),
        "peers": not config.getoption("--bench-no-peers"),
        "flush_l2": dev == "cuda" and not config.getoption("--bench-no-flush-l2"),
        "cuda_graph": dev == "cuda" and config.getoption("--bench-cuda-graph"),
    }


def _machine_items(case: common.Case, modes, st) -> List[Item]:
    out = []
    lim = case.limit
    if lim.gemms:
        dt = lim.dtype or case.dtype
        for g in lim.gemms:
            shapes = [(g.m, g.k, g.n)]
            if "fwd+bwd" in modes and lim.backward_gemms:
                shapes += [(g.m, g.n, g.k), (g.k, g.m, g.n)]
            for m, k, n in shapes:
                name = f"torch.mm {m}x{k}x{n} {run.dtype_name(dt)}"
                info = {"limit": name}
                out.append(Item(f"machine|{name}", "machine limits", info, "machine", machine=("mm", m, k, n, dt)))
    elif lim.bytes:
        nbytes = common.COPY_BYTES[(st["device"].type, st["quick"])]
        name = f"copy {nbytes // 2**20} MiB"
        out.append(Item(f"machine|{name}", "machine limits", {"limit": name}, "machine", machine=("copy", nbytes)))
    return out


def registry_items(config) -> List[Item]:
    """Every benchmark of the selected cases (cached per session)."""
    cached = getattr(config, "_unif2ace_bench_items", None)
    if cached is not None:
        return cached
    st = _settings(config)
    device, quick = st["device"], st["quick"]
    items: List[Item] = []
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "--bench-device cuda but torch.cuda.is_available() is False"
        items.append(Item("no-cuda", "errors", {}, "error", error=why, settings=st))
        config._unif2ace_bench_items = items
        return items
    modules, import_errors = run.discover()
    cases, case_errors = run.collect(modules, device, quick)
    for stem, err in import_errors + case_errors:
        if any(stem == o or stem.startswith(o + "_") for o in st["ops"]) or (not st["ops"] and stem[0] != "_"):
            items.append(Item(f"case-file|{stem}", "errors", {}, "error", error=f"{stem}.py: {err}", settings=st))
    machine: Dict[str, Item] = {}
    for _stem, case in run.select(cases, st["ops"], st["dtypes"]):
        modes = ["fwd"] + (["fwd+bwd"] if case.backward is not None else [])
        dt = run.dtype_name(case.dtype)
        for label, kind, fn in run.case_labels(case, st["compile"], None, st["peers"]):
            for mode in modes:
                info = {"op": case.op, "family": case.family, "case": case.name, "backend": label, "kind": kind,
                        "dtype": dt, "mode": mode, "shape": dict(case.shape)}  # fmt: skip
                items.append(
                    Item(
                        f"{case.op}|{case.name}|{dt}|{label}|{mode}",
                        f"{case.op} | {case.name} | {dt} | {mode}",
                        info,
                        kind,
                        case,
                        label,
                        fn,
                        mode,
                        settings=st,
                    )  # fmt: skip
                )
        if case.limit is not None:
            for it in _machine_items(case, modes, st):
                it.settings = st
                machine.setdefault(it.id, it)
    items += list(machine.values())
    config._unif2ace_bench_items = items
    return items


def pytest_generate_tests(metafunc):
    if "bench_item" in metafunc.fixturenames:
        items = registry_items(metafunc.config)
        metafunc.parametrize("bench_item", items, ids=[it.id for it in items])


def _limits(st) -> common.MachineLimits:
    key = (str(st["device"]), st["quick"], st["flush_l2"])
    if key not in _LIMITS:
        _LIMITS[key] = common.MachineLimits(st["device"], st["quick"], flush_l2=st["flush_l2"])
    return _LIMITS[key]


def _rounds(pol: common.TimingPolicy, est_s: float) -> int:
    est_s = max(est_s, 1e-6)
    n = math.ceil(pol.target_s / est_s)
    return max(1, min(pol.max_reps, max(pol.min_reps, n), max(1, int(pol.budget_s / est_s))))


def _machine_call(it: Item, device):
    if it.machine[0] == "mm":
        _, m, k, n, dt = it.machine
        g = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=g).to(device, dt)
        b = (torch.randn(k, n, generator=g) / max(k, 1) ** 0.5).to(device, dt)
        return lambda: torch.mm(a, b), None
    src = torch.ones(it.machine[1] // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src), None


def test_registry(benchmark, bench_item: Item):
    it = bench_item
    if it.error:
        pytest.fail(it.error, pytrace=False)
    st = it.settings
    device, quick = st["device"], st["quick"]
    cuda = device.type == "cuda"
    benchmark.group = it.group
    benchmark.extra_info.update(it.info)
    benchmark.extra_info.update(device=device.type, device_name=common.device_name(device), quick=quick,
                                l2_flush=st["flush_l2"] if cuda else None)  # fmt: skip

    if it.kind == "machine":
        call, prepare = _machine_call(it, device)
    else:
        case = it.case
        reason = run.skip_reason(it.label, it.kind, device)
        if reason:
            pytest.skip(reason)
        fn = run.compiled(it.fn) if it.kind == "compile" else it.fn
        torch.manual_seed(0)
        inputs = case.setup()
        if it.mode == "fwd":

            def call():
                return fn(inputs)

            prepare = None
        else:
            leaves = run._grad_leaves(inputs, [])

            def prepare():
                for t in leaves:
                    t.grad = None

            def call():
                case.backward(fn(inputs)).backward()

    try:  # first call: warm-up (compile, JIT, lazy loading), and a peer that is not installed shows here
        if prepare:
            prepare()
        call()
    except run.SKIPPABLE as e:
        pytest.skip(run._why(e))
    if prepare:
        prepare()
    common.synchronize(device)
    t0 = time.perf_counter()
    call()
    common.synchronize(device)
    est = time.perf_counter() - t0

    timer = "perf_counter"
    if cuda:
        timer = "perf_counter + cuda sync"
        if st["cuda_graph"] and it.mode == "fwd":
            try:
                call = common.capture_cuda_graph(call)
                timer += ", cuda-graph"
            except Exception as e:  # noqa: BLE001
                timer += f", graph capture failed: {run._why(e)}"
    benchmark.extra_info["timer"] = timer
    flush = common.l2_flusher(device) if st["flush_l2"] else None

    def setup():
        if prepare:
            prepare()
        if flush:
            flush()
        common.synchronize(device)

    def target():
        call()
        common.synchronize(device)

    pol = common.policy(device, quick)
    benchmark.pedantic(target, setup=setup, rounds=_rounds(pol, est), warmup_rounds=pol.warmup, iterations=1)

    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if it.kind != "machine" and it.case.limit is not None:
        limit_ms, desc = _limits(st).limit_ms(it.case.limit, it.mode, it.case.dtype)
        if limit_ms:
            benchmark.extra_info.update(limit=desc, limit_ms=limit_ms)
            if stats is not None and stats.median > 0:
                benchmark.extra_info["pct_limit"] = 100 * limit_ms / (stats.median * 1e3)
