"""The benchmark runner (benchmarks/run.py) on its self-test cases (benchmarks/cases/_selftest.py):
rows and skips, peers, machine limits, plots (benchmarks/plot.py), CUDA timing bookkeeping (L2
flush, CUDA graphs) on a fake device, and the pytest-benchmark entry point (benchmarks/test_bench.py)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from benchmarks import common, run

ROOT = Path(__file__).resolve().parent.parent
SELFTEST_SKIPPED = {
    "cuda": "cuda backend runs on CUDA tensors",
    "missing-baseline": "BackendUnavailableError: selftest: this baseline is never installed",
    "triton": "triton runs on CUDA tensors",
    "todo": "NotImplementedError: selftest: no such kernel yet",
    "peer-missing": "selftest-peer not installed (pip install --no-deps -r requirements-peers.txt)",
}
SELFTEST_KINDS = {
    "reference": "reference", "cpu": "ours", "cuda": "ours", "triton": "ours", "missing-baseline": "baseline",
    "todo": "baseline", "broken": "baseline", "peer-torch": "peer", "peer-missing": "peer", "limit": "limit",
    run.COMPILE: "compile",
}  # fmt: skip


def _rows(records, **match):
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _one(records, **match):
    rows = _rows(records, **match)
    assert len(rows) == 1, (match, rows)
    return rows[0]


def _check_selftest_records(records, compile_rows: bool):
    assert records, "no records written"
    for r in records:
        assert set(r) == set(run.FIELDS), set(r) ^ set(run.FIELDS)
        assert r["status"] in ("ok", "skipped", "error")
        assert r["kind"] == SELFTEST_KINDS[r["backend"]], r
        assert r["l2_flush"] is None  # CPU
    for dtype in ("float32", "bfloat16"):
        recs = _rows(records, dtype=dtype, op="softmax")
        for mode in ("fwd", "fwd+bwd"):
            ref = _one(recs, backend="reference", mode=mode)
            cpu = _one(recs, backend="cpu", mode=mode)
            peer = _one(recs, backend="peer-torch", mode=mode)
            limit = _one(recs, backend="limit", mode=mode)
            # the limit of the case, measured in the same run: copy bandwidth (fp32), torch.mm (bf16)
            assert limit["status"] == "ok" and limit["limit_ms"] > 0 and limit["median_ms"] == limit["limit_ms"]
            assert limit["pct_limit"] == 100.0 and limit["speedup_vs_reference"] is None
            if dtype == "float32":
                assert limit["limit"].startswith("copy ") and "GB/s" in limit["limit"]
            else:
                assert limit["limit"].startswith("torch.mm 64x64x1000") and "bfloat16" in limit["limit"]
                assert ("+dX,dW" in limit["limit"]) == (mode == "fwd+bwd")
            for r in (ref, cpu, peer):
                assert r["limit"] == limit["limit"] and r["limit_ms"] == limit["limit_ms"]
                assert r["pct_limit"] == pytest.approx(100 * limit["limit_ms"] / r["median_ms"])
                assert r["timer"] == "perf_counter"
            assert peer["speedup_vs_reference"] == pytest.approx(ref["median_ms"] / peer["median_ms"])
            for r in (ref, cpu):
                assert r["status"] == "ok", r
                assert r["family"] == "_selftest" and r["device"] == "cpu" and r["quick"] is True
                assert r["shape"] == {"N": 64, "V": 1000}
                assert r["device_name"] == common.cpu_model()
                assert r["torch"] == torch.__version__
                assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
                assert r["reps"] >= 1 and r["first_call_ms"] > 0  # >= 3 unless the machine is loaded
                assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0
                assert r["pct_peak_bw"] is None and r["pct_peak_tflops"] is None  # CPU: no device peak
            # speedups come from this run's reference row, in the same mode
            assert ref["speedup_vs_reference"] == 1.0
            assert cpu["speedup_vs_reference"] == pytest.approx(ref["median_ms"] / cpu["median_ms"])
            if mode == "fwd":
                elt = 4 if dtype == "float32" else 2
                assert cpu["gbps"] == pytest.approx(2.0 * 64 * 1000 * elt / (cpu["median_ms"] / 1e3) / 1e9)
                assert cpu["tflops"] == pytest.approx(5.0 * 64 * 1000 / (cpu["median_ms"] / 1e3) / 1e12)
            else:
                assert cpu["gbps"] is None and cpu["tflops"] is None  # bytes/flops are per forward
            for backend, why in SELFTEST_SKIPPED.items():
                r = _one(recs, backend=backend, mode=mode)
                assert r["status"] == "skipped" and why in r["reason"], r
                assert r["median_ms"] is None and r["speedup_vs_reference"] is None
            broken = _one(recs, backend="broken", mode=mode)
            assert broken["status"] == "error" and "deliberately broken" in broken["reason"]
            comp = _rows(recs, backend=run.COMPILE, mode=mode)
            if compile_rows and dtype == "float32":  # the bf16 case sets compile=False
                assert len(comp) == 1 and comp[0]["status"] == "ok"
                assert comp[0]["speedup_vs_compile"] == 1.0
                assert cpu["speedup_vs_compile"] == pytest.approx(comp[0]["median_ms"] / cpu["median_ms"])
                assert ref["speedup_vs_compile"] == pytest.approx(comp[0]["median_ms"] / ref["median_ms"])
            else:
                assert comp == [] and cpu["speedup_vs_compile"] is None


def test_script_quick_json(tmp_path):
    """The documented command line, run as a script from the repo root."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "benchmarks/run.py", "_selftest", "--device", "cpu", "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert time.perf_counter() - t0 < 60
    _check_selftest_records(json.loads(out.read_text()), compile_rows=False)
    assert "torch.compile baseline: skipped in quick CPU mode" in p.stdout
    lines = p.stdout.splitlines()
    for backend, why in SELFTEST_SKIPPED.items():  # skipped backends are listed with their reason
        assert any(backend in ln and "skipped:" in ln and why in ln for ln in lines), (backend, p.stdout)
    assert any("broken" in ln and "error:" in ln for ln in lines), p.stdout
    assert "2 cases" in lines[-1] and "4 failed" in lines[-1] and "12 measurements" in lines[-1], lines[-1]
    assert any(ln.split()[3:5] == ["limit", "limit"] and "copy" in ln for ln in lines), p.stdout


def test_compile_baseline_and_speedups(tmp_path, monkeypatch, capsys):
    # torch.compile itself is exercised on CPU by the op tests; here it is replaced by a plain
    # wrapper so the runner's bookkeeping (row, speedup_vs_compile) is checked in milliseconds.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []

    def fake_compile(fn, **kw):
        calls.append(kw)
        return lambda inputs: fn(inputs)

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "b.json"
    assert run.main(["_selftest", "--device", "cpu", "--quick", "--compile", "--json", str(out)]) == 0
    assert calls == [{"dynamic": False}]  # only the float32 case asks for the baseline
    _check_selftest_records(json.loads(out.read_text()), compile_rows=True)
    assert "torch.compile baseline: on" in capsys.readouterr().out


def test_compile_failure_is_a_skipped_row(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def failing_compile(fn, **kw):
        def compiled(inputs):
            raise RuntimeError("backend compiler failed (simulated)")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    out = tmp_path / "b.json"
    rc = run.main(["softmax", "--dtype", "fp32", "--quick", "--compile", "--backends", "cpu", "--json", str(out)])
    assert rc == 0
    recs = json.loads(out.read_text())
    assert {r["dtype"] for r in recs} == {"float32"}
    assert {r["backend"] for r in recs} == {"reference", run.COMPILE, "cpu", "limit"}  # --backends filter
    for mode in ("fwd", "fwd+bwd"):
        r = _one(recs, backend=run.COMPILE, mode=mode)
        assert r["status"] == "skipped" and "torch.compile failed" in r["reason"]
        assert "simulated" in r["reason"]
        assert _one(recs, backend="cpu", mode=mode)["speedup_vs_compile"] is None


def test_strict_and_usage_errors(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert run.main(["_selftest", "--quick", "--backends", "broken", "--strict"]) == 1
    assert run.main(["_selftest", "--quick", "--backends", "cpu", "--strict"]) == 0
    assert run.main(["no_such_op", "--quick"]) == 2
    assert "no case matches no_such_op" in capsys.readouterr().err
    assert run.main(["_selftest", "--quick", "--dtype", "int7"]) == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "int7" in err
    if not torch.cuda.is_available():
        assert run.main(["_selftest", "--device", "cuda"]) == 2
        assert "--device cuda" in capsys.readouterr().err


def test_time_limit_skips_remaining_cases(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "b.json"
    assert run.main(["_selftest", "--quick", "--time-limit", "0", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert recs and all(r["status"] == "skipped" and "--time-limit" in r["reason"] for r in recs)


def test_default_selection_leaves_out_underscore_files():
    modules, errors = run.discover()
    stems = [s for s, _ in modules]
    assert "_selftest" in stems
    cases, _ = run.collect([(s, m) for s, m in modules if s == "_selftest"], torch.device("cpu"), True)
    assert cases and run.select(cases, [], None) == []
    assert len(run.select(cases, ["_selftest"], None)) == 2
    assert len(run.select(cases, ["softmax"], [torch.bfloat16])) == 1


BROKEN_FILES = {
    "a_good.py": """
        import torch
        from benchmarks.common import Case

        def cases(device, quick):
            return [Case(family="good_family", op="double", name="n=8", shape={"n": 8},
                         dtype=torch.float32, setup=lambda: {"x": torch.randn(8, device=device)},
                         impls={"reference": lambda i: i["x"] * 2, "alt": lambda i: i["x"] + i["x"]},
                         compile=False)]
    """,
    "b_syntax.py": "def cases(device, quick):\n    return [\n",
    "c_import.py": "import no_such_module_for_unif2ace_bench\n",
    "d_nocases.py": "X = 1\n",
    "e_raises.py": "def cases(device, quick):\n    raise ValueError('no cases today')\n",
    "f_exit.py": "import sys\nsys.exit(3)\n",
    "g_noref.py": """
        import torch
        from benchmarks.common import Case

        def cases(device, quick):
            return [Case(family="noref", op="noref", name="x", shape={}, dtype=torch.float32,
                         setup=dict, impls={"cpu": lambda i: None})]
    """,
}


def test_discovery_tolerates_broken_case_files(tmp_path, capsys):
    for name, src in BROKEN_FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(src))
    modules, errors = run.discover(tmp_path)
    assert [s for s, _ in modules] == ["a_good", "e_raises", "g_noref"]
    errs = dict(errors)
    assert "SyntaxError" in errs["b_syntax"]
    assert "no_such_module_for_unif2ace_bench" in errs["c_import"]
    assert "no cases(device, quick)" in errs["d_nocases"]
    assert "SystemExit" in errs["f_exit"]

    out = tmp_path / "b.json"
    assert run.main(["--cases-dir", str(tmp_path), "--quick", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())
    ok = [r for r in recs if r["status"] == "ok"]
    assert {(r["op"], r["backend"]) for r in ok} == {("double", "reference"), ("double", "alt")}
    failed = {r["family"]: r["reason"] for r in recs if r["status"] == "error"}
    assert set(failed) == {"b_syntax", "c_import", "d_nocases", "e_raises", "f_exit", "g_noref"}
    assert "no cases today" in failed["e_raises"] and "no 'reference'" in failed["g_noref"]
    err = capsys.readouterr().err
    assert "b_syntax.py skipped" in err and "e_raises.py skipped" in err


def test_percentiles_and_timing_policy():
    t = common.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == (3.0, 1.8, 4.2, 5)
    assert common.percentile([7.0], 0.2) == 7.0
    calls = []
    pol = common.TimingPolicy(warmup=2, target_s=10.0, min_reps=3, max_reps=6, budget_s=10.0)
    t = common.time_cpu(lambda: calls.append(1), pol, prepare=lambda: calls.append(0))
    assert t.reps == 6 and calls == [0, 1] * 8  # prepare before every call, warm-ups untimed
    pol = common.TimingPolicy(warmup=0, target_s=0.0, min_reps=3, max_reps=50, budget_s=10.0)
    assert common.time_cpu(lambda: None, pol).reps == 3
    pol = common.TimingPolicy(warmup=0, target_s=10.0, min_reps=3, max_reps=50, budget_s=0.02)
    t = common.time_cpu(lambda: time.sleep(0.015), pol)  # the budget stops a slow case early
    assert 1 <= t.reps <= 3 and t.median_ms >= 14


def test_cpu_peak_memory_sees_a_large_allocation():
    def alloc():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
        time.sleep(0.01)
        return float(x[::4096].sum())

    _, mb = common.call_with_cpu_peak(alloc)
    if common.rss_bytes() is None:
        pytest.skip("no /proc/self/statm")
    assert 48 <= mb < 200, mb
    _, small = common.call_with_cpu_peak(lambda: 1 + 1)
    assert small < 8


def test_device_peaks():
    assert common.device_peak("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)
    assert common.device_peak("NVIDIA H100 PCIe")[0] == 2.0e12
    assert common.device_peak("NVIDIA H200") == (4.8e12, 989e12)
    assert common.device_peak("AMD EPYC") is None
    assert common.device_name(torch.device("cpu")) == common.cpu_model() != ""


class _FakeCuda:
    """Stands in for torch.cuda so the CUDA-only bookkeeping (events, peak memory, % of peak) is
    checked on a machine without a GPU; the "kernels" are CPU calls timed by the host clock."""

    def __init__(self):
        self.allocated, self.peak, self.syncs = 100 * 2**20, 0, 0

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    def install(self, monkeypatch):
        c = torch.cuda
        monkeypatch.setattr(c, "Event", self.Event)
        monkeypatch.setattr(c, "synchronize", lambda *a: setattr(self, "syncs", self.syncs + 1))
        monkeypatch.setattr(c, "memory_allocated", lambda *a: self.allocated)
        monkeypatch.setattr(c, "reset_peak_memory_stats", lambda *a: setattr(self, "peak", self.allocated))
        monkeypatch.setattr(c, "max_memory_allocated", lambda *a: self.peak)

    def alloc(self, nbytes):  # a "kernel" that allocates nbytes at its peak and frees them
        self.peak = max(self.peak, self.allocated + nbytes)

    def install_flush(self, monkeypatch, log):  # the L2 flush, logged instead of zeroing 256 MB
        monkeypatch.setattr(common, "l2_flusher", lambda device: lambda: log.append("flush"))


def test_cuda_timing_and_peak_memory_logic(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    prepared = []
    pol = common.TimingPolicy(warmup=2, target_s=0.02, min_reps=5, max_reps=50, budget_s=1.0)
    t = common.time_cuda(lambda: time.sleep(0.002), pol, prepare=lambda: prepared.append(1))
    assert 5 <= t.reps <= 12 and t.median_ms >= 1.9  # ~target / per-call estimate, at least min_reps
    assert len(prepared) == 2 + t.reps
    pol = common.TimingPolicy(warmup=1, target_s=100.0, min_reps=5, max_reps=7, budget_s=100.0)
    assert common.time_cuda(lambda: None, pol).reps == 7
    assert common.cuda_peak_mb(lambda: fake.alloc(3 * 2**20)) == 3.0


def test_cuda_l2_flush_between_timed_calls(monkeypatch):
    """As triton.testing.do_bench: the L2 flush runs before every timed call, after prepare(),
    outside the events (so it is not timed), and not during the warm-up calls."""
    fake = _FakeCuda()
    fake.install(monkeypatch)
    log = []

    class Event(_FakeCuda.Event):
        def record(self):
            log.append("event")
            super().record()

    monkeypatch.setattr(torch.cuda, "Event", Event)

    def slow_flush():
        log.append("flush")
        time.sleep(0.01)  # a flush this slow would dominate the 1 ms calls if it were timed

    def call():
        log.append("call")
        time.sleep(0.001)

    pol = common.TimingPolicy(warmup=2, target_s=0.01, min_reps=4, max_reps=4, budget_s=1.0)
    t = common.time_cuda(call, pol, prepare=lambda: log.append("prepare"), flush=slow_flush)
    assert t.reps == 4 and t.timer == "cuda-events" and t.median_ms < 8
    assert log[:4] == ["prepare", "call"] * 2  # warm-up: no flush
    assert log[4:] == ["prepare", "flush", "event", "call", "event"] * 4
    log.clear()
    fake.install_flush(monkeypatch, log)
    t = common.time_fn(lambda: None, torch.device("cuda"), quick=True)
    assert log.count("flush") == t.reps
    log.clear()
    common.time_fn(lambda: None, torch.device("cuda"), quick=True, flush_l2=False)
    assert "flush" not in log and "event" in log


def test_cuda_graph_timing_and_fallback(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    calls = []

    def capture(fn):
        fn()
        calls.append("captured")
        return lambda: calls.append("replay")

    monkeypatch.setattr(common, "capture_cuda_graph", capture)
    pol = common.TimingPolicy(warmup=1, target_s=0.0, min_reps=3, max_reps=3, budget_s=1.0)
    t = common.time_cuda(lambda: calls.append("eager"), pol, graph=True)
    assert t.timer == "cuda-graph" and calls == ["eager", "captured"] + ["replay"] * 4  # 1 warm-up + 3 reps

    def cannot(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(common, "capture_cuda_graph", cannot)
    calls.clear()
    t = common.time_cuda(lambda: calls.append("eager"), pol, graph=True)
    assert t.timer.startswith("cuda-events (graph capture failed: RuntimeError: operation not permitted")
    assert calls == ["eager"] * 4


def test_cuda_rows_report_percent_of_peak(monkeypatch):
    """run_case on a (fake) H100: % of peak BW / TFLOP/s columns, CPU-only backends skipped, L2
    flushed before every timed call and recorded, the forward timed through a CUDA graph."""
    fake = _FakeCuda()
    fake.install(monkeypatch)
    flushes = []
    fake.install_flush(monkeypatch, flushes)
    monkeypatch.setattr(common, "capture_cuda_graph", lambda fn: fn)

    def ref(inp):
        fake.alloc(2 * 2**20)
        return inp["x"] * 2

    case = common.Case(
        family="fake", op="double", name="n=64", shape={"n": 64}, dtype=torch.bfloat16,
        setup=lambda: {"x": torch.randn(64, dtype=torch.bfloat16)},
        impls={"reference": ref, "cpu": ref}, flops=1e9, bytes=1e9, compile=False,
    )  # fmt: skip
    opts = run.parse_args(["--quick", "--cuda-graph"])
    opts.backends = None
    env = {"device_name": "NVIDIA H100 80GB HBM3", "threads": None, "torch": "t", "triton": "x",
           "date": "d", "compile": True, "l2_flush": True}  # fmt: skip
    recs = run.run_case(case, torch.device("cuda"), env, opts)
    ref_row = _one(recs, backend="reference")
    assert ref_row["status"] == "ok" and ref_row["device"] == "cuda" and ref_row["threads"] is None
    assert ref_row["l2_flush"] is True and ref_row["timer"] == "cuda-graph"
    assert len(flushes) == ref_row["reps"]
    assert ref_row["peak_mem_mb"] == 2.0
    sec = ref_row["median_ms"] / 1e3
    assert ref_row["pct_peak_bw"] == pytest.approx(100 * 1e9 / sec / 3.35e12)
    assert ref_row["pct_peak_tflops"] == pytest.approx(100 * 1e9 / sec / 989e12)
    cpu_row = _one(recs, backend="cpu")
    assert cpu_row["status"] == "skipped" and "CPU tensors" in cpu_row["reason"]
    cols = run.table_columns(cuda=True)
    lines = run.format_rows(recs, cols)
    assert cols[-2:] == [("%peak BW", 8), ("%peak TF", 8)] and len(lines) == 2
    assert lines[0].split()[-2:] == [f"{ref_row['pct_peak_bw']:.1f}", f"{ref_row['pct_peak_tflops']:.1f}"]


# --------------------------------------------------------------------------------------------
# machine limits, peers, plots, pytest-benchmark


def test_machine_limits_formula_and_cache(monkeypatch):
    lim = common.MachineLimits(torch.device("cpu"), quick=True)
    timed = []
    monkeypatch.setattr(lim, "_time", lambda fn: timed.append(fn) or 2.0)  # every product "takes" 2 ms
    gemm = common.Limit(gemms=(common.Gemm(8, 16, 32, count=3), common.Gemm(8, 32, 16)), note="n")
    ms, desc = lim.limit_ms(gemm, "fwd", torch.bfloat16)
    assert ms == 4 * 2.0 and desc.startswith("torch.mm 3*(8x16x32) + 8x32x16 bfloat16: ") and desc.endswith("(n)")
    flops = 2.0 * 8 * 16 * 32 * 4
    assert f"{flops / 8e-3 / 1e9:.1f} GFLOP/s" in desc
    ms, desc = lim.limit_ms(gemm, "fwd+bwd", torch.bfloat16)  # + dX and dW of every product
    assert ms == 12 * 2.0 and "+dX,dW" in desc
    # shapes (8,16,32) (8,32,16) (16,8,32) / (8,32,16) (8,16,32) (32,8,16): 4 distinct, each timed once
    assert len(timed) == 4
    ms, _ = lim.limit_ms(common.Limit(gemms=(common.Gemm(8, 16, 32),), backward_gemms=False), "fwd+bwd", torch.float32)
    assert ms == 2.0 and len(timed) == 5  # float32 is another key
    lim._copy = 10e9  # 10 GB/s
    ms, desc = lim.limit_ms(common.copy_limit(5e6, 2e7), "fwd", torch.float32)
    assert ms == pytest.approx(0.5) and desc.startswith("copy 10.0 GB/s")
    assert lim.limit_ms(common.copy_limit(5e6), "fwd+bwd", torch.float32) == (None, "")


def test_machine_limits_measured_for_real():
    lim = common.MachineLimits(torch.device("cpu"), quick=True)
    bw = lim.copy_bytes_per_s()
    assert 1e8 < bw < 1e13 and lim.copy_bytes_per_s() == bw  # cached
    ms = lim.mm_ms(64, 64, 64, torch.float32)
    assert 0 < ms < 1000 and lim.mm_ms(64, 64, 64, torch.float32) == ms


def test_missing_peer_is_a_skipped_row(monkeypatch):
    """A peer library that is not installed gives a skipped row naming it and how to install it."""
    from benchmarks import peers

    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # import -> ModuleNotFoundError
    monkeypatch.setattr(peers, "_IMPORTS", {})
    case = common.Case(
        family="fake", op="ce", name="n=8", shape={}, dtype=torch.float32,
        setup=lambda: {"hidden": torch.randn(8, 4, requires_grad=True), "weight": torch.randn(16, 4),
                       "target": torch.randint(0, 16, (8,))},
        impls={"reference": peers.eager_linear_ce}, backward=lambda o: o[0], compile=False,
        peers={"cce-torch_compile": peers.cce_loss("torch_compile"), "cce": peers.cce_loss("cce"),
               "liger-flce": peers.liger_flce},
    )  # fmt: skip
    opts = run.parse_args(["--quick"])
    opts.backends = None
    env = {"device_name": "cpu", "threads": 1, "torch": "t", "triton": "x", "date": "d", "compile": False}
    recs = run.run_case(case, torch.device("cpu"), env, opts)
    for mode in ("fwd", "fwd+bwd"):
        r = _one(recs, backend="cce-torch_compile", mode=mode)
        assert r["status"] == "skipped" and r["kind"] == "peer"
        assert r["reason"].endswith("cut-cross-entropy not installed (pip install --no-deps -r requirements-peers.txt)")
        assert "CUDA tensors only" in _one(recs, backend="cce", mode=mode)["reason"]
        assert "CUDA tensors only" in _one(recs, backend="liger-flce", mode=mode)["reason"]
        assert _one(recs, backend="reference", mode=mode)["status"] == "ok"
    with pytest.raises(run.BackendUnavailableError, match="no-such-dist failed to import|not installed"):
        peers._need("no_such_module_for_unif2ace.sub", "no-such-dist")
    opts = run.parse_args(["--quick", "--no-peers"])
    opts.backends = None
    assert {r["backend"] for r in run.run_case(case, torch.device("cpu"), env, opts)} == {"reference"}


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plots_written(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "b.json"
    args = ["_selftest", "--quick", "--dtype", "bf16", "--backends", "peer-torch,peer-missing", "--json", str(out)]
    assert run.main(args + ["--plot", str(tmp_path / "plots")]) == 0
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["softmax.png"]
    assert _png(tmp_path / "plots" / "softmax.png")
    # the same from the JSON, with records of a second op and one without any limit
    from benchmarks import plot

    recs = json.loads(out.read_text())
    other = [dict(r, op="UniF2ace.forward", limit=None, limit_ms=None, pct_limit=None) for r in recs
             if r["kind"] != "limit"]  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(other))
    assert plot.main([str(out), str(tmp_path / "c.json"), "--out", str(tmp_path / "p2")]) == 0
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == ["UniF2ace.forward.png", "softmax.png"]
    assert all(_png(p) for p in (tmp_path / "p2").iterdir())


def test_plot_without_matplotlib_warns(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert run.main(["_selftest", "--quick", "--time-limit", "0", "--plot", str(tmp_path)]) == 0
    assert "--plot needs matplotlib" in capsys.readouterr().err


def _pytest_bench(args, tmp_path, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "-p", "no:cacheprovider", "-q", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_pytest_benchmark_entry_point(tmp_path):
    """`pytest benchmarks/ --benchmark-only` runs the same registry: one benchmark per case x
    implementation x peer x mode, grouped by case and mode, the machine limits, skips with run.py's
    reasons, and a --benchmark-json that pytest-benchmark can compare (bf16 selftest case only)."""
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "pb.json"
    args = ["--benchmark-only", "--bench-ops", "_selftest", "--bench-dtype", "bf16", "--benchmark-json", str(out)]
    p = _pytest_bench(args, tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr  # the "broken" implementation fails its tests
    data = json.loads(out.read_text())
    names = {b["name"] for b in data["benchmarks"]}
    for backend in ("reference", "cpu", "peer-torch"):
        for mode in ("fwd", "fwd+bwd"):
            assert f"test_registry[softmax|N=64 V=1000|bfloat16|{backend}|{mode}]" in names
    groups = {b["group"] for b in data["benchmarks"]}
    assert groups == {"softmax | N=64 V=1000 | bfloat16 | fwd", "softmax | N=64 V=1000 | bfloat16 | fwd+bwd",
                      "machine limits"}  # fmt: skip
    machine = {b["extra_info"]["limit"] for b in data["benchmarks"] if b["group"] == "machine limits"}
    # the forward product and, for fwd+bwd, dX (dW has the forward's shape here)
    assert machine == {"torch.mm 64x64x1000 bfloat16", "torch.mm 64x1000x64 bfloat16"}
    peer = next(b for b in data["benchmarks"] if "peer-torch|fwd+bwd" in b["name"])
    info = peer["extra_info"]
    assert info["kind"] == "peer" and info["mode"] == "fwd+bwd" and info["device"] == "cpu"
    assert info["limit"].startswith("torch.mm 64x64x1000 +dX,dW bfloat16") and info["limit_ms"] > 0
    assert info["pct_limit"] == pytest.approx(100 * info["limit_ms"] / (peer["stats"]["median"] * 1e3))
    summary = p.stdout.splitlines()[-1]
    assert "2 failed" in summary and "passed" in summary and "skipped" in summary, summary  # broken: 2 modes
    for backend, why in SELFTEST_SKIPPED.items():  # skipped with run.py's reasons (triton: the interpreter is on)
        assert (why if backend != "triton" else "TRITON_INTERPRET=1") in p.stdout, why


def test_pytest_benchmark_collects_the_whole_registry():
    """What `pytest benchmarks/ --collect-only` parametrizes (quick sizes, CPU): every case file
    without errors, peers included; the same labels as run.py."""
    from benchmarks import test_bench

    class Config:
        opts = {"--bench-device": "cpu", "--bench-full": False, "--bench-ops": "", "--bench-dtype": "",
                "--bench-compile": False, "--bench-no-peers": False, "--bench-no-flush-l2": False,
                "--bench-cuda-graph": False}  # fmt: skip

        def getoption(self, name):
            return self.opts[name]

    items = test_bench.registry_items(Config())
    ids = [it.id for it in items]
    assert len(ids) == len(set(ids)) > 50 and not [it.error for it in items if it.error]
    for want in ("|cce-torch_compile|fwd+bwd", "|torch._grouped_mm|fwd", "|torch-native|fwd", "machine|copy"):
        assert any(want in i for i in ids), want
    assert not any(i.startswith("softmax|") for i in ids)  # _selftest only when asked for
    cases, _ = run.collect(run.discover()[0], torch.device("cpu"), True)
    for _stem, case in run.select(cases, [], None):
        for label, _kind, _fn in run.case_labels(case, False):
            assert f"{case.op}|{case.name}|{run.dtype_name(case.dtype)}|{label}|fwd" in ids
