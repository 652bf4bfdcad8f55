"""Benchmark building blocks: the :class:`Case` record that case files return, timing, peak memory,
device names and peaks. ``benchmarks/run.py`` is the driver.

Timing
    CPU: ``time.perf_counter`` around each call. CUDA: a pair of ``torch.cuda.Event`` around each
    call, and -- as ``triton.testing.do_bench`` does -- the L2 cache flushed before every timed
    call by zeroing a 256 MB buffer (between the calls, outside the events; ``flush_l2=False``
    turns it off). Optionally (``graph=True``, launch-bound ops) the call is captured once into a
    CUDA graph and the graph's replays are timed; a call that cannot be captured (host syncs) falls
    back to plain events and says why in ``Timing.timer``. The first call of every implementation
    is a warm-up that is not timed (it also pays for lazy loading, Triton JIT, ``torch.compile``).
    Reps continue until a target time or a rep cap is reached (fewer in quick mode); the median and
    the 20th/80th percentiles of the per-call times are reported in milliseconds.

Machine limits (:class:`Limit`, :class:`MachineLimits`)
    Measured in the same run as the rows they judge: ``torch.mm`` at an op's own GEMM shapes and
    dtype (GEMM-bound ops) and the copy bandwidth (``dst.copy_(src)`` of a buffer larger than the
    last-level cache; read + write bytes counted) for memory-bound ops. ``limit_ms`` is the time
    the machine needs for the op's necessary work at that rate; a row's ``pct_limit`` is
    ``100 * limit_ms / median_ms``.

Peak memory
    CUDA: ``torch.cuda.max_memory_allocated()`` during one call minus ``memory_allocated()`` just
    before it (so inputs made by ``setup`` are not counted; the output and, for fwd+bwd, the
    gradients are). CPU: approximate — a background thread samples the resident set size from
    ``/proc/self/statm`` every ~0.2 ms during one call and reports the peak growth over the RSS
    just before it. Memory that the allocator reuses without touching new pages is not seen, and
    very short peaks can be missed, so read it as a lower bound. On CPU it is measured during the
    first (warm-up) call of an eager implementation, when freshly allocated pages are most
    visible, and during an extra call after warm-up for ``torch.compile``.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class Gemm:
    """``count`` products ``[m, k] @ [k, n]`` in one forward call."""

    m: int
    k: int
    n: int
    count: int = 1


@dataclass(frozen=True)
class Limit:
    """The work an op cannot avoid, judged against the machine's own rate measured in the same run.

    GEMM-bound (``gemms`` given): the forward's products at their shapes, in ``dtype`` (default:
    the case's); forward+backward adds, per product, the two backward ones (dX ``[m, n] @ [n, k]``
    and dW ``[k, m] @ [m, n]``) unless ``backward_gemms=False``. Memory-bound (``bytes`` given):
    the bytes that must move per mode (``{"fwd": ..., "fwd+bwd": ...}``), at the copy bandwidth.
    """

    gemms: Tuple[Gemm, ...] = ()
    bytes: Optional[Dict[str, float]] = None
    dtype: Optional[torch.dtype] = None
    backward_gemms: bool = True
    note: str = ""  # what the work is, e.g. "rows that carry loss only"

    @property
    def kind(self) -> str:
        return "torch.mm" if self.gemms else "copy"


def copy_limit(fwd_bytes: float, fwd_bwd_bytes: Optional[float] = None, note: str = "") -> Limit:
    b = {"fwd": float(fwd_bytes)}
    if fwd_bwd_bytes is not None:
        b["fwd+bwd"] = float(fwd_bwd_bytes)
    return Limit(bytes=b, note=note)


@dataclass
class Case:
    family: str  # run.py's OP filter matches this or `op`, e.g. "moe_routing"
    op: str  # public op name, e.g. "d3diff_loss_from_logits"
    name: str  # short case label, e.g. "(c) N=2048 D=512 V=8192"
    shape: dict  # recorded in the JSON
    dtype: torch.dtype
    setup: Callable[[], dict]  # fresh inputs on the device (tensors needing grads: requires_grad=True)
    impls: dict  # backend name -> fn(inputs) -> tensor or tuple; must include "reference"
    backward: Optional[Callable] = None  # fn(output) -> scalar tensor to .backward(); times fwd+bwd too
    flops: Optional[float] = None  # per forward call, for TFLOP/s
    bytes: Optional[float] = None  # per forward call, for GB/s
    compile: bool = True  # the runner also times torch.compile(impls["reference"])
    peers: dict = field(default_factory=dict)  # name -> fn(inputs): what users would run instead (benchmarks/peers.py)
    limit: Optional[Limit] = None  # the machine limit every row is judged against


# --------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    timer: str = ""  # "perf_counter", "cuda-events", "cuda-graph" (+ why a graph was not used)


@dataclass(frozen=True)
class TimingPolicy:
    warmup: int  # untimed calls before timing (on top of the runner's first call)
    target_s: float  # stop once this much time was measured ...
    min_reps: int  # ... and at least this many reps were made,
    max_reps: int  # or at this many reps,
    budget_s: float  # or once this much time was spent (a slow case cannot eat the run; >= 1 rep)


POLICIES = {
    ("cpu", True): TimingPolicy(warmup=0, target_s=0.1, min_reps=3, max_reps=10, budget_s=1.0),
    ("cpu", False): TimingPolicy(warmup=1, target_s=0.3, min_reps=5, max_reps=200, budget_s=5.0),
    ("cuda", True): TimingPolicy(warmup=2, target_s=0.05, min_reps=5, max_reps=50, budget_s=1.0),
    ("cuda", False): TimingPolicy(warmup=5, target_s=0.5, min_reps=20, max_reps=1000, budget_s=5.0),
}


def policy(device: torch.device, quick: bool) -> TimingPolicy:
    return POLICIES[("cuda" if device.type == "cuda" else "cpu", bool(quick))]


def percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 1]), like ``numpy.percentile``."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times_ms: List[float]) -> Timing:
    return Timing(percentile(times_ms, 0.5), percentile(times_ms, 0.2), percentile(times_ms, 0.8), len(times_ms))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(fn: Callable[[], object], pol: TimingPolicy, prepare: Optional[Callable[[], None]] = None) -> Timing:
    """Per-call wall times of ``fn()``; ``prepare()`` runs before each call, untimed."""
    for _ in range(pol.warmup):
        if prepare:
            prepare()
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while True:
        if prepare:
            prepare()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        del out
        times.append((t1 - t0) * 1e3)
        spent = time.perf_counter() - start
        measured = sum(times) / 1e3
        if len(times) >= pol.max_reps or spent >= pol.budget_s:
            break
        if measured >= pol.target_s and len(times) >= pol.min_reps:
            break
    return summarize(times)


L2_FLUSH_BYTES = 256 * 2**20  # as triton.testing.do_bench: larger than any current L2 (H100/H200: 50-60 MB)
_L2_BUFFERS: Dict[str, torch.Tensor] = {}


def l2_flusher(device: torch.device) -> Callable[[], None]:
    """A function that evicts the L2 cache of ``device`` by zeroing a 256 MB buffer (do_bench's way)."""
    key = str(device)
    if key not in _L2_BUFFERS:
        _L2_BUFFERS[key] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    buf = _L2_BUFFERS[key]
    return buf.zero_


def capture_cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture ``fn()`` into a CUDA graph (after warm-up calls on a side stream, as
    ``torch.cuda.graphs`` asks); return a function that replays it. Raises when ``fn`` cannot be
    captured (host synchronisation, CPU tensors, ...)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    keep = (g, out)  # the graph's output tensors live as long as the replay function

    def replay():
        keep[0].replay()

    return replay


def time_cuda(
    fn: Callable[[], object],
    pol: TimingPolicy,
    prepare: Optional[Callable[[], None]] = None,
    flush: Optional[Callable[[], None]] = None,
    graph: bool = False,
) -> Timing:
    """Per-call GPU times of ``fn()`` from CUDA events; ``prepare()`` and ``flush()`` (the L2
    flush) run before each call, outside the events. ``graph``: time replays of ``fn`` captured
    into a CUDA graph (falls back to plain calls, noted in ``timer``, when capture fails)."""
    timer = "cuda-events"
    if graph:
        try:
            fn = capture_cuda_graph(fn)
            timer = "cuda-graph"
        except Exception as e:  # noqa: BLE001 - not capturable: time it eagerly and say why
            torch.cuda.synchronize()
            msg = str(e).strip().splitlines()
            timer = f"cuda-events (graph capture failed: {type(e).__name__}: {msg[0][:120] if msg else ''})"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(max(1, pol.warmup)):
        if prepare:
            prepare()
        fn()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) / max(1, pol.warmup), 1e-6)
    n = math.ceil(pol.target_s / est)
    n = max(pol.min_reps, min(n, pol.max_reps, max(1, int(pol.budget_s / est))))
    n = min(n, pol.max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        if prepare:
            prepare()
        if flush:
            flush()
        starts[i].record()
        out = fn()
        ends[i].record()
        del out
    torch.cuda.synchronize()
    t = summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])
    t.timer = timer
    return t


def time_fn(fn, device: torch.device, quick: bool, prepare=None, flush_l2: bool = True, graph: bool = False) -> Timing:
    pol = policy(device, quick)
    if device.type == "cuda":
        return time_cuda(fn, pol, prepare, l2_flusher(device) if flush_l2 else None, graph)
    t = time_cpu(fn, pol, prepare)
    t.timer = "perf_counter"
    return t


# --------------------------------------------------------------------------------------------
# peak memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> Optional[int]:
    """Resident set size of this process from /proc/self/statm (None where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class _RssSampler(threading.Thread):
    def __init__(self, interval_s: float = 2e-4):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = rss_bytes() or 0
        self._stop_evt = threading.Event()

    def run(self):
        while not self._stop_evt.is_set():
            r = rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        r = rss_bytes()
        if r is not None and r > self.peak:
            self.peak = r
        return self.peak


def call_with_cpu_peak(fn: Callable[[], object]) -> Tuple[object, Optional[float]]:
    """Run ``fn()`` once; return (its result, approximate peak extra RSS in MB or None)."""
    gc.collect()
    base = rss_bytes()
    if base is None:
        return fn(), None
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)  # let the sampler thread in between Python-level steps
    sampler = _RssSampler()
    sampler.start()
    try:
        out = fn()
    finally:
        peak = sampler.stop()
        sys.setswitchinterval(old_interval)
    return out, max(0, peak - base) / 2**20


def cuda_peak_mb(fn: Callable[[], object], prepare: Optional[Callable[[], None]] = None) -> float:
    """Peak CUDA memory allocated during one ``fn()`` over what was allocated just before, in MB."""
    if prepare:
        prepare()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - base) / 2**20


# --------------------------------------------------------------------------------------------
# device description


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


# Dense (non-sparse) vendor peaks: (substring of the device name, HBM bytes/s, bf16/fp16 FLOP/s).
# First match wins, so the specific variants come before the plain names (SXM).
DEVICE_PEAKS = (
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 4.8e12, 835e12),
    ("H200", 4.8e12, 989e12),  # H200 SXM
)


def device_peak(name: str) -> Optional[Tuple[float, float]]:
    """(bytes/s, 16-bit tensor-core FLOP/s) of a known GPU, else None."""
    for key, bw, flops in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return bw, flops
    return None


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001 - triton missing or broken: just record it
        tv = None
    return {"torch": torch.__version__, "triton": tv, "python": sys.version.split()[0]}


# --------------------------------------------------------------------------------------------
# machine limits, measured in the same run

COPY_BYTES = {
    ("cpu", True): 64 * 2**20,
    ("cpu", False): 256 * 2**20,
    ("cuda", True): 256 * 2**20,
    ("cuda", False): 1024 * 2**20,
}  # fmt: skip  source buffer; beyond any last-level cache


def _dname(dt) -> str:
    return str(dt).replace("torch.", "")


class MachineLimits:
    """``torch.mm`` rates and the copy bandwidth of one device, each measured once per run (cached)
    with the same timing policy as the rows they judge."""

    def __init__(self, device: torch.device, quick: bool, flush_l2: bool = True):
        self.device, self.quick, self.flush_l2 = torch.device(device), bool(quick), flush_l2
        self._mm: Dict[tuple, float] = {}
        self._copy: Optional[float] = None

    def _time(self, fn) -> float:
        fn()  # warm-up (oneDNN / cuBLAS heuristics, page faults)
        synchronize(self.device)
        return time_fn(fn, self.device, self.quick, flush_l2=self.flush_l2).median_ms

    def mm_ms(self, m: int, k: int, n: int, dtype: torch.dtype) -> float:
        """Median ms of ``torch.mm([m, k], [k, n])`` in ``dtype`` on this device."""
        key = (m, k, n, dtype)
        if key not in self._mm:
            g = torch.Generator().manual_seed(0)
            a = torch.randn(m, k, generator=g).to(self.device, dtype)
            b = (torch.randn(k, n, generator=g) / max(k, 1) ** 0.5).to(self.device, dtype)
            self._mm[key] = self._time(lambda: torch.mm(a, b))
            del a, b
        return self._mm[key]

    def copy_bytes_per_s(self) -> float:
        """Copy bandwidth: (read + write bytes) / s of ``dst.copy_(src)`` over a buffer larger than
        the last-level cache."""
        if self._copy is None:
            nbytes = COPY_BYTES[("cuda" if self.device.type == "cuda" else "cpu", self.quick)]
            src = torch.ones(nbytes // 4, dtype=torch.float32, device=self.device)
            dst = torch.empty_like(src)
            ms = self._time(lambda: dst.copy_(src))
            self._copy = 2 * nbytes / (ms / 1e3)
            del src, dst
        return self._copy

    def limit_ms(self, limit: Limit, mode: str, case_dtype: torch.dtype) -> Tuple[Optional[float], str]:
        """(ms the machine needs for ``limit``'s work in ``mode`` or None, a description)."""
        if limit.gemms:
            dt = limit.dtype or case_dtype
            total, parts, flops = 0.0, [], 0.0
            for g in limit.gemms:
                shapes = [(g.m, g.k, g.n)]
                if mode != "fwd" and limit.backward_gemms:
                    shapes += [(g.m, g.n, g.k), (g.k, g.m, g.n)]
                for m, k, n in shapes:
                    total += g.count * self.mm_ms(m, k, n, dt)
                    flops += g.count * 2.0 * m * k * n
                parts.append(f"{g.count}*({g.m}x{g.k}x{g.n})" if g.count > 1 else f"{g.m}x{g.k}x{g.n}")
            bwd = " +dX,dW" if mode != "fwd" and limit.backward_gemms else ""
            rate = flops / (total / 1e3) / 1e9 if total > 0 else float("nan")
            desc = f"torch.mm {' + '.join(parts)}{bwd} {_dname(dt)}: {rate:.1f} GFLOP/s"
            return total, desc + (f" ({limit.note})" if limit.note else "")
        if limit.bytes and mode in limit.bytes:
            bw = self.copy_bytes_per_s()
            nbytes = limit.bytes[mode]
            desc = f"copy {bw / 1e9:.1f} GB/s, {nbytes / 2**20:.1f} MiB"
            return nbytes / bw * 1e3, desc + (f" ({limit.note})" if limit.note else "")
        return None, ""
