"""Value checks (``kernels/_validate.py``): named errors on the host for CPU tensors, sync-free
device checks (``torch._assert_async``) for GPU tensors, the mode switch.

GPU tensors are simulated with fake CUDA tensors (``FakeTensorMode``): they have
``device.type == "cuda"`` and no values. :class:`_NoHostReads` fails on every op that reads a
tensor on the host -- ``.item()`` / ``bool()`` / ``int()`` (``_local_scalar_dense``), ``nonzero``,
boolean-mask indexing: on a GPU each is a host sync. A value check that passes under both is free
of host syncs.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import unif2ace.kernels.d3diff as d3diff_mod
from unif2ace.kernels import _validate as V
from unif2ace.kernels import (
    ar_sample,
    d3diff_loss,
    d3diff_loss_from_logits,
    masked_sample_step,
    moe_gating,
    set_value_checks,
)
from unif2ace.kernels.reference import moe_gating as ref_gating
from unif2ace.kernels.reference import sampling as ref_sampling


@pytest.fixture(autouse=True)
def _reset_mode():
    set_value_checks(None)
    yield
    set_value_checks(None)


class _Asserts:
    """Counts the device-side asserts the checks issue."""

    def __init__(self, monkeypatch):
        self.messages = []
        real = torch._assert_async

        def spy(t, msg=None):
            self.messages.append(msg)
            return real(t, msg) if msg is not None else real(t)

        monkeypatch.setattr(torch, "_assert_async", spy)


@pytest.fixture
def asserts(monkeypatch):
    return _Asserts(monkeypatch)


_aten = torch.ops.aten
_HOST_READS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default}
_HOST_READS |= {_aten.is_nonzero.default, _aten.equal.default}


class _NoHostReads(TorchDispatchMode):
    """Fails on any op that reads a tensor's values on the host (a sync on a GPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is _aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        )
        if func in _HOST_READS or bool_index:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **kwargs)


@pytest.fixture
def fake_cuda():
    with FakeTensorMode(), _NoHostReads():
        yield lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device="cuda")


# ------------------------------------------------------------------------------------ the mode


@pytest.mark.parametrize(
    "value,mode", [(None, "on"), (True, "on"), (False, "off"), ("sync", "sync"), ("off", "off"), ("1", "on")]
)
def test_set_value_checks_modes(value, mode):
    set_value_checks(value)
    assert V.value_check_mode() == mode
    assert V.value_checks_enabled() == (mode != "off")


@pytest.mark.parametrize("env,mode", [("1", "on"), ("0", "off"), ("sync", "sync"), ("ON", "on"), ("off", "off")])
def test_env_switch(monkeypatch, env, mode):
    monkeypatch.setenv("UNIF2ACE_CHECK_VALUES", env)
    assert V.value_check_mode() == mode
    set_value_checks("sync")  # the function wins over the environment
    assert V.value_check_mode() == "sync"


def test_bad_mode_names_the_switch(monkeypatch):
    with pytest.raises(ValueError, match="set_value_checks"):
        set_value_checks("maybe")
    monkeypatch.setenv("UNIF2ACE_CHECK_VALUES", "yes please")
    with pytest.raises(ValueError, match="UNIF2ACE_CHECK_VALUES"):
        V.value_check_mode()


# -------------------------------------------------------------------- GPU tensors: no host sync


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("allow", [None, -100])
def test_range_check_on_gpu_tensors_is_sync_free(fake_cuda, asserts, dtype, allow):
    t = fake_cuda(1000, dtype=dtype)
    V.check_range("op", "target", t, 0, 8192, allow=allow)  # a host read raises on a fake tensor
    assert asserts.messages == ["op: argument 'target' must hold values in [0, 8192)" + (" (or -100)" if allow else "")]


def test_range_check_bounds_outside_the_dtype_cost_nothing(fake_cuda, asserts):
    V.check_range("op", "ids", fake_cuda(10, dtype=torch.int64), 0, 1 << 63)  # only the lower bound
    V.check_range("op", "pos", fake_cuda(10, dtype=torch.int32), -(1 << 40), 1 << 40)  # none
    assert len(asserts.messages) == 1


@pytest.mark.parametrize("low_open", [False, True])
@pytest.mark.parametrize("high", [1.0, float("inf")])
def test_float_range_check_on_gpu_tensors_is_sync_free(fake_cuda, asserts, low_open, high):
    V.check_float_range("op", "mask_rate", fake_cuda(8), 0.0, high, low_open=low_open)
    assert len(asserts.messages) == 1 and "mask_rate" in asserts.messages[0]


def test_sync_mode_reads_gpu_tensors_on_the_host(fake_cuda):
    set_value_checks("sync")
    # a host read of a fake CUDA tensor: caught by _NoHostReads, or fails in the fake fallback
    with pytest.raises((AssertionError, RuntimeError)):  # a real GPU would sync here
        V.check_range("op", "target", fake_cuda(10, dtype=torch.int64), 0, 5)


def test_off_mode_issues_nothing(fake_cuda, asserts):
    set_value_checks(False)
    V.check_range("op", "target", fake_cuda(10, dtype=torch.int64), 0, 5)
    V.check_float_range("op", "rate", fake_cuda(10), 0.0, 1.0)
    assert asserts.messages == []


# ------------------------------------------------------------------------- CPU tensors: unchanged


def test_cpu_tensors_still_get_the_named_error(asserts):
    t = torch.tensor([0, 3, 9, -100])
    with pytest.raises(ValueError, match=r"'target' must hold values in \[0, 8\) \(or -100\), got values in \[0, 9\]"):
        V.check_range("op", "target", t, 0, 8, allow=-100)
    with pytest.raises(ValueError, match="'rate' must hold values in \\(0.0, 1.0\\].*with NaN"):
        V.check_float_range("op", "rate", torch.tensor([0.5, float("nan")]), 0.0, 1.0, low_open=True)
    assert asserts.messages == []


def test_device_check_condition_is_right_on_cpu(monkeypatch):
    """The device path's condition, evaluated here by routing CPU tensors through it."""
    monkeypatch.setattr(V, "_checks_on_host", lambda t: False)
    V.check_range("op", "t", torch.tensor([0, 7, -100]), 0, 8, allow=-100)
    V.check_float_range("op", "r", torch.tensor([1e-3, 1.0]), 0.0, 1.0, low_open=True)
    for bad in (
        lambda: V.check_range("op", "t", torch.tensor([0, 8]), 0, 8),
        lambda: V.check_range("op", "t", torch.tensor([-1, 2]), 0, 8, allow=-100),
        lambda: V.check_float_range("op", "r", torch.tensor([0.0, 0.5]), 0.0, 1.0, low_open=True),
        lambda: V.check_float_range("op", "r", torch.tensor([float("nan")]), 0.0, float("inf")),
    ):
        with pytest.raises(RuntimeError):  # torch._assert_async on CPU raises at once
            bad()


# ------------------------------------------------------------- the public ops on GPU tensors


class _Reached(Exception):
    pass


def _stop(*a, **k):
    raise _Reached


def test_public_ops_validate_gpu_tensors_without_host_sync(fake_cuda, asserts, monkeypatch):
    """Every public op with value checks validates fake CUDA tensors (no host read) and reaches its
    backend; each value check is one device assert (the loss: 4 instead of ~7 syncs)."""
    monkeypatch.setattr(d3diff_mod, "d3diff_loss_from_logits_ref", _stop)
    monkeypatch.setattr(d3diff_mod, "d3diff_loss_ref", _stop)
    monkeypatch.setattr(ref_gating, "moe_gating_ref", _stop)
    monkeypatch.setattr(ref_sampling, "masked_sample_step_ref", _stop)
    monkeypatch.setattr(ref_sampling, "ar_sample_ref", _stop)
    N, V_, B, D = 64, 128, 4, 32
    i64 = torch.int64
    loss_args = dict(
        sample_index=fake_cuda(N, dtype=i64), mask_rate=fake_cuda(B) + 0.5, mask_rate_deriv=fake_cuda(B), alpha=0.1
    )
    calls = {
        "d3diff_loss_from_logits": (
            lambda: d3diff_loss_from_logits(
                fake_cuda(N, V_), fake_cuda(N, dtype=i64), **loss_args, backend="reference"
            ),
            4,
        ),
        "d3diff_loss": (
            lambda: d3diff_loss(
                fake_cuda(N, D), fake_cuda(V_, D), fake_cuda(N, dtype=i64), **loss_args, backend="reference"
            ),
            4,
        ),
        "moe_gating": (
            lambda: moe_gating(fake_cuda(N, 16), fake_cuda(N, dtype=i64), [8, 8], 2, backend="reference"),
            1,
        ),
        "masked_sample_step": (
            lambda: masked_sample_step(
                fake_cuda(B, 16, V_),
                fake_cuda(B, 16, dtype=i64),
                fake_cuda(B, 16, dtype=torch.bool),
                step=0,
                num_steps=4,
                seed=1,
                mask_token_id=V_,
                sample_ids=fake_cuda(B, dtype=i64),
                backend="reference",
            ),
            1,
        ),
        "ar_sample": (
            lambda: ar_sample(
                fake_cuda(B, V_),
                seed=1,
                position=fake_cuda(B, dtype=i64),
                sample_ids=fake_cuda(B, dtype=i64),
                backend="reference",
            ),
            2,
        ),
    }
    for name, (call, n_checks) in calls.items():
        before = len(asserts.messages)
        with pytest.raises(_Reached):
            call()
        assert len(asserts.messages) - before == n_checks, name


@pytest.mark.gpu
def test_value_checks_do_not_sync_on_a_gpu():
    dev = torch.device("cuda")
    t = torch.randint(0, 100, (1000,), device=dev)
    r = torch.rand(16, device=dev) + 0.01
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        V.check_range("op", "t", t, 0, 100, allow=-100)
        V.check_float_range("op", "r", r, 0.0, 1.0, low_open=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
