"""Backend registry and selection for the public ops.

Every public op has one :class:`Op` record here: a name, the backends that implement it and the
order in which they are tried automatically per device. Backends:

============  ====================================================================================
reference     plain PyTorch, fp32 internally; the semantics every other backend is tested against
triton        Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests)
cuda          the CUDA extension ``unif2ace._C_cuda`` (built only against a CUDA torch)
cpu           the C++/OpenMP extension ``unif2ace._C`` (always built)
============  ====================================================================================

Choosing a backend, strongest first:

1. the ``backend=`` argument of the call;
2. :func:`use_backend` (a context manager; one name for all ops, or per op by keyword);
3. the ``UNIF2ACE_BACKEND`` environment variable: ``cpu`` for all ops, or a per-op list such as
   ``d3diff_loss=triton,moe_align=cuda`` (``*=reference`` sets the default);
4. automatic: CPU tensors -> ``cpu`` if this op has a C++ kernel and the extension loaded, else
   ``reference``; CUDA tensors -> the op's GPU order (e.g. ``triton`` then ``cuda``), else
   ``reference``. Triton is never picked automatically for CPU tensors (the interpreter is slow).

A backend asked for by name that cannot run (not built, no kernel for this op, wrong device)
raises :class:`BackendUnavailableError` saying why; automatic selection falls back quietly.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

from . import _ext

BACKENDS = ("reference", "triton", "cuda", "cpu")
ENV_VAR = "UNIF2ACE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run this op here."""


_OVERRIDE: contextvars.ContextVar[Dict[str, str]] = contextvars.ContextVar("unif2ace_backend_override", default=None)

OPS: Dict[str, "Op"] = {}


def _check_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _parse_spec(spec: str, where: str) -> Dict[str, str]:
    """'cpu' -> {'*': 'cpu'}; 'a=cpu,b=triton' -> {'a': 'cpu', 'b': 'triton'}."""
    out: Dict[str, str] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "=" in part:
            op, be = (s.strip() for s in part.split("=", 1))
        else:
            op, be = "*", part
        if op != "*" and op not in OPS:
            raise ValueError(f"{where}: unknown op {op!r}; known ops: {', '.join(sorted(OPS))}")
        out[op] = _check_backend_name(be, where)
    return out


_env_cache: Tuple[Optional[str], Dict[str, str]] = (None, {})


def _env_spec() -> Dict[str, str]:
    global _env_cache
    raw = os.environ.get(ENV_VAR, "")
    if raw != _env_cache[0]:
        _env_cache = (raw, _parse_spec(raw, f"environment variable {ENV_VAR}={raw!r}"))
    return _env_cache[1]


@contextlib.contextmanager
def use_backend(default: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Force backends inside a ``with`` block.

    ``use_backend("reference")`` forces every op; ``use_backend(d3diff_loss="triton")`` forces one
    op; both can be combined (per-op names win). Nested blocks override outer ones.
    """
    spec = dict(_OVERRIDE.get() or {})
    if default is not None:
        spec["*"] = _check_backend_name(default, "use_backend")
    for op, be in per_op.items():
        if op not in OPS:
            raise ValueError(f"use_backend: unknown op {op!r}; known ops: {', '.join(sorted(OPS))}")
        spec[op] = _check_backend_name(be, "use_backend")
    token = _OVERRIDE.set(spec)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_usable(backend: str, device: torch.device) -> Tuple[bool, str]:
    """Whether ``backend`` can run at all on tensors of ``device`` (ignoring which ops it has)."""
    dev = device.type
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        if dev != "cpu":
            return False, f"the cpu backend runs on CPU tensors, got {dev} tensors"
        ok, err = _ext.cpu_status()
        return ok, "" if ok else f"the C++ extension unif2ace._C did not load ({err})"
    if backend == "cuda":
        if _ext.cuda_emulated():  # tests: the CPU emulation of the CUDA kernels (unif2ace.testing.cuda_emu)
            ok = dev == "cpu"
            return ok, "" if ok else f"the emulated cuda backend runs on CPU tensors, got {dev} tensors"
        if dev != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, got {dev} tensors"
        ok, err = _ext.cuda_status()
        return ok, "" if ok else f"the CUDA extension unif2ace._C_cuda did not load ({err})"
    if backend == "triton":
        ok, err = _ext.triton_status()
        if not ok:
            return False, f"triton is not importable ({err})"
        if dev == "cuda":
            if not torch.cuda.is_available():
                return False, "no CUDA device is available"
            return True, ""
        if dev == "cpu" and triton_interpreter_enabled():
            return True, ""
        return False, f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {dev}"
    raise ValueError(f"unknown backend {backend!r}")


class Op:
    """One public op, as data: its name, the stem of its kernel files, the backends that implement
    it and the order in which they are tried automatically per device.

    One idiom for every op and backend: the implementation of op ``name`` on backend ``b`` is the
    module ``unif2ace.kernels.<b>.<stem>`` (``reference/``, ``cpu/``, ``triton/``, ``cuda/``), which
    defines the functions named in ``entry_points`` (for the fast backends) -- e.g.
    ``unif2ace.kernels.cpu.moe_gating.moe_gating_backward``. :meth:`kernels` imports that module on
    first use, so importing unif2ace imports neither triton nor the extensions. The stem is the
    same in every layer: ``csrc/cpu/<stem>.cpp``, ``csrc/cuda/<stem>.cu``, ``tests/test_<stem>.py``,
    ``benchmarks/cases/<stem>.py``.
    """

    def __init__(
        self,
        name: str,
        *,
        stem: str,
        backends: Sequence[str],
        entry_points: Sequence[str] = (),
        cpu_order: Sequence[str] = ("cpu",),
        cuda_order: Sequence[str] = ("triton", "cuda"),
        doc: str = "",
    ):
        if name in OPS:
            raise RuntimeError(f"op {name!r} registered twice")
        for b in backends:
            _check_backend_name(b, f"Op({name!r}, backends=...)")
        self.name = name
        self.stem = stem
        self.backends: Tuple[str, ...] = tuple(backends)
        self.entry_points: Tuple[str, ...] = tuple(entry_points)
        self.cpu_order = tuple(cpu_order)
        self.cuda_order = tuple(cuda_order)
        self.doc = doc
        OPS[name] = self

    def module_name(self, backend: str) -> str:
        return f"{__package__}.{backend}.{self.stem}"

    def kernels(self, backend: str):
        """The module implementing this op on ``backend`` (imported on first use)."""
        if backend not in self.backends:
            raise BackendUnavailableError(f"{self.name}: no {backend!r} implementation")
        mod = importlib.import_module(self.module_name(backend))
        if backend != "reference":
            missing = [f for f in self.entry_points if not callable(getattr(mod, f, None))]
            if missing:
                raise RuntimeError(f"{self.module_name(backend)} lacks the entry points {missing} of op {self.name}")
        return mod

    def availability(self, backend: str, device: torch.device) -> Tuple[bool, str]:
        if backend not in self.backends:
            have = ", ".join(b for b in BACKENDS if b in self.backends)
            return False, f"op {self.name} has no {backend!r} kernel (implemented: {have})"
        return backend_usable(backend, device)

    def select(self, device: torch.device, backend: Optional[str] = None) -> str:
        """Resolve the backend for a call on ``device`` (see the module docstring).

        Under ``torch.compile`` the choice is made once, at trace time, and baked into the graph
        (changing ``use_backend``/the environment afterwards needs a recompile).
        """
        if torch.compiler.is_compiling():
            return _select_at_trace_time(self.name, device.type, backend)
        return self._select(device, backend)

    def _select(self, device: torch.device, backend: Optional[str]) -> str:
        source = None
        if backend is not None:
            source = "the backend= argument"
            _check_backend_name(backend, f"{self.name}(backend=...)")
        else:
            for spec, where in ((_OVERRIDE.get() or {}, "use_backend()"), (_env_spec(), ENV_VAR)):
                be = spec.get(self.name, spec.get("*"))
                if be is not None:
                    backend, source = be, where
                    break
        if backend is not None:
            ok, why = self.availability(backend, device)
            if not ok:
                raise BackendUnavailableError(
                    f"{self.name}: backend {backend!r} was requested by {source} but cannot run: {why}"
                )
            return backend
        order = self.cuda_order if device.type == "cuda" else self.cpu_order
        for be in order:
            if self.availability(be, device)[0]:
                return be
        return "reference"


@torch.compiler.assume_constant_result
def _select_at_trace_time(op_name: str, device_type: str, backend: Optional[str]) -> str:
    # Selection reads Python state (registry, env, context, extension loading) that dynamo cannot
    # trace; run it eagerly while tracing and treat the result as a constant.
    return OPS[op_name]._select(torch.device(device_type), backend)


def device_of(*tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def registered_ops() -> Dict[str, Op]:
    return dict(OPS)
