"""Backend registry and selection (unif2ace.kernels._dispatch) on a test-only op."""

import subprocess
import sys

import pytest
import torch

from unif2ace.kernels import BackendUnavailableError, use_backend
from unif2ace.kernels import _dispatch as D

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def op():
    name = "_test_dispatch_op"
    D.OPS.pop(name, None)
    o = D.Op(
        name, stem="_test", backends=("reference", "cpu", "triton"), cpu_order=("cpu",), cuda_order=("triton", "cuda")
    )
    yield o
    D.OPS.pop(name, None)


@pytest.fixture(scope="module")
def ref_only_op():
    name = "_test_dispatch_ref_only"
    D.OPS.pop(name, None)
    o = D.Op(name, stem="_test", backends=("reference",))
    yield o
    D.OPS.pop(name, None)


def test_auto_cpu_picks_cpu_extension(op, monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    assert op.select(CPU) == "cpu"


def test_auto_falls_back_quietly_to_reference(ref_only_op, monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    assert ref_only_op.select(CPU) == "reference"


def test_auto_never_picks_triton_for_cpu_tensors(monkeypatch):
    name = "_test_dispatch_triton_only"
    D.OPS.pop(name, None)
    o = D.Op(name, stem="_test", backends=("reference", "triton"))
    try:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert o.select(CPU) == "reference"
        assert o.select(CPU, "triton") == "triton"  # forced: allowed under the interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            o.select(CPU, "triton")
    finally:
        D.OPS.pop(name, None)


def test_per_call_beats_context_beats_env(op, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, "cpu")
    assert op.select(CPU) == "cpu"
    with use_backend("reference"):
        assert op.select(CPU) == "reference"
        assert op.select(CPU, "cpu") == "cpu"
        with use_backend(**{op.name: "cpu"}):
            assert op.select(CPU) == "cpu"
        assert op.select(CPU) == "reference"
    assert op.select(CPU) == "cpu"


def test_env_var_per_op_spec(op, ref_only_op, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, f"*=reference,{op.name}=cpu")
    assert op.select(CPU) == "cpu"
    assert ref_only_op.select(CPU) == "reference"


def test_env_var_bad_values_are_clear(op, monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"UNIF2ACE_BACKEND.*unknown backend 'fast'"):
        op.select(CPU)
    monkeypatch.setenv(D.ENV_VAR, "no_such_op=cpu")
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        op.select(CPU)


def test_forcing_unavailable_backend_names_op_backend_and_reason(op, ref_only_op, monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    with pytest.raises(
        BackendUnavailableError, match=r"_test_dispatch_ref_only: backend 'cpu' .*argument.*no 'cpu' kernel"
    ):
        ref_only_op.select(CPU, "cpu")
    with pytest.raises(BackendUnavailableError, match=r"cuda.*CUDA tensors, got cpu"):
        backends = op.backends
        op.backends = backends + ("cuda",)
        try:
            op.select(CPU, "cuda")
        finally:
            op.backends = backends
    with pytest.raises(BackendUnavailableError, match=r"use_backend\(\)"):
        with use_backend("cpu"):
            ref_only_op.select(CPU)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        op.select(CPU, "gpu")
    with pytest.raises(ValueError, match="unknown op"):
        with use_backend(not_an_op="cpu"):
            pass


def test_cpu_backend_rejects_cuda_tensors(op):
    ok, why = D.backend_usable("cpu", CUDA)
    assert not ok and "CPU tensors" in why


def test_info_lists_backends_per_op():
    out = subprocess.run([sys.executable, "-m", "unif2ace", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "torch" in text and "triton" in text
    assert "unif2ace._C (cpu)          loaded" in text
    for name in D.registered_ops():
        if not name.startswith("_test"):
            assert name in text


def test_select_is_traceable_by_torch_compile(op, monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    picked = []

    def f(x):
        be = op.select(x.device)
        picked.append(be)
        return x + (1.0 if be == "cpu" else 2.0)

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(3))
    assert torch.equal(out, torch.ones(3)) and picked == ["cpu"]


def test_every_op_finds_its_kernels_by_stem():
    """One idiom: op X on backend b lives in unif2ace.kernels.<b>.<stem> and defines its entry points."""
    for name, op in D.registered_ops().items():
        if name.startswith("_test") or op.stem is None:
            continue
        for b in op.backends:
            if b == "triton" and not D._ext.triton_status()[0]:
                continue
            mod = op.kernels(b)
            assert mod.__name__ == f"unif2ace.kernels.{b}.{op.stem}", (name, b)
    with pytest.raises(BackendUnavailableError, match="no 'cuda' implementation"):
        D.Op("_test_dispatch_no_cuda", stem="_test", backends=("reference",)).kernels("cuda")
    D.OPS.pop("_test_dispatch_no_cuda", None)
