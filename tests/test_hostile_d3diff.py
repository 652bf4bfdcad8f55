"""Hostile inputs for the D3Diff family (``d3diff_loss_from_logits``, ``d3diff_loss``) on every
backend that runs here, against the reference (issue 18; the contract: docs/kernels.md §A, "NaN,
inf and large offsets"):

- NaN / ±inf in masked rows, in ignored rows, at the target, as a vocabulary mask of −inf
  columns (longer than a first vocabulary tile), in hidden / weight / bias of the fused head --
  the NaN pattern and the ±inf values must be the reference's, in every dtype; ignored rows get
  exactly zero gradient whatever they hold;
- common logit offsets up to 1e30 in fp32 (the CE and the softmax are formed relative to the row
  max, never at the offset's scale);
- empty and degenerate shapes (N = 0, V = 1, D = 1), non-contiguous layouts (transposed logits,
  hidden and weight; strided target);
- every custom op of the family, forward and backward: fake vs real output strides on
  non-contiguous inputs, and ``torch.compile(fullgraph=True)`` of the public ops on them.

Shapes are small: the Triton kernels run under the interpreter here.
"""

import pytest
import torch

from unif2ace.kernels import d3diff_loss, d3diff_loss_from_logits
from unif2ace.kernels._dispatch import backend_usable
from unif2ace.testing import cuda_emu, fwd_bwd_parity, randn

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fp32_exact_cpu_gemms(monkeypatch):
    """The cpu fused head on its fp32-GEMM path, comparable with the reference at the usual
    tolerances; its 16-bit GEMM path (logits rounded once, as PyTorch's own) has its own test."""
    monkeypatch.setenv("UNIF2ACE_CPU_LOWP_GEMM", "0")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN, INF = float("nan"), float("inf")


def _on(backend, *values):
    ok, why = backend_usable(backend, CPU)
    return pytest.param(backend, *values, marks=pytest.mark.skipif(not ok, reason=why))


BACKENDS = [_on("cpu"), _on("triton")]
# d3diff_loss_from_logits also has the cuda row kernels: on the card (gpu) and emulated (cuda_emu)
LOGITS_BACKENDS = BACKENDS + cuda_emu.cuda_backends()


def _dev(backend):
    return cuda_emu.device(backend)


def _to(dev, *xs):
    return [x.to(dev) for x in xs]


def _schedule(N, B=2):
    return dict(
        sample_index=torch.arange(N) % B, mask_rate=torch.rand(B) * 0.8 + 0.1, mask_rate_deriv=torch.rand(B) + 0.1
    )


def _schedule_on(dev, N, B=2):
    return {k: v.to(dev) for k, v in _schedule(N, B).items()}


def _parity(ref, fast, inputs, dtype, **kw):
    fwd_bwd_parity(ref, fast, [x.requires_grad_() for x in inputs], dtype=dtype, equal_nan=True, **kw)


# ------------------------------------------------------------------------------------ NaN / inf

LOGIT_CASES = [
    "nan_masked_row",
    "nan_at_target",
    "nan_among_neg_inf",
    "nan_and_inf_in_ignored_row",
    "neg_inf_vocabulary_mask",
    "neg_inf_at_target",
    "pos_inf",
    "row_all_neg_inf",
]


def _spoiled_logits(case, N, V, dtype):
    """Logits [N, V] and target: rows 0..N-2 masked with targets in the last 4 columns, row N-1
    ignored; then one hostile value pattern."""
    x = randn(N, V, scale=2.0)
    t = torch.randint(V - 4, V, (N,))
    t[-1] = -100
    if case == "nan_masked_row":
        x[1, 3] = NAN
    elif case == "nan_at_target":
        x[1, t[1]] = NAN
    elif case == "nan_among_neg_inf":  # NaN in a masked-vocabulary row: max-folds may skip it
        x[1, : V - 4] = -INF
        x[1, 3] = NAN
    elif case == "nan_and_inf_in_ignored_row":
        x[-1, ::2] = NAN
        x[-1, 1::2] = INF
    elif case == "neg_inf_vocabulary_mask":  # every column but the last 4 (the whole first tile)
        x[:, : V - 4] = -INF
    elif case == "neg_inf_at_target":
        x[2, t[2]] = -INF
    elif case == "pos_inf":
        x[3, 0] = INF
    else:
        x[0] = -INF
    return x.to(dtype), t


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LOGIT_CASES)
def test_from_logits_nan_inf_contract(backend, dtype, case):
    # V = 5000: two vocabulary tiles of the Triton row kernel (4096 + 904), a mask covering the
    # first; CTA rows of the CUDA kernel
    V = 5000 if case == "neg_inf_vocabulary_mask" else 37
    N, dev = 6, _dev(backend)
    x, t = _to(dev, *_spoiled_logits(case, N, V, dtype))
    for reduction, kw in (("none", _schedule_on(dev, N)), ("mean", dict(alpha=0.0))):
        for par in ("posterior", "raw"):

            def run(be, par=par, reduction=reduction, kw=kw):
                return lambda x: tuple(
                    d3diff_loss_from_logits(x, t, backend=be, parametrization=par, reduction=reduction, **kw)
                )

            _parity(run("reference"), run(backend), [x.clone()], dtype)
    # ignored rows: exactly zero gradient, whatever they hold
    xx = x.clone().requires_grad_()
    o = d3diff_loss_from_logits(xx, t, reduction="none", backend=backend, **_schedule_on(dev, N))
    (g,) = torch.autograd.grad(o.loss.sum(), xx)
    assert (g[-1] == 0).all() and o.loss[-1] == 0


HEAD_CASES = [
    "nan_hidden_masked_row",
    "nan_and_inf_hidden_ignored_row",
    "nan_weight_row",
    "neg_inf_bias_vocabulary_mask",
    "pos_inf_bias",
    "nan_bias_all_ignored",
]


def _spoiled_head(case, N, D, V, dtype):
    h, w, b = randn(N, D), randn(V, D, scale=0.3), randn(V)
    t = torch.randint(V - 4, V, (N,))
    t[-1] = -100
    if case == "nan_hidden_masked_row":
        h[1, 2] = NAN
    elif case == "nan_and_inf_hidden_ignored_row":
        h[-1, ::2] = NAN
        h[-1, 1::2] = INF
    elif case == "nan_weight_row":
        w[5, 1] = NAN
    elif case == "neg_inf_bias_vocabulary_mask":  # > one 256-column tile of the interpreter config
        b[: V - 4] = -INF
    elif case == "pos_inf_bias":
        b[7] = INF
    else:
        b[3] = NAN
        t[:] = -100
    return h.to(dtype), w.to(dtype), b.to(dtype), t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", HEAD_CASES)
def test_fused_head_nan_inf_contract(backend, dtype, case):
    N, D, V = 6, 16, 333
    h, w, b, t = _spoiled_head(case, N, D, V, dtype)
    # mean/sum: the cpu backend's gradient-in-forward path; none: the recompute path
    for reduction, kw in (("none", _schedule(N)), ("sum", dict(alpha=0.0))):

        def run(be, reduction=reduction, kw=kw):
            return lambda h, w, b: tuple(d3diff_loss(h, w, t, bias=b, backend=be, reduction=reduction, **kw))

        _parity(run("reference"), run(backend), [h.clone(), w.clone(), b.clone()], dtype)
    if case == "nan_hidden_masked_row":  # where the row feeds: every dW and dbias entry
        hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
        o = d3diff_loss(hh, ww, t, bias=bb, backend=backend, alpha=0.0)
        gh, gw, gb = torch.autograd.grad(o.loss, [hh, ww, bb])
        assert torch.isnan(o.loss) and gw.isnan().all() and gb.isnan().all() and gh[1].isnan().all()
        assert torch.isfinite(gh[[0, 2, 3, 4, 5]]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["nan_hidden_masked_row", "nan_and_inf_hidden_ignored_row", "pos_inf_bias"])
def test_fused_head_nan_inf_cpu_16bit_gemms(dtype, case, monkeypatch):
    """The cpu backend's 16-bit GEMM path follows the contract too (NaN pattern and ±inf)."""
    monkeypatch.setenv("UNIF2ACE_CPU_LOWP_GEMM", "1")
    N, D, V = 6, 16, 333
    h, w, b, t = _spoiled_head(case, N, D, V, dtype)
    for reduction in ("none", "mean"):
        outs = []
        for be in ("reference", "cpu"):
            hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
            o = d3diff_loss(hh, ww, t, bias=bb, backend=be, reduction=reduction, alpha=0.0)
            outs.append([o.loss, *torch.autograd.grad(o.loss.sum(), [hh, ww, bb])])
        for a, r in zip(*outs[::-1]):
            assert torch.equal(a.isnan(), r.isnan()) and torch.equal(a.isinf(), r.isinf())


# ------------------------------------------------------------------------------- large offsets


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5, 1e6, 1e30])
def test_large_common_offsets(backend, offset):
    """fp32 logits ℓ + offset: CE, the score term and the gradients as accurate as the reference's
    (which subtracts the row max before anything is rounded at the offset's scale)."""
    N, V, D = 7, 37, 16
    dev = _dev(backend)
    x, t = randn(N, V, scale=2.0) + offset, torch.randint(0, V, (N,))
    t[-1] = -100
    x, t = _to(dev, x, t)
    sched = _schedule_on(dev, N)
    for par in ("posterior", "radd"):

        def run(be, par=par):
            return lambda x: tuple(
                d3diff_loss_from_logits(x, t, backend=be, parametrization=par, reduction="none", **sched)
            )

        _parity(run("reference"), run(backend), [x], torch.float32)
    if backend == "cuda":
        return
    # fused head: the offset rides in on the bias
    h, w, b = randn(N, D), randn(V, D, scale=0.3), randn(V) + offset

    def head(be):
        return lambda h, w, b: tuple(d3diff_loss(h, w, t, bias=b, backend=be, reduction="none", alpha=0.0))

    _parity(head("reference"), head(backend), [h, w, b], torch.float32)


# ---------------------------------------------------------------------- degenerate, layouts


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
@pytest.mark.parametrize("N,V,D", [(0, 37, 8), (5, 1, 8), (5, 37, 1), (1, 2, 3)])
def test_degenerate_shapes(backend, N, V, D):
    dev = _dev(backend)
    t = torch.randint(0, V, (N,))
    if N > 1:
        t[-1] = -100
    t = t.to(dev)
    sched = _schedule_on(dev, N) if N else dict(alpha=0.0)
    for reduction in ("mean", "none"):

        def logits_run(be, reduction=reduction):
            return lambda x: tuple(d3diff_loss_from_logits(x, t, backend=be, reduction=reduction, **sched))

        _parity(logits_run("reference"), logits_run(backend), _to(dev, randn(N, V)), torch.float32)
        if backend == "cuda":
            continue

        def head_run(be, reduction=reduction):
            return lambda h, w, b: tuple(d3diff_loss(h, w, t, bias=b, backend=be, reduction=reduction, **sched))

        _parity(head_run("reference"), head_run(backend), [randn(N, D), randn(V, D), randn(V)], torch.float32)


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_layouts(backend, dtype):
    """Transposed logits / hidden / weight, a strided bias and a strided target."""
    N, V, D = 9, 37, 16
    dev = _dev(backend)
    t = torch.randint(0, V, (2 * N,)).to(dev)[::2]
    t[3] = -100
    sched = _schedule_on(dev, N)

    def logits_run(be):
        return lambda xt: tuple(d3diff_loss_from_logits(xt.t(), t, backend=be, reduction="none", **sched))

    _parity(logits_run("reference"), logits_run(backend), _to(dev, randn(V, N, dtype=dtype)), dtype)
    if backend == "cuda":
        return
    for reduction in ("none", "mean"):

        def head_run(be, reduction=reduction):
            return lambda ht, wt, b2: tuple(
                d3diff_loss(ht.t(), wt.t(), t, bias=b2[::2], backend=be, reduction=reduction, **sched)
            )

        inputs = [randn(D, N, dtype=dtype), randn(D, V, dtype=dtype, scale=0.3), randn(2 * V, dtype=dtype)]
        _parity(head_run("reference"), head_run(backend), inputs, dtype)


# ------------------------------------------------------------ custom ops: fake vs real, compile


def _custom_op_calls(backend):
    """(name, op, args) for every custom op of the family, on non-contiguous inputs."""
    ops = torch.ops.unif2ace
    N, V, D = 6, 37, 8
    dev = _dev(backend)
    x = randn(V, N, device=dev).t()  # [N, V], column stride N
    h, w = randn(D, N).t(), randn(D, V, scale=0.3).t()
    b = randn(2 * V)[::2]
    t = torch.randint(0, V, (2 * N,), device=dev)[::2]
    t[2] = -100
    stats = ops.lse_gather(x, t, -100, backend)
    row = [randn(2 * N, device=dev)[::2] for _ in range(2)]  # strided upstream gradients
    logits_calls = [
        ("lse_gather", ops.lse_gather, (x, t, -100, backend)),
        ("lse_gather_backward", ops.lse_gather_backward, (x, t, stats[0], stats[1], *row, -100, backend)),
    ]
    if backend == "cuda":
        return logits_calls
    hstats = ops.head_lse_gather(h, w, b, t, -100, backend)
    g = (randn(N, D), randn(V, D), randn(V))
    sched = (torch.arange(N) % 2, torch.tensor([0.3, 0.7]), torch.tensor([1.0, 0.5]))
    calls = logits_calls + [
        ("head_lse_gather", ops.head_lse_gather, (h, w, b, t, -100, backend)),
        ("head_lse_gather_backward", ops.head_lse_gather_backward, (h, w, b, t, *hstats[:2], *row, -100, backend)),
        ("head_grad_anchor", ops.head_grad_anchor, (h, w, b, *g)),
        ("head_lse_gather_attach", ops.head_lse_gather_attach, (h, w, b, t, *hstats, -100, backend)),
    ]
    if backend == "cpu":
        args = (h, w, b, t, *sched, 0.3, "raw", "mean", -100, True, True, backend)
        calls.append(("head_lse_gather_eager_grad", ops.head_lse_gather_eager_grad, args))
    return calls


@pytest.mark.parametrize("backend", LOGITS_BACKENDS)
def test_custom_ops_fake_strides_match_real(backend):
    """Every custom op of the family: the fake implementation's outputs have the real outputs'
    shapes, dtypes and strides on non-contiguous inputs (a mismatch breaks compiled graphs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name, op, args in _custom_op_calls(backend):
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real = real if isinstance(real, (tuple, list)) else (real,)
        fake = fake if isinstance(fake, (tuple, list)) else (fake,)
        assert len(real) == len(fake), name
        for i, (r, f) in enumerate(zip(real, fake)):
            got, want = (f.shape, f.dtype, f.stride()), (r.shape, r.dtype, r.stride())
            assert got == want, f"{name} output {i}: fake {got}, real {want}"


def test_torch_compile_fullgraph_noncontiguous():
    """Both public ops, forward and backward, in one fullgraph-compiled function on transposed
    inputs: from logits, the fused head with reduction none (its backward used to crash the graph
    on a transposed hidden), and the fused head's gradient-in-forward path (reduction mean)."""
    N, V, D = 11, 37, 8
    t = torch.randint(0, V, (N,))
    t[3] = -100
    sched = _schedule(N)

    def f(xt, ht, wt, b):
        a = d3diff_loss_from_logits(xt.t(), t, reduction="none", backend="cpu", **sched)
        c = d3diff_loss(ht.t(), wt.t(), t, bias=b, reduction="none", backend="cpu", **sched)
        e = d3diff_loss(ht.t(), wt.t(), t, bias=b, reduction="mean", backend="cpu", **sched)
        return a.loss, c.loss, c.mask_loss, e.loss, e.score_loss

    torch._dynamo.reset()
    inputs = [randn(V, N), randn(D, N), randn(D, V, scale=0.3), randn(V)]
    fwd_bwd_parity(f, torch.compile(f, fullgraph=True), [x.requires_grad_() for x in inputs])
