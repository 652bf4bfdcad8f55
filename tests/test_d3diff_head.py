"""The D3Diff loss fused with the LM head (stem ``d3diff_head``, ``d3diff_loss``), fast backends
against the reference: loss, parts and gradients for hidden/weight/bias, low precision, edge
cases -- parametrised over the backend (cpu: row-chunked, chunks of 7 rows here; triton:
vocabulary-tiled) -- then what is particular to each backend.

triton: masked-row compaction (tile counts), both backward schemes, the split-precision gradient,
GPU-marked tests with real shapes. On CPU the kernels run under the Triton interpreter (root
conftest), ~1 ms per program instance, so shapes are small and tiles large. Two launch configs are
exercised: the interpreter default (one vocabulary split, one K step for D <= 128) and a "multi"
config (BLOCK_M 16/32, BLOCK_V 64/128, BLOCK_K 32, 3 splits) that hits several row blocks,
vocabulary tiles, splits and K steps.

cpu: the row chunking, the gradient-during-forward path (reduction mean/sum with a gradient
needed: dhidden/dweight/dbias computed per chunk in the forward, scaled in the backward) and the
recompute path (reduction none, no grad, or HEAD_EAGER_GRAD off), the in-place C++ row gradient.
"""

import pytest
import torch
import torch.nn.functional as F

import unif2ace.kernels._custom_ops.d3diff as custom_ops
import unif2ace.kernels.cpu as cpu
import unif2ace.kernels.cpu.d3diff_head as cpu_head

# the package re-exports the function d3diff_loss, which shadows the submodule's attribute name
import unif2ace.kernels.d3diff as d3mod
from unif2ace.kernels import d3diff_loss, d3diff_loss_from_logits, set_value_checks
from unif2ace.kernels._dispatch import backend_usable
from unif2ace.testing import assert_all_written, assert_close, fwd_bwd_parity, randn

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

CPU = torch.device("cpu")
TRITON_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on(backend, *values):
    """A pytest param (backend, *values), skipped where the backend cannot run on its device."""
    ok, why = backend_usable(backend, TRITON_DEV if backend == "triton" else CPU)
    return pytest.param(backend, *values, marks=pytest.mark.skipif(not ok, reason=why))


BACKENDS = [_on("cpu"), _on("triton")]
TRITON = [_on("triton")]
CPU_ONLY = [_on("cpu")]
CONFIGS = {  # triton launch configs (interpreter only: on CUDA the real table is used)
    "default": None,
    "multi": dict(block_m=32, block_v=128, block_k=32, num_warps=4, num_stages=1, splits=3),
    "multi_small": dict(block_m=16, block_v=64, block_k=32, num_warps=4, num_stages=1, splits=3),
}


def _triton():
    """The triton kernels of the op (imported on first use: the cpu tests run without triton)."""
    return d3mod.OP_HEAD.kernels("triton")


def _config(name):
    return None if CONFIGS[name] is None else _triton().FusedConfig(**CONFIGS[name])


@pytest.fixture
def dev(backend):
    """The device of the backend's tensors."""
    return TRITON_DEV if backend == "triton" else CPU


@pytest.fixture
def configure(monkeypatch):
    """Set a backend up: triton's launch config and backward scheme, or cpu's small chunks."""

    def set_(backend, cfg="default", deterministic=True):
        if backend == "triton":
            k = _triton()
            monkeypatch.setattr(k, "DETERMINISTIC", deterministic)
            if CONFIGS[cfg] is not None and TRITON_DEV.type == "cpu":
                monkeypatch.setattr(k, "INTERPRETER_CONFIG", _config(cfg))
        else:
            monkeypatch.setattr(cpu_head, "CHUNK_ROWS", 7)  # several chunks, ragged last one
            monkeypatch.setattr(cpu_head, "CHUNK_BYTES", 1)  # (then CHUNK_ROWS rows per chunk)

    return set_


def _target(N, V, masked_frac=0.6):
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) > masked_frac] = -100
    return t


def _schedule(N, B):
    return torch.randint(0, B, (N,)), torch.rand(B) * 0.8 + 0.1, torch.rand(B) + 0.1


def _oracle(backend, dtype, target, **kw):
    """(function, tolerance scale) ``backend`` is compared with: the reference -- or, for the cpu
    backend's 16-bit GEMM path (logits and dℓ rounded once to the GEMM dtype), the reference loss
    on the logits of PyTorch's own 16-bit ``F.linear``, whose autograd rounds them identically;
    tolerance ×4 there: the tests use many 7-row chunks, and each chunk's dW is rounded once before
    the fp32 sum."""
    if backend == "cpu" and cpu_head.gemm_dtype(dtype) != torch.float32:

        def lowp(h, w, *rest):
            logits = F.linear(h, w, rest[0] if rest else None)
            return tuple(d3diff_loss_from_logits(logits, target, backend="reference", **kw))

        return lowp, 4.0

    def ref(h, w, *rest):
        return tuple(d3diff_loss(h, w, target, bias=rest[0] if rest else None, backend="reference", **kw))

    return ref, 1.0


def _parity(backend, h, w, b, target, *, dtype=torch.float32, scale=1.0, **kw):
    inputs = [h.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if b is not None else [])

    def f(h, w, *rest):
        return tuple(d3diff_loss(h, w, target, bias=rest[0] if rest else None, backend=backend, **kw))

    oracle, oscale = _oracle(backend, dtype, target, **kw)
    fwd_bwd_parity(oracle, f, inputs, dtype=dtype, scale=scale * oscale, names=["hidden", "weight", "bias"])


def _fresh(*xs):
    """Detached copies (new leaves for one more parity run)."""
    return [x.detach().clone() for x in xs]


def _inputs(N, D, V, dtype=torch.float32, bias=True, device=TRITON_DEV):
    h = randn(N, D, dtype=dtype, device=device)
    w = randn(V, D, dtype=dtype, device=device, scale=D**-0.5 * 2)
    b = randn(V, dtype=dtype, device=device) if bias else None
    return h, w, b


# ----------------------------------------------------------------------------------- parity

_SHAPES = [  # N, V, D, parametrization, bias, triton config, deterministic triton backward
    (1, 111, 64, "posterior", True, "default", True),
    (33, 111, 96, "raw", True, "multi", True),
    (33, 111, 64, "radd", False, "default", False),
    (100, 1000, 64, "posterior", True, "default", True),
    (100, 1000, 96, "posterior", True, "multi", True),
    (100, 1000, 96, "raw", False, "multi", False),
    (97, 1000, 96, "radd", True, "multi_small", True),
    (33, 1000, 64, "posterior", True, "multi_small", False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,V,D,par,bias,cfg,det", _SHAPES)
def test_parity_fp32(backend, dev, configure, N, V, D, par, bias, cfg, det):
    configure(backend, cfg, det)
    h, w, b = _inputs(N, D, V, bias=bias, device=dev)
    target = _target(N, V)
    target[0] = 3
    si, m, dm = _schedule(N, 3)
    _parity(
        backend,
        h,
        w,
        b,
        target.to(dev),
        sample_index=si.to(dev),
        mask_rate=m.to(dev),
        mask_rate_deriv=dm.to(dev),
        alpha=0.3,
        parametrization=par,
    )


@pytest.mark.parametrize(
    "backend,cfg,det", [_on("triton", "default", True), _on("triton", "multi", False), _on("cpu", "default", True)]
)
def test_reductions_nonuniform_upstream_and_3d(backend, dev, configure, cfg, det):
    # fwd_bwd_parity feeds fresh random (non-uniform) gradients into loss, mask_loss, score_loss
    configure(backend, cfg, det)
    B, L, D, V = 3, 23, 64, 333
    h, w, b = _inputs(B * L, D, V, device=dev)
    target = _target(B * L, V).reshape(B, L).to(dev)
    m, dm = (torch.rand(B) * 0.8 + 0.1).to(dev), (torch.rand(B) + 0.1).to(dev)
    for red, par in (("none", "posterior"), ("none", "raw"), ("sum", "radd")):
        kw = dict(mask_rate=m, mask_rate_deriv=dm, reduction=red, parametrization=par)
        _parity(backend, *_fresh(h.reshape(B, L, D), w, b), target, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_zero_plain_cross_entropy(backend, dev, configure):
    configure(backend, "multi")
    N, D, V = 45, 64, 111
    h, w, b = _inputs(N, D, V, device=dev)
    target = _target(N, V).to(dev)
    _parity(backend, h.clone(), w.clone(), b.clone(), target, alpha=0.0)
    o = d3diff_loss(h, w, target.to(torch.int32), bias=b, alpha=0.0, backend=backend)
    assert_close(o.loss, F.cross_entropy(F.linear(h, w, b), target, ignore_index=-100))
    assert o.score_loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_masked_row(backend, dev, configure):
    configure(backend, "multi")
    N, D, V = 70, 64, 111
    target = torch.full((N,), -100)
    target[41] = 77  # lands in the first compacted row block, far from row 0
    si, m, dm = _schedule(N, 2)
    h, w, b = _inputs(N, D, V, device=dev)
    _parity(backend, h, w, b, target.to(dev), sample_index=si.to(dev), mask_rate=m.to(dev), mask_rate_deriv=dm.to(dev))


@pytest.mark.parametrize("backend,det", [_on("triton", True), _on("triton", False), _on("cpu", True)])
def test_all_rows_ignored(backend, dev, configure, det):
    configure(backend, "multi", det)
    N, D, V = 40, 64, 111
    h, w, b = (x.requires_grad_() for x in _inputs(N, D, V, device=dev))
    target = torch.full((N,), -100, device=dev)
    si, m, dm = (x.to(dev) for x in _schedule(N, 2))
    for red in ("mean", "sum", "none"):
        o = d3diff_loss(
            h, w, target, bias=b, sample_index=si, mask_rate=m, mask_rate_deriv=dm, reduction=red, backend=backend
        )
        for t in o:
            assert torch.isfinite(t).all() and (t == 0).all()
        for g in torch.autograd.grad(o.loss.sum(), [h, w, b]):
            assert (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dev, configure, dtype):
    configure(backend, "multi")
    N, D, V = 57, 96, 333
    h, w, b = _inputs(N, D, V, dtype=dtype, device=dev)
    target = _target(N, V).to(dev)
    si, m, dm = (x.to(dev) for x in _schedule(N, 3))
    for par in ("posterior", "raw"):
        kw = dict(sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization=par)
        _parity(backend, *_fresh(h, w, b), target, dtype=dtype, **kw)
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    o = d3diff_loss(hh, ww, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend=backend)
    assert o.loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(o.loss, [hh, ww])
    assert gh.dtype == dtype and gw.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, dev, configure):
    configure(backend, "default")
    N, D, V = 29, 64, 111
    wide = randn(N, D + 11, device=dev)
    wt = randn(D, V, device=dev, scale=0.25)  # weight = wt.T: column stride V, copied by the launcher
    target = _target(N, V).to(dev)

    def run(be):
        return lambda x, y: tuple(d3diff_loss(x[:, 3 : 3 + D], y.t(), target, alpha=0.0, backend=be))

    fwd_bwd_parity(run("reference"), run(backend), [wide.requires_grad_(), wt.requires_grad_()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_without_value_checks_is_nan_not_a_crash(backend, dev):
    N, D, V = 7, 64, 111
    h, w, _ = _inputs(N, D, V, bias=False, device=dev)
    t = torch.randint(0, V, (N,))
    t[2] = V + 1000
    set_value_checks(False)
    try:
        o = d3diff_loss(h, w, t.to(dev), alpha=0.0, reduction="none", backend=backend)
    finally:
        set_value_checks(None)
    assert torch.isnan(o.loss[2]) and torch.isfinite(o.loss[torch.arange(N, device=dev) != 2]).all()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, dev):
    N, D, V = 29, 64, 111
    h, w, b = _inputs(N, D, V, device=dev)
    target = _target(N, V).to(dev)

    def f(h, w, b):
        o = d3diff_loss(h, w, target, bias=b, alpha=0.0, backend=backend)
        return o.loss, o.mask_loss

    torch._dynamo.reset()
    fwd_bwd_parity(f, torch.compile(f, fullgraph=True), [h.requires_grad_(), w.requires_grad_(), b.requires_grad_()])


# ------------------------------------------------------------------- triton: kernels directly


def _ref_parts(h, w, b, t):
    logits = F.linear(h.float(), w.float(), None if b is None else b.float())
    valid = t != -100
    mx = torch.where(valid, logits.amax(1), 0.0)
    lse_rel = torch.where(valid, torch.logsumexp(logits - mx[:, None], 1), 0.0)
    tgt = torch.where(valid, logits.gather(1, t.clamp_min(0)[:, None]).squeeze(1), 0.0)
    return logits, valid, (mx, lse_rel, tgt)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("cfg", ["multi", "multi_small"])
@pytest.mark.parametrize("det", [True, False])
def test_ignored_rows_are_skipped_and_every_output_written(backend, dev, cfg, det):
    """Logit-tile counts follow the number of rows that carry loss, not N; hand-counted. The dW
    kernel shares the row blocks that carry loss (from the device count) evenly among its row
    splits, whose number is planned for all N rows (counted per split)."""
    k, cfg = _triton(), _config(cfg)
    N, D, V = 100, 64, 333
    h, w, b = _inputs(N, D, V)
    n_tiles = -(-V // cfg.block_v)
    S_w, _ = k._split(-(-N // cfg.block_m), n_tiles, cfg, dev)
    assert S_w > 1
    for n_valid in (0, 1, 17, 40, 100):
        t = torch.full((N,), -100)
        keep = torch.randperm(N)[:n_valid]
        t[keep] = torch.randint(0, V, (n_valid,))
        t = t.to(dev)
        row_blocks = -(-n_valid // cfg.block_m)
        ctr = torch.zeros(1, dtype=torch.int32, device=dev)
        stats = k.head_lse_gather(h, w, b, t, -100, config=cfg, debug_counter=ctr)
        assert int(ctr) == row_blocks * n_tiles, f"forward: {int(ctr)} tiles for {n_valid} valid rows"
        logits, valid, want = _ref_parts(h, w, b, t)
        for x, x_r, name in zip(stats, want, ("row_max", "lse_rel", "tgt")):
            assert_all_written(x, name)
            assert_close(x, x_r, name=name)

        gl, gt = randn(N, device=dev), randn(N, device=dev)
        ctr = torch.zeros(1 + S_w, dtype=torch.int32, device=dev)
        gh, gw, gb = k.head_lse_gather_backward(
            h, w, b, t, *stats[:2], gl, gt, -100, config=cfg, deterministic=det, debug_counter=ctr
        )
        per_pass = row_blocks * n_tiles
        assert int(ctr[0]) == (2 * per_pass if det else per_pass), f"backward: {int(ctr[0])} tiles for {n_valid} rows"
        if det:
            per = -(-row_blocks // S_w)
            want = [max(0, min(per, row_blocks - s * per)) * n_tiles for s in range(S_w)]
            assert ctr[1:].tolist() == want, f"dW row splits for {n_valid} valid rows"
        for x, name in ((gh, "grad_hidden"), (gw, "grad_weight"), (gb, "grad_bias")):
            assert_all_written(x, name)
        g = gl[:, None] * torch.softmax(logits, 1)
        g[valid, t[valid]] += gt[valid]
        g[~valid] = 0
        assert_close(gh, g @ w, name="grad_hidden")
        assert_close(gw, g.t() @ h, name="grad_weight")
        assert_close(gb, g.sum(0), name="grad_bias")
        assert (gh[~valid] == 0).all()


@pytest.mark.parametrize("backend", TRITON)
def test_hand_computed_small_case(backend, dev):
    """N = 2, D = 16, V = 3 with integer-valued inputs: lse and tgt in closed form."""
    D = 16
    h = torch.zeros(2, D, device=dev)
    h[0, 0], h[1, 1] = 1.0, 2.0
    w = torch.zeros(3, D, device=dev)
    w[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    w[:, 1] = torch.tensor([0.0, 1.0, -1.0])
    b = torch.tensor([0.5, 0.0, 0.0], device=dev)
    # logits: row 0 = [1.5, 2, 3], row 1 = [0.5, 2, -2]
    t = torch.tensor([2, 0], device=dev)
    mx, lse_rel, tgt = _triton().head_lse_gather(h, w, b, t, -100)
    assert_close(mx, torch.tensor([3.0, 2.0], device=dev), name="row_max")
    lse = mx + lse_rel
    want_lse = torch.tensor(
        [torch.logsumexp(torch.tensor([1.5, 2.0, 3.0]), 0), torch.logsumexp(torch.tensor([0.5, 2.0, -2.0]), 0)]
    )
    assert_close(lse, want_lse.to(dev), name="lse")
    assert_close(tgt, torch.tensor([3.0, 0.5], device=dev), name="tgt")


@pytest.mark.parametrize("backend", TRITON)
def test_deterministic_and_atomic_schemes_agree(backend, dev):
    k = _triton()
    N, D, V = 64, 96, 333
    h, w, b = _inputs(N, D, V)
    t = _target(N, V).to(dev)
    cfg = _config("multi_small") if dev.type == "cpu" else None
    mx, lse_rel, _ = k.head_lse_gather(h, w, b, t, -100, config=cfg)
    gl, gt = randn(N, device=dev), randn(N, device=dev)
    a = k.head_lse_gather_backward(h, w, b, t, mx, lse_rel, gl, gt, -100, deterministic=True, config=cfg)
    a2 = k.head_lse_gather_backward(h, w, b, t, mx, lse_rel, gl, gt, -100, deterministic=True, config=cfg)
    c = k.head_lse_gather_backward(h, w, b, t, mx, lse_rel, gl, gt, -100, deterministic=False, config=cfg)
    for x, x2, y, name in zip(a, a2, c, ("grad_hidden", "grad_weight", "grad_bias")):
        assert torch.equal(x, x2), f"{name}: deterministic scheme not bitwise reproducible"
        assert_close(x, y, name=name)


@pytest.mark.parametrize("backend", TRITON)
def test_precise_grad_split_beats_single_rounding(backend, dev):
    """bf16: dℓ as a hi + lo pair is closer to the fp32-dℓ result than dℓ rounded once."""
    k = _triton()
    N, D, V = 48, 64, 200
    h, w, b = _inputs(N, D, V, dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), device=dev)
    mx, lse_rel, _ = k.head_lse_gather(h, w, b, t, -100)
    gl, gt = randn(N, device=dev, scale=20.0), randn(N, device=dev, scale=20.0)
    logits, valid, _ = _ref_parts(h, w, b, t)
    g = gl[:, None] * torch.softmax(logits, 1)
    g[valid, t[valid]] += gt[valid]
    want = (g @ w.float(), g.t() @ h.float())
    err = {}
    for precise in (True, False):
        gh, gw, _ = k.head_lse_gather_backward(h, w, b, t, mx, lse_rel, gl, gt, -100, precise_grad=precise)
        err[precise] = [(x.float() - y).abs().max().item() for x, y in zip((gh, gw), want)]
    for i, name in enumerate(("grad_hidden", "grad_weight")):
        ulp = want[i].abs().max().item() * 2.0**-8
        assert err[True][i] <= ulp, f"{name}: precise error {err[True][i]} above one bf16 ulp {ulp}"
        assert err[True][i] < err[False][i], f"{name}: split {err[True][i]} not better than single {err[False][i]}"


class _OperandDtypes:
    """Records the dtypes of (hidden, weight, bias) every kernel entry point of a backend gets."""

    ENTRY_POINTS = ("head_lse_gather", "head_lse_gather_backward", "head_lse_gather_eager_grad")

    def __init__(self, monkeypatch, backend):
        self.seen = []
        module = d3mod.OP_HEAD.kernels(backend)
        for name in self.ENTRY_POINTS:
            fn = getattr(module, name, None)
            if fn is not None:
                monkeypatch.setattr(module, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def f(hidden, weight, bias, *rest, **kw):
            self.seen.append((name, hidden.dtype, weight.dtype, None if bias is None else bias.dtype))
            return fn(hidden, weight, bias, *rest, **kw)

        return f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_bf16_operands(backend, dev, configure, monkeypatch, reduction):
    """Under torch.autocast(bf16) the fused head behaves like F.linear: fp32 hidden / weight /
    bias reach the kernels as bf16 GEMM operands (forward and backward entry points), the loss
    matches PyTorch's own autocast numerics (F.linear + the reference loss) and the reference
    within bf16 tolerance, and the gradients come back in fp32."""
    configure(backend, "multi")
    N, D, V = 57, 64, 333
    h, w, b = _inputs(N, D, V, device=dev)
    target = _target(N, V).to(dev)
    kw = dict(_loss_kw(N, 3), reduction=reduction)
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    rec = _OperandDtypes(monkeypatch, backend)

    def fast(h, w, b):
        return tuple(d3diff_loss(h, w, target, bias=b, backend=backend, **kw))

    def torch_autocast(h, w, b):  # what autocast makes of F.linear: bf16 logits
        return tuple(d3diff_loss_from_logits(F.linear(h, w, b), target, backend="reference", **kw))

    def ref(h, w, b):
        return tuple(d3diff_loss(h, w, target, bias=b, backend="reference", **kw))

    # "none": random per-row upstream gradients cancel in dW, where the oracles round dℓ to bf16
    # (PyTorch) or not (reference): twice the bf16 tolerance
    scale = 2.0 if reduction == "none" else 1.0
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        for oracle in (torch_autocast, ref):
            inputs = [x.requires_grad_() for x in _fresh(h, w, b)]
            fwd_bwd_parity(oracle, fast, inputs, dtype=torch.bfloat16, scale=scale)
        hh, ww, bb = (x.requires_grad_() for x in _fresh(h, w, b))
        o = fast(hh, ww, bb)
        grads = torch.autograd.grad(o[0].sum(), [hh, ww, bb])
    assert o[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert {name for name, *_ in rec.seen} >= {"head_lse_gather_backward"}, rec.seen
    assert all(dt == torch.bfloat16 for _, *dts in rec.seen for dt in dts), rec.seen
    # outside autocast: fp32 operands, and mixed dtypes are refused
    rec.seen.clear()
    fast(h, w, b)
    assert all(dt == torch.float32 for _, *dts in rec.seen for dt in dts), rec.seen
    with pytest.raises(TypeError, match="only under torch.autocast"):
        d3diff_loss(h, w.bfloat16(), target, backend=backend)


@pytest.mark.parametrize("backend", TRITON)
def test_registration_and_selection(backend, dev):
    k = _triton()
    assert "triton" in d3mod.OP_HEAD.backends
    assert d3mod.OP_HEAD.cuda_order[0] == "triton"
    assert d3mod.OP_HEAD.select(torch.device("cpu"), "triton") == "triton"
    for kernel in k.KERNELS:
        cfg = k.pick_config(kernel, torch.bfloat16, 2048, torch.device("cuda"))
        assert cfg.block_m >= 16 and cfg.block_v >= 16 and cfg.block_k >= 16
        assert k.pick_config(kernel, torch.float32, 64, torch.device("cpu")) is k.INTERPRETER_CONFIG


# ----------------------------------------------------------------------------------- triton, GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize(
    "N,D,V,rate,alpha,bias",
    [
        (2048, 2048, 8192, 0.5, 0.01, False),
        (2048, 2048, 8192, 0.5, 0.01, True),
        (1024, 2304, 256000, 1.0, 0.0, False),
        (423, 1000, 8191, 0.3, 0.01, True),
    ],
)
@pytest.mark.parametrize("det", [True, False])
def test_gpu_real_shapes_bf16(monkeypatch, backend, dev, N, D, V, rate, alpha, bias, det):
    monkeypatch.setattr(_triton(), "DETERMINISTIC", det)
    h = randn(N, D, dtype=torch.bfloat16, device=dev)
    w = randn(V, D, dtype=torch.bfloat16, device=dev, scale=D**-0.5)
    b = randn(V, dtype=torch.bfloat16, device=dev) if bias else None
    t = torch.randint(0, V, (N,), device=dev)
    t[torch.rand(N, device=dev) >= rate] = -100
    B = max(1, N // 256)
    si = (torch.arange(N, device=dev) // 256).clamp_max(B - 1)
    kw = dict(alpha=alpha)
    if alpha:
        kw.update(
            sample_index=si,
            mask_rate=torch.full((B,), rate, device=dev),
            mask_rate_deriv=torch.rand(B, device=dev) + 0.5,
        )
    _parity(backend, h, w, b, t, dtype=torch.bfloat16, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", TRITON)
def test_gpu_fp32_and_compaction_speed(backend, dev):
    k = _triton()
    N, D, V = 4096, 1024, 8192
    h, w = randn(N, D, device=dev), randn(V, D, device=dev, scale=D**-0.5)
    t_all = torch.randint(0, V, (N,), device=dev)
    _parity(backend, h.clone(), w.clone(), None, t_all, alpha=0.0)
    t_few = t_all.clone()
    t_few[N // 8 :] = -100

    def ms(t):
        fn = lambda: k.head_lse_gather(h, w, None, t, -100)  # noqa: E731
        for _ in range(3):
            fn()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / 10

    assert ms(t_few) < 0.5 * ms(t_all), "masked-row compaction should cut the forward time"


# ------------------------------------------------------------------- cpu: chunks, gradient in forward


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(cpu_head, "CHUNK_ROWS", 7)  # several chunks, ragged last one
    monkeypatch.setattr(cpu_head, "CHUNK_BYTES", 1)  # (then CHUNK_ROWS rows per chunk)


def _cpu_target(N, V):
    t = _target(N, V)
    t[0] = 1  # at least one masked row
    return t


class _Spy:
    """Counts calls of the chunk loops (which path ran)."""

    def __init__(self, monkeypatch):
        self.eager = self.recompute = 0
        eager, recompute = cpu_head.head_lse_gather_eager_grad, cpu_head.head_lse_gather_backward

        def e(*a, **k):
            self.eager += 1
            return eager(*a, **k)

        def r(*a, **k):
            self.recompute += 1
            return recompute(*a, **k)

        monkeypatch.setattr(cpu_head, "head_lse_gather_eager_grad", e)
        monkeypatch.setattr(cpu_head, "head_lse_gather_backward", r)


def _loss_kw(N, B, **kw):
    """The schedule of N rows in B samples, and the other loss arguments."""
    si, m, dm = _schedule(N, B)
    return dict(sample_index=si, mask_rate=m, mask_rate_deriv=dm, **kw)


def _cpu_problem(N, D, V, B, **kw):
    """hidden, weight, a target with row 0 masked, and the loss arguments (schedule + kw)."""
    h, w = randn(N, D), randn(V, D, scale=0.3)
    return h, w, _cpu_target(N, V), _loss_kw(N, B, **kw)


def _run(be, target, **kw):
    def f(h, w, *rest):
        return tuple(d3diff_loss(h, w, target, bias=rest[0] if rest else None, backend=be, **kw))

    return f


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_chunked_parity(backend, dev, small_chunks, dtype, with_bias):
    N, D, V, B = 61, 24, 111, 3
    h, w = randn(N, D, dtype=dtype), randn(V, D, dtype=dtype, scale=0.3)
    b = randn(V, dtype=dtype) if with_bias else None
    target = _target(N, V)
    si, m, dm = _schedule(N, B)
    _parity(backend, h, w, b, target, dtype=dtype, sample_index=si, mask_rate=m, mask_rate_deriv=dm)


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lowp", ["1", "0"])
def test_cpu_gemm_paths(backend, dev, small_chunks, monkeypatch, dtype, lowp):
    """Both GEMM paths of 16-bit inputs, whatever this CPU would pick: 16-bit GEMMs (compared with
    PyTorch's own 16-bit F.linear numerics, and the loss with the fp32 reference) and fp32 GEMMs
    (compared with the reference); the eager-grad path (``loss``) and the recompute path
    (``mask_loss``, ``score_loss``) each on its own -- both at once add two gradients each rounded
    to the input dtype, which cancel -- with one and with several chunks."""
    monkeypatch.setenv(cpu.LOWP_GEMM_ENV, lowp)
    assert (cpu_head.gemm_dtype(dtype) == dtype) == (lowp == "1")
    N, D, V, B = 45, 24, 111, 3
    h, w, b = randn(N, D, dtype=dtype), randn(V, D, dtype=dtype, scale=0.3), randn(V, dtype=dtype)
    target = _cpu_target(N, V)
    for reduction, chunk in (("mean", 7), ("none", 7), ("sum", 1000)):
        monkeypatch.setattr(cpu_head, "CHUNK_ROWS", chunk)
        kw = _loss_kw(N, B, alpha=0.3, parametrization="raw", reduction=reduction)
        oracle, scale = _oracle(backend, dtype, target, **kw)
        for outs in ((0,), (1, 2)):

            def pick(f, outs=outs):
                return lambda *inputs: tuple(f(*inputs)[i] for i in outs)

            fwd_bwd_parity(
                pick(oracle),
                pick(_run(backend, target, **kw)),
                [x.requires_grad_() for x in _fresh(h, w, b)],
                dtype=dtype,
                scale=scale,
            )
        got = d3diff_loss(h, w, target, bias=b, backend=backend, **kw).loss
        want = d3diff_loss(h, w, target, bias=b, backend="reference", **kw).loss
        assert_close(got, want, dtype, name="loss vs the fp32 reference")


def test_cpu_gemm_choice_is_reported(monkeypatch):
    import io

    from unif2ace.__main__ import info

    for env, word in (("1", "in bfloat16"), ("0", "in fp32")):
        monkeypatch.setenv(cpu.LOWP_GEMM_ENV, env)
        out = io.StringIO()
        info(out)
        assert f"cpu bfloat16 GEMMs: {word} ({cpu.LOWP_GEMM_ENV}={env})" in out.getvalue()
    monkeypatch.delenv(cpu.LOWP_GEMM_ENV)
    use, why = cpu.lowp_gemm(torch.bfloat16)
    assert why and cpu_head.gemm_dtype(torch.bfloat16) == (torch.bfloat16 if use else torch.float32)
    assert cpu_head.gemm_dtype(torch.float32) == torch.float32


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_cpu_three_d_none_and_all_ignored(backend, dev, monkeypatch):
    monkeypatch.setattr(cpu_head, "CHUNK_ROWS", 5)
    monkeypatch.setattr(cpu_head, "CHUNK_BYTES", 1)
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

    fwd_bwd_parity(run("reference"), run(backend), [h.requires_grad_(), w.requires_grad_()])
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    o = d3diff_loss(hh, ww, torch.full((B, L), -100), mask_rate=m, mask_rate_deriv=dm, backend=backend)
    assert (torch.stack(list(o)) == 0).all()
    gh, gw = torch.autograd.grad(o.loss, [hh, ww])
    assert (gh == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("parametrization", ["posterior", "raw", "radd"])
def test_eager_grad_parity_all_outputs(backend, dev, small_chunks, monkeypatch, reduction, parametrization):
    # random upstream gradients on loss, mask_loss and score_loss: the anchor (loss) and the
    # recompute (mask/score) both contribute
    N, D, V, B = 45, 16, 111, 3
    h, w, b = randn(N, D), randn(V, D, scale=0.3), randn(V)
    target = _cpu_target(N, V)
    kw = _loss_kw(N, B, alpha=0.3, parametrization=parametrization, reduction=reduction)
    spy = _Spy(monkeypatch)
    _parity(backend, h, w, b, target, **kw)
    assert spy.eager == 1 and spy.recompute == 1


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_eager_grad_loss_only_skips_recompute(backend, dev, small_chunks, monkeypatch, reduction, with_bias):
    N, D, V, B = 52, 24, 97, 4
    h, w = randn(N, D), randn(V, D, scale=0.3)
    b = randn(V) if with_bias else None
    target = _cpu_target(N, V)
    kw = _loss_kw(N, B, alpha=0.5, reduction=reduction, parametrization="raw")
    spy = _Spy(monkeypatch)
    leaves = [h, w] + ([b] if with_bias else [])
    grads = {}
    for be in ("reference", backend):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        o = d3diff_loss(xs[0], xs[1], target, bias=xs[2] if with_bias else None, backend=be, **kw)
        up = torch.tensor(1.7)  # a non-unit upstream scalar
        grads[be] = (o, torch.autograd.grad(o.loss, xs, up))
    (o_ref, g_ref), (o_cpu, g_cpu) = grads["reference"], grads[backend]
    for a, r in zip(o_cpu, o_ref):
        assert_close(a, r)
    for a, r, name in zip(g_cpu, g_ref, ["hidden", "weight", "bias"]):
        assert_close(a, r, name=name)
    assert spy.eager == 1 and spy.recompute == 0, "backward of loss alone must not recompute the chunks"


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_eager_grad_bf16(backend, dev, small_chunks, monkeypatch):
    N, D, V, B = 40, 32, 111, 2
    dt = torch.bfloat16
    h, w, b = randn(N, D, dtype=dt), randn(V, D, dtype=dt, scale=0.3), randn(V, dtype=dt)
    target = _cpu_target(N, V)
    kw = _loss_kw(N, B)
    spy = _Spy(monkeypatch)
    _parity(backend, h, w, b, target, dtype=dt, **kw)
    assert spy.eager == 1
    x = h.detach().clone().requires_grad_()
    o = d3diff_loss(x, w.detach(), target, backend=backend, **kw)
    assert torch.autograd.grad(o.loss, x)[0].dtype == dt


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_eager_grad_three_d_and_frozen_weight(backend, dev, small_chunks, monkeypatch):
    Bn, L, D, V = 3, 8, 16, 37
    h, w = randn(Bn, L, D), randn(V, D)
    target = _cpu_target(Bn * L, V).reshape(Bn, L)
    m, dm = torch.tensor([0.3, 0.9, 0.5]), torch.tensor([1.0, 2.0, 0.5])
    spy = _Spy(monkeypatch)
    kw = dict(mask_rate=m, mask_rate_deriv=dm, parametrization="posterior")
    # weight frozen: only dhidden is computed in the forward
    fwd_bwd_parity(
        lambda h: tuple(d3diff_loss(h, w, target, backend="reference", **kw)),
        lambda h: tuple(d3diff_loss(h, w, target, backend=backend, **kw)),
        [h.requires_grad_()],
    )
    assert spy.eager == 1
    # hidden frozen
    fwd_bwd_parity(
        lambda w: tuple(d3diff_loss(h.detach(), w, target, backend="reference", **kw)),
        lambda w: tuple(d3diff_loss(h.detach(), w, target, backend=backend, **kw)),
        [w.requires_grad_()],
    )
    assert spy.eager == 2


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("mode", ["reduction_none", "switched_off", "no_grad"])
def test_recompute_path(backend, dev, small_chunks, monkeypatch, mode):
    reduction = "none" if mode == "reduction_none" else "mean"
    h, w, target, kw = _cpu_problem(N=45, D=16, V=111, B=3, parametrization="raw", alpha=0.2, reduction=reduction)
    spy = _Spy(monkeypatch)
    if mode == "switched_off":
        monkeypatch.setattr(custom_ops, "HEAD_EAGER_GRAD", False)
    if mode == "no_grad":
        with torch.no_grad():
            got = d3diff_loss(h, w, target, backend=backend, **kw)
            want = d3diff_loss(h, w, target, backend="reference", **kw)
        for a, r in zip(got, want):
            assert_close(a, r)
        assert spy.eager == 0
        return
    # non-uniform upstream gradients (per row for reduction none)
    _parity(backend, h, w, None, target, **kw)
    assert spy.eager == 0 and spy.recompute == 1


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_eager_grad_all_rows_ignored(backend, dev, reduction):
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
        backend=backend,
    )
    assert (torch.stack(list(o)) == 0).all()
    for g in torch.autograd.grad(o.loss + o.mask_loss + o.score_loss, [h, w, b]):
        assert (g == 0).all()


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_eager_grad_torch_compile_fullgraph(backend, dev, small_chunks):
    h, w, target, kw = _cpu_problem(N=30, D=16, V=53, B=2)

    def f(h, w):
        o = d3diff_loss(h, w, target, backend=backend, **kw)
        return o.loss, o.mask_loss, o.score_loss

    torch._dynamo.reset()
    fwd_bwd_parity(
        _run("reference", target, **kw),
        torch.compile(f, fullgraph=True),
        [h.requires_grad_(), w.requires_grad_()],
    )


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_eager_grad_deterministic(backend, dev, small_chunks):
    h, w, target, kw = _cpu_problem(N=64, D=16, V=111, B=2)
    runs = []
    for _ in range(2):
        x, y = h.clone().requires_grad_(), w.clone().requires_grad_()
        o = d3diff_loss(x, y, target, backend=backend, **kw)
        runs.append((o.loss.detach(),) + torch.autograd.grad(o.loss, [x, y]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_gradient_in_place(backend, dev, dtype):
    from unif2ace.kernels import _ext

    ops = _ext.cpu_ops()
    N, V = 33, 111
    x = randn(N, V, dtype=dtype, scale=2.0)
    t = _cpu_target(N, V)
    t[5] = V + 3  # out of range: no one-hot term, no out-of-bounds write
    mx, lse_rel, _ = ops.lse_gather(x, t, -100)
    gl, gt = randn(N), randn(N)
    want = ops.lse_gather_backward(x, t, mx, lse_rel, gl, gt, -100)
    buf = x.clone()
    assert ops.lse_gather_backward_(buf, t, mx, lse_rel, gl, gt, -100) is None
    assert torch.equal(buf, want)
    ignored = t == -100
    assert ignored.any() and (buf[ignored] == 0).all()
    # strided rows (row stride > V) are written in place too; the padding columns stay untouched
    wide = randn(N, V + 9, dtype=dtype)
    view = wide[:, :V]
    view.copy_(x)
    ops.lse_gather_backward_(view, t, mx, lse_rel, gl, gt, -100)
    assert torch.equal(view, want)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.lse_gather_backward_(buf, t, mx, lse_rel.double(), gl, gt, -100)


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_eager_grad_raw_overflow_regime(backend, dev, small_chunks, monkeypatch):
    # logits ≈ 100: LSE − c > 60, the safe_exp tangent (constant derivative exp(60)) is in play
    N, D, V, B = 23, 8, 37, 2
    h, w, b = randn(N, D), randn(V, D, scale=0.3), randn(V) + 100.0
    target = _cpu_target(N, V)
    kw = _loss_kw(N, B, parametrization="raw", reduction="sum")
    spy = _Spy(monkeypatch)
    _parity(backend, h, w, b, target, **kw)
    assert spy.eager == 1
