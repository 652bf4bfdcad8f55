"""Helpers of the grouped-MoE test files (tests/test_moe_*.py): the backend parameter, the device of
a backend's tensors, poisoned Triton allocations and random expert ids."""

import importlib

import pytest
import torch

from unif2ace.kernels._dispatch import backend_usable
from unif2ace.testing import cuda_emu, poison_, randn

# the cuda backend, twice: on the card (marked gpu: skipped without one) and through the CPU
# emulator of the CUDA kernels (marked cuda_emu, id "cuda_emu"); the parameter value is "cuda" in both
CUDA = cuda_emu.cuda_backends()
CUDA_GPU = CUDA[0]  # the card only (shapes too large for the emulator)


def backend_cases(by_backend):
    """pytest params ``(backend, *case)`` from per-backend case lists: key ``cuda`` gives the GPU
    cases (marked gpu), key ``cuda_emu`` the emulated ones (backend "cuda", marked cuda_emu)."""
    out = []
    for be, cases in by_backend.items():
        for case in cases:
            marks = {"cuda": pytest.mark.gpu, "cuda_emu": pytest.mark.cuda_emu}.get(be, ())
            value = "cuda" if be == "cuda_emu" else be
            out.append(pytest.param(value, *case, marks=marks, id="-".join(map(str, (be,) + case))))
    return out


def backend_device(backend: str) -> torch.device:
    """The device of a backend's tensors: CUDA for cuda on the card (the test is skipped when the CUDA
    extension is missing), else the CPU (triton runs under the interpreter there, cuda under the
    emulator)."""
    dev = cuda_emu.device(backend)
    if dev.type != "cuda":
        return dev
    ok, why = backend_usable("cuda", dev)
    if not ok:
        pytest.skip(why)
    return dev


def device_fixture():
    """A ``dev`` fixture: :func:`backend_device` of the test's ``backend`` parameter."""

    @pytest.fixture
    def dev(backend):
        return backend_device(backend)

    return dev


def poison_fixture(*stems: str):
    """A ``poison`` fixture: :func:`poison_triton` of these stems when the test's ``backend`` is triton."""

    @pytest.fixture
    def poison(backend, monkeypatch):
        if backend == "triton":
            poison_triton(monkeypatch, *stems)

    return poison


def poison_triton(monkeypatch, *stems: str) -> None:
    """Every buffer the launchers of ``unif2ace.kernels.triton.<stem>`` allocate starts as poison
    (NaN / sentinel int), so a kernel that leaves an output element unwritten is caught."""
    for stem in stems:
        mod = importlib.import_module(f"unif2ace.kernels.triton.{stem}")
        monkeypatch.setattr(mod, "_empty", lambda *shape, **kw: poison_(torch.empty(*shape, **kw)))
        if hasattr(mod, "_empty_like"):
            monkeypatch.setattr(mod, "_empty_like", lambda t, **kw: poison_(torch.empty_like(t, **kw)))


def random_ids(T, k, E, dtype=torch.int64, device="cpu"):
    """Mostly valid expert ids plus ~10% invalid ones (null -1 and out-of-range E)."""
    ids = torch.randint(0, E, (T, k))
    drop = torch.rand(T, k) < 0.1
    ids[drop] = torch.where(torch.rand(int(drop.sum())) < 0.5, -1, E)
    return ids.to(device=device, dtype=dtype)


def mlp_args(T, D, E, F1, F):
    """Positional inputs of moe_expert_mlp for T tokens of width D: random w1 ``[E, D, F1]`` and w2
    ``[E, F, D]``, every token routed to expert 0 with gate 1 (k = 1)."""
    return randn(T, D), randn(E, D, F1), randn(E, F, D), torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1)
