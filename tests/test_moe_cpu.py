"""Grouped MoE, C++ cpu backend: moe_gating and moe_expert_mlp (forward and backward) against the
reference (csrc/cpu/moe_gating.cpp, csrc/cpu/moe_mlp.cpp)."""

import contextlib
import math

import pytest
import torch

from unif2ace.kernels import _ext, moe_expert_mlp, moe_gating
from unif2ace.kernels import moe as M
from unif2ace.kernels.reference import moe as R
from unif2ace.testing import assert_all_written, assert_close, fwd_bwd_parity, poison_, randn

TS, KS, ES = (1, 33, 222, 1000), (1, 2, 4, 8), (4, 8, 64)


@contextlib.contextmanager
def _threads(n):
    """pytest-xdist workers run torch with one thread; the kernels' parallel paths (chunked
    statistics, expert-parallel GEMMs on OpenMP workers) need two. Only a few tests use two:
    two threads per xdist worker oversubscribe the cores and slow the reference down a lot."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _dirty_heap(*shapes):
    """Allocate and free NaN-filled buffers of the output sizes so that fresh outputs likely reuse
    poisoned memory (best effort; equality with the reference is the real check)."""
    for s in shapes:
        poison_(torch.empty(s, dtype=torch.float32))


def _ids(T, k, E, dtype=torch.int64):
    """Mostly valid expert ids plus ~10% invalid ones (-1 and E)."""
    ids = torch.randint(0, E, (T, k))
    drop = torch.rand(T, k) < 0.1
    ids[drop] = torch.where(torch.rand(int(drop.sum())) < 0.5, -1, E)
    return ids.to(dtype)


# ------------------------------------------------------------------------------------------------
# gating


def _gating_fns(gid, sizes, k, score, renorm, coef):
    def ref_fn(z):
        return R.moe_gating_ref(z, gid, sizes, k, score, renorm, coef)

    def cpu_fn(z):
        return tuple(moe_gating(z, gid, sizes, k, score=score, renormalize=renorm, balance_coef=coef, backend="cpu"))

    return ref_fn, cpu_fn


GATING_CASES = [(T, k, E) for T in TS for k in KS for E in ES if k <= E]


@pytest.mark.parametrize("T,k,E", GATING_CASES)
def test_gating_parity(T, k, E):
    # two groups of uneven sizes (E and E + 3); score / renormalisation / id dtype vary with the case
    i = GATING_CASES.index((T, k, E))
    score = ("softmax", "sigmoid")[i % 2]
    renorm = bool((i // 2) % 2)
    sizes = [E, E + 3]
    logits = randn(T, sum(sizes), scale=2.0).requires_grad_(True)
    gid = torch.randint(0, 2, (T,), dtype=(torch.int32, torch.int64)[i % 2])
    _dirty_heap((T, k), (sum(sizes),), (T, sum(sizes)))
    ref_fn, cpu_fn = _gating_fns(gid, sizes, k, score, renorm, 0.1)
    out = cpu_fn(logits.detach())
    for name, t in zip(M.MoEGating._fields, out):
        assert_all_written(t, name)
    assert out[0].dtype == torch.int32 and out[1].dtype == torch.float32
    fwd_bwd_parity(ref_fn, cpu_fn, [logits], names=["router_logits"])


def test_gating_hand_computed():
    # one group of 2, k = 1: softmax rows [1/4, 3/4] and [3/4, 1/4]
    l3 = math.log(3.0)
    z = torch.tensor([[0.0, l3], [l3, 0.0], [0.0, l3]])
    gid = torch.zeros(3, dtype=torch.long)
    ids, gates, f, P, loss = moe_gating(z, gid, [2], 1, balance_coef=0.5, backend="cpu")
    assert ids.tolist() == [[1], [0], [1]]
    assert_close(gates, torch.full((3, 1), 0.75))
    assert_close(f, torch.tensor([1 / 3, 2 / 3]))
    assert_close(P, torch.tensor([(0.25 + 0.75 + 0.25) / 3, (0.75 + 0.25 + 0.75) / 3]))
    # 0.5 * size 2 * (1/3 * 5/12 + 2/3 * 7/12)
    assert_close(loss, torch.tensor([0.5 * 2 * (5 / 36 + 14 / 36)]))
    # renormalised top-2 of one group: gates are the softmax itself
    z2 = torch.tensor([[1.0, 2.0, 0.5]])
    r = moe_gating(z2, torch.zeros(1, dtype=torch.long), [3], 2, renormalize=True, backend="cpu")
    s = torch.softmax(z2, -1)[0]
    assert r.expert_ids.tolist() == [[1, 0]]
    assert_close(r.gates, torch.stack([s[1], s[0]]).view(1, 2) / (s[1] + s[0]))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gating_ties_go_to_lowest_index(score):
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    gid = torch.zeros(2, dtype=torch.long)
    ids = moe_gating(z, gid, [5], 3, score=score, backend="cpu").expert_ids
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    # many exact ties: small integer logits, second group offset, k = 4 of 8
    T = 500
    zt = torch.randint(-2, 2, (T, 16)).float().requires_grad_(True)
    gid = torch.randint(0, 2, (T,))
    ref_fn, cpu_fn = _gating_fns(gid, [8, 8], 4, score, False, 0.01)
    fwd_bwd_parity(ref_fn, cpu_fn, [zt], names=["router_logits"])
    # underflowing softmax scores (exactly 0) tie as well
    zu = torch.tensor([[0.0, -200.0, -300.0, -150.0, 10.0]])
    got = moe_gating(zu, torch.zeros(1, dtype=torch.long), [5], 4, backend="cpu").expert_ids
    assert torch.equal(got, R.moe_gating_ref(zu, torch.zeros(1, dtype=torch.long), [5], 4)[0])


def test_gating_empty_groups_and_no_tokens():
    T = 40
    z = randn(T, 4 + 6 + 5).requires_grad_(True)
    gid = torch.full((T,), 2, dtype=torch.long)  # groups 0 and 1 receive no tokens
    gid[:3] = 0
    ref_fn, cpu_fn = _gating_fns(gid, [4, 6, 5], 2, "softmax", True, 0.3)
    fwd_bwd_parity(ref_fn, cpu_fn, [z], names=["router_logits"])
    out = M.MoEGating(*cpu_fn(z.detach()))
    assert out.balance_loss[1].item() == 0.0 and not out.expert_prob[4:10].any() and not out.expert_fraction[4:10].any()
    # T = 0
    z0 = randn(0, 8)
    out0 = moe_gating(z0, torch.zeros(0, dtype=torch.long), [3, 5], 2, backend="cpu")
    ref0 = R.moe_gating_ref(z0, torch.zeros(0, dtype=torch.long), [3, 5], 2)
    for a, b in zip(out0, ref0):
        assert a.shape == b.shape and torch.equal(a, b)


def test_gating_bf16():
    T, sizes, k = 222, [8, 5], 2
    z = randn(T, sum(sizes), dtype=torch.bfloat16, scale=2.0).requires_grad_(True)
    gid = torch.randint(0, 2, (T,))
    ref_fn, cpu_fn = _gating_fns(gid, sizes, k, "softmax", False, 0.1)
    fwd_bwd_parity(ref_fn, cpu_fn, [z], dtype=torch.bfloat16, names=["router_logits"])
    g = moe_gating(z, gid, sizes, k, backend="cpu")
    g.gates.sum().backward()
    assert z.grad.dtype == torch.bfloat16


def test_gating_deterministic_across_runs_and_threads():
    T, sizes = 5000, [64, 8]  # several statistics chunks
    z = randn(T, sum(sizes), scale=3.0)
    gid = torch.randint(0, 2, (T,))
    gg, gp, gl = randn(T, 4), randn(sum(sizes)), randn(2)
    ops = _ext.cpu_ops()
    args = (z, gid, sizes, 4, "softmax", True, 0.01)
    base = ops.moe_gating(*args)
    base_dz = ops.moe_gating_backward(gg, gp, gl, *args)
    n = torch.get_num_threads()
    try:
        for threads in (1, 2, n):
            torch.set_num_threads(threads)
            again = ops.moe_gating(*args)
            assert all(torch.equal(a, b) for a, b in zip(base, again))
            assert torch.equal(ops.moe_gating_backward(gg, gp, gl, *args), base_dz)
    finally:
        torch.set_num_threads(n)


def test_gating_cpu_errors_name_the_argument():
    ops = _ext.cpu_ops()
    z, gid = randn(4, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="group_sizes"):
        ops.moe_gating(z, gid, [3, 4], 2, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="group_ids"):
        ops.moe_gating(z, torch.tensor([0, 1, 2, 0]), [3, 5], 2, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="top_k"):
        ops.moe_gating(z, gid, [3, 5], 4, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="score"):
        ops.moe_gating(z, gid, [8], 2, "relu", False, 0.1)
    with pytest.raises(RuntimeError, match="grad_gates"):
        ops.moe_gating_backward(randn(4, 3), randn(8), randn(1), z, gid, [8], 2, "softmax", False, 0.1)
    with pytest.raises(ValueError, match="group_ids"):  # the public check, cpu backend selected
        moe_gating(z, torch.tensor([0, 1, 2, 0]), [3, 5], 2, backend="cpu")


# ------------------------------------------------------------------------------------------------
# expert MLP


def _mlp_inputs(T, D, F, E, k, activation, bias, dtype=torch.float32, ids=None):
    F1 = 2 * F if activation == "swiglu" else F
    ids = _ids(T, k, E) if ids is None else ids
    inputs = [
        randn(T, D, dtype=dtype),
        randn(E, D, F1, dtype=dtype, scale=D**-0.5),
        randn(E, F, D, dtype=dtype, scale=F**-0.5),
        torch.rand(T, k).to(dtype),
    ]
    if bias:
        inputs += [randn(E, F1, dtype=dtype, scale=0.5), randn(E, D, dtype=dtype, scale=0.5)]
    return ids, [t.requires_grad_(True) for t in inputs]


def _mlp_fns(ids, activation, bias):
    def unpack(args):
        x, w1, w2, g = args[:4]
        b1, b2 = (args[4], args[5]) if bias else (None, None)
        return x, w1, w2, g, b1, b2

    def ref_fn(*args):
        x, w1, w2, g, b1, b2 = unpack(args)
        return R.moe_expert_mlp_ref(x, w1, w2, ids, g, b1, b2, activation)

    def cpu_fn(*args):
        x, w1, w2, g, b1, b2 = unpack(args)
        return moe_expert_mlp(x, w1, w2, ids, g, b1=b1, b2=b2, activation=activation, backend="cpu")

    return ref_fn, cpu_fn


MLP_NAMES = ["x", "w1", "w2", "gates", "b1", "b2"]
MLP_CASES = [(T, k) for T in TS for k in KS]


@pytest.mark.parametrize("T,k", MLP_CASES)
def test_mlp_parity(T, k):
    # E, activation and bias cycle with the case so that each appears with several (T, k)
    i = MLP_CASES.index((T, k))
    E = ES[i % 3]
    activation = ("gelu", "swiglu", "gelu_tanh")[(i // 3) % 3]
    bias = i % 2 == 0
    D, F = 24, 20
    ids, inputs = _mlp_inputs(T, D, F, E, k, activation, bias, ids=_ids(T, k, E, (torch.int32, torch.int64)[i % 2]))
    _dirty_heap((T, D))
    ref_fn, cpu_fn = _mlp_fns(ids, activation, bias)
    out = cpu_fn(*[t.detach() for t in inputs])
    assert_all_written(out, "out")
    fwd_bwd_parity(ref_fn, cpu_fn, inputs, names=MLP_NAMES)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_activations_and_bias(activation, bias):
    ids, inputs = _mlp_inputs(90, 33, 17, 8, 2, activation, bias)
    ref_fn, cpu_fn = _mlp_fns(ids, activation, bias)
    fwd_bwd_parity(ref_fn, cpu_fn, inputs, names=MLP_NAMES)


def test_mlp_skewed_routing_and_empty_experts():
    T, D, F, E, k = 300, 16, 12, 8, 2
    # all tokens to expert 3 (the skewed path: experts run one after another, threaded inside)
    ids = torch.full((T, k), 3, dtype=torch.long)
    ids[::7, 1] = -1
    _, inputs = _mlp_inputs(T, D, F, E, k, "gelu", True, ids=ids)
    ref_fn, cpu_fn = _mlp_fns(ids, "gelu", True)
    with _threads(2):
        fwd_bwd_parity(ref_fn, cpu_fn, inputs, names=MLP_NAMES)
    # the experts without tokens get exactly zero weight gradients
    x, w1, w2, g, b1, b2 = [t.detach().clone().requires_grad_(True) for t in inputs]
    moe_expert_mlp(x, w1, w2, ids, g, b1=b1, b2=b2, backend="cpu").square().sum().backward()
    others = [e for e in range(E) if e != 3]
    for name, grad in (("w1", w1.grad), ("w2", w2.grad), ("b1", b1.grad), ("b2", b2.grad)):
        assert not grad[others].any(), f"{name}: nonzero gradient for an expert without tokens"
        assert grad[3].abs().sum() > 0, name
    # every id invalid: output and all gradients zero
    bad = torch.where(torch.rand(T, k) < 0.5, -1, E)
    out = moe_expert_mlp(x, w1, w2, bad, g, backend="cpu")
    assert out.shape == (T, D) and not out.any()
    dx, dw1, dw2, dg, db1, db2 = _ext.cpu_ops().moe_expert_mlp_backward(
        randn(T, D), x, w1, w2, bad, g, None, None, "gelu"
    )
    assert db1 is None and db2 is None
    assert not (dx.any() or dw1.any() or dw2.any() or dg.any())


def test_mlp_bf16_and_mixed_dtypes():
    T, D, F, E, k = 120, 32, 24, 8, 4
    ids, inputs = _mlp_inputs(T, D, F, E, k, "swiglu", True, dtype=torch.bfloat16)
    ref_fn, cpu_fn = _mlp_fns(ids, "swiglu", True)
    fwd_bwd_parity(ref_fn, cpu_fn, inputs, dtype=torch.bfloat16, names=MLP_NAMES)
    # bf16 activations with fp32 weights, fp16 gates: output in x's dtype, grads in each input's dtype
    x = randn(T, D, dtype=torch.bfloat16).requires_grad_(True)
    w1 = randn(E, D, F, scale=D**-0.5).requires_grad_(True)
    w2 = randn(E, F, D, scale=F**-0.5).requires_grad_(True)
    g = torch.rand(T, k).half().requires_grad_(True)
    ref_fn, cpu_fn = _mlp_fns(ids, "gelu", False)
    fwd_bwd_parity(ref_fn, cpu_fn, [x, w1, w2, g], dtype=torch.bfloat16, names=MLP_NAMES)
    out = cpu_fn(x, w1, w2, g)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert (x.grad.dtype, w1.grad.dtype, g.grad.dtype) == (torch.bfloat16, torch.float32, torch.float16)


def test_mlp_bitwise_deterministic():
    # balanced routing: with two threads the experts run in parallel (single-threaded GEMMs on the
    # OpenMP workers), with one thread one after another: the same arithmetic either way
    T, D, F, E, k = 1000, 48, 40, 8, 4
    ids, inputs = _mlp_inputs(T, D, F, E, k, "gelu", True)
    x, w1, w2, g, b1, b2 = [t.detach() for t in inputs]
    go = randn(T, D)
    ops = _ext.cpu_ops()

    def run():
        return (
            ops.moe_expert_mlp(x, w1, w2, ids, g, b1, b2, "gelu"),
            ops.moe_expert_mlp_backward(go, x, w1, w2, ids, g, b1, b2, "gelu"),
        )

    with _threads(1):
        runs = [run()]
    with _threads(2):
        runs += [run() for _ in range(3)]
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def test_mlp_aten_gemm_fallback(monkeypatch):
    # the GEMMs normally run through oneDNN; at::mm is the fallback (torch without oneDNN)
    monkeypatch.setenv("UNIF2ACE_MOE_GEMM", "aten")
    ids, inputs = _mlp_inputs(300, 24, 20, 8, 2, "swiglu", True)
    ref_fn, cpu_fn = _mlp_fns(ids, "swiglu", True)
    with _threads(2):
        fwd_bwd_parity(ref_fn, cpu_fn, inputs, names=MLP_NAMES)


def test_mlp_worker_threads_with_inputs_requiring_grad():
    # Regression: experts run on OpenMP workers, which do not inherit the caller's dispatch TLS; a
    # GEMM there went through autograd and raised "mm(): functions with out=... arguments don't
    # support automatic differentiation". Experts big enough (benchmark case (c)) that the workers
    # take some of them.
    T, D, F, E, k = 2048, 256, 256, 16, 4
    ids, inputs = _mlp_inputs(T, D, F, E, k, "gelu", True)
    ops = _ext.cpu_ops()
    with _threads(2):
        for _ in range(3):
            out = ops.moe_expert_mlp(*inputs[:3], ids, inputs[3], inputs[4], inputs[5], "gelu")
            grads = ops.moe_expert_mlp_backward(randn(T, D), *inputs[:3], ids, inputs[3], inputs[4], inputs[5], "gelu")
            assert not out.requires_grad and all(not g.requires_grad for g in grads)


def test_mlp_cpu_errors_name_the_argument():
    ops = _ext.cpu_ops()
    x, w1, w2 = randn(4, 6), randn(3, 6, 5), randn(3, 5, 6)
    ids, g = torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    with pytest.raises(RuntimeError, match="w1"):
        ops.moe_expert_mlp(x, w1, w2, ids, g, None, None, "swiglu")  # swiglu needs [3, 6, 10]
    with pytest.raises(RuntimeError, match="activation"):
        ops.moe_expert_mlp(x, w1, w2, ids, g, None, None, "relu")
    with pytest.raises(RuntimeError, match="gates"):
        ops.moe_expert_mlp(x, w1, w2, ids, torch.rand(4, 3), None, None, "gelu")
    with pytest.raises(RuntimeError, match="b2"):
        ops.moe_expert_mlp(x, w1, w2, ids, g, None, randn(3, 5), "gelu")
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.moe_expert_mlp_backward(randn(4, 5), x, w1, w2, ids, g, None, None, "gelu")
    with pytest.raises(ValueError, match="w1"):  # the public check
        moe_expert_mlp(x, w1, w2, ids, g, activation="swiglu", backend="cpu")


# ------------------------------------------------------------------------------------------------
# integration


def test_cpu_backend_is_auto_selected():
    dev = torch.device("cpu")
    assert M.MOE_GATING.select(dev) == "cpu" and M.MOE_MLP.select(dev) == "cpu"


def test_custom_ops_opcheck_cpu():
    logits = randn(12, 8).requires_grad_(True)
    gid = torch.randint(0, 2, (12,))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(M._gating_op, (logits, gid, [3, 5], 2, "softmax", True, 0.1, "cpu"), test_utils=utils)
    x, w1, w2 = randn(6, 4).requires_grad_(True), randn(3, 4, 10).requires_grad_(True), randn(3, 5, 4)
    torch.library.opcheck(M._mlp_op, (x, w1, w2, _ids(6, 2, 3), torch.rand(6, 2), None, randn(3, 4), "swiglu", "cpu"))


def test_gating_and_mlp_compile_fullgraph():
    T, D, F, sizes, k = 64, 16, 12, [4, 6], 2
    E = sum(sizes)
    gid = torch.randint(0, 2, (T,))
    x0, w10, w20, wr0 = randn(T, D), randn(E, D, F, scale=0.25), randn(E, F, D, scale=0.3), randn(D, E)

    def layer(x, w1, w2, wr):
        r = moe_gating(x @ wr, gid, sizes, k, renormalize=True, balance_coef=0.1)
        y = moe_expert_mlp(x, w1, w2, r.expert_ids, r.gates, activation="gelu")
        return y, r.balance_loss.sum()

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x0, w10, w20, wr0)]
        y, aux = fn(*leaves)
        (y.square().mean() + aux).backward()
        return [y, aux] + [t.grad for t in leaves]

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True))
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert_close(a, b, name=f"compiled output/grad {i}")
