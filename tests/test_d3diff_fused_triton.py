"""Triton backend of the fused-head D3Diff loss (``d3diff_loss(..., backend="triton")``) against the
reference: loss, parts and gradients for hidden/weight/bias, masked-row compaction (tile counts),
both backward schemes, low precision, edge cases; GPU-marked tests with real shapes.

On CPU the kernels run under the Triton interpreter (root conftest), ~1 ms per program instance,
so shapes are small and tiles large. Two launch configs are exercised: the interpreter default
(one vocabulary split, one K step for D <= 128) and a "multi" config (BLOCK_M 16/32, BLOCK_V 64/128,
BLOCK_K 32, 3 splits) that hits several row blocks, vocabulary tiles, splits and K steps.
"""

import pytest
import torch
import torch.nn.functional as F

import unif2ace.kernels.d3diff as d3mod
from unif2ace.kernels import d3diff_loss, set_value_checks
from unif2ace.kernels._dispatch import backend_usable
from unif2ace.testing import assert_all_written, assert_close, fwd_bwd_parity, randn

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.skipif(
        not backend_usable("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0],
        reason="triton backend unusable here",
    ),
]

k = pytest.importorskip("unif2ace.kernels.triton.d3diff_fused")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MULTI = k.FusedConfig(block_m=32, block_v=128, block_k=32, num_warps=4, num_stages=1, splits=3)
MULTI_SMALL = k.FusedConfig(block_m=16, block_v=64, block_k=32, num_warps=4, num_stages=1, splits=3)
CONFIGS = {"default": None, "multi": MULTI, "multi_small": MULTI_SMALL}


@pytest.fixture
def use_config(monkeypatch):
    """Force a launch config (interpreter only: on CUDA the real table is used)."""

    def set_(name, deterministic=True):
        monkeypatch.setattr(k, "DETERMINISTIC", deterministic)
        if CONFIGS[name] is not None and DEV.type == "cpu":
            monkeypatch.setattr(k, "INTERPRETER_CONFIG", CONFIGS[name])

    return set_


def _target(N, V, masked_frac=0.6):
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) > masked_frac] = -100
    return t


def _schedule(N, B):
    return torch.randint(0, B, (N,)), torch.rand(B) * 0.8 + 0.1, torch.rand(B) + 0.1


def _parity(h, w, b, target, *, dtype=torch.float32, scale=1.0, **kw):
    inputs = [h.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if b is not None else [])

    def run(be):
        def f(h, w, *rest):
            return tuple(d3diff_loss(h, w, target, bias=rest[0] if rest else None, backend=be, **kw))

        return f

    fwd_bwd_parity(
        run("reference"), run("triton"), inputs, dtype=dtype, scale=scale, names=["hidden", "weight", "bias"]
    )


def _inputs(N, D, V, dtype=torch.float32, bias=True):
    h = randn(N, D, dtype=dtype, device=DEV)
    w = randn(V, D, dtype=dtype, device=DEV, scale=D**-0.5 * 2)
    b = randn(V, dtype=dtype, device=DEV) if bias else None
    return h, w, b


# ----------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "N,V,D,par,bias,cfg,det",
    [
        (1, 111, 64, "posterior", True, "default", True),
        (33, 111, 96, "raw", True, "multi", True),
        (33, 111, 64, "radd", False, "default", False),
        (100, 1000, 64, "posterior", True, "default", True),
        (100, 1000, 96, "posterior", True, "multi", True),
        (100, 1000, 96, "raw", False, "multi", False),
        (97, 1000, 96, "radd", True, "multi_small", True),
        (33, 1000, 64, "posterior", True, "multi_small", False),
    ],
)
def test_parity_fp32(use_config, N, V, D, par, bias, cfg, det):
    use_config(cfg, det)
    h, w, b = _inputs(N, D, V, bias=bias)
    target = _target(N, V)
    target[0] = 3
    si, m, dm = _schedule(N, 3)
    _parity(
        h,
        w,
        b,
        target.to(DEV),
        sample_index=si.to(DEV),
        mask_rate=m.to(DEV),
        mask_rate_deriv=dm.to(DEV),
        alpha=0.3,
        parametrization=par,
    )


@pytest.mark.parametrize("cfg,det", [("default", True), ("multi", False)])
def test_reductions_nonuniform_upstream_and_3d(use_config, cfg, det):
    # fwd_bwd_parity feeds fresh random (non-uniform) gradients into loss, mask_loss, score_loss
    use_config(cfg, det)
    B, L, D, V = 3, 23, 64, 333
    h, w, b = _inputs(B * L, D, V)
    target = _target(B * L, V).reshape(B, L).to(DEV)
    m, dm = (torch.rand(B) * 0.8 + 0.1).to(DEV), (torch.rand(B) + 0.1).to(DEV)
    for red, par in (("none", "posterior"), ("none", "raw"), ("sum", "radd")):
        _parity(
            h.detach().reshape(B, L, D).clone(),
            w.detach().clone(),
            b.detach().clone(),
            target,
            mask_rate=m,
            mask_rate_deriv=dm,
            reduction=red,
            parametrization=par,
        )


def test_alpha_zero_plain_cross_entropy(use_config):
    use_config("multi")
    N, D, V = 45, 64, 111
    h, w, b = _inputs(N, D, V)
    target = _target(N, V).to(DEV)
    _parity(h.clone(), w.clone(), b.clone(), target, alpha=0.0)
    o = d3diff_loss(h, w, target.to(torch.int32), bias=b, alpha=0.0, backend="triton")
    assert_close(o.loss, F.cross_entropy(F.linear(h, w, b), target, ignore_index=-100))
    assert o.score_loss.item() == 0.0


def test_one_masked_row(use_config):
    use_config("multi")
    N, D, V = 70, 64, 111
    target = torch.full((N,), -100)
    target[41] = 77  # lands in the first compacted row block, far from row 0
    si, m, dm = _schedule(N, 2)
    h, w, b = _inputs(N, D, V)
    _parity(h, w, b, target.to(DEV), sample_index=si.to(DEV), mask_rate=m.to(DEV), mask_rate_deriv=dm.to(DEV))


@pytest.mark.parametrize("det", [True, False])
def test_all_rows_ignored(use_config, det):
    use_config("multi", det)
    N, D, V = 40, 64, 111
    h, w, b = (x.requires_grad_() for x in _inputs(N, D, V))
    target = torch.full((N,), -100, device=DEV)
    si, m, dm = (x.to(DEV) for x in _schedule(N, 2))
    for red in ("mean", "sum", "none"):
        o = d3diff_loss(
            h, w, target, bias=b, sample_index=si, mask_rate=m, mask_rate_deriv=dm, reduction=red, backend="triton"
        )
        for t in o:
            assert torch.isfinite(t).all() and (t == 0).all()
        for g in torch.autograd.grad(o.loss.sum(), [h, w, b]):
            assert (g == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(use_config, dtype):
    use_config("multi")
    N, D, V = 57, 96, 333
    h, w, b = _inputs(N, D, V, dtype=dtype)
    target = _target(N, V).to(DEV)
    si, m, dm = (x.to(DEV) for x in _schedule(N, 3))
    for par in ("posterior", "raw"):
        _parity(
            h.detach().clone(),
            w.detach().clone(),
            b.detach().clone(),
            target,
            dtype=dtype,
            sample_index=si,
            mask_rate=m,
            mask_rate_deriv=dm,
            parametrization=par,
        )
    hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    o = d3diff_loss(hh, ww, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend="triton")
    assert o.loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(o.loss, [hh, ww])
    assert gh.dtype == dtype and gw.dtype == dtype


def test_noncontiguous_inputs(use_config):
    use_config("default")
    N, D, V = 29, 64, 111
    wide = randn(N, D + 11, device=DEV)
    wt = randn(D, V, device=DEV, scale=0.25)  # weight = wt.T: column stride V, copied by the launcher
    target = _target(N, V).to(DEV)

    def run(be):
        return lambda x, y: tuple(d3diff_loss(x[:, 3 : 3 + D], y.t(), target, alpha=0.0, backend=be))

    fwd_bwd_parity(run("reference"), run("triton"), [wide.requires_grad_(), wt.requires_grad_()])


def test_out_of_range_target_without_value_checks_is_nan_not_a_crash():
    N, D, V = 7, 64, 111
    h, w, _ = _inputs(N, D, V, bias=False)
    t = torch.randint(0, V, (N,))
    t[2] = V + 1000
    set_value_checks(False)
    try:
        o = d3diff_loss(h, w, t.to(DEV), alpha=0.0, reduction="none", backend="triton")
    finally:
        set_value_checks(None)
    assert torch.isnan(o.loss[2]) and torch.isfinite(o.loss[torch.arange(N, device=DEV) != 2]).all()


# ------------------------------------------------------------------- kernels directly: compaction


def _ref_parts(h, w, b, t):
    logits = F.linear(h.float(), w.float(), None if b is None else b.float())
    valid = t != -100
    lse = torch.where(valid, torch.logsumexp(logits, 1), 0.0)
    tgt = torch.where(valid, logits.gather(1, t.clamp_min(0)[:, None]).squeeze(1), 0.0)
    return logits, valid, lse, tgt


@pytest.mark.parametrize("cfg", [MULTI, MULTI_SMALL])
@pytest.mark.parametrize("det", [True, False])
def test_ignored_rows_are_skipped_and_every_output_written(cfg, det):
    """Logit-tile counts follow the number of rows that carry loss, not N; hand-counted."""
    N, D, V = 100, 64, 333
    h, w, b = _inputs(N, D, V)
    n_tiles = -(-V // cfg.block_v)
    for n_valid in (0, 1, 17, 40, 100):
        t = torch.full((N,), -100)
        keep = torch.randperm(N)[:n_valid]
        t[keep] = torch.randint(0, V, (n_valid,))
        t = t.to(DEV)
        row_blocks = -(-n_valid // cfg.block_m)
        ctr = torch.zeros(1, dtype=torch.int32, device=DEV)
        lse, tgt = k.head_lse_gather(h, w, b, t, -100, config=cfg, debug_counter=ctr)
        assert int(ctr) == row_blocks * n_tiles, f"forward: {int(ctr)} tiles for {n_valid} valid rows"
        for x, name in ((lse, "lse"), (tgt, "tgt")):
            assert_all_written(x, name)
        logits, valid, lse_r, tgt_r = _ref_parts(h, w, b, t)
        assert_close(lse, lse_r, name="lse")
        assert_close(tgt, tgt_r, name="tgt")

        gl, gt = randn(N, device=DEV), randn(N, device=DEV)
        ctr.zero_()
        gh, gw, gb = k.head_lse_gather_backward(
            h, w, b, t, lse, gl, gt, -100, config=cfg, deterministic=det, debug_counter=ctr
        )
        per_pass = row_blocks * n_tiles
        assert int(ctr) == (2 * per_pass if det else per_pass), f"backward: {int(ctr)} tiles for {n_valid} rows"
        for x, name in ((gh, "grad_hidden"), (gw, "grad_weight"), (gb, "grad_bias")):
            assert_all_written(x, name)
        g = gl[:, None] * torch.softmax(logits, 1)
        g[valid, t[valid]] += gt[valid]
        g[~valid] = 0
        assert_close(gh, g @ w, name="grad_hidden")
        assert_close(gw, g.t() @ h, name="grad_weight")
        assert_close(gb, g.sum(0), name="grad_bias")
        assert (gh[~valid] == 0).all()


def test_hand_computed_small_case():
    """N = 2, D = 16, V = 3 with integer-valued inputs: lse and tgt in closed form."""
    D = 16
    h = torch.zeros(2, D, device=DEV)
    h[0, 0], h[1, 1] = 1.0, 2.0
    w = torch.zeros(3, D, device=DEV)
    w[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    w[:, 1] = torch.tensor([0.0, 1.0, -1.0])
    b = torch.tensor([0.5, 0.0, 0.0], device=DEV)
    # logits: row 0 = [1.5, 2, 3], row 1 = [0.5, 2, -2]
    t = torch.tensor([2, 0], device=DEV)
    lse, tgt = k.head_lse_gather(h, w, b, t, -100)
    want_lse = torch.tensor(
        [torch.logsumexp(torch.tensor([1.5, 2.0, 3.0]), 0), torch.logsumexp(torch.tensor([0.5, 2.0, -2.0]), 0)]
    )
    assert_close(lse, want_lse.to(DEV), name="lse")
    assert_close(tgt, torch.tensor([3.0, 0.5], device=DEV), name="tgt")


def test_deterministic_and_atomic_schemes_agree():
    N, D, V = 64, 96, 333
    h, w, b = _inputs(N, D, V)
    t = _target(N, V).to(DEV)
    lse, _ = k.head_lse_gather(h, w, b, t, -100, config=MULTI_SMALL if DEV.type == "cpu" else None)
    gl, gt = randn(N, device=DEV), randn(N, device=DEV)
    cfg = MULTI_SMALL if DEV.type == "cpu" else None
    a = k.head_lse_gather_backward(h, w, b, t, lse, gl, gt, -100, deterministic=True, config=cfg)
    a2 = k.head_lse_gather_backward(h, w, b, t, lse, gl, gt, -100, deterministic=True, config=cfg)
    c = k.head_lse_gather_backward(h, w, b, t, lse, gl, gt, -100, deterministic=False, config=cfg)
    for x, x2, y, name in zip(a, a2, c, ("grad_hidden", "grad_weight", "grad_bias")):
        assert torch.equal(x, x2), f"{name}: deterministic scheme not bitwise reproducible"
        assert_close(x, y, name=name)


def test_precise_grad_split_beats_single_rounding():
    """bf16: dℓ as a hi + lo pair is closer to the fp32-dℓ result than dℓ rounded once."""
    N, D, V = 48, 64, 200
    h, w, b = _inputs(N, D, V, dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), device=DEV)
    lse, _ = k.head_lse_gather(h, w, b, t, -100)
    gl, gt = randn(N, device=DEV, scale=20.0), randn(N, device=DEV, scale=20.0)
    logits, valid, _, _ = _ref_parts(h, w, b, t)
    g = gl[:, None] * torch.exp(logits - lse[:, None])
    g[valid, t[valid]] += gt[valid]
    want = (g @ w.float(), g.t() @ h.float())
    err = {}
    for precise in (True, False):
        gh, gw, _ = k.head_lse_gather_backward(h, w, b, t, lse, gl, gt, -100, precise_grad=precise)
        err[precise] = [(x.float() - y).abs().max().item() for x, y in zip((gh, gw), want)]
    for i, name in enumerate(("grad_hidden", "grad_weight")):
        ulp = want[i].abs().max().item() * 2.0**-8
        assert err[True][i] <= ulp, f"{name}: precise error {err[True][i]} above one bf16 ulp {ulp}"
        assert err[True][i] < err[False][i], f"{name}: split {err[True][i]} not better than single {err[False][i]}"


def test_registration_and_selection():
    assert "triton" in d3mod.OP_FUSED.impls
    assert d3mod.OP_FUSED.cuda_order[0] == "triton"
    assert d3mod.OP_FUSED.select(torch.device("cpu"), "triton") == "triton"
    cfg = k.pick_config(torch.bfloat16, 2048, torch.device("cuda"))
    assert cfg.block_m >= 16 and cfg.block_v >= 16 and cfg.block_k >= 16
    assert k.pick_config(torch.float32, 64, torch.device("cpu")) is k.INTERPRETER_CONFIG


@pytest.mark.slow
def test_torch_compile_fullgraph():
    N, D, V = 29, 64, 111
    h, w, b = _inputs(N, D, V)
    target = _target(N, V).to(DEV)

    def f(h, w, b):
        o = d3diff_loss(h, w, target, bias=b, alpha=0.0, backend="triton")
        return o.loss, o.mask_loss

    torch._dynamo.reset()
    fwd_bwd_parity(f, torch.compile(f, fullgraph=True), [h.requires_grad_(), w.requires_grad_(), b.requires_grad_()])


# ----------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
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
def test_gpu_real_shapes_bf16(monkeypatch, N, D, V, rate, alpha, bias, det):
    monkeypatch.setattr(k, "DETERMINISTIC", det)
    dev = torch.device("cuda")
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
    _parity(h, w, b, t, dtype=torch.bfloat16, **kw)


@pytest.mark.gpu
def test_gpu_fp32_and_compaction_speed():
    dev = torch.device("cuda")
    N, D, V = 4096, 1024, 8192
    h, w = randn(N, D, device=dev), randn(V, D, device=dev, scale=D**-0.5)
    t_all = torch.randint(0, V, (N,), device=dev)
    _parity(h.clone(), w.clone(), None, t_all, alpha=0.0)
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
