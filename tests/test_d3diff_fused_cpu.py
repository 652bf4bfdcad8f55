"""Fused-head D3Diff loss, cpu backend: the gradient-during-forward path (reduction mean/sum with a
gradient needed: dhidden/dweight/dbias computed per chunk in the forward, scaled in the backward)
and the recompute path (reduction none, no grad, or FUSED_EAGER_GRAD off), against the reference;
the in-place C++ row gradient they use."""

import pytest
import torch

import unif2ace.kernels.d3diff as d3mod
from unif2ace.kernels import d3diff_loss
from unif2ace.kernels._dispatch import backend_usable
from unif2ace.testing import assert_close, fwd_bwd_parity, randn

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not backend_usable("cpu", CPU)[0], reason="C++ extension missing")


def _target(N, V, masked_frac=0.6):
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) > masked_frac] = -100
    t[0] = 1  # at least one masked row
    return t


def _schedule(N, B):
    return torch.randint(0, B, (N,)), torch.rand(B) * 0.8 + 0.1, torch.rand(B) + 0.1


class _Spy:
    """Counts calls of the chunk loops (which path ran)."""

    def __init__(self, monkeypatch):
        self.eager = self.recompute = 0
        eager, recompute = d3mod._cpu_head_eager_grad, d3mod._cpu_head_lse_gather_backward

        def e(*a, **k):
            self.eager += 1
            return eager(*a, **k)

        def r(*a, **k):
            self.recompute += 1
            return recompute(*a, **k)

        monkeypatch.setattr(d3mod, "_cpu_head_eager_grad", e)
        monkeypatch.setattr(d3mod, "_cpu_head_lse_gather_backward", r)
        ns = d3mod.OP_FUSED.impls["cpu"]
        monkeypatch.setattr(ns, "head_lse_gather_backward", r)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(d3mod, "FUSED_CHUNK_ROWS", 7)  # several chunks, ragged last one


def _run(be, target, **kw):
    def f(h, w, *rest):
        return tuple(d3diff_loss(h, w, target, bias=rest[0] if rest else None, backend=be, **kw))

    return f


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("parametrization", ["posterior", "raw", "radd"])
def test_eager_grad_parity_all_outputs(small_chunks, monkeypatch, reduction, parametrization):
    # random upstream gradients on loss, mask_loss and score_loss: the anchor (loss) and the
    # recompute (mask/score) both contribute
    N, D, V, B = 45, 16, 111, 3
    h, w, b = randn(N, D), randn(V, D, scale=0.3), randn(V)
    target = _target(N, V)
    si, m, dm = _schedule(N, B)
    spy = _Spy(monkeypatch)
    kw = dict(
        sample_index=si,
        mask_rate=m,
        mask_rate_deriv=dm,
        alpha=0.3,
        parametrization=parametrization,
        reduction=reduction,
    )
    fwd_bwd_parity(
        _run("reference", target, **kw),
        _run("cpu", target, **kw),
        [h.requires_grad_(), w.requires_grad_(), b.requires_grad_()],
        names=["hidden", "weight", "bias"],
    )
    assert spy.eager == 1 and spy.recompute == 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_eager_grad_loss_only_skips_recompute(small_chunks, monkeypatch, reduction, with_bias):
    N, D, V, B = 52, 24, 97, 4
    h, w = randn(N, D), randn(V, D, scale=0.3)
    b = randn(V) if with_bias else None
    target = _target(N, V)
    si, m, dm = _schedule(N, B)
    kw = dict(sample_index=si, mask_rate=m, mask_rate_deriv=dm, alpha=0.5, reduction=reduction, parametrization="raw")
    spy = _Spy(monkeypatch)
    leaves = [h, w] + ([b] if with_bias else [])
    grads = {}
    for be in ("reference", "cpu"):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        o = d3diff_loss(xs[0], xs[1], target, bias=xs[2] if with_bias else None, backend=be, **kw)
        up = torch.tensor(1.7)  # a non-unit upstream scalar
        grads[be] = (o, torch.autograd.grad(o.loss, xs, up))
    (o_ref, g_ref), (o_cpu, g_cpu) = grads["reference"], grads["cpu"]
    for a, r in zip(o_cpu, o_ref):
        assert_close(a, r)
    for a, r, name in zip(g_cpu, g_ref, ["hidden", "weight", "bias"]):
        assert_close(a, r, name=name)
    assert spy.eager == 1 and spy.recompute == 0, "backward of loss alone must not recompute the chunks"


def test_eager_grad_bf16(small_chunks, monkeypatch):
    N, D, V, B = 40, 32, 111, 2
    dt = torch.bfloat16
    h, w, b = randn(N, D, dtype=dt), randn(V, D, dtype=dt, scale=0.3), randn(V, dtype=dt)
    target = _target(N, V)
    si, m, dm = _schedule(N, B)
    spy = _Spy(monkeypatch)
    kw = dict(sample_index=si, mask_rate=m, mask_rate_deriv=dm)
    fwd_bwd_parity(
        _run("reference", target, **kw),
        _run("cpu", target, **kw),
        [h.requires_grad_(), w.requires_grad_(), b.requires_grad_()],
        dtype=dt,
        names=["hidden", "weight", "bias"],
    )
    assert spy.eager == 1
    x = h.detach().clone().requires_grad_()
    o = d3diff_loss(x, w.detach(), target, backend="cpu", **kw)
    assert torch.autograd.grad(o.loss, x)[0].dtype == dt


def test_eager_grad_three_d_and_frozen_weight(small_chunks, monkeypatch):
    Bn, L, D, V = 3, 8, 16, 37
    h, w = randn(Bn, L, D), randn(V, D)
    target = _target(Bn * L, V).reshape(Bn, L)
    m, dm = torch.tensor([0.3, 0.9, 0.5]), torch.tensor([1.0, 2.0, 0.5])
    spy = _Spy(monkeypatch)
    kw = dict(mask_rate=m, mask_rate_deriv=dm, parametrization="posterior")
    # weight frozen: only dhidden is computed in the forward
    fwd_bwd_parity(
        lambda h: tuple(d3diff_loss(h, w, target, backend="reference", **kw)),
        lambda h: tuple(d3diff_loss(h, w, target, backend="cpu", **kw)),
        [h.requires_grad_()],
    )
    assert spy.eager == 1
    # hidden frozen
    fwd_bwd_parity(
        lambda w: tuple(d3diff_loss(h.detach(), w, target, backend="reference", **kw)),
        lambda w: tuple(d3diff_loss(h.detach(), w, target, backend="cpu", **kw)),
        [w.requires_grad_()],
    )
    assert spy.eager == 2


@pytest.mark.parametrize("mode", ["reduction_none", "switched_off", "no_grad"])
def test_recompute_path(small_chunks, monkeypatch, mode):
    N, D, V, B = 45, 16, 111, 3
    h, w = randn(N, D), randn(V, D, scale=0.3)
    target = _target(N, V)
    si, m, dm = _schedule(N, B)
    spy = _Spy(monkeypatch)
    kw = dict(
        sample_index=si,
        mask_rate=m,
        mask_rate_deriv=dm,
        parametrization="raw",
        alpha=0.2,
        reduction="none" if mode == "reduction_none" else "mean",
    )
    if mode == "switched_off":
        monkeypatch.setattr(d3mod, "FUSED_EAGER_GRAD", False)
    if mode == "no_grad":
        with torch.no_grad():
            got = d3diff_loss(h, w, target, backend="cpu", **kw)
            want = d3diff_loss(h, w, target, backend="reference", **kw)
        for a, r in zip(got, want):
            assert_close(a, r)
        assert spy.eager == 0
        return
    # non-uniform upstream gradients (per row for reduction none)
    fwd_bwd_parity(
        _run("reference", target, **kw),
        _run("cpu", target, **kw),
        [h.requires_grad_(), w.requires_grad_()],
        names=["hidden", "weight"],
    )
    assert spy.eager == 0 and spy.recompute == 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_eager_grad_all_rows_ignored(reduction):
    N, D, V = 9, 8, 21
    h, w, b = (randn(N, D).requires_grad_(), randn(V, D).requires_grad_(), randn(V).requires_grad_())
    m, dm = torch.tensor([0.4]), torch.tensor([1.0])
    o = d3diff_loss(
        h,
        w,
        torch.full((N,), -100),
        bias=b,
        sample_index=torch.zeros(N, dtype=torch.long),
        mask_rate=m,
        mask_rate_deriv=dm,
        reduction=reduction,
        backend="cpu",
    )
    assert (torch.stack(list(o)) == 0).all()
    for g in torch.autograd.grad(o.loss + o.mask_loss + o.score_loss, [h, w, b]):
        assert (g == 0).all()


def test_eager_grad_torch_compile_fullgraph(small_chunks):
    N, D, V, B = 30, 16, 53, 2
    h, w = randn(N, D), randn(V, D, scale=0.3)
    target = _target(N, V)
    si, m, dm = _schedule(N, B)

    def f(h, w):
        o = d3diff_loss(h, w, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend="cpu")
        return o.loss, o.mask_loss, o.score_loss

    torch._dynamo.reset()
    fwd_bwd_parity(
        _run("reference", target, sample_index=si, mask_rate=m, mask_rate_deriv=dm),
        torch.compile(f, fullgraph=True),
        [h.requires_grad_(), w.requires_grad_()],
    )


def test_eager_grad_deterministic(small_chunks):
    N, D, V, B = 64, 16, 111, 2
    h, w = randn(N, D), randn(V, D, scale=0.3)
    target = _target(N, V)
    si, m, dm = _schedule(N, B)
    runs = []
    for _ in range(2):
        x, y = h.clone().requires_grad_(), w.clone().requires_grad_()
        o = d3diff_loss(x, y, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend="cpu")
        runs.append((o.loss.detach(),) + torch.autograd.grad(o.loss, [x, y]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_gradient_in_place(dtype):
    from unif2ace.kernels import _ext

    ops = _ext.cpu_ops()
    N, V = 33, 111
    x = randn(N, V, dtype=dtype, scale=2.0)
    t = _target(N, V)
    t[5] = V + 3  # out of range: no one-hot term, no out-of-bounds write
    lse, _ = ops.lse_gather(x, t, -100)
    gl, gt = randn(N), randn(N)
    want = ops.lse_gather_backward(x, t, lse, gl, gt, -100)
    buf = x.clone()
    assert ops.lse_gather_backward_(buf, t, lse, gl, gt, -100) is None
    assert torch.equal(buf, want)
    ignored = t == -100
    assert ignored.any() and (buf[ignored] == 0).all()
    # strided rows (row stride > V) are written in place too; the padding columns stay untouched
    wide = randn(N, V + 9, dtype=dtype)
    view = wide[:, :V]
    view.copy_(x)
    ops.lse_gather_backward_(view, t, lse, gl, gt, -100)
    assert torch.equal(view, want)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.lse_gather_backward_(buf, t, lse.double(), gl, gt, -100)


def test_eager_grad_raw_overflow_regime(small_chunks, monkeypatch):
    # logits ≈ 100: LSE − c > 60, the safe_exp tangent (constant derivative exp(60)) is in play
    N, D, V, B = 23, 8, 37, 2
    h, w, b = randn(N, D), randn(V, D, scale=0.3), randn(V) + 100.0
    target = _target(N, V)
    si, m, dm = _schedule(N, B)
    spy = _Spy(monkeypatch)
    kw = dict(sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization="raw", reduction="sum")
    fwd_bwd_parity(
        _run("reference", target, **kw),
        _run("cpu", target, **kw),
        [h.requires_grad_(), w.requires_grad_(), b.requires_grad_()],
        names=["hidden", "weight", "bias"],
    )
    assert spy.eager == 1
