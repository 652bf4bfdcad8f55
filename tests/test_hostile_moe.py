"""Hostile inputs for the grouped-MoE ops (issue 18), every backend that runs here against the
reference: NaN/+-inf and huge-offset logits (the NaN/inf contract of docs/kernels.md §B),
non-finite expert-MLP inputs, empty and degenerate shapes, non-contiguous layouts, scalar
arguments (numpy integers, bools, NaN coefficients), and the custom ops' fake implementations
against the real ones (output strides, forward and backward, also under
``torch.compile(fullgraph=True)``)."""

import numpy as np
import pytest
import torch
from moe_testing import CUDA, device_fixture, random_ids

from unif2ace.kernels import (
    moe_align,
    moe_expert_histogram,
    moe_expert_mlp,
    moe_gating,
    moe_sequence_gating,
    moe_shared_expert,
)
from unif2ace.kernels._custom_ops import moe as C
from unif2ace.kernels.reference import moe_gating as RG
from unif2ace.kernels.reference import moe_routing as RR
from unif2ace.testing import assert_close, randn

# the interpreter turns runtime loop bounds into numpy scalars this way (fine with numpy < 2.4)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

BACKENDS = ["cpu", "triton", *CUDA]
MLP_BACKENDS = ["cpu", "triton"]  # moe_expert_mlp has no cuda kernel
dev = device_fixture()
NAN, INF = float("nan"), float("inf")


def assert_same_nonfinite(actual, expected, name, dtype=torch.float32, *, exact_nan=True):
    """Same NaN positions (``exact_nan``) or same non-finite positions, same +-inf where the
    reference is infinite, and the finite values within the tolerance of ``dtype``."""
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} vs reference {tuple(e.shape)}"
    if exact_nan:
        bad = torch.isnan(a) != torch.isnan(e)
        assert not bad.any(), f"{name}: NaN at {bad.nonzero()[:5].tolist()} differs from the reference"
        inf = torch.isinf(e)
        assert torch.equal(a[inf], e[inf]), f"{name}: +-inf differs from the reference"
    else:
        bad = torch.isfinite(a) != torch.isfinite(e)
        assert not bad.any(), f"{name}: non-finite at {bad.nonzero()[:5].tolist()} differs from the reference"
    fin = torch.isfinite(e)
    assert_close(a[fin], e[fin], dtype, name=name)


# ------------------------------------------------------------------------------------------------
# gating: the NaN/inf contract and huge offsets


def _hostile_logits(dtype, device):
    """Two groups (5 + 3 experts), 10 tokens: a NaN, +inf, -inf, an all -inf group row, a NaN in
    group 1, two +inf (a tie) and clean rows, in the token's own group's columns."""
    z = randn(10, 8, scale=2.0)
    z[0, 1] = NAN
    z[1, 0] = INF
    z[2, 2] = -INF
    z[3, :5] = -INF
    z[4, 6] = NAN
    z[5, 5] = INF
    z[6, 0] = z[6, 3] = INF
    z[7, 1] = z[7, 4] = NAN
    gid = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0, 1, 0])
    return z.to(device=device, dtype=dtype), gid.to(device)


def _gating_both(backend, z, gid, sizes, k, score, renorm, coef=0.1):
    """(reference, backend) results of moe_gating and d router_logits for the same random upstream
    gradients of gates, expert_prob and balance_loss."""
    T, E = z.shape
    ups = [randn(T, k), randn(E), randn(len(sizes))]
    out = []
    for be in ("reference", backend):
        zz = z.detach().clone().requires_grad_(True)
        o = moe_gating(zz, gid, sizes, k, score=score, renormalize=renorm, balance_coef=coef, backend=be)
        torch.autograd.backward([o.gates, o.expert_prob, o.balance_loss], [u.to(zz.device) for u in ups])
        out.append((*o, zz.grad))
    return out


GATING_NAMES = ("expert_ids", "gates", "expert_fraction", "expert_prob", "balance_loss", "d router_logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score,renorm", [("softmax", False), ("softmax", True), ("sigmoid", False), ("sigmoid", True)])
def test_gating_nan_inf_contract(backend, dtype, score, renorm, dev):
    z, gid = _hostile_logits(dtype, dev)
    ref, got = _gating_both(backend, z, gid, [5, 3], 2, score, renorm)
    assert torch.equal(got[0].cpu(), ref[0]), f"expert_ids: {got[0].tolist()} vs reference {ref[0].tolist()}"
    for name, a, e in list(zip(GATING_NAMES, got, ref))[1:]:
        assert_same_nonfinite(a, e, name, dtype if name == "d router_logits" else torch.float32)
    if score == "softmax":  # the contract, spelled out: NaN rows, NaN ranked first, NaN statistics
        assert torch.isnan(ref[1][[0, 1, 3, 4, 5, 6, 7]]).all() and not torch.isnan(ref[1][[2, 8, 9]]).any()
        assert torch.isnan(ref[3]).all() and torch.isnan(ref[4]).all()
    else:
        assert ref[0][0, 0] == 1 and ref[0][7].tolist() == [1, 4]  # NaN above every number, ties by index
        assert ref[0][6].tolist() == [0, 3] and ref[1][6].tolist() == ([0.5, 0.5] if renorm else [1.0, 1.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e3, 1e6, 1e30, -1e30])
def test_gating_huge_offsets(backend, offset, dev):
    T, sizes, k = 33, [6, 4], 2
    z = (torch.randint(-16, 16, (T, 10)).float() / 4 + offset).to(dev)
    gid = torch.randint(0, 2, (T,), device=dev)
    for score in ("softmax", "sigmoid"):
        ref, got = _gating_both(backend, z, gid, sizes, k, score, True)
        assert torch.equal(got[0].cpu(), ref[0])
        for name, a, e in list(zip(GATING_NAMES, got, ref))[1:]:
            assert_same_nonfinite(a, e, f"{score} {name}")


# ------------------------------------------------------------------------------------------------
# expert MLP: non-finite inputs


def _mlp_hostile_inputs(activation, device):
    T, D, F_, E, k = 9, 6, 5, 3, 2
    F1 = 2 * F_ if activation == "swiglu" else F_
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [1, -1], [1, 3], [2, 1], [0, 1], [-1, 1], [1, 0]])
    x, w1, w2 = randn(T, D), randn(E, D, F1, scale=0.4), randn(E, F_, D, scale=0.4)
    g, b1, b2 = torch.rand(T, k), randn(E, F1, scale=0.5), randn(E, D, scale=0.5)
    x[1, 3] = NAN  # token 1: NaN everywhere it goes
    g[3, 1] = g[4, 1] = g[7, 0] = NAN  # invalid slots: never read
    g[6, 0] = NAN  # a valid slot: token 6 NaN
    w2[2, 1, 4] = NAN  # expert 2: NaN for its tokens (1, 2, 5), whatever their gate
    g[5, 0] = 0.0
    x[8, 0] = INF  # token 8: non-finite
    b1[0, 2] = -INF if activation != "swiglu" else INF
    ins = [x, w1, w2, g, b1, b2]
    return ids.to(device), [t.to(device) for t in ins]


@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
def test_mlp_nan_inf_contract(backend, activation, dev):
    ids, ins = _mlp_hostile_inputs(activation, dev)
    res = []
    grad_out = randn(*ins[0].shape, device=dev)
    for be in ("reference", backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in ins]
        x, w1, w2, g, b1, b2 = leaves
        out = moe_expert_mlp(x, w1, w2, ids, g, b1=b1, b2=b2, activation=activation, backend=be)
        out.backward(grad_out)
        res.append([out] + [t.grad for t in leaves])
    names = ["out", "dx", "dw1", "dw2", "dgates", "db1", "db2"]
    for name, a, e in zip(names, res[1], res[0]):
        assert_same_nonfinite(a, e, name, exact_nan=False)
    out = res[0][0]
    assert torch.isnan(out[[1, 6]]).all(), "a NaN input or a NaN gate: NaN row"
    assert torch.isnan(out[[1, 2, 5], 4]).all(), "a NaN weight of expert 2: NaN where it feeds (gate 0 too)"
    assert torch.isfinite(out[[3, 4, 7]]).all(), "a NaN gate of an invalid slot is never read"
    assert (res[0][4][[3, 4, 7], [1, 1, 0]] == 0).all(), "invalid slots get zero gate gradients"


# ------------------------------------------------------------------------------------------------
# empty and degenerate shapes


def _mlp_parity(backend, dev, T, D, F_, E, k, activation="gelu", bias=True, ids=None):
    F1 = 2 * F_ if activation == "swiglu" else F_
    ids = random_ids(T, k, E) if ids is None else ids
    ins = [randn(T, D), randn(E, D, F1, scale=0.5), randn(E, F_, D, scale=0.5), torch.rand(T, k)]
    ins += [randn(E, F1), randn(E, D)] if bias else []
    grad_out = randn(T, D)
    res = []
    for be in ("reference", backend):
        leaves = [t.detach().clone().to(dev).requires_grad_(True) for t in ins]
        x, w1, w2, g = leaves[:4]
        b1, b2 = leaves[4:] if bias else (None, None)
        out = moe_expert_mlp(x, w1, w2, ids.to(dev), g, b1=b1, b2=b2, activation=activation, backend=be)
        out.backward(grad_out.to(dev))
        # the reference leaves no gradient on an input nothing was routed through: zeros
        res.append([out] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves])
    for i, (a, e) in enumerate(zip(res[1], res[0])):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(a.cpu(), e.cpu(), name=f"output/grad {i}")
    return res[1]


@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize(
    "T,D,F_,E,k,activation,bias",
    [
        (0, 5, 4, 3, 2, "gelu", True),  # no tokens
        (6, 5, 4, 3, 0, "gelu", True),  # k = 0
        (6, 0, 4, 3, 2, "swiglu", True),  # D = 0
        (6, 5, 0, 3, 2, "gelu", False),  # F = 0: zeros
        (6, 5, 0, 3, 2, "swiglu", True),  # F = 0 with biases: sum_j gate * b2
        (7, 5, 4, 1, 1, "gelu_tanh", True),  # one expert
    ],
)
def test_mlp_degenerate_shapes(backend, T, D, F_, E, k, activation, bias, dev):
    got = _mlp_parity(backend, dev, T, D, F_, E, k, activation, bias)
    if F_ == 0 and not bias and T:
        assert not got[0].any() and not got[1].any() and not got[4].any(), "F = 0: zero output and gradients"


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_mlp_all_ids_invalid_and_shared_expert_empty(backend, dev):
    got = _mlp_parity(backend, dev, 5, 4, 3, 2, 2, ids=torch.tensor([[-1, 2]] * 5))
    assert not got[0].any() and not got[2].any()
    x = randn(4, 6, device=dev).requires_grad_(True)
    out = moe_shared_expert(x, randn(6, 0, device=dev), randn(0, 6, device=dev), backend=backend)
    out.sum().backward()
    assert out.shape == (4, 6) and not out.any() and not x.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gating_degenerate_shapes(backend, dev):
    cases = [
        (0, [3, 5], 2),  # no tokens
        (5, [1], 1),  # a single expert
        (6, [4, 4], 4),  # k = group size
        (1, [7, 2, 3], 2),  # one token, groups without tokens
    ]
    for T, sizes, k in cases:
        z = randn(T, sum(sizes), device=dev)
        gid = torch.randint(0, len(sizes), (T,), device=dev)
        ref, got = _gating_both(backend, z, gid, sizes, k, "softmax", True)
        assert torch.equal(got[0].cpu(), ref[0])
        for name, a, e in list(zip(GATING_NAMES, got, ref))[1:]:
            assert_close(a.cpu(), e, name=f"{(T, sizes, k)} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_degenerate(backend, dev):
    cases = [
        (torch.zeros(0, 2, dtype=torch.long), 4, 3),  # no tokens
        (torch.zeros(5, 1, dtype=torch.int32), 1, 1),  # one expert, block size 1
        (torch.tensor([[-1, 7], [9, -3]]), 4, 2),  # every id invalid
        (torch.tensor([[2**40, 1], [-(2**40), 2**33 + 1]]), 3, 4),  # int64 ids far outside [0, E)
        (random_ids(33, 3, 5), 5, 1000),  # block size far above the token count
    ]
    for ids, E, bs in cases:
        ids = ids.to(dev)
        got, ref = moe_align(ids, E, bs, backend=backend), RR.moe_align_ref(ids.cpu(), E, bs)
        for name, a, e in zip(("sorted_token_ids", "block_expert_ids", "total", "counts"), got, ref):
            assert torch.equal(a.cpu(), e), f"{tuple(ids.shape)} E={E} bs={bs}: {name}"
        if backend != "triton":  # no triton histogram
            assert torch.equal(moe_expert_histogram(ids, E, backend=backend).cpu(), RR.moe_expert_histogram_ref(ids, E))


# ------------------------------------------------------------------------------------------------
# non-contiguous layouts


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_layouts_gating_align(backend, dev):
    T, sizes, k = 23, [6, 4], 2
    z = randn(sum(sizes), T, device=dev).t()  # transposed logits
    gid = torch.randint(0, 2, (2 * T,), device=dev)[::2]  # strided group ids
    ref, got = _gating_both(backend, z, gid, sizes, k, "softmax", False)
    assert torch.equal(got[0].cpu(), ref[0])
    for name, a, e in list(zip(GATING_NAMES, got, ref))[1:]:
        assert_close(a.cpu(), e, name=name)
    idt = random_ids(9, 4, 6).t()  # align on a transposed id view
    for a, e in zip(moe_align(idt.to(dev), 6, 4, backend=backend), RR.moe_align_ref(idt, 6, 4)):
        assert torch.equal(a.cpu(), e)


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_non_contiguous_layouts_mlp(backend):
    T, sizes, k, D, F_ = 23, [6, 4], 2, 12, 8
    E = sum(sizes)
    ids = RG.moe_gating_ref(randn(T, E), torch.randint(0, 2, (T,)), sizes, k)[0].t().contiguous().t()  # transposed
    x = randn(D, T).t()
    w1 = randn(E, 2 * F_, D, scale=0.3).transpose(1, 2)  # swiglu [E, D, 2F], transposed
    w2 = randn(E, D, F_, scale=0.3).transpose(1, 2)
    g = torch.rand(k, T).t()
    b1, b2 = randn(E, 4 * F_)[:, ::2], randn(D, E).t()
    ins = [x, w1, w2, g, b1, b2]
    grad_out = randn(T, D)
    res = []
    for be in ("reference", backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in ins]  # clone keeps the strides
        assert not leaves[0].is_contiguous() and not leaves[1].is_contiguous()
        xx, ww1, ww2, gg, bb1, bb2 = leaves
        out = moe_expert_mlp(xx, ww1, ww2, ids, gg, b1=bb1, b2=bb2, activation="swiglu", backend=be)
        out.backward(grad_out)
        res.append([out] + [t.grad for t in leaves])
    for i, (a, e) in enumerate(zip(res[1], res[0])):
        assert_close(a, e, name=f"mlp output/grad {i}")


# ------------------------------------------------------------------------------------------------
# scalar arguments: one rule for every op (numpy integers are ints; bools are bools; reals finite)


def test_scalar_arguments():
    z, gid = randn(7, 12), torch.randint(0, 2, (7,))
    sizes, k = [np.int64(8), np.int32(4)], np.int64(2)
    a = moe_gating(z, gid, sizes, k, renormalize=np.bool_(True), balance_coef=np.float32(0.5))
    b = moe_gating(z, gid, [8, 4], 2, renormalize=True, balance_coef=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ids = random_ids(5, 2, 4)
    for x, y in zip(moe_align(ids, np.int64(4), np.uint8(3)), moe_align(ids, 4, 3)):
        assert torch.equal(x, y)
    assert torch.equal(moe_expert_histogram(ids, np.int16(4)), moe_expert_histogram(ids, 4))
    h, mask = randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    w, g2 = randn(12, 6), torch.tensor([0, 1])
    s = moe_sequence_gating(h, mask, w, g2, [np.int64(8), 4], np.int32(2))
    assert torch.equal(s.expert_ids, moe_sequence_gating(h, mask, w, g2, [8, 4], 2).expert_ids)
    bad = [
        (dict(renormalize="no"), TypeError, "'renormalize' must be a bool, got str"),
        (dict(renormalize=1), TypeError, "'renormalize' must be a bool"),
        (dict(balance_coef=float("nan")), ValueError, "'balance_coef' must be a finite number"),
        (dict(balance_coef=float("inf")), ValueError, "'balance_coef' must be a finite number"),
        (dict(balance_coef="0.1"), TypeError, "'balance_coef' must be a real number"),
    ]
    for kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            moe_gating(z, gid, [8, 4], 2, **kw)
        with pytest.raises(exc, match=msg):
            moe_sequence_gating(h, mask, w, g2, [8, 4], 2, **kw)
    for top_k, exc in ((True, TypeError), (2.0, TypeError), (np.float64(2), TypeError), (0, ValueError)):
        with pytest.raises(exc, match="top_k"):
            moe_gating(z, gid, [8, 4], top_k)
    with pytest.raises(TypeError, match="block_size"):
        moe_align(ids, 4, 3.0)


# ------------------------------------------------------------------------------------------------
# fake implementations against the kernels: output strides on non-contiguous inputs


def _custom_op_cases(backend):
    T, E, k, D, F_ = 9, 6, 2, 8, 5
    z = randn(E, T).t()
    gid = torch.randint(0, 2, (2 * T,))[::2]
    ids = random_ids(T, k, E).t().contiguous().t()
    x, w1 = randn(D, T).t(), randn(E, F_, D, scale=0.3).transpose(1, 2)
    w2, g = randn(E, D, F_, scale=0.3).transpose(1, 2), torch.rand(k, T).t()
    b1, b2 = randn(E, 2 * F_)[:, ::2], randn(D, E).t()
    gating = (z, gid, [4, 2], k, "softmax", True, 0.1, backend)
    mlp = (x, w1, w2, ids, g, b1, b2, "gelu")
    saved = C.mlp_op(*mlp, backend)[1]  # what the forward keeps for the backward (cpu: pre-activations)
    return [
        (C.histogram_op, (ids, E, backend)),
        (C.align_op, (ids, E, 4, backend)),
        (C.gating_op, gating),
        (C.gating_backward_op, (randn(k, T).t(), randn(E), randn(2), *gating)),
        (C.mlp_op, (*mlp, backend)),
        (C.mlp_op, (x.bfloat16(), w1.bfloat16(), w2.bfloat16(), ids, g, None, None, "gelu", backend)),
        (C.mlp_backward_op, (randn(D, T).t(), *mlp, saved, backend)),
        (C.mlp_backward_op, (randn(T, D), x, w1, w2, ids, g, None, None, "gelu_tanh", x.new_empty(0), backend)),
    ]


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_fake_strides_match_the_kernels(backend):
    """Every custom op of the family, forward and backward: the fake's output metadata (shape,
    dtype, strides) equals the real output's, on transposed and strided inputs."""
    for op, args in _custom_op_cases(backend):
        if op is C.histogram_op and backend == "triton":
            continue  # no triton histogram
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def test_compile_fullgraph_on_transposed_inputs():
    """The issue's repro (moe_gating backward on a transposed router_logits) and moe_expert_mlp on
    a transposed x and w1, forward and backward, in one compiled graph on the cpu backend."""
    T, E, k, D, F_ = 32, 12, 2, 8, 6
    r = randn(E, T)
    gid = torch.randint(0, 2, (T,))
    x, w1, w2 = randn(D, T), randn(E, F_, D, scale=0.3), randn(E, F_, D, scale=0.3)

    def f(r, x, w1, w2):
        route = moe_gating(r.t(), gid, [8, 4], k, backend="cpu")
        out = moe_expert_mlp(x.t(), w1.transpose(1, 2), w2, route.expert_ids, route.gates, backend="cpu")
        return out.square().sum() + route.balance_loss.sum()

    res = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (r, x, w1, w2)]
        loss = fn(*leaves)
        loss.backward()
        res.append([loss] + [t.grad for t in leaves])
    for a, e in zip(res[1], res[0]):
        assert_close(a, e)
