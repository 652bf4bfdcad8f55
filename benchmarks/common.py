"""Benchmark building blocks: the :class:`Case` record that case files return, timing, peak memory,
device names and peaks. ``benchmarks/run.py`` is the driver.

Timing
    CPU: ``time.perf_counter`` around each call; CUDA: a pair of ``torch.cuda.Event`` around each
    call (synchronised before and after, L2 not flushed). The first call of every implementation is
    a warm-up that is not timed (it also pays for lazy loading, Triton JIT, ``torch.compile``).
    Reps continue until a target time or a rep cap is reached (fewer in quick mode); the median and
    the 20th/80th percentiles of the per-call times are reported in milliseconds.

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
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch


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


# --------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


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


def time_cuda(fn: Callable[[], object], pol: TimingPolicy, prepare: Optional[Callable[[], None]] = None) -> Timing:
    """Per-call GPU times of ``fn()`` from CUDA events; ``prepare()`` runs between the events."""
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
        starts[i].record()
        out = fn()
        ends[i].record()
        del out
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_fn(fn, device: torch.device, quick: bool, prepare=None) -> Timing:
    pol = policy(device, quick)
    if device.type == "cuda":
        return time_cuda(fn, pol, prepare)
    return time_cpu(fn, pol, prepare)


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
