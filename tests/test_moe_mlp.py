"""Routed expert MLP, fast backends against the reference (forward and backward): cpu
(csrc/cpu/moe_mlp.cpp: counting sort + per-expert oneDNN GEMMs) and triton
(unif2ace/kernels/triton/moe_mlp.py: gather-GEMMs on the align index list, under the interpreter
on CPU tensors; ``gpu``-marked tests at real sizes on a CUDA device); the custom ops behind them."""

import contextlib
import math

import pytest
import torch
from moe_testing import mlp_args, poison_fixture, random_ids

from unif2ace.kernels import BackendUnavailableError, _ext, moe_expert_mlp, moe_gating, moe_shared_expert
from unif2ace.kernels._custom_ops import moe as C
from unif2ace.kernels.reference import moe_mlp as R
from unif2ace.kernels.triton import moe_mlp as triton_mlp
from unif2ace.testing import assert_all_written, assert_close, fwd_bwd_parity, poison_, randn

TS, KS, ES = (1, 33, 222, 1000), (1, 2, 4, 8), (4, 8, 64)
MLP_NAMES = ["x", "w1", "w2", "gates", "b1", "b2"]
# multi-tile configuration: loops over D/F tiles, expert segments spanning several blocks
SMALL_TILES = dict(BLOCK_M=16, BLOCK_F=16, BLOCK_D=16)

# the interpreter turns runtime loop bounds into numpy scalars this way (fine with numpy < 2.4)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


poison = poison_fixture("moe_routing", "moe_mlp")  # poisoned triton allocations when the backend is triton


@contextlib.contextmanager
def _threads(n):
    """pytest-xdist workers run torch with one thread; the cpu kernel's parallel paths (expert-parallel
    GEMMs on OpenMP workers) need two. Only a few tests use two: two threads per xdist worker
    oversubscribe the cores and slow the reference down a lot."""
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


def _ids(T, k, E, dtype=torch.int64, device="cpu"):
    return random_ids(T, k, E, dtype, device)


def _distinct_ids(T, k, E, device="cpu"):
    """Top-k style ids: k distinct experts per token (as gating produces)."""
    return torch.rand(T, E).argsort(dim=1)[:, :k].to(device=device, dtype=torch.int32)


def _mlp_inputs(T, D, F, E, k, activation, bias, dtype=torch.float32, ids=None, scale=1.0, bias_scale=0.5):
    F1 = 2 * F if activation == "swiglu" else F
    ids = _ids(T, k, E) if ids is None else ids
    inputs = [
        randn(T, D, dtype=dtype, scale=scale),
        randn(E, D, F1, dtype=dtype, scale=D**-0.5),
        randn(E, F, D, dtype=dtype, scale=F**-0.5),
        torch.rand(T, k).to(dtype),
    ]
    if bias:
        inputs += [randn(E, F1, dtype=dtype, scale=bias_scale), randn(E, D, dtype=dtype, scale=bias_scale)]
    return ids, [t.requires_grad_(True) for t in inputs]


def _mlp_fns(backend, ids, activation, bias):
    """(reference fn, fn of the backend) of the float inputs ``x, w1, w2, gates[, b1, b2]``; backend
    "custom_op" runs the reference through the custom op (as every fast backend does)."""

    def unpack(args):
        x, w1, w2, g = args[:4]
        b1, b2 = (args[4], args[5]) if bias else (None, None)
        return x, w1, w2, g, b1, b2

    def ref_fn(*args):
        x, w1, w2, g, b1, b2 = unpack(args)
        return R.moe_expert_mlp_ref(x, w1, w2, ids, g, b1, b2, activation)

    def fast_fn(*args):
        x, w1, w2, g, b1, b2 = unpack(args)
        if backend == "custom_op":
            return C.mlp_op(x, w1, w2, ids, g, b1, b2, activation, "reference")[0]
        out = moe_expert_mlp(x, w1, w2, ids, g, b1=b1, b2=b2, activation=activation, backend=backend)
        assert_all_written(out, "out")
        return out

    return ref_fn, fast_fn


def _parity_cases():
    cpu = []  # E, activation, bias and the id dtype cycle with (T, k) so that each appears with several
    for i, (T, k) in enumerate((T, k) for T in TS for k in KS):
        act = ("gelu", "swiglu", "gelu_tanh")[(i // 3) % 3]
        cpu.append(pytest.param("cpu", T, 24, 20, ES[i % 3], k, act, i % 2 == 0, ("int32", "int64")[i % 2], 0.5))
    triton = [
        pytest.param("triton", 45, 40, 24, E, k, act, bias, "int64", 1.0)
        for act, bias, E, k in [
            ("gelu", True, 4, 1),
            ("gelu", False, 8, 2),
            ("gelu_tanh", True, 8, 4),
            ("swiglu", False, 4, 2),
            ("swiglu", True, 8, 4),
        ]
    ]
    return cpu + triton


@pytest.mark.parametrize("backend,T,D,F,E,k,activation,bias,id_dtype,bias_scale", _parity_cases())
def test_mlp_parity(backend, T, D, F, E, k, activation, bias, id_dtype, bias_scale, poison):
    ids = _ids(T, k, E, getattr(torch, id_dtype))
    ids, inputs = _mlp_inputs(T, D, F, E, k, activation, bias, ids=ids, bias_scale=bias_scale)
    _dirty_heap((T, D))
    ref_fn, fast_fn = _mlp_fns(backend, ids, activation, bias)
    fast_fn(*[t.detach() for t in inputs])
    fwd_bwd_parity(ref_fn, fast_fn, inputs, names=MLP_NAMES)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_mlp_custom_op_opcheck(backend):
    # triton's dots need D, F >= 16
    T, D, F, E, k = (9, 16, 16, 3, 2) if backend == "triton" else (6, 4, 5, 3, 2)
    x, w1, w2 = randn(T, D).requires_grad_(True), randn(E, D, 2 * F).requires_grad_(True), randn(E, F, D)
    torch.library.opcheck(
        C.mlp_op, (x, w1, w2, _ids(T, k, E, torch.int64), torch.rand(T, k), None, randn(E, D), "swiglu", backend)
    )


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False)])
def test_mlp_custom_op_path_matches_reference(activation, bias):
    T, D, F, E, k = 11, 6, 4, 3, 2
    F1 = 2 * F if activation == "swiglu" else F
    ids = _ids(T, k, E, torch.int64)
    inputs = [randn(T, D), randn(E, D, F1), randn(E, F, D), torch.rand(T, k)]
    inputs += [randn(E, F1), randn(E, D)] if bias else []
    inputs = [t.requires_grad_(True) for t in inputs]
    ref_fn, op_fn = _mlp_fns("custom_op", ids, activation, bias)
    fwd_bwd_parity(ref_fn, op_fn, inputs, names=MLP_NAMES)


def test_forcing_a_backend_without_a_kernel_is_a_clear_error():
    logits, gid = randn(4, 4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(BackendUnavailableError, match="moe_gating: backend 'cuda'.*CUDA tensors"):
        moe_gating(logits, gid, [4], 2, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="moe_expert_mlp: backend 'cuda'.*no 'cuda' kernel"):
        moe_expert_mlp(*mlp_args(2, 3, 1, 2, 2), backend="cuda")


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


# ------------------------------------------------------------------------------------------------
# cpu


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_mlp_activations_and_bias(activation, bias):
    ids, inputs = _mlp_inputs(90, 33, 17, 8, 2, activation, bias)
    ref_fn, cpu_fn = _mlp_fns("cpu", ids, activation, bias)
    fwd_bwd_parity(ref_fn, cpu_fn, inputs, names=MLP_NAMES)


def test_cpu_mlp_skewed_routing_and_empty_experts():
    T, D, F, E, k = 300, 16, 12, 8, 2
    # all tokens to expert 3 (the skewed path: experts run one after another, threaded inside)
    ids = torch.full((T, k), 3, dtype=torch.long)
    ids[::7, 1] = -1
    _, inputs = _mlp_inputs(T, D, F, E, k, "gelu", True, ids=ids)
    ref_fn, cpu_fn = _mlp_fns("cpu", ids, "gelu", True)
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


def _gemm_dtypes(fn, *inputs):
    """The operand dtypes of the GEMMs the cpu kernel ran (forward and backward of fn), as the
    profiler records its at::mm / oneDNN linear calls."""
    with _threads(1), torch.profiler.profile(record_shapes=True) as prof:  # one thread: every call on this one
        fn(*inputs).float().square().sum().backward()
    names = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")
    floats = ("float", "c10::BFloat16", "c10::Half")
    return {d for e in prof.events() if e.name in names for d in e.input_dtypes if d in floats}


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("lowp", [True, False], ids=["bf16-gemms", "fp32-fallback"])
def test_cpu_mlp_bf16_gemms(lowp, activation, monkeypatch):
    """bf16 inputs run the GEMMs on bf16 operands where the machine has bf16 matrix instructions
    (``_ext.cpu_features()["bf16_gemm"]``); with UNIF2ACE_CPU_LOWP_GEMM=0 -- what a machine without
    them runs -- in fp32. Both within the MoE bf16 tolerance of the reference, forward and backward."""
    if not lowp:
        monkeypatch.setenv("UNIF2ACE_CPU_LOWP_GEMM", "0")
    elif not _ext.cpu_features()["bf16_gemm"]:
        pytest.skip("no bf16 matrix instructions on this CPU")
    # the Triton bf16 test's shape. Its tolerance (x4) is what dW2 = A^T (g * grad_out) on bf16
    # operands -- the GPU kernels' design too -- reaches only for some seeds (emulated over 8
    # seeds: up to 1.5x of it, ours as the GPU scheme), so x8
    T, D, F, E, k = 37, 48, 32, 4, 2
    ids, inputs = _mlp_inputs(T, D, F, E, k, activation, True, dtype=torch.bfloat16, scale=0.1, bias_scale=1.0)
    ref_fn, cpu_fn = _mlp_fns("cpu", ids, activation, True)
    fwd_bwd_parity(ref_fn, cpu_fn, inputs, dtype=torch.bfloat16, names=MLP_NAMES, scale=8.0)
    assert _gemm_dtypes(cpu_fn, *inputs) == ({"c10::BFloat16"} if lowp else {"float"})


def test_cpu_mlp_mixed_dtypes():
    T, D, F, E, k = 120, 32, 24, 8, 4
    ids = _ids(T, k, E)
    # bf16 activations with fp32 weights, fp16 gates: output in x's dtype, grads in each input's dtype
    x = randn(T, D, dtype=torch.bfloat16).requires_grad_(True)
    w1 = randn(E, D, F, scale=D**-0.5).requires_grad_(True)
    w2 = randn(E, F, D, scale=F**-0.5).requires_grad_(True)
    g = torch.rand(T, k).half().requires_grad_(True)
    ref_fn, cpu_fn = _mlp_fns("cpu", ids, "gelu", False)
    fwd_bwd_parity(ref_fn, cpu_fn, [x, w1, w2, g], dtype=torch.bfloat16, names=MLP_NAMES)
    out = cpu_fn(x, w1, w2, g)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert (x.grad.dtype, w1.grad.dtype, g.grad.dtype) == (torch.bfloat16, torch.float32, torch.float16)


class _OperandDtypes:
    """Records the dtypes of (x, w1, w2) every kernel entry point of a backend gets."""

    def __init__(self, monkeypatch, backend):
        self.seen = []
        module = C.OPS["moe_expert_mlp"].kernels(backend)
        monkeypatch.setattr(module, "moe_expert_mlp", self._wrap("fwd", module.moe_expert_mlp, 0))
        monkeypatch.setattr(module, "moe_expert_mlp_backward", self._wrap("bwd", module.moe_expert_mlp_backward, 1))

    def _wrap(self, name, fn, first):
        def f(*args, **kw):
            self.seen.append((name, *(a.dtype for a in args[first : first + 3])))
            return fn(*args, **kw)

        return f


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_autocast_bf16_operands(backend, monkeypatch):
    """Under torch.autocast(cpu, bf16) the expert MLP behaves like F.linear: fp32 x / w1 / w2 reach
    the kernel entry points as bf16 GEMM operands, forward and backward; the result matches the
    reference on the bf16-cast operands within bf16 tolerance, comes out in bf16, and the gradients
    come back in fp32. A custom op's backward inside the autocast region computes exactly as one
    outside it; fp32 weights that require grad are cast once per autocast region (autocast's cache)."""
    T, D, F, E, k = 37, 32, 16, 4, 2  # triton's dots need D, F >= 16
    ids, inputs = _mlp_inputs(T, D, F, E, k, "swiglu", True, scale=0.5, bias_scale=1.0)
    rec = None if backend == "reference" else _OperandDtypes(monkeypatch, backend)

    def fast(x, w1, w2, g, b1, b2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return moe_expert_mlp(x, w1, w2, ids, g, b1=b1, b2=b2, activation="swiglu", backend=backend)

    def ref(x, w1, w2, g, b1, b2):  # the contract: the GEMM operands rounded to bf16, the rest fp32
        return R.moe_expert_mlp_ref(x.bfloat16(), w1.bfloat16(), w2.bfloat16(), ids, g, b1, b2, "swiglu")

    fwd_bwd_parity(ref, fast, inputs, dtype=torch.bfloat16, names=MLP_NAMES, scale=8.0)  # see test_cpu_mlp_bf16_gemms
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fast(*leaves)
    assert out.dtype == torch.bfloat16
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, go, retain_graph=True)
    assert all(gr.dtype == torch.float32 for gr in grads)
    if rec is not None:  # (the reference's backward is autograd's: autocast applies to it)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads_in = torch.autograd.grad(out, leaves, go)
        for name, a, b in zip(MLP_NAMES, grads, grads_in):
            assert torch.equal(a, b), f"{name}: the backward inside autocast differs from the one outside"
        assert {name for name, *_ in rec.seen} == {"fwd", "bwd"}, rec.seen
        assert all(dt == torch.bfloat16 for _, *dts in rec.seen for dt in dts), rec.seen
        rec.seen.clear()  # outside autocast: the fp32 operands as given
        moe_expert_mlp(*inputs[:3], ids, inputs[3], activation="swiglu", backend=backend)
        assert rec.seen == [("fwd", torch.float32, torch.float32, torch.float32)], rec.seen
    # two calls in one region cast the weight leaves once
    x = inputs[0].detach() * 1.0
    with torch.profiler.profile(record_shapes=True) as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            moe_expert_mlp(x, *inputs[1:3], ids, inputs[3], activation="swiglu", backend=backend)
    casts = [tuple(e.input_shapes[0]) for e in prof.events() if e.name == "aten::_to_copy"]
    want = 2 if _ext.cpu_status()[0] else 4  # without the C++ extension: no cache
    assert sum(s in (tuple(inputs[1].shape), tuple(inputs[2].shape)) for s in casts) == want, casts


def test_cpu_mlp_bitwise_deterministic():
    # balanced routing: with two threads the experts run in parallel (single-threaded GEMMs on the
    # OpenMP workers), with one thread one after another: the same arithmetic either way
    T, D, F, E, k = 1000, 48, 40, 8, 4
    ids, inputs = _mlp_inputs(T, D, F, E, k, "gelu", True)
    x, w1, w2, g, b1, b2 = [t.detach() for t in inputs]
    go = randn(T, D)
    ops = _ext.cpu_ops()

    def run():
        out, saved_h = ops.moe_expert_mlp(x, w1, w2, ids, g, b1, b2, "gelu")
        grads = ops.moe_expert_mlp_backward(go, x, w1, w2, ids, g, b1, b2, "gelu", saved_h)
        # without the forward's pre-activations the backward recomputes them: the same numbers
        again = ops.moe_expert_mlp_backward(go, x, w1, w2, ids, g, b1, b2, "gelu")
        assert all(torch.equal(a, b) for a, b in zip(grads, again))
        return out, grads

    with _threads(1):
        runs = [run()]
    with _threads(2):
        runs += [run() for _ in range(3)]
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def test_cpu_mlp_aten_gemm_fallback(monkeypatch):
    # the GEMMs normally run through oneDNN; at::mm is the fallback (torch without oneDNN)
    monkeypatch.setenv("UNIF2ACE_MOE_GEMM", "aten")
    ids, inputs = _mlp_inputs(300, 24, 20, 8, 2, "swiglu", True)
    ref_fn, cpu_fn = _mlp_fns("cpu", ids, "swiglu", True)
    with _threads(2):
        fwd_bwd_parity(ref_fn, cpu_fn, inputs, names=MLP_NAMES)


def test_cpu_mlp_worker_threads_with_inputs_requiring_grad():
    # Regression: experts run on OpenMP workers, which do not inherit the caller's dispatch TLS; a
    # GEMM there went through autograd and raised "mm(): functions with out=... arguments don't
    # support automatic differentiation". Experts big enough (benchmark case (c)) that the workers
    # take some of them.
    T, D, F, E, k = 2048, 256, 256, 16, 4
    ids, inputs = _mlp_inputs(T, D, F, E, k, "gelu", True)
    ops = _ext.cpu_ops()
    with _threads(2):
        for _ in range(3):
            out, _ = ops.moe_expert_mlp(*inputs[:3], ids, inputs[3], inputs[4], inputs[5], "gelu")
            grads = ops.moe_expert_mlp_backward(randn(T, D), *inputs[:3], ids, inputs[3], inputs[4], inputs[5], "gelu")
            assert not out.requires_grad and all(not g.requires_grad for g in grads)


def test_cpu_mlp_errors_name_the_argument():
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


# ------------------------------------------------------------------------------------------------
# triton (under the interpreter on CPU tensors; gpu-marked tests at real sizes on a CUDA device)


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_triton_mlp_small_tiles_skewed_routing(backend, activation, poison):
    # several D/F tiles (D, F not multiples of 16), one expert owning most rows (many blocks),
    # experts without tokens, invalid ids; kernels called directly with a small-tile config
    T, D, F, E, k = 50, 40, 24, 6, 2
    ids = torch.zeros(T, k, dtype=torch.int32)
    ids[:, 1] = 3
    ids[::7, 1] = -1
    ids[5, 0] = 6  # out of range: dropped
    _, (x, w1, w2, g, b1, b2) = _mlp_inputs(T, D, F, E, k, activation, True, bias_scale=1.0)
    args = [t.detach() for t in (x, w1, w2, g)]
    bs = [b1.detach(), b2.detach()]
    out = triton_mlp.moe_expert_mlp(*args[:3], ids, args[3], *bs, activation, config=SMALL_TILES)
    assert_all_written(out, "out")
    assert_close(out, R.moe_expert_mlp_ref(*args[:3], ids, args[3], *bs, activation), name="out")
    go = randn(T, D)
    got = triton_mlp.moe_expert_mlp_backward(go, *args[:3], ids, args[3], *bs, activation, config=SMALL_TILES)
    want = R.moe_expert_mlp_backward_ref(go, *args[:3], ids, args[3], *bs, activation)
    for name, a, b in zip(("dx", "dw1", "dw2", "dgates", "db1", "db2"), got, want):
        assert_all_written(a, name)
        assert_close(a, b, name=name)
    # experts 1, 2, 4, 5 got no token: zero weight gradients
    assert got[1][[1, 2, 4, 5]].eq(0).all() and got[2][[1, 2, 4, 5]].eq(0).all()


def test_triton_mlp_hand_computed():
    # w1[e] = c_e * I, w2[e] = I: out[t] = sum_j g_tj * gelu(c_e * x_t) elementwise
    D = 16
    c = [0.5, -2.0, 1.5]
    w1 = torch.stack([ci * torch.eye(D) for ci in c])
    w2 = torch.eye(D).expand(3, D, D).contiguous()
    x = torch.linspace(-3, 3, 2 * D).view(2, D)
    ids = torch.tensor([[0, 2], [1, -1]])
    g = torch.tensor([[0.25, 0.75], [0.5, 0.9]])
    out = moe_expert_mlp(x, w1, w2, ids, g, backend="triton")

    def gelu(v):
        return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))

    want = torch.tensor(
        [
            [0.25 * gelu(c[0] * v) + 0.75 * gelu(c[2] * v) for v in x[0].tolist()],
            [0.5 * gelu(c[1] * v) for v in x[1].tolist()],
        ]
    )
    assert_close(out, want)


def test_triton_mlp_bf16_and_mixed_dtypes():
    # bf16 end to end (vLLM practice: inputs scaled by 1/10); fp32 x with bf16 weights (fp32 path)
    # scale=4: atol 2e-2 (docs/kernels.md's MoE tolerance); h, dh and gate*grad_out are bf16 dot operands, as on GPUs
    ids, inputs = _mlp_inputs(37, 48, 32, 4, 2, "swiglu", True, dtype=torch.bfloat16, scale=0.1, bias_scale=1.0)
    ref_fn, tri_fn = _mlp_fns("triton", ids, "swiglu", True)
    fwd_bwd_parity(ref_fn, tri_fn, inputs, names=MLP_NAMES, dtype=torch.bfloat16, scale=4.0)
    ids = _distinct_ids(21, 2, 4)
    x = randn(21, 32)
    w1, w2 = randn(4, 32, 16, dtype=torch.bfloat16, scale=0.2), randn(4, 16, 32, dtype=torch.bfloat16, scale=0.25)
    g = torch.rand(21, 2)
    out = moe_expert_mlp(x, w1, w2, ids, g, activation="gelu_tanh", backend="triton")
    assert out.dtype == torch.float32
    assert_close(out, R.moe_expert_mlp_ref(x, w1, w2, ids, g, None, None, "gelu_tanh"))


def test_triton_mlp_deterministic_and_shared_expert():
    ids, (x, w1, w2, g) = _mlp_inputs(30, 32, 16, 4, 4, "gelu", False)
    ids = _distinct_ids(30, 4, 4)
    a = moe_expert_mlp(x.detach(), w1.detach(), w2.detach(), ids, g.detach(), backend="triton")
    b = moe_expert_mlp(x.detach(), w1.detach(), w2.detach(), ids, g.detach(), backend="triton")
    assert torch.equal(a, b)
    xs, ws1, ws2, bs1 = randn(13, 32), randn(32, 16, scale=0.2), randn(16, 32, scale=0.25), randn(16)
    got = moe_shared_expert(xs, ws1, ws2, b1=bs1, backend="triton")
    assert_close(got, torch.nn.functional.gelu(xs @ ws1 + bs1) @ ws2, name="shared expert")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "T,D,F,E,k,activation,dtype",
    [
        (4096, 512, 256, 16, 4, "gelu", torch.bfloat16),
        (2048, 256, 128, 128, 8, "swiglu", torch.bfloat16),
        (1, 256, 128, 8, 2, "swiglu", torch.bfloat16),
        (777, 200, 96, 8, 2, "gelu_tanh", torch.float32),
    ],
)
def test_triton_gpu_mlp_parity(T, D, F, E, k, activation, dtype, gpu_device):
    ids, inputs = _mlp_inputs(T, D, F, E, k, activation, True, dtype=dtype, scale=0.1, bias_scale=1.0)
    ids = ids.to(gpu_device)
    inputs = [t.detach().to(gpu_device).requires_grad_(True) for t in inputs]
    ref_fn, tri_fn = _mlp_fns("triton", ids, activation, True)
    scale = 4.0 if dtype == torch.bfloat16 else 1.0
    fwd_bwd_parity(ref_fn, tri_fn, inputs, names=MLP_NAMES, dtype=dtype, scale=scale)


@pytest.mark.gpu
def test_triton_gpu_mlp_64bit_offsets(gpu_device):
    # x with more than 2**31 elements: token row offsets overflow int32
    D, E, F = 2048, 4, 32
    T = 2**31 // D + 64
    x = torch.empty(T, D, device=gpu_device, dtype=torch.bfloat16).normal_().mul_(0.1)
    w1, w2 = (
        randn(E, D, F, device=gpu_device, dtype=torch.bfloat16, scale=D**-0.5),
        randn(E, F, D, device=gpu_device, dtype=torch.bfloat16, scale=F**-0.5),
    )
    ids = torch.full((T, 1), -1, dtype=torch.int32, device=gpu_device)
    last = torch.arange(T - 64, T, device=gpu_device)
    ids[last, 0] = torch.arange(64, device=gpu_device, dtype=torch.int32) % E
    g = torch.ones(T, 1, device=gpu_device)
    out = moe_expert_mlp(x, w1, w2, ids, g, backend="triton")
    want = R.moe_expert_mlp_ref(x[last], w1, w2, ids[last], g[last])
    assert_close(out[last], want, torch.bfloat16, name="rows past 2**31 elements")
    assert out[:-64].abs().max().item() == 0
