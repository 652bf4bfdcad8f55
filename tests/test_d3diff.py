"""D3Diff loss from logits (stem ``d3diff``), fast backends against the reference: loss, parts and
gradients, edge cases, low precision, compile -- parametrised over the backend (cpu: C++ row
kernels; triton: the interpreter on CPU; cuda: csrc/cuda/d3diff.cu on a GPU, marked gpu, and through
the CPU emulator of the CUDA kernels, marked cuda_emu) -- and, per backend,
the row kernels' own outputs (lse, tgt, gradient; every element written), the CUDA row geometry
(warp/CTA rows, misaligned rows, 64-bit offsets), and backend selection."""

import pytest
import torch

# the package re-exports the function d3diff_loss, which shadows the submodule's attribute name
import unif2ace.kernels.d3diff as d3mod
from unif2ace.kernels import BackendUnavailableError, _ext, d3diff_loss_from_logits, set_value_checks, use_backend
from unif2ace.kernels._dispatch import backend_usable
from unif2ace.testing import assert_all_written, assert_close, cuda_emu, fwd_bwd_parity, poison_, poisoned_empty, randn

CPU = torch.device("cpu")
# the cuda backend on the card (marked gpu) and through the CPU emulator (marked cuda_emu)
CUDA = cuda_emu.cuda_backends()
BACKENDS = ["cpu", "triton", *CUDA]


def _backend_cases(*rows):
    """pytest params (backend, *values): a cuda row runs on the card (marked gpu) and emulated."""
    out = []
    for r in rows:
        out += cuda_emu.cuda_backends(*r[1:]) if r[0] == "cuda" else [r]
    return out


@pytest.fixture
def dev(backend):
    """The device of the backend's tensors (CPU for cpu, triton and the emulated cuda, CUDA for
    cuda on the card); skips where the backend cannot run."""
    d = cuda_emu.device(backend)
    ok, why = backend_usable(backend, d)
    if not ok:
        pytest.skip(why)
    return d


def _schedule(N, B, device=CPU):
    si = torch.randint(0, B, (N,))
    m = torch.rand(B) * 0.8 + 0.1
    dm = torch.rand(B) + 0.1
    return si.to(device), m.to(device), dm.to(device)


def _target(N, V, device=CPU, masked_frac=0.6):
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) > masked_frac] = -100
    return t.to(device)


def _parity(backend, logits, target, *, dtype=torch.float32, scale=1.0, **kw):
    def run(be):
        return lambda x: tuple(d3diff_loss_from_logits(x, target, backend=be, **kw))

    fwd_bwd_parity(
        run("reference"), run(backend), [logits.requires_grad_()], dtype=dtype, scale=scale, names=["logits"]
    )


def _parity_each(backend, logits, target, parametrizations=("posterior", "raw"), **kw):
    for par in parametrizations:
        _parity(backend, logits.clone(), target, parametrization=par, **kw)


# ------------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "N,V,parametrization",
    [(n, v, p) for n, v in ((1, 111), (33, 111), (5, 8192)) for p in ("posterior", "raw", "radd")]
    + [(423, 111, "posterior")],
)
def test_parity_fp32(backend, dev, N, V, parametrization):
    B = 3
    logits = randn(N, V, scale=2.0, device=dev)
    target = _target(N, V, dev)
    target[0] = 1  # at least one masked row
    si, m, dm = _schedule(N, B, dev)
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


@pytest.mark.parametrize("backend,V", _backend_cases(("cpu", 111), ("triton", 111), ("cuda", 333)))
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_parity_reductions_nonuniform_upstream(backend, V, dev, reduction):
    # fwd_bwd_parity feeds random (non-uniform) gradients into all three outputs
    N, B = 57, 4
    logits, target = randn(N, V, device=dev), _target(N, V, dev)
    si, m, dm = _schedule(N, B, dev)
    _parity_each(backend, logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_d_input(backend, dev):
    B, L, V = 3, 11, 111
    logits = randn(B, L, V, device=dev)
    target = _target(B * L, V, dev).reshape(B, L)
    m, dm = (torch.rand(B) * 0.8 + 0.1).to(dev), torch.rand(B).to(dev)
    _parity(backend, logits, target, mask_rate=m, mask_rate_deriv=dm, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_rows(backend, dev):
    N, V = 19, 111
    wide = randn(N, V + 37, device=dev)
    logits = wide[:, 5 : 5 + V]
    assert not logits.is_contiguous()
    target = _target(N, V, dev)
    si, m, dm = _schedule(N, 2, dev)

    def run(be):
        return lambda w: tuple(
            d3diff_loss_from_logits(
                w[:, 5 : 5 + V], target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend=be
            )
        )

    fwd_bwd_parity(run("reference"), run(backend), [wide.requires_grad_()])


@pytest.mark.parametrize("backend,V", _backend_cases(("cpu", 111), ("triton", 111), ("cuda", 3000)))
def test_all_rows_ignored(backend, V, dev):
    N = 9
    logits = randn(N, V, device=dev).requires_grad_()
    target = torch.full((N,), -100, device=dev)
    si, m, dm = _schedule(N, 2, dev)
    for red in ("mean", "sum", "none"):
        o = d3diff_loss_from_logits(
            logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, reduction=red, backend=backend
        )
        for t in o:
            assert torch.isfinite(t).all() and (t == 0).all()
        (g,) = torch.autograd.grad(o.loss.sum(), logits)
        assert (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_masked_row(backend, dev):
    N, V = 21, 111
    target = torch.full((N,), -100, device=dev)
    target[13] = 77
    si, m, dm = _schedule(N, 2, dev)
    _parity(backend, randn(N, V, device=dev), target, sample_index=si, mask_rate=m, mask_rate_deriv=dm)


@pytest.mark.parametrize("backend,V", _backend_cases(("cpu", 111), ("triton", 111), ("cuda", 111), ("cuda", 8192)))
def test_extreme_logits(backend, V, dev):
    N = 17
    logits = randn(N, V, scale=1e4, device=dev).clamp(-1e4, 1e4)
    logits[0, :] = -1e4
    logits[0, 3] = 1e4
    logits[1, :] = 1e4  # uniform row at +1e4
    target = _target(N, V, dev)
    target[:2] = torch.tensor([3, 5], device=dev)
    si, m, dm = _schedule(N, 2, dev)
    _parity(backend, logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_overflow_regime(backend, dev):
    N, V = 23, 111
    logits = randn(N, V, device=dev) + 100.0  # LSE − c ≈ 100: exp overflows fp32, the guard is linear
    target = _target(N, V, dev)
    target[0] = 4
    si, m, dm = _schedule(N, 3, dev)
    x = logits.clone().requires_grad_()
    o = d3diff_loss_from_logits(
        x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization="raw", backend=backend
    )
    assert torch.isfinite(o.loss) and o.score_loss.item() > 1e26
    assert torch.isfinite(torch.autograd.grad(o.loss, x)[0]).all()
    _parity(backend, logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization="raw")


@pytest.mark.parametrize("backend,V", _backend_cases(("cpu", 111), ("triton", 111), ("cuda", 5000)))
def test_alpha_zero_plain_cross_entropy(backend, V, dev):
    N = 45
    logits, target = randn(N, V, device=dev), _target(N, V, dev)
    _parity(backend, logits, target, alpha=0.0)
    x = logits.clone().requires_grad_()
    o = d3diff_loss_from_logits(x, target.to(torch.int32), alpha=0.0, backend=backend)
    assert_close(o.loss, torch.nn.functional.cross_entropy(logits, target, ignore_index=-100))
    assert o.score_loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dev, dtype):
    N, V = 37, 111
    logits = randn(N, V, dtype=dtype, scale=2.0, device=dev)
    target = _target(N, V, dev)
    si, m, dm = _schedule(N, 3, dev)
    _parity_each(backend, logits, target, dtype=dtype, sample_index=si, mask_rate=m, mask_rate_deriv=dm)
    # grad dtype follows the logits
    x = logits.clone().requires_grad_()
    o = d3diff_loss_from_logits(x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend=backend)
    assert o.loss.dtype == torch.float32
    assert torch.autograd.grad(o.loss, x)[0].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_without_value_checks_is_nan_not_a_crash(backend, dev):
    N, V = 7, 111
    x, t = randn(N, V, device=dev), torch.randint(0, V, (N,))
    t[2] = V + 1000
    set_value_checks(False)
    try:
        o = d3diff_loss_from_logits(x, t.to(dev), alpha=0.0, reduction="none", backend=backend)
    finally:
        set_value_checks(None)
    assert torch.isnan(o.loss[2]) and torch.isfinite(o.loss[torch.arange(N, device=dev) != 2]).all()


@pytest.mark.parametrize("backend,V", _backend_cases(("cpu", 111), ("cuda", 4099)))
def test_torch_compile_fullgraph(backend, V, dev):
    N, B = 29, 2
    logits, target = randn(N, V, device=dev), _target(N, V, dev)
    si, m, dm = _schedule(N, B, dev)

    def f(x):
        o = d3diff_loss_from_logits(x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend=backend)
        return o.loss, o.mask_loss, o.score_loss

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    fwd_bwd_parity(f, cf, [logits.requires_grad_()])


# ------------------------------------------------------------------------------- row kernels


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


@pytest.mark.parametrize("backend", ["triton"])
def test_lse_gather_triton_writes_every_element(backend, dev):
    k = d3mod.OP_FROM_LOGITS.kernels(backend)
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


@pytest.mark.parametrize("backend", ["cpu"])
def test_lse_gather_cpu_row_kernel(backend, dev):
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


def _poison_cache(nbytes, device):
    """Leave NaN-filled blocks in the caching allocator, so the next outputs of about this size
    start as NaN (the ops allocate their outputs themselves)."""
    junk = [poison_(torch.empty(nbytes // 4 + 64, device=device)) for _ in range(2)]
    del junk


def _cuda_target(N, V, device):
    t = _target(N, V, device)
    t[0] = min(1, V - 1)
    return t


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# V: shorter than a warp and than the 16-byte vector (1, 7), a warp's worth (31), warp/CTA rows
@pytest.mark.parametrize("N,V", [(5, 1), (9, 7), (4, 31), (33, 111), (6, 8192), (3, 33333)])
def test_cuda_row_kernels_write_every_element(backend, dev, dtype, N, V):
    from unif2ace.kernels import _ext

    ops = _ext.cuda_ops()
    x, t = randn(N, V, device=dev, dtype=dtype, scale=2.0), _cuda_target(N, V, dev)
    t[1] = V + 5  # out of range: tgt NaN, no one-hot term, no crash
    _poison_cache(N * 4, dev)
    lse, tgt = ops.lse_gather(x, t, -100)
    assert_all_written(lse, "lse")
    valid = (t != -100) & (t < V)
    zero = torch.zeros((), device=dev)
    assert_close(lse, torch.where(t != -100, torch.logsumexp(x.float(), 1), zero), name="lse")
    want_tgt = torch.where(valid, x.float().gather(1, t.clamp(0, V - 1)[:, None]).squeeze(1), zero)
    keep = torch.arange(N, device=dev) != 1
    assert_close(tgt[keep], want_tgt[keep], name="tgt")
    assert torch.isnan(tgt[1])
    gl, gt = torch.randn(N, device=dev), torch.randn(N, device=dev)
    _poison_cache(N * V * x.element_size(), dev)
    g = ops.lse_gather_backward(x, t, lse, gl, gt, -100)
    assert g.dtype == dtype and g.is_contiguous()
    assert_all_written(g, "grad")
    want = gl[:, None] * torch.softmax(x.float(), 1)
    rows = valid.nonzero().squeeze(1)
    want[rows, t[rows]] += gt[rows]
    want[t == -100] = 0
    assert_close(g, want, dtype, name="grad")


# ------------------------------------------------------------------------------- cuda geometry


# V: warp rows (<= 2048), 256-thread CTA rows, 512-thread CTA rows; odd V exercises the scalar tail
@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,V", [(1, 111), (33, 111), (37, 2048), (9, 8191), (5, 40001)])
@pytest.mark.parametrize("parametrization", ["posterior", "raw"])
def test_cuda_parity(backend, dev, dtype, N, V, parametrization):
    logits = randn(N, V, device=dev, dtype=dtype, scale=2.0)
    target = _cuda_target(N, V, dev)
    si, m, dm = _schedule(N, 3, dev)
    _parity(
        backend,
        logits,
        target,
        dtype=dtype,
        sample_index=si,
        mask_rate=m,
        mask_rate_deriv=dm,
        alpha=0.3,
        parametrization=parametrization,
    )


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_cuda_misaligned_rows(backend, dev, dtype, offset):
    # rows starting off a 16-byte boundary (column offset) and row strides that are not a multiple
    # of the vector width: scalar head + vector body + scalar tail, input/output phases differ
    N, V = 13, 1000 + offset
    wide = randn(N, V + 2 * offset + 7, device=dev, dtype=dtype)
    target = _cuda_target(N, V, dev)
    si, m, dm = _schedule(N, 2, dev)

    def run(be):
        return lambda w: tuple(
            d3diff_loss_from_logits(
                w[:, offset : offset + V], target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend=be
            )
        )

    fwd_bwd_parity(run("reference"), run(backend), [wide.requires_grad_()], dtype=dtype)


@pytest.mark.parametrize("backend", CUDA[:1])  # 8 GiB of buffers: on the card only
def test_cuda_large_row_offsets_64bit(backend, dev):
    # rows whose element offset i * ld exceeds 2^31 (int32 indexing would wrap): a bf16 [rows, V]
    # buffer of just over 2^31 elements (4 GiB), only the last two rows carry loss
    from unif2ace.kernels import _ext

    V = 4096
    rows = 2**31 // V + 2
    if torch.cuda.mem_get_info(dev)[0] < rows * V * 2 * 3:
        pytest.skip("not enough free GPU memory for the 64-bit offset check")
    big = torch.empty(rows, V, device=dev, dtype=torch.bfloat16)
    big[-2:].normal_()
    t = torch.full((rows,), -100, device=dev)
    t[-2:] = torch.tensor([7, 11], device=dev)
    lse, tgt = _ext.cuda_ops().lse_gather(big, t, -100)
    x = big[-2:].float()
    assert_close(lse[-2:], torch.logsumexp(x, 1), name="lse")
    assert_close(tgt[-2:], x.gather(1, t[-2:, None]).squeeze(1), name="tgt")
    assert (lse[:-2] == 0).all()
    gl, gt = torch.ones(rows, device=dev), torch.zeros(rows, device=dev)
    g = _ext.cuda_ops().lse_gather_backward(big, t, lse, gl, gt, -100)
    assert_close(g[-2:].float(), torch.softmax(x, 1), torch.bfloat16, name="grad")
    assert (g[0] == 0).all()


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_raw_ops_check_their_inputs(backend, dev):
    ops = _ext.cuda_ops()
    elsewhere = torch.device("meta") if dev.type == "cpu" else CPU  # not the kernels' device
    x, t = randn(4, 10, device=dev), torch.zeros(4, dtype=torch.long, device=dev)
    with pytest.raises(RuntimeError, match="logits must be a CUDA"):
        ops.lse_gather(x.to(elsewhere), t, -100)
    with pytest.raises(RuntimeError, match="target must be on"):
        ops.lse_gather(x, t.to(elsewhere), -100)
    with pytest.raises(RuntimeError, match="target must be \\[N\\]"):
        ops.lse_gather(x, t[:3], -100)
    with pytest.raises(RuntimeError, match="target must be int64"):
        ops.lse_gather(x, t.int(), -100)
    with pytest.raises(RuntimeError, match="logits must be float32, float16 or bfloat16"):
        ops.lse_gather(x.double(), t, -100)
    lse = torch.zeros(4, device=dev)
    with pytest.raises(RuntimeError, match="must be fp32 \\[N\\]"):
        ops.lse_gather_backward(x, t, lse[:2], lse, lse, -100)
    with pytest.raises(RuntimeError, match="must be fp32 \\[N\\]"):
        ops.lse_gather_backward(x, t, lse, lse.to(elsewhere), lse, -100)


NAN_CONTRACT = pytest.mark.xfail(reason="NaN contract: issue 18", strict=False)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("V", [100, 5000])  # warp rows, CTA rows
@pytest.mark.parametrize(
    "case",
    [
        "nan",
        "neg_inf_entries",
        "neg_inf_row",
        pytest.param("pos_inf_entry", marks=NAN_CONTRACT),  # rows: lse NaN (inf - inf), the reference inf
        pytest.param("pos_inf_row", marks=NAN_CONTRACT),
    ],
)
def test_cuda_row_kernels_nonfinite_logits(backend, dev, V, case):
    N = 6
    x = randn(N, V, device=dev)
    t = torch.tensor([1, 2, 3, 4, -100, 5], device=dev)
    if case == "nan":
        x[0, 7] = float("nan")
        x[1, 2] = float("nan")  # at the target
    elif case == "neg_inf_entries":
        x[0, :50] = float("-inf")
        x[1, 2] = float("-inf")  # at the target
    elif case == "neg_inf_row":
        x[0, :] = float("-inf")
    elif case == "pos_inf_entry":
        x[0, 7] = float("inf")
    else:
        x[0, :] = float("inf")
    ops = _ext.cuda_ops()
    lse, tgt = ops.lse_gather(x, t, -100)
    valid = t != -100
    zero = torch.zeros((), device=dev)
    want_lse = torch.where(valid, torch.logsumexp(x, 1), zero)
    want_tgt = torch.where(valid, x.gather(1, t.clamp_min(0)[:, None]).squeeze(1), zero)
    torch.testing.assert_close(lse, want_lse, equal_nan=True)
    torch.testing.assert_close(tgt, want_tgt, equal_nan=True)
    gl, gt = torch.ones(N, device=dev), torch.ones(N, device=dev)
    g = ops.lse_gather_backward(x, t, lse, gl, gt, -100)
    want = torch.softmax(x, 1)
    want[valid, t[valid]] += 1
    want[~valid] = 0
    torch.testing.assert_close(g, want, equal_nan=True)


# ------------------------------------------------------------------------------- selection


def test_backend_selection():
    N, V = 5, 111
    x, t = randn(N, V), _target(N, V)
    if backend_usable("cpu", CPU)[0]:
        assert d3mod.OP_FROM_LOGITS.select(CPU) == "cpu"
        assert d3mod.OP_HEAD.select(CPU) == "cpu"
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
