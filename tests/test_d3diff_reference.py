"""The D3Diff reference (explicit SEDD score-vector form) against hand math, closed forms, float64
direct computations and PyTorch's cross-entropy; input validation of the public ops (both stems:
d3diff_loss_from_logits and d3diff_loss). The fused-head oracle: test_d3diff_head_reference.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from unif2ace.kernels import d3diff_loss, d3diff_loss_from_logits
from unif2ace.kernels.reference.d3diff import safe_exp, schedule_terms
from unif2ace.testing import assert_close, randn

REF = dict(backend="reference")


def _ref(logits, target, **kw):
    return d3diff_loss_from_logits(logits, target, backend="reference", **kw)


def _problem(N=41, V=37, B=3, scale=1.0, ignore_every=4):
    logits = randn(N, V, scale=scale)
    target = torch.randint(0, V, (N,))
    target[::ignore_every] = -100
    si = torch.randint(0, B, (N,))
    m = torch.rand(B) * 0.8 + 0.1
    dm = torch.rand(B) + 0.1
    return logits, target, si, m, dm


# ------------------------------------------------------------------------------- hand-computed


def _hand_v3():
    """3 rows over V = 3 codes: rows 0, 2 of sample 0 (m = 0.5), row 1 of sample 1 (m = 0.25);
    row 2 ignored."""
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [3.0, 0.0, 0.0]])
    target = torch.tensor([0, 2, -100])
    si = torch.tensor([0, 1, 0])
    m = torch.tensor([0.5, 0.25])
    dm = torch.tensor([1.0, 0.5])
    return logits, target, si, m, dm


def _hand_rows(parametrization):
    """Per-row (CE, σ'·DSE) written out by hand with the math module (masked rows 0 and 1)."""
    rows = [((1.0, 2.0, 3.0), 0, 0.5, 1.0), ((0.5, -1.0, 2.0), 2, 0.25, 0.5)]
    out = []
    for l, x0, m, dm in rows:
        Z = sum(math.exp(v) for v in l)
        p = [math.exp(v) / Z for v in l]
        ce = -math.log(p[x0])
        r = (1 - m) / m
        sigma = -math.log(1 - m)
        dsigma = dm / (1 - m)
        if parametrization == "posterior":
            s = [pv / m for pv in p]
        elif parametrization == "radd":
            s = [pv * r for pv in p]
        else:
            c = math.log(math.exp(sigma) - 1) + math.log(len(l))
            s = [math.exp(v - c) for v in l]
        dse = sum(s) - r * math.log(s[x0]) + r * (math.log(r) - 1)
        out.append((ce, dsigma * dse))
    return out


@pytest.mark.parametrize("parametrization", ["posterior", "raw", "radd"])
def test_hand_computed_v3(parametrization):
    logits, target, si, m, dm = _hand_v3()
    (ce0, sc0), (ce1, sc1) = _hand_rows(parametrization)
    kw = dict(sample_index=si, mask_rate=m, mask_rate_deriv=dm, alpha=0.5, parametrization=parametrization)
    o = _ref(logits, target, **kw)
    assert o.mask_loss.item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    assert o.score_loss.item() == pytest.approx((sc0 + sc1) / 2, rel=1e-5)  # B = 2 samples
    assert o.loss.item() == pytest.approx((ce0 + ce1) / 2 + 0.5 * (sc0 + sc1) / 2, rel=1e-5)
    s = _ref(logits, target, reduction="sum", **kw)
    assert s.mask_loss.item() == pytest.approx(ce0 + ce1, rel=1e-6)
    assert s.score_loss.item() == pytest.approx(sc0 + sc1, rel=1e-5)
    n = _ref(logits, target, reduction="none", **kw)
    torch.testing.assert_close(n.mask_loss, torch.tensor([ce0, ce1, 0.0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n.score_loss, torch.tensor([sc0, sc1, 0.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n.loss, torch.tensor([ce0 + 0.5 * sc0, ce1 + 0.5 * sc1, 0.0]), rtol=1e-5, atol=1e-5)


def test_hand_posterior_closed_form_value():
    # m = 0.5, m' = 1: r = 1, σ = log 2, σ' = 2, so σ'·DSE = 2·(CE + 1 − log 2)
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    ce = math.log(math.e + math.e**2 + math.e**3) - 1.0
    o = _ref(
        logits,
        torch.tensor([0]),
        sample_index=torch.tensor([0]),
        mask_rate=torch.tensor([0.5]),
        mask_rate_deriv=torch.tensor([1.0]),
    )
    assert o.score_loss.item() == pytest.approx(2 * (ce + 1 - math.log(2)), rel=1e-6)


def test_schedule_terms():
    m = torch.tensor([0.25, 0.5, 1.0])
    dm = torch.tensor([2.0, 1.0, 3.0])
    s = schedule_terms(m, dm)
    assert s["r"][0].item() == pytest.approx(3.0)
    assert s["sigma"][1].item() == pytest.approx(math.log(2))
    assert s["dsigma"][0].item() == pytest.approx(2.0 / 0.75)
    assert s["w"][0].item() == pytest.approx(8.0)
    assert s["log_r"][0].item() == pytest.approx(math.log(3))
    assert s["m"][2].item() == pytest.approx(1 - 1e-6)  # clamped
    assert torch.isfinite(torch.stack(list(s.values()))).all()


# ------------------------------------------------------------------------------- identities


def test_posterior_identity_vector_form_vs_closed_form():
    logits, target, si, m, dm = _problem()
    o = _ref(logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, reduction="none")
    ce = F.cross_entropy(logits, target, ignore_index=-100, reduction="none")
    r, sigma, dsig = (1 - m) / m, -torch.log1p(-m), dm / (1 - m)
    closed = dsig[si] * (r[si] * ce + 1 - r[si] * sigma[si])
    closed = torch.where(target != -100, closed, torch.zeros_like(closed))
    assert_close(o.score_loss, closed, name="posterior score")
    assert_close(o.mask_loss, ce, name="ce")


def test_radd_equals_r_ce():
    logits, target, si, m, dm = _problem()
    o = _ref(logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization="radd", reduction="none")
    ce = F.cross_entropy(logits, target, ignore_index=-100, reduction="none")
    dsig, r = dm / (1 - m), (1 - m) / m
    assert_close(o.score_loss, dsig[si] * r[si] * ce, name="radd score")


def test_raw_vs_float64_direct():
    logits, target, si, m, dm = _problem()
    o = _ref(logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization="raw", reduction="none")
    x, md = logits.double(), m.double()
    V = x.shape[1]
    sigma = -torch.log1p(-md)
    c = torch.log(torch.exp(sigma) - 1) + math.log(V)
    r = (1 - md) / md
    valid = target != -100
    t = target.clamp_min(0)
    pos = torch.exp(x - c[si, None]).sum(1)
    neg = r[si] * (x.gather(1, t[:, None]).squeeze(1) - c[si])
    dse = pos - neg + r[si] * (torch.log(r[si]) - 1)
    want = torch.where(valid, dm.double()[si] / (1 - md[si]) * dse, torch.zeros_like(dse))
    assert_close(o.score_loss, want.float(), name="raw score")


def test_safe_exp_guard():
    x = torch.tensor([-5.0, 0.0, 59.0, 60.0, 61.0, 200.0, 1e6], dtype=torch.float64, requires_grad=True)
    y = safe_exp(x)
    e60 = math.exp(60)
    want = [math.exp(-5), 1.0, math.exp(59), e60, e60 * 2, e60 * 141, e60 * (1 + 1e6 - 60)]
    torch.testing.assert_close(y.detach(), torch.tensor(want, dtype=torch.float64))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(
        g, torch.tensor([math.exp(-5), 1.0, math.exp(59), e60, e60, e60, e60], dtype=torch.float64)
    )
    # continuity of value and slope at 60 (fp32)
    a, b = safe_exp(torch.tensor([60.0 - 1e-3, 60.0 + 1e-3]))
    assert (b / a).item() == pytest.approx((1 + 1e-3) * math.exp(1e-3), rel=1e-5)


def test_raw_guard_keeps_overflow_finite():
    # LSE − c ≈ 100: exp overflows fp32, the guard continues linearly
    logits, target, si, m, dm = _problem(V=29)
    logits = (logits + 100.0).requires_grad_()
    with torch.no_grad():
        assert torch.isinf(torch.exp(torch.logsumexp(logits, 1) - math.log(29))).all()
    o = _ref(logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization="raw")
    assert torch.isfinite(o.loss) and o.score_loss.item() > 1e26
    (g,) = torch.autograd.grad(o.loss, logits)
    assert torch.isfinite(g).all() and g.abs().max() > 1e20
    # value against float64 with the same guard
    x, md = logits.detach().double(), m.double()
    lse = torch.logsumexp(x, 1)
    c = torch.log(torch.expm1(-torch.log1p(-md))) + math.log(29)
    r = (1 - md) / md
    t = target.clamp_min(0)
    dse = safe_exp(lse - c[si]) - r[si] * (x.gather(1, t[:, None]).squeeze(1) - c[si]) + r[si] * (torch.log(r[si]) - 1)
    want = torch.where(target != -100, dm.double()[si] / (1 - md[si]) * dse, torch.zeros_like(dse)).sum() / 3
    assert o.score_loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_posterior_score_gradient_is_weighted_ce_gradient():
    logits, target, si, m, dm = _problem()
    x = logits.clone().requires_grad_()
    o = _ref(x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, reduction="sum")
    (g_score,) = torch.autograd.grad(o.score_loss, x)
    x2 = logits.clone().requires_grad_()
    ce = F.cross_entropy(x2, target, ignore_index=-100, reduction="none")
    (g_ce,) = torch.autograd.grad(((dm / m)[si] * ce).sum(), x2)
    assert_close(g_score, g_ce, name="grad of posterior score")


def test_alpha_zero_is_masked_cross_entropy():
    logits, target, *_ = _problem()
    x = logits.clone().requires_grad_()
    o = _ref(x, target, alpha=0.0)
    want = F.cross_entropy(logits, target, ignore_index=-100)
    assert_close(o.loss, want)
    assert_close(o.mask_loss, want)
    assert o.score_loss.item() == 0.0
    # int32 target, 3-D input, another ignore_index
    t3 = torch.where(target == -100, torch.full_like(target, 7777), target).to(torch.int32)
    o3 = _ref(logits.reshape(1, 41, 37), t3.reshape(1, 41), alpha=0.0, ignore_index=7777)
    assert_close(o3.loss, want)


def test_reductions_consistent():
    logits, target, si, m, dm = _problem()
    kw = dict(sample_index=si, mask_rate=m, mask_rate_deriv=dm, alpha=0.2)
    for par in ("posterior", "raw", "radd"):
        mean = _ref(logits, target, parametrization=par, **kw)
        tot = _ref(logits, target, parametrization=par, reduction="sum", **kw)
        none = _ref(logits, target, parametrization=par, reduction="none", **kw)
        n_masked = int((target != -100).sum())
        assert_close(mean.mask_loss, tot.mask_loss / n_masked)
        assert_close(mean.score_loss, tot.score_loss / 3)  # B = 3
        assert_close(tot.mask_loss, none.mask_loss.sum())
        assert_close(tot.score_loss, none.score_loss.sum())
        assert_close(none.loss, none.mask_loss + 0.2 * none.score_loss)
        assert (none.loss[target == -100] == 0).all()


def test_three_d_equals_two_d_with_sample_index():
    B, L, V = 3, 7, 19
    logits = randn(B, L, V)
    target = torch.randint(0, V, (B, L))
    target[:, ::2] = -100
    m, dm = torch.rand(B) * 0.8 + 0.1, torch.rand(B)
    o3 = _ref(logits, target, mask_rate=m, mask_rate_deriv=dm, reduction="none")
    assert o3.loss.shape == (B, L)
    o2 = _ref(
        logits.reshape(-1, V),
        target.reshape(-1),
        sample_index=torch.arange(B).repeat_interleave(L),
        mask_rate=m,
        mask_rate_deriv=dm,
        reduction="none",
    )
    assert_close(o3.loss.reshape(-1), o2.loss)


def test_all_rows_ignored_gives_finite_zeros():
    logits, target, si, m, dm = _problem()
    target[:] = -100
    for par in ("posterior", "raw", "radd"):
        for red in ("mean", "sum", "none"):
            x = logits.clone().requires_grad_()
            o = _ref(x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization=par, reduction=red)
            for t in o:
                assert torch.isfinite(t).all() and (t == 0).all(), (par, red)
            (g,) = torch.autograd.grad(o.loss.sum(), x)
            assert (g == 0).all()


def test_mask_rate_one_is_clamped_finite():
    logits, target, si, m, dm = _problem()
    m[0] = 1.0
    for par in ("posterior", "raw", "radd"):
        x = logits.clone().requires_grad_()
        o = _ref(x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, parametrization=par)
        assert torch.isfinite(o.loss)
        assert torch.isfinite(torch.autograd.grad(o.loss, x)[0]).all()


# ------------------------------------------------------------------------------- validation


def _bad_calls():
    N, V, B = 6, 11, 2
    x = randn(N, V)
    t = torch.randint(0, V, (N,))
    si = torch.randint(0, B, (N,))
    m, dm = torch.tensor([0.5, 0.25]), torch.tensor([1.0, 1.0])
    good = dict(sample_index=si, mask_rate=m, mask_rate_deriv=dm)
    f = d3diff_loss_from_logits

    def kw(**over):
        d = dict(good)
        d.update(over)
        return d

    return [
        ("logits", lambda: f(x[0], t, **good)),
        ("logits", lambda: f(x.long(), t, **good)),
        ("target", lambda: f(x, t.float(), **good)),
        ("target", lambda: f(x, t[:-1], **good)),
        ("target", lambda: f(x, torch.full_like(t, V), **good)),
        ("target", lambda: f(x, torch.full_like(t, -1), **good)),
        ("sample_index", lambda: f(x, t, **kw(sample_index=None))),
        ("sample_index", lambda: f(x, t, **kw(sample_index=si + B))),
        ("sample_index", lambda: f(x, t, **kw(sample_index=si[:-1]))),
        ("sample_index", lambda: f(x, t, **kw(sample_index=si.float()))),
        ("sample_index", lambda: f(x.reshape(2, 3, V), t.reshape(2, 3), **good)),
        ("mask_rate", lambda: f(x, t, **kw(mask_rate=torch.tensor([0.0, 0.5])))),
        ("mask_rate", lambda: f(x, t, **kw(mask_rate=torch.tensor([1.5, 0.5])))),
        ("mask_rate", lambda: f(x, t, **kw(mask_rate=torch.tensor([[0.5, 0.5]])))),
        (
            "mask_rate",
            lambda: f(
                x.reshape(2, 3, V), t.reshape(2, 3), mask_rate=torch.tensor([0.5]), mask_rate_deriv=torch.tensor([1.0])
            ),
        ),
        ("mask_rate", lambda: f(x, t, **kw(mask_rate=None))),
        ("mask_rate_deriv", lambda: f(x, t, **kw(mask_rate_deriv=None))),
        ("mask_rate_deriv", lambda: f(x, t, **kw(mask_rate_deriv=torch.tensor([-1.0, 1.0])))),
        ("mask_rate_deriv", lambda: f(x, t, **kw(mask_rate_deriv=torch.tensor([1.0])))),
        ("mask_rate", lambda: f(x, t, alpha=0.5)),
        ("alpha", lambda: f(x, t, alpha=float("nan"), **good)),
        ("parametrization", lambda: f(x, t, parametrization="score", **good)),
        ("reduction", lambda: f(x, t, reduction="avg", **good)),
        ("ignore_index", lambda: f(x, t, ignore_index=1.5, **good)),
        ("hidden", lambda: d3diff_loss(x.long(), randn(V, V), t, **good)),
        ("weight", lambda: d3diff_loss(x, randn(V, V + 1), t, **good)),
        ("weight", lambda: d3diff_loss(x, randn(V, V).double(), t, **good)),
        ("bias", lambda: d3diff_loss(x, randn(5, V), t, bias=randn(6), **good)),
        ("target", lambda: d3diff_loss(x, randn(5, V), t, **good)),  # target values >= V = 5
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_clear_errors(case):
    arg, call = _bad_calls()[case]
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    assert f"'{arg}'" in str(e.value), str(e.value)
    assert "d3diff_loss" in str(e.value)
