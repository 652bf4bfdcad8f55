"""Grouped MoE gating, fast backends against the reference (forward: ids exact, gates and balance
statistics at fp32 tolerance; backward): cpu (csrc/cpu/moe_gating.cpp), triton
(unif2ace/kernels/triton/moe_gating.py, under the interpreter on CPU tensors) and cuda
(csrc/cuda/moe_gating.cu/.cuh: on a GPU, marked ``gpu``, and through the CPU emulator of the CUDA
kernels, marked ``cuda_emu``, at shapes that keep every branch); the custom ops behind them,
selection and argument errors."""

import math

import pytest
import torch
from moe_testing import CUDA, backend_cases, device_fixture, mlp_args, poison_fixture

from unif2ace.kernels import BackendUnavailableError, _ext, moe_align, moe_expert_mlp, moe_gating
from unif2ace.kernels import moe as M
from unif2ace.kernels._custom_ops import moe as C
from unif2ace.kernels.cuda import moe_gating as cuda_gating
from unif2ace.kernels.reference import moe_gating as R
from unif2ace.testing import assert_all_written, assert_close, fwd_bwd_parity, poison_, randn

TS, KS, ES = (1, 33, 222, 1000), (1, 2, 4, 8), (4, 8, 64)
FIELDS = M.MoEGating._fields

# the interpreter turns runtime loop bounds into numpy scalars this way (fine with numpy < 2.4)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


dev = device_fixture()  # the device of the test's backend
poison = poison_fixture("moe_gating")  # poisoned triton allocations when the backend is triton


def _dirty_heap(device, *shapes):
    """Allocate and free NaN-filled buffers of the output sizes so that fresh outputs likely reuse
    poisoned memory (best effort; equality with the reference is the real check)."""
    for s in shapes:
        poison_(torch.empty(s, dtype=torch.float32, device=device))


def _fns(backend, gid, sizes, k, score, renorm, coef):
    def ref_fn(z):
        return R.moe_gating_ref(z, gid, sizes, k, score, renorm, coef)

    def fast_fn(z):
        return tuple(moe_gating(z, gid, sizes, k, score=score, renormalize=renorm, balance_coef=coef, backend=backend))

    return ref_fn, fast_fn


def _check_written(out):
    for name, t in zip(FIELDS, out):
        assert_all_written(t, name)
    assert out[0].dtype == torch.int32 and all(t.dtype == torch.float32 for t in out[1:])


def _quantized_logits(T, E, device, dtype=torch.float32):
    """Logits on a 1/8 grid: scores are either exactly tied or far apart, so the chosen ids cannot
    depend on last-bit differences between two correct softmax implementations."""
    return (torch.randint(-24, 24, (T, E)).float() / 8).to(device=device, dtype=dtype)


def _grid_cases():
    # two groups of uneven sizes; their order, score, renormalisation and the id dtype vary with the case
    grid = [(T, k, E) for T in TS for k in KS for E in ES if k <= E]
    out = []
    for i, (T, k, E) in enumerate(grid):
        sizes = (E, E + 3) if (i // 4) % 2 == 0 else (E + 3, E)
        out.append((T, sizes, k, ("softmax", "sigmoid")[i % 2], bool((i // 2) % 2), ("int32", "int64")[i % 2]))
    return out


PARITY_CASES = {
    "cpu": _grid_cases(),
    "triton": [
        (53, sizes, k, score, renorm, "int64")
        for sizes, k, score, renorm in [
            ((4,), 1, "softmax", False),
            ((8,), 4, "sigmoid", True),
            ((4, 8), 2, "softmax", False),
            ((8, 4), 4, "softmax", True),
            ((4, 8), 2, "sigmoid", False),
            ((8, 8, 4), 1, "sigmoid", True),
            ((128, 8), 8, "softmax", False),  # a real-model group (E=128, k=8) next to a small one
        ]
    ],
    "cuda": _grid_cases(),
    # the emulator: the same grid without most T = 1000 cases (the grid cap is tested below)
    "cuda_emu": [c for c in _grid_cases() if c[0] < 1000 or c[2] == 8],
}


@pytest.mark.parametrize("backend,T,sizes,k,score,renorm,gid_dtype", backend_cases(PARITY_CASES))
def test_gating_parity(backend, T, sizes, k, score, renorm, gid_dtype, dev, poison):
    sizes = list(sizes)
    G, E = len(sizes), sum(sizes)
    logits = randn(T, E, scale=2.0, device=dev).requires_grad_(True)
    gid = torch.randint(0, G, (T,), dtype=getattr(torch, gid_dtype), device=dev)
    _dirty_heap(dev, (T, k), (E,), (T, E))
    ref_fn, fast_fn = _fns(backend, gid, sizes, k, score, renorm, 0.1)
    _check_written(fast_fn(logits.detach()))
    fwd_bwd_parity(ref_fn, fast_fn, [logits], names=["router_logits"])
    # the backend's backward entry point with every upstream gradient non-zero, against the closed form
    gg, gp, gl = randn(T, k, device=dev), randn(E, device=dev), randn(G, device=dev)
    args = (logits.detach(), gid, sizes, k, score, renorm, 0.1)
    got = M.MOE_GATING.kernels(backend).moe_gating_backward(gg, gp, gl, *args)
    assert_all_written(got, "d router_logits")
    assert_close(got, R.moe_gating_backward_ref(gg, gp, gl, *args), name="d router_logits")


@pytest.mark.parametrize("backend", ["cpu", "triton", *CUDA])
def test_gating_hand_computed(backend, dev):
    # one group of 2, k = 1: softmax rows [1/4, 3/4] and [3/4, 1/4]
    l3 = math.log(3.0)
    z = torch.tensor([[0.0, l3], [l3, 0.0], [0.0, l3]], device=dev)
    gid = torch.zeros(3, dtype=torch.long, device=dev)
    ids, gates, f, P, loss = moe_gating(z, gid, [2], 1, balance_coef=0.5, backend=backend)
    assert ids.tolist() == [[1], [0], [1]]
    assert_close(gates.cpu(), torch.full((3, 1), 0.75))
    assert_close(f.cpu(), torch.tensor([1 / 3, 2 / 3]))
    assert_close(P.cpu(), torch.tensor([(0.25 + 0.75 + 0.25) / 3, (0.75 + 0.25 + 0.75) / 3]))
    # 0.5 * size 2 * (1/3 * 5/12 + 2/3 * 7/12)
    assert_close(loss.cpu(), torch.tensor([0.5 * 2 * (5 / 36 + 14 / 36)]))
    # renormalised top-2 of one group: gates are the softmax itself
    z2 = torch.tensor([[1.0, 2.0, 0.5]], device=dev)
    r = moe_gating(z2, torch.zeros(1, dtype=torch.long, device=dev), [3], 2, renormalize=True, backend=backend)
    s = torch.softmax(z2.cpu(), -1)[0]
    assert r.expert_ids.tolist() == [[1, 0]]
    assert_close(r.gates.cpu(), torch.stack([s[1], s[0]]).view(1, 2) / (s[1] + s[0]))
    # renormalised top-2 of [1, 2, 2, 4] / 9 (softmax of [0, ln 2, ln 2, ln 4]): tie 1 vs 2 -> 1
    z3 = torch.tensor([[0.0, math.log(2), math.log(2), math.log(4)]], device=dev)
    g1 = torch.zeros(1, dtype=torch.long, device=dev)
    r = moe_gating(z3, g1, [4], 2, renormalize=True, balance_coef=1.0, backend=backend)
    assert r.expert_ids.tolist() == [[3, 1]]
    assert_close(r.gates.cpu(), torch.tensor([[4 / 6, 2 / 6]]))
    assert_close(r.expert_fraction.cpu(), torch.tensor([0.0, 0.5, 0.0, 0.5]))
    assert_close(r.expert_prob.cpu(), torch.tensor([1, 2, 2, 4]) / 9.0)
    assert_close(r.balance_loss.cpu(), torch.tensor([4 * (0.5 * 2 / 9 + 0.5 * 4 / 9)]))


@pytest.mark.parametrize("backend", ["cpu", *CUDA])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gating_ties_go_to_lowest_index(backend, score, dev):
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device=dev)
    gid = torch.zeros(2, dtype=torch.long, device=dev)
    assert moe_gating(z, gid, [5], 3, score=score, backend=backend).expert_ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    # many exact ties: small integer logits, second group offset, k = 4 of 8; a 40-wide group
    # spans two lanes' slots of the cuda kernel (ties across lanes and slots)
    for sizes, k in (([8, 8], 4), ([40, 8], 8)):
        T = 500
        zt = torch.randint(-2, 2, (T, sum(sizes))).float().to(dev).requires_grad_(True)
        gid = torch.randint(0, 2, (T,), device=dev)
        ref_fn, fast_fn = _fns(backend, gid, sizes, k, score, False, 0.01)
        fwd_bwd_parity(ref_fn, fast_fn, [zt], names=["router_logits"])
    # underflowing softmax scores (exactly 0) tie as well
    zu = torch.tensor([[0.0, -200.0, -300.0, -150.0, 10.0]], device=dev)
    g1 = torch.zeros(1, dtype=torch.long, device=dev)
    got = moe_gating(zu, g1, [5], 4, score=score, backend=backend).expert_ids
    assert torch.equal(got, R.moe_gating_ref(zu, g1, [5], 4, score)[0])


@pytest.mark.parametrize("backend", ["cpu", *CUDA])
def test_gating_empty_groups_and_no_tokens(backend, dev):
    T = 40
    z = randn(T, 4 + 6 + 5, device=dev).requires_grad_(True)
    gid = torch.full((T,), 2, dtype=torch.long, device=dev)  # groups 0 and 1 receive no tokens ...
    gid[:3] = 0  # ... then group 0 gets three
    ref_fn, fast_fn = _fns(backend, gid, [4, 6, 5], 2, "softmax", True, 0.3)
    fwd_bwd_parity(ref_fn, fast_fn, [z], names=["router_logits"])
    out = M.MoEGating(*fast_fn(z.detach()))
    _check_written(out)
    assert out.balance_loss[1].item() == 0.0 and not out.expert_prob[4:10].any()
    assert not out.expert_fraction[4:10].any()
    # backward: zero gradient outside each token's group (and for the empty group's columns)
    zz = z.detach().clone().requires_grad_(True)
    o = moe_gating(zz, gid, [4, 6, 5], 2, backend=backend)
    (o.gates.sum() + o.expert_prob.sum() + o.balance_loss.sum()).backward()
    assert not zz.grad[:, 4:10].any() and not zz.grad[3:, :4].any() and not zz.grad[:3, 10:].any()
    # T = 0: empty ids/gates, zero statistics; the backward returns an empty gradient
    z0 = randn(0, 8, device=dev).requires_grad_(True)
    g0 = torch.zeros(0, dtype=torch.long, device=dev)
    out0 = moe_gating(z0, g0, [3, 5], 2, backend=backend)
    ref0 = R.moe_gating_ref(z0.detach(), g0, [3, 5], 2)
    for a, b in zip(out0, ref0):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    (out0.gates.sum() + out0.expert_prob.sum() + out0.balance_loss.sum()).backward()
    assert z0.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", ["cpu", *CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gating_low_precision_logits(backend, dtype, dev):
    T, sizes, k = 222, [8, 5], 2
    z = randn(T, sum(sizes), dtype=dtype, scale=2.0, device=dev).requires_grad_(True)
    gid = torch.randint(0, 2, (T,), device=dev)
    ref_fn, fast_fn = _fns(backend, gid, sizes, k, "softmax", False, 0.1)
    fwd_bwd_parity(ref_fn, fast_fn, [z], dtype=dtype, names=["router_logits"])
    g = moe_gating(z, gid, sizes, k, backend=backend)
    g.gates.sum().backward()
    assert z.grad.dtype == dtype
    # the kernel reads bf16/fp16 itself: same result as on an fp32 copy of the logits
    z32 = z.detach().float()
    a, b = moe_gating(z.detach(), gid, sizes, k, backend=backend), moe_gating(z32, gid, sizes, k, backend=backend)
    assert torch.equal(a.expert_ids, b.expert_ids) and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_gating_custom_op_opcheck(backend):
    logits = randn(12, 8).requires_grad_(True)
    gid = torch.randint(0, 2, (12,))
    # opcheck's aot_dispatch test sums all outputs into one scalar, which fails on gating's int32
    # expert_ids output (a harness limitation); the fwd+bwd parity tests cover autograd.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(C.gating_op, (logits, gid, [3, 5], 2, "softmax", True, 0.1, backend), test_utils=utils)


# The custom-op path (used by every fast backend) run with the reference impl: forward and the
# backward custom op must match autograd through the plain reference.
@pytest.mark.parametrize("score,renormalize", [("softmax", False), ("sigmoid", True)])
def test_gating_custom_op_path_matches_reference(score, renormalize):
    logits = randn(30, 8, scale=2.0).requires_grad_(True)
    gid = torch.randint(0, 2, (30,))

    def ref_fn(z):
        return R.moe_gating_ref(z, gid, [3, 5], 2, score, renormalize, 0.1)

    def op_fn(z):
        return C.gating_op(z, gid, [3, 5], 2, score, renormalize, 0.1, "reference")

    fwd_bwd_parity(ref_fn, op_fn, [logits], names=["router_logits"])


# ------------------------------------------------------------------------------------------------
# selection and errors


def test_cpu_backend_is_auto_selected():
    dev = torch.device("cpu")
    assert M.MOE_GATING.select(dev) == "cpu" and M.MOE_MLP.select(dev) == "cpu"


def test_triton_not_auto_selected_on_cpu_and_needs_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    for op in (M.MOE_GATING, M.MOE_ALIGN, M.MOE_MLP):
        assert "triton" in op.backends and op.select(cpu) != "triton"
    assert M.MOE_MLP.cuda_order[0] == "triton" and M.MOE_GATING.cuda_order[0] == "triton"
    assert "triton" in M.MOE_ALIGN.cuda_order
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="moe_gating.*triton.*TRITON_INTERPRET"):
        moe_gating(randn(4, 4), torch.zeros(4, dtype=torch.long), [4], 2, backend="triton")


def test_cuda_backend_registered_and_clear_error_on_cpu_tensors():
    assert "cuda" in M.MOE_GATING.backends and "cuda" in M.MOE_GATING.cuda_order
    assert cuda_gating.gating_fits([128, 8]) and not cuda_gating.gating_fits([129, 8])
    assert not cuda_gating.gating_fits([1] * (cuda_gating.CUDA_GATING_MAX_GROUPS + 1))
    logits, gid = randn(4, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(BackendUnavailableError, match="moe_gating: backend 'cuda'.*CUDA tensors"):
        moe_gating(logits, gid, [8], 2, backend="cuda")


def test_bad_inputs_name_the_argument():
    z, gid = randn(6, 8), torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="top_k"):
        moe_gating(z, gid, [4, 4], 5, backend="triton")
    with pytest.raises(ValueError, match="group_sizes"):
        moe_gating(z, gid, [4, 5], 2, backend="triton")
    with pytest.raises(ValueError, match="w1"):
        moe_expert_mlp(*mlp_args(3, 8, 2, 6, 4), activation="swiglu", backend="triton")
    with pytest.raises(ValueError, match="block_size"):
        moe_align(torch.zeros(3, 2, dtype=torch.int32), 4, 0, backend="triton")


# ------------------------------------------------------------------------------------------------
# cpu


def test_cpu_gating_deterministic_across_runs_and_threads():
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


def test_cpu_gating_errors_name_the_argument():
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
# triton (under the interpreter on CPU tensors; gpu-marked tests at real sizes on a CUDA device)


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_gating_ties_empty_group_strided_and_int32_ids(backend, poison):
    # logits from a 3-value set: many exact ties, broken towards the lowest index
    T, sizes, k = 40, [4, 8], 3
    base = torch.randint(0, 3, (sum(sizes) + 3, T)).float()
    logits = base.t()[:, 1 : 1 + sum(sizes)]  # non-contiguous view with an offset
    gid = torch.zeros(T, dtype=torch.int32)  # group 1 gets no tokens
    got = moe_gating(logits, gid, sizes, k, backend="triton")
    want = R.moe_gating_ref(logits, gid, sizes, k, "softmax", False, 0.01)
    assert torch.equal(got.expert_ids, want[0])
    for name, a, b in zip(got._fields[1:], got[1:], want[1:]):
        assert_close(a, b, name=name)
    assert got.expert_fraction[4:].eq(0).all() and got.expert_prob[4:].eq(0).all() and got.balance_loss[1] == 0
    # backward with the empty group: zero gradient outside each token's group
    z = logits.detach().clone().requires_grad_(True)
    out = moe_gating(z, gid, sizes, k, backend="triton")
    (out.gates.sum() + out.balance_loss.sum()).backward()
    z2 = logits.detach().clone().requires_grad_(True)
    o2 = R.moe_gating_ref(z2, gid, sizes, k, "softmax", False, 0.01)
    (o2[1].sum() + o2[4].sum()).backward()
    assert_close(z.grad, z2.grad, name="router_logits grad")
    assert z.grad[:, 4:].eq(0).all()


def test_triton_gating_bf16_and_deterministic():
    T, sizes, k = 61, [8, 4], 2
    logits = randn(T, 12, dtype=torch.bfloat16).requires_grad_(True)
    gid = torch.randint(0, 2, (T,))
    ref_fn, tri_fn = _fns("triton", gid, sizes, k, "softmax", True, 0.1)
    fwd_bwd_parity(ref_fn, tri_fn, [logits], names=["router_logits"])
    a = moe_gating(logits.detach(), gid, sizes, k, backend="triton")
    b = moe_gating(logits.detach(), gid, sizes, k, backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_triton_gating_many_blocks():
    # more tokens than one program's block: partial statistics reduced over several rows
    T, sizes = 300, [8, 8]
    logits = randn(T, 16)
    gid = torch.randint(0, 2, (T,), dtype=torch.int64)
    got = moe_gating(logits, gid, sizes, 4, backend="triton")
    want = R.moe_gating_ref(logits, gid, sizes, 4, "softmax", False, 0.01)
    assert torch.equal(got.expert_ids, want[0])
    for name, a, b in zip(got._fields[1:], got[1:], want[1:]):
        assert_close(a, b, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("T,sizes,k", [(4096, [8, 8], 4), (8192, [128], 8), (1000, [64, 32, 8], 2)])
def test_triton_gpu_gating_parity(T, sizes, k, gpu_device):
    logits = randn(T, sum(sizes), device=gpu_device, dtype=torch.bfloat16).requires_grad_(True)
    gid = torch.randint(0, len(sizes), (T,), device=gpu_device)
    ref_fn, tri_fn = _fns("triton", gid, sizes, k, "softmax", True, 0.01)
    fwd_bwd_parity(ref_fn, tri_fn, [logits], names=["router_logits"], dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# cuda (on a GPU, and through the CPU emulator)


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_gating_strided_inputs_and_invalid_group_id(backend, dev):
    T, sizes, k = 300, [8, 4], 3
    base = randn(sum(sizes) + 3, T, device=dev, scale=2.0)
    logits = base.t()[:, 1 : 1 + sum(sizes)]  # non-unit column stride: the op copies once
    gid_full = torch.randint(0, 2, (2 * T,), dtype=torch.int32, device=dev)
    gid = gid_full[::2]  # strided ids, read in place
    ref_fn, cuda_fn = _fns("cuda", gid, sizes, k, "sigmoid", True, 0.2)
    fwd_bwd_parity(ref_fn, cuda_fn, [logits.detach().requires_grad_(True)], names=["router_logits"])
    rows = randn(T, sum(sizes) + 5, device=dev, scale=2.0)[:, 2 : 2 + sum(sizes)]  # row stride != E: read in place
    want = R.moe_gating_ref(rows, gid, sizes, k)
    got = moe_gating(rows, gid, sizes, k, backend="cuda")
    assert torch.equal(got.expert_ids, want[0])
    for name, a, b in zip(FIELDS[1:], got[1:], want[1:]):
        assert_close(a, b, name=name)
    # raw op, group id out of range (the public check is skipped under compile): null routing,
    # not counted, zero gradient row; never an out-of-bounds read
    bad = gid.clone()
    bad[5] = 7
    ids, gates, f, P, loss = _ext.cuda_ops().moe_gating(rows, bad, sizes, k, "softmax", False, 0.1)
    assert ids[5].tolist() == [-1] * k and not gates[5].any()
    keep = torch.arange(T, device=dev) != 5
    ref_ok = R.moe_gating_ref(rows[keep], gid[keep], sizes, k)
    assert torch.equal(ids[keep], ref_ok[0])
    assert_close(P, ref_ok[3], name="expert_prob without the bad token")
    dz = _ext.cuda_ops().moe_gating_backward(
        randn(T, k, device=dev), randn(12, device=dev), randn(2, device=dev), rows, bad, sizes, k, "softmax", False, 0.1
    )
    assert not dz[5].any() and torch.isfinite(dz).all()


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_gating_deterministic_and_many_blocks(backend, dev):
    # T large enough to cap the statistics grid (1024 blocks, several tokens per warp; emulated:
    # 9000 tokens, blocks of 9 whose first warp takes two)
    T, sizes, k = 40000 if dev.type == "cuda" else 9000, [64, 8], 4
    z = _quantized_logits(T, sum(sizes), dev)
    gid = torch.randint(0, 2, (T,), device=dev)
    ops = _ext.cuda_ops()
    args = (z, gid, sizes, k, "softmax", True, 0.01)
    base = ops.moe_gating(*args)
    want = R.moe_gating_ref(*args)
    assert torch.equal(base[0], want[0])
    for name, a, b in zip(FIELDS[1:], base[1:], want[1:]):
        assert_close(a, b, name=name)
    gg, gp, gl = randn(T, k, device=dev), randn(sum(sizes), device=dev), randn(2, device=dev)
    base_dz = ops.moe_gating_backward(gg, gp, gl, *args)
    assert_close(base_dz, R.moe_gating_backward_ref(gg, gp, gl, *args), name="d router_logits")
    for _ in range(3 if dev.type == "cuda" else 1):  # the emulator runs blocks in one fixed order
        again = ops.moe_gating(*args)
        assert all(torch.equal(a, b) for a, b in zip(base, again)), "forward not bitwise reproducible"
        assert torch.equal(ops.moe_gating_backward(gg, gp, gl, *args), base_dz), "backward not reproducible"


def _scratch_allocations(fn, row_words):
    """The 1-D allocations of whole [blocks, 8 warps, 2E + G] scratch rows that ``fn()`` makes."""
    with torch.profiler.profile(record_shapes=True) as prof:
        out = fn()
    sizes = [e.concrete_inputs[0] for e in prof.events() if e.name == "aten::empty" and e.concrete_inputs]
    return out, [sh for sh in sizes if len(sh) == 1 and sh[0] > 0 and sh[0] % (8 * row_words) == 0]


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("groups,scratch", [(8, False), (29, True)], ids=["opt-in-smem", "global-scratch"])
def test_cuda_gating_large_expert_counts_statistics(backend, groups, scratch, dev):
    # the per-warp accumulators (8 * (2E + G) words) exceed 48 KiB of shared memory: up to the
    # device's opt-in limit (227 KiB on sm_90, the emulator's too) they stay in shared memory
    # (8 x 100 experts: 51 KiB), above it (29 x 128 experts: 233 KiB) they live in a global scratch
    # buffer (64 statistics blocks; emulated: 1000 tokens still fill them)
    T, sizes, k = 3000 if dev.type == "cuda" else 1000, [100] * 8 if groups == 8 else [128] * 29, 8
    z = _quantized_logits(T, sum(sizes), dev).requires_grad_(True)
    gid = torch.randint(0, groups, (T,), device=dev)
    gid[gid == 5] = 6  # and one empty group
    ref_fn, cuda_fn = _fns("cuda", gid, sizes, k, "softmax", False, 0.05)
    out, allocs = _scratch_allocations(lambda: cuda_fn(z.detach()), 2 * sum(sizes) + groups)
    assert bool(allocs) == scratch, allocs
    _check_written(out)
    fwd_bwd_parity(ref_fn, cuda_fn, [z], names=["router_logits"])
    again = cuda_fn(z.detach())
    assert all(torch.equal(a, b) for a, b in zip(out, again))


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_gating_fallback_for_large_groups(backend, dev):
    # groups over 128 experts (and more than 255 groups) run the reference inside the cuda backend
    for T, sizes, k in ((70, [200, 8], 4), (50, [1] * 300, 1)):
        z = randn(T, sum(sizes), device=dev).requires_grad_(True)
        gid = torch.randint(0, len(sizes), (T,), device=dev)
        ref_fn, cuda_fn = _fns("cuda", gid, sizes, k, "softmax", False, 0.1)
        fwd_bwd_parity(ref_fn, cuda_fn, [z], names=["router_logits"])
    # a group of exactly 128 experts runs the kernel (all 4 slots of every lane)
    z = randn(90, 136, device=dev).requires_grad_(True)
    gid = torch.randint(0, 2, (90,), device=dev)
    ref_fn, cuda_fn = _fns("cuda", gid, [128, 8], 8, "sigmoid", True, 0.1)
    fwd_bwd_parity(ref_fn, cuda_fn, [z], names=["router_logits"])


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_gating_compile_fullgraph(backend, dev):
    T, sizes, k = 64, [8, 4], 2
    z = randn(T, 12, device=dev).requires_grad_(True)
    gid = torch.randint(0, 2, (T,), device=dev)

    @torch.compile(fullgraph=True)
    def f(x):
        out = moe_gating(x, gid, sizes, k, renormalize=True, balance_coef=0.1, backend="cuda")
        return out.gates.sum() + out.balance_loss.sum() + out.expert_prob.sum()

    def g(x):
        out = R.moe_gating_ref(x, gid, sizes, k, "softmax", True, 0.1)
        return out[1].sum() + out[4].sum() + out[3].sum()

    fwd_bwd_parity(g, f, [z], names=["router_logits"])


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_gating_raw_op_errors_name_the_argument(backend, dev):
    ops = _ext.cuda_ops()
    elsewhere = torch.device("meta") if dev.type == "cpu" else torch.device("cpu")  # not the kernels' device
    z, gid = randn(4, 8, device=dev), torch.zeros(4, dtype=torch.long, device=dev)
    with pytest.raises(RuntimeError, match="sum\\(group_sizes\\)"):
        ops.moe_gating(z, gid, [3, 4], 2, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="group_sizes.*cuda kernel"):
        ops.moe_gating(randn(4, 200, device=dev), gid, [200], 2, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="top_k"):
        ops.moe_gating(z, gid, [3, 5], 4, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="score"):
        ops.moe_gating(z, gid, [8], 2, "relu", False, 0.1)
    with pytest.raises(RuntimeError, match="group_ids"):
        ops.moe_gating(z, gid.to(elsewhere), [8], 2, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="router_logits must be a CUDA"):
        ops.moe_gating(z.to(elsewhere), gid, [8], 2, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="gradients must be on"):
        ops.moe_gating_backward(
            randn(4, 2, device=elsewhere),
            randn(8, device=dev),
            randn(1, device=dev),
            z,
            gid,
            [8],
            2,
            "softmax",
            False,
            0.1,
        )
    with pytest.raises(RuntimeError, match="grad_gates"):
        ops.moe_gating_backward(
            randn(4, 3, device=dev), randn(8, device=dev), randn(1, device=dev), z, gid, [8], 2, "softmax", False, 0.1
        )
    with pytest.raises(ValueError, match="group_ids"):  # the public check, cuda backend selected
        moe_gating(z, torch.tensor([0, 1, 2, 0], device=dev), [3, 5], 2, backend="cuda")


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_gating_1024_experts(backend, dev):
    # E = 1024 in 8 full groups of 128 (every lane's 4 slots; 66 KiB of shared-memory statistics), k = 8
    T, sizes, k = 120, [128] * 8, 8
    z = randn(T, sum(sizes), device=dev, scale=2.0).requires_grad_(True)
    gid = torch.randint(0, 8, (T,), device=dev)
    gid[gid == 3] = 4  # an empty group
    for score, renorm in (("softmax", True), ("sigmoid", False)):
        ref_fn, cuda_fn = _fns("cuda", gid, sizes, k, score, renorm, 0.02)
        _check_written(cuda_fn(z.detach()))
        fwd_bwd_parity(ref_fn, cuda_fn, [z], names=["router_logits"])


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_cuda_gating_nan_inf_logits(backend, score, dev):
    # NaN ranks above every number; -inf rows, +inf entries; the same ids / gates as the reference
    z = randn(7, 16, device=dev)
    z[0, 3] = float("nan")
    z[1, :] = float("-inf")
    z[2, 4] = float("inf")
    z[3, :4] = float("nan")
    z[4, :] = float("inf")
    z[5, 9] = float("-inf")
    gid = torch.zeros(7, dtype=torch.long, device=dev)
    for renorm in (False, True):
        got = moe_gating(z, gid, [16], 3, score=score, renormalize=renorm, backend="cuda")
        want = R.moe_gating_ref(z, gid, [16], 3, score, renorm, 0.01)
        assert torch.equal(got.expert_ids, want[0])
        for name, a, b in zip(FIELDS[1:], got[1:], want[1:]):
            torch.testing.assert_close(a, b, equal_nan=True, msg=name)
