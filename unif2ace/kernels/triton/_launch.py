"""One source of truth for Triton launches: every launcher *plans* and then *launches*.

Planning turns a call's inputs into :class:`Launch` records: the kernel, its grid, its positional
arguments (tensors and ints, from which Triton derives the argument dtypes and its value
specialisations: an int equal to 1 becomes a constexpr, 16-byte divisibility of pointers and ints
is tracked), its constexprs and its compile options (``num_warps``, ``num_stages``). Every
launcher in this package builds its records from its own config tables and hands each one to
:func:`launch`; nothing else starts a Triton kernel (``tests/test_triton_sm90.py`` checks).

Normally :func:`launch` launches the record. Under :func:`record` it collects it instead, and the
planning questions that depend on the machine -- :func:`on_gpu` (GPU config tables or the
interpreter's?), :func:`interpreting`, :func:`sm_count` -- answer for the GPU being planned for.
A launcher called inside ``record()`` with ``meta`` tensors (shapes and dtypes only, no memory,
any size) therefore yields exactly the launches a real call of that size would make on that GPU,
through the same code. ``scripts/check_triton_sm90.py`` compiles them for sm_90a on a CPU-only
machine (docs/testing.md, "The sm_90a compile check").

Rules for launchers: no host sync and no data-dependent Python control flow between the inputs
and the launches (meta tensors have no values; a sync would fail here and stall the GPU there),
and every device/machine question goes through the helpers below.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from .._dispatch import triton_interpreter_enabled

__all__ = ["GpuTarget", "H100", "Launch", "launch", "record", "planning_target", "on_gpu", "interpreting", "sm_count"]


@dataclass(frozen=True)
class GpuTarget:
    """The GPU a recorded plan is made for."""

    name: str
    capability: int  # 90 = sm_90a (Hopper)
    sm_count: int


H100 = GpuTarget("H100 SXM", 90, 132)
"""The card the project targets (H200 has the same SM count and shared memory per block)."""


@dataclass
class Launch:
    """One kernel launch as planned: ``kernel[grid](*args, **constexprs, **options)``."""

    kernel: Any  # a @triton.jit function (an interpreter object under TRITON_INTERPRET=1)
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]  # positional run-time arguments: tensors, ints, floats, bools
    constexprs: Dict[str, Any]
    options: Dict[str, Any] = field(default_factory=dict)  # num_warps / num_stages as passed

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


_RECORDER: contextvars.ContextVar[Optional[List[Launch]]] = contextvars.ContextVar("unif2ace_launch_rec", default=None)
_TARGET: contextvars.ContextVar[Optional[GpuTarget]] = contextvars.ContextVar("unif2ace_launch_tgt", default=None)


def launch(plan: Launch) -> None:
    """Launch ``plan`` (or record it under :func:`record`)."""
    rec = _RECORDER.get()
    if rec is not None:
        rec.append(plan)
        return
    plan()


@contextlib.contextmanager
def record(target: GpuTarget = H100) -> Iterator[List[Launch]]:
    """Collect the launches the launchers plan, for ``target``, instead of running them."""
    t_rec, t_tgt = _RECORDER.set([]), _TARGET.set(target)
    try:
        yield _RECORDER.get()
    finally:
        _RECORDER.reset(t_rec)
        _TARGET.reset(t_tgt)


def planning_target() -> Optional[GpuTarget]:
    """The GPU :func:`record` plans for (None outside it)."""
    return _TARGET.get()


def on_gpu(device: torch.device) -> bool:
    """Whether tensors on ``device`` run on a GPU (the GPU config tables apply)."""
    return _TARGET.get() is not None or device.type == "cuda"


def interpreting() -> bool:
    """Whether launches run under Triton's interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    return _TARGET.get() is None and triton_interpreter_enabled()


_SM_COUNT: Dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (of the planned-for GPU under :func:`record`)."""
    tgt = _TARGET.get()
    if tgt is not None:
        return tgt.sm_count
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
