"""D3Diff loss fast backends (cpu: C++ row kernels; triton: interpreter on CPU) against the
reference: loss, parts and gradients, edge cases, low precision, row-kernel outputs, compile,
backend selection, and the fused-head cpu backend."""

import pytest
import torch

# the package re-exports the function d3diff_loss, which shadows the submodule's attribute name
import unif2ace.kernels.d3diff as d3mod
from unif2ace.kernels import (
    BackendUnavailableError,
    d3diff_loss,
    d3diff_loss_from_logits,
    set_value_checks,
    use_backend,
)
from unif2ace.kernels._dispatch import backend_usable
from unif2ace.testing import assert_all_written, assert_close, fwd_bwd_parity, poisoned_empty, randn

# the interpreter's runtime loop bounds trip a numpy deprecation warning on every launch

CPU = torch.device("cpu")
BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(not backend_usable(b, CPU)[0], reason=backend_usable(b, CPU)[1]))
    for b in ("cpu", "triton")
]


def _schedule(N, B, gen_rows=True):
    si = torch.randint(0, B, (N,))
    m = torch.rand(B) * 0.8 + 0.1
    dm = torch.rand(B) + 0.1
    return si, m, dm


def _target(N, V, masked_frac=0.6):
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) > masked_frac] = -100
    return t


def _parity(backend, logits, target, *, dtype=torch.float32, scale=1.0, **kw):
    def run(be):
        return lambda x: tuple(d3diff_loss_from_logits(x, target, backend=be, **kw))

    fwd_bwd_parity(
        run("reference"), run(backend), [logits.requires_grad_()], dtype=dtype, scale=scale, names=["logits"]
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "N,V,parametrization",
    [(n, v, p) for n, v in ((1, 111), (33, 111), (5, 8192)) for p in ("posterior", "raw", "radd")]
    + [(423, 111, "posterior")],
)
def test_parity_fp32(backend, N, V, parametrization):
    B = 3
    logits = randn(N, V, scale=2.0)
    target = _target(N, V)
    target[0] = 1  # at least one masked row
    si, m, dm = _schedule(N, B)
    _parity(
        backend,
        logits,
        target,
        sample_index=si,
        mask_rate=m,
        mask_rate_deriv=dm,
        alpha=0.3,
        parametrization=parametrization,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_parity_reductions_nonuniform_upstream(backend, reduction):
    # fwd_bwd_parity feeds random (non-uniform) gradients into all three outputs
    N, V, B = 57, 111, 4
    logits, target = randn(N, V), _target(N, V)
    si, m, dm = _schedule(N, B)
    for par in ("posterior", "raw"):
        _parity(
            backend,
            logits.clone(),
            target,
            sample_index=si,
            mask_rate=m,
            mask_rate_deriv=dm,
            parametrization=par,
            reduction=reduction,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_d_input(backend):
    B, L, V = 3, 11, 111
    logits = randn(B, L, V)
    target = _target(B * L, V).reshape(B, L)
    m, dm = torch.rand(B) * 0.8 + 0.1, torch.rand(B)
    _parity(backend, logits, target, mask_rate=m, mask_rate_deriv=dm, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_rows(backend):
    N, V = 19, 111
    wide = randn(N, V + 37)
    logits = wide[:, 5 : 5 + V]
    assert not logits.is_contiguous()
    target = _target(N, V)
    si, m, dm = _schedule(N, 2)

    def run(be):
        return lambda w: tuple(
            d3diff_loss_from_logits(
                w[:, 5 : 5 + V], target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend=be
            )
        )

    fwd_bwd_parity(run("reference"), run(backend), [wide.requires_grad_()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    N, V = 9, 111
    logits = randn(N, V).requires_grad_()
    target = torch.full((N,), -100)
    si, m, dm = _schedule(N, 2)
    for red in ("mean", "sum", "none"):
        o = d3diff_loss_from_logits(
            logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, reduction=red, backend=backend
        )
        for t in o:
            assert torch.isfinite(t).all() and (t == 0).all()
        (g,) = torch.autograd.grad(o.loss.sum(), logits)
        assert (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_masked_row(backend):
    N, V = 21, 111
    target = torch.full((N,), -100)
    target[13] = 77
    si, m, dm = _schedule(N, 2)
    _parity(backend, randn(N, V), target, sample_index=si, mask_rate=m, mask_rate_deriv=dm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    N, V = 17, 111
    logits = randn(N, V, scale=1e4).clamp(-1e4, 1e4)
    logits[0, :] = -1e4
    logits[0, 3] = 1e4
    logits[1, :] = 1e4  # uniform row at +1e4
    target = _target(N, V)
    target[:2] = torch.tensor([3, 5])
    si, m, dm = _schedule(N, 2)
    _parity(backend, logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_overflow_regime(backend):
    N, V = 23, 111
    logits = randn(N, V) + 100.0  # LSE − c ≈ 100: exp overflows fp32, the guard is linear
    target = _target(N, V)
    target[0] = 4
    si, m, dm = _schedule(N, 3)
    x = logits.clone().requires_grad_()
    o = d3diff_loss_from_logits(
        x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization="raw", backend=backend
    )
    assert torch.isfinite(o.loss) and o.score_loss.item() > 1e26
    assert torch.isfinite(torch.autograd.grad(o.loss, x)[0]).all()
    _parity(backend, logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization="raw")


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_plain_cross_entropy(backend):
    N, V = 45, 111
    logits, target = randn(N, V), _target(N, V)
    _parity(backend, logits, target, alpha=0.0)
    x = logits.clone().requires_grad_()
    o = d3diff_loss_from_logits(x, target.to(torch.int32), alpha=0.0, backend=backend)
    assert_close(o.loss, torch.nn.functional.cross_entropy(logits, target, ignore_index=-100))
    assert o.score_loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    N, V = 37, 111
    logits = randn(N, V, dtype=dtype, scale=2.0)
    target = _target(N, V)
    si, m, dm = _schedule(N, 3)
    for par in ("posterior", "raw"):
        _parity(
            backend,
            logits.clone(),
            target,
            dtype=dtype,
            sample_index=si,
            mask_rate=m,
            mask_rate_deriv=dm,
            parametrization=par,
        )
    # grad dtype follows the logits
    x = logits.clone().requires_grad_()
    o = d3diff_loss_from_logits(x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend=backend)
    assert o.loss.dtype == torch.float32
    assert torch.autograd.grad(o.loss, x)[0].dtype == dtype


def test_lse_gather_triton_writes_every_element():
    pytest.importorskip("triton")
    if not backend_usable("triton", CPU)[0]:
        pytest.skip("triton unusable")
    from unif2ace.kernels.triton import d3diff_loss as k

    for N, V in ((33, 111), (3, 8192)):
        x, t = randn(N, V), _target(N, V)
        lse, tgt = poisoned_empty(N, dtype=torch.float32), poisoned_empty(N, dtype=torch.float32)
        k.lse_gather(x, t, -100, lse_out=lse, tgt_out=tgt)
        assert_all_written(lse, "lse")
        assert_all_written(tgt, "tgt")
        _check_lse_tgt(x, t, lse, tgt)
        gl, gt = randn(N), randn(N)
        g = poisoned_empty(N, V, dtype=torch.float32)
        k.lse_gather_backward(x, t, lse, gl, gt, -100, grad_out=g)
        assert_all_written(g, "grad")
        _check_grad(x, t, lse, gl, gt, g)


def _check_lse_tgt(x, t, lse, tgt):
    valid = t != -100
    want_lse = torch.where(valid, torch.logsumexp(x.float(), 1), torch.zeros(()))
    want_tgt = torch.where(valid, x.float().gather(1, t.clamp_min(0)[:, None]).squeeze(1), torch.zeros(()))
    assert_close(lse, want_lse, name="lse")
    assert_close(tgt, want_tgt, name="tgt")


def _check_grad(x, t, lse, gl, gt, g):
    valid = (t != -100)[:, None]
    want = gl[:, None] * torch.softmax(x.float(), 1)
    want[valid.squeeze(1), t[valid.squeeze(1)]] += gt[valid.squeeze(1)]
    assert_close(g, torch.where(valid, want, torch.zeros(())), name="grad")


@pytest.mark.skipif(not backend_usable("cpu", CPU)[0], reason="C++ extension missing")
def test_lse_gather_cpu_row_kernel():
    from unif2ace.kernels import _ext

    ops = _ext.cpu_ops()
    for N, V in ((33, 111), (3, 8192), (64, 1)):
        x, t = randn(N, V), _target(N, V)
        if V == 1:
            t = torch.where(t == -100, t, torch.zeros_like(t))
        lse, tgt = ops.lse_gather(x, t, -100)
        assert torch.isfinite(lse).all() and torch.isfinite(tgt).all()
        _check_lse_tgt(x, t, lse, tgt)
        gl, gt = randn(N), randn(N)
        g = ops.lse_gather_backward(x, t, lse, gl, gt, -100)
        assert torch.isfinite(g).all()
        _check_grad(x, t, lse, gl, gt, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_without_value_checks_is_nan_not_a_crash(backend):
    N, V = 7, 111
    x, t = randn(N, V), torch.randint(0, V, (N,))
    t[2] = V + 1000
    set_value_checks(False)
    try:
        o = d3diff_loss_from_logits(x, t, alpha=0.0, reduction="none", backend=backend)
    finally:
        set_value_checks(None)
    assert torch.isnan(o.loss[2]) and torch.isfinite(o.loss[torch.arange(N) != 2]).all()


@pytest.mark.skipif(not backend_usable("cpu", CPU)[0], reason="C++ extension missing")
def test_torch_compile_fullgraph_cpu():
    N, V, B = 29, 111, 2
    logits, target = randn(N, V), _target(N, V)
    si, m, dm = _schedule(N, B)

    def f(x):
        o = d3diff_loss_from_logits(x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend="cpu")
        return o.loss, o.mask_loss, o.score_loss

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    fwd_bwd_parity(f, cf, [logits.requires_grad_()])


# ------------------------------------------------------------------------------- selection


def test_backend_selection():
    N, V = 5, 111
    x, t = randn(N, V), _target(N, V)
    if backend_usable("cpu", CPU)[0]:
        assert d3mod.OP_FROM_LOGITS.select(CPU) == "cpu"
        assert d3mod.OP_FUSED.select(CPU) == "cpu"
    with pytest.raises(BackendUnavailableError, match="cuda"):
        d3diff_loss_from_logits(x, t, alpha=0.0, backend="cuda")
    called = []
    orig = d3mod.d3diff_loss_from_logits_ref

    def spy(*a, **k):
        called.append(1)
        return orig(*a, **k)

    d3mod.d3diff_loss_from_logits_ref = spy
    try:
        with use_backend("reference"):
            d3diff_loss_from_logits(x, t, alpha=0.0)
        assert called, "use_backend('reference') did not force the reference"
        called.clear()
        if backend_usable("cpu", CPU)[0]:
            d3diff_loss_from_logits(x, t, alpha=0.0)
            assert not called, "CPU tensors should pick the cpu backend automatically"
    finally:
        d3mod.d3diff_loss_from_logits_ref = orig


# ------------------------------------------------------------------------------- fused head, cpu


@pytest.mark.skipif(not backend_usable("cpu", CPU)[0], reason="C++ extension missing")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_cpu_parity(monkeypatch, dtype, with_bias):
    monkeypatch.setattr(d3mod, "FUSED_CHUNK_ROWS", 7)  # several chunks, ragged last one
    N, D, V, B = 61, 24, 111, 3
    h, w = randn(N, D, dtype=dtype), randn(V, D, dtype=dtype, scale=0.3)
    b = randn(V, dtype=dtype) if with_bias else None
    target = _target(N, V)
    si, m, dm = _schedule(N, B)
    inputs = [h.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if with_bias else [])

    def run(be):
        def f(h, w, *rest):
            return tuple(
                d3diff_loss(
                    h,
                    w,
                    target,
                    bias=rest[0] if rest else None,
                    sample_index=si,
                    mask_rate=m,
                    mask_rate_deriv=dm,
                    backend=be,
                )
            )

        return f

    fwd_bwd_parity(run("reference"), run("cpu"), inputs, dtype=dtype, names=["hidden", "weight", "bias"])


@pytest.mark.skipif(not backend_usable("cpu", CPU)[0], reason="C++ extension missing")
def test_fused_cpu_three_d_none_and_all_ignored(monkeypatch):
    monkeypatch.setattr(d3mod, "FUSED_CHUNK_ROWS", 5)
    B, L, D, V = 2, 9, 16, 37
    h, w = randn(B, L, D), randn(V, D)
    target = _target(B * L, V).reshape(B, L)
    m, dm = torch.tensor([0.3, 0.9]), torch.tensor([1.0, 2.0])

    def run(be):
        return lambda h, w: tuple(
            d3diff_loss(
                h, w, target, mask_rate=m, mask_rate_deriv=dm, reduction="none", parametrization="raw", backend=be
            )
        )

    fwd_bwd_parity(run("reference"), run("cpu"), [h.requires_grad_(), w.requires_grad_()])
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    o = d3diff_loss(hh, ww, torch.full((B, L), -100), mask_rate=m, mask_rate_deriv=dm, backend="cpu")
    assert (torch.stack(list(o)) == 0).all()
    gh, gw = torch.autograd.grad(o.loss, [hh, ww])
    assert (gh == 0).all() and (gw == 0).all()
