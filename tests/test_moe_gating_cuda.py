"""Grouped MoE gating, cuda backend (csrc/cuda/moe_gating.cu/.cuh): forward (ids exact, gates and
balance statistics at fp32 tolerance) and backward against the reference, ties, empty groups,
T = 0, bf16/fp16 logits, the global-scratch statistics path, the >128-experts fallback, bitwise
determinism, torch.compile. GPU tests are skipped without a CUDA device (the .cu is compile-checked
by scripts/check_cuda_compile.py); the registration test at the top runs everywhere."""

import math

import pytest
import torch

from unif2ace.kernels import BackendUnavailableError, _ext, moe_gating
from unif2ace.kernels import moe as M
from unif2ace.kernels._dispatch import backend_usable
from unif2ace.kernels.reference import moe as R
from unif2ace.testing import assert_all_written, assert_close, fwd_bwd_parity, poison_, randn

gpu = pytest.mark.gpu
TS, KS, ES = (1, 33, 222, 1000), (1, 2, 4, 8), (4, 8, 64)
FIELDS = M.MoEGating._fields


def test_cuda_backend_registered_and_clear_error_on_cpu_tensors():
    assert "cuda" in M.MOE_GATING.impls and "cuda" in M.MOE_GATING.cuda_order
    assert M._gating_cuda_fits([128, 8]) and not M._gating_cuda_fits([129, 8])
    assert not M._gating_cuda_fits([1] * (M.CUDA_GATING_MAX_GROUPS + 1))
    logits, gid = randn(4, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(BackendUnavailableError, match="moe_gating: backend 'cuda'.*CUDA tensors"):
        moe_gating(logits, gid, [8], 2, backend="cuda")


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.fixture
def dev(gpu_device):
    ok, why = backend_usable("cuda", gpu_device)
    if not ok:
        pytest.skip(why)
    return gpu_device


def _dirty_heap(device, *shapes):
    """Allocate and free NaN-filled buffers of the output sizes so that fresh outputs likely reuse
    poisoned memory (best effort; equality with the reference is the real check)."""
    for s in shapes:
        poison_(torch.empty(s, dtype=torch.float32, device=device))


def _fns(gid, sizes, k, score, renorm, coef):
    def ref_fn(z):
        return R.moe_gating_ref(z, gid, sizes, k, score, renorm, coef)

    def cuda_fn(z):
        return tuple(moe_gating(z, gid, sizes, k, score=score, renormalize=renorm, balance_coef=coef, backend="cuda"))

    return ref_fn, cuda_fn


def _check_written(out):
    for name, t in zip(FIELDS, out):
        assert_all_written(t, name)
    assert out[0].dtype == torch.int32 and all(t.dtype == torch.float32 for t in out[1:])


def _quantized_logits(T, E, device, dtype=torch.float32):
    """Logits on a 1/8 grid: scores are either exactly tied or far apart, so the chosen ids cannot
    depend on last-bit differences between two correct softmax implementations."""
    return (torch.randint(-24, 24, (T, E)).float() / 8).to(device=device, dtype=dtype)


CASES = [(T, k, E) for T in TS for k in KS for E in ES if k <= E]


@gpu
@pytest.mark.parametrize("T,k,E", CASES)
def test_cuda_gating_parity(dev, T, k, E):
    # two groups of uneven sizes; order, score, renormalisation and the id dtype vary with the case
    i = CASES.index((T, k, E))
    score = ("softmax", "sigmoid")[i % 2]
    renorm = bool((i // 2) % 2)
    sizes = [E, E + 3] if (i // 4) % 2 == 0 else [E + 3, E]
    logits = randn(T, sum(sizes), scale=2.0, device=dev).requires_grad_(True)
    gid = torch.randint(0, 2, (T,), dtype=(torch.int32, torch.int64)[i % 2], device=dev)
    _dirty_heap(dev, (T, k), (sum(sizes),), (T, sum(sizes)))
    ref_fn, cuda_fn = _fns(gid, sizes, k, score, renorm, 0.1)
    out = cuda_fn(logits.detach())
    _check_written(out)
    fwd_bwd_parity(ref_fn, cuda_fn, [logits], names=["router_logits"])
    # the raw backward with every upstream gradient non-zero, against the closed form
    gg, gp, gl = randn(T, k, device=dev), randn(sum(sizes), device=dev), randn(2, device=dev)
    args = (logits.detach(), gid, sizes, k, score, renorm, 0.1)
    got = _ext.cuda_ops().moe_gating_backward(gg, gp, gl, *args)
    assert_all_written(got, "d router_logits")
    assert_close(got, R.moe_gating_backward_ref(gg, gp, gl, *args), name="d router_logits")


@gpu
def test_cuda_gating_hand_computed(dev):
    # one group of 2, k = 1: softmax rows [1/4, 3/4] and [3/4, 1/4]
    l3 = math.log(3.0)
    z = torch.tensor([[0.0, l3], [l3, 0.0], [0.0, l3]], device=dev)
    gid = torch.zeros(3, dtype=torch.long, device=dev)
    ids, gates, f, P, loss = moe_gating(z, gid, [2], 1, balance_coef=0.5, backend="cuda")
    assert ids.tolist() == [[1], [0], [1]]
    assert_close(gates.cpu(), torch.full((3, 1), 0.75))
    assert_close(f.cpu(), torch.tensor([1 / 3, 2 / 3]))
    assert_close(P.cpu(), torch.tensor([(0.25 + 0.75 + 0.25) / 3, (0.75 + 0.25 + 0.75) / 3]))
    assert_close(loss.cpu(), torch.tensor([0.5 * 2 * (5 / 36 + 14 / 36)]))
    # renormalised top-2 of [1, 2, 2, 4] / 9 (softmax of [0, ln 2, ln 2, ln 4]): tie 1 vs 2 -> 1
    z2 = torch.tensor([[0.0, math.log(2), math.log(2), math.log(4)]], device=dev)
    r = moe_gating(
        z2, torch.zeros(1, dtype=torch.long, device=dev), [4], 2, renormalize=True, balance_coef=1.0, backend="cuda"
    )
    assert r.expert_ids.tolist() == [[3, 1]]
    assert_close(r.gates.cpu(), torch.tensor([[4 / 6, 2 / 6]]))
    assert_close(r.expert_fraction.cpu(), torch.tensor([0.0, 0.5, 0.0, 0.5]))
    assert_close(r.balance_loss.cpu(), torch.tensor([4 * (0.5 * 2 / 9 + 0.5 * 4 / 9)]))


@gpu
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_cuda_gating_ties_go_to_lowest_index(dev, score):
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device=dev)
    gid = torch.zeros(2, dtype=torch.long, device=dev)
    assert moe_gating(z, gid, [5], 3, score=score, backend="cuda").expert_ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    # many exact ties: small integer logits, second group offset, k = 4 of 8; a 40-wide group
    # spans two lanes' slots (ties across lanes and slots)
    for sizes, k in (([8, 8], 4), ([40, 8], 8)):
        T = 500
        zt = torch.randint(-2, 2, (T, sum(sizes))).float().to(dev).requires_grad_(True)
        gid = torch.randint(0, 2, (T,), device=dev)
        ref_fn, cuda_fn = _fns(gid, sizes, k, score, False, 0.01)
        fwd_bwd_parity(ref_fn, cuda_fn, [zt], names=["router_logits"])
    # underflowing softmax scores (exactly 0) tie as well
    zu = torch.tensor([[0.0, -200.0, -300.0, -150.0, 10.0]], device=dev)
    g1 = torch.zeros(1, dtype=torch.long, device=dev)
    got = moe_gating(zu, g1, [5], 4, score=score, backend="cuda").expert_ids
    assert torch.equal(got, R.moe_gating_ref(zu, g1, [5], 4, score)[0])


@gpu
def test_cuda_gating_empty_groups_and_no_tokens(dev):
    T = 40
    z = randn(T, 4 + 6 + 5, device=dev).requires_grad_(True)
    gid = torch.full((T,), 2, dtype=torch.long, device=dev)  # groups 0 and 1 receive no tokens ...
    gid[:3] = 0  # ... then group 0 gets three
    ref_fn, cuda_fn = _fns(gid, [4, 6, 5], 2, "softmax", True, 0.3)
    fwd_bwd_parity(ref_fn, cuda_fn, [z], names=["router_logits"])
    out = M.MoEGating(*cuda_fn(z.detach()))
    _check_written(out)
    assert out.balance_loss[1].item() == 0.0 and not out.expert_prob[4:10].any()
    assert not out.expert_fraction[4:10].any()
    # backward: zero gradient outside each token's group (and for the empty group's columns)
    zz = z.detach().clone().requires_grad_(True)
    o = moe_gating(zz, gid, [4, 6, 5], 2, backend="cuda")
    (o.gates.sum() + o.expert_prob.sum() + o.balance_loss.sum()).backward()
    assert not zz.grad[:, 4:10].any() and not zz.grad[3:, :4].any() and not zz.grad[:3, 10:].any()
    # T = 0: empty ids/gates, zero statistics; the backward returns an empty gradient
    z0 = randn(0, 8, device=dev).requires_grad_(True)
    g0 = torch.zeros(0, dtype=torch.long, device=dev)
    out0 = moe_gating(z0, g0, [3, 5], 2, backend="cuda")
    ref0 = R.moe_gating_ref(z0.detach(), g0, [3, 5], 2)
    for a, b in zip(out0, ref0):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    (out0.gates.sum() + out0.expert_prob.sum() + out0.balance_loss.sum()).backward()
    assert z0.grad.shape == (0, 8)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_gating_low_precision_logits(dev, dtype):
    T, sizes, k = 222, [8, 5], 2
    z = randn(T, sum(sizes), dtype=dtype, scale=2.0, device=dev).requires_grad_(True)
    gid = torch.randint(0, 2, (T,), device=dev)
    ref_fn, cuda_fn = _fns(gid, sizes, k, "softmax", False, 0.1)
    fwd_bwd_parity(ref_fn, cuda_fn, [z], dtype=dtype, names=["router_logits"])
    g = moe_gating(z, gid, sizes, k, backend="cuda")
    g.gates.sum().backward()
    assert z.grad.dtype == dtype
    # the kernel reads bf16/fp16 itself: same result as on an fp32 copy of the logits
    z32 = z.detach().float()
    a, b = moe_gating(z.detach(), gid, sizes, k, backend="cuda"), moe_gating(z32, gid, sizes, k, backend="cuda")
    assert torch.equal(a.expert_ids, b.expert_ids) and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))


@gpu
def test_cuda_gating_strided_inputs_and_invalid_group_id(dev):
    T, sizes, k = 300, [8, 4], 3
    base = randn(sum(sizes) + 3, T, device=dev, scale=2.0)
    logits = base.t()[:, 1 : 1 + sum(sizes)]  # non-unit column stride: the op copies once
    gid_full = torch.randint(0, 2, (2 * T,), dtype=torch.int32, device=dev)
    gid = gid_full[::2]  # strided ids, read in place
    ref_fn, cuda_fn = _fns(gid, sizes, k, "sigmoid", True, 0.2)
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


@gpu
def test_cuda_gating_deterministic_and_many_blocks(dev):
    # T large enough to cap the statistics grid (1024 blocks, several tokens per warp)
    T, sizes, k = 40000, [64, 8], 4
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
    for _ in range(3):
        again = ops.moe_gating(*args)
        assert all(torch.equal(a, b) for a, b in zip(base, again)), "forward not bitwise reproducible"
        assert torch.equal(ops.moe_gating_backward(gg, gp, gl, *args), base_dz), "backward not reproducible"


@gpu
def test_cuda_gating_global_scratch_statistics(dev):
    # 8 groups x 100 experts: the per-warp accumulators (8 * (2E + G) words) exceed 48 KiB of
    # shared memory and live in a global scratch buffer (64 statistics blocks)
    T, sizes, k = 3000, [100] * 8, 8
    z = _quantized_logits(T, sum(sizes), dev).requires_grad_(True)
    gid = torch.randint(0, 8, (T,), device=dev)
    gid[gid == 5] = 6  # and one empty group
    ref_fn, cuda_fn = _fns(gid, sizes, k, "softmax", False, 0.05)
    out = cuda_fn(z.detach())
    _check_written(out)
    fwd_bwd_parity(ref_fn, cuda_fn, [z], names=["router_logits"])
    again = cuda_fn(z.detach())
    assert all(torch.equal(a, b) for a, b in zip(out, again))


@gpu
def test_cuda_gating_fallback_for_large_groups(dev):
    # groups over 128 experts (and more than 255 groups) run the reference inside the cuda backend
    for T, sizes, k in ((70, [200, 8], 4), (50, [1] * 300, 1)):
        z = randn(T, sum(sizes), device=dev).requires_grad_(True)
        gid = torch.randint(0, len(sizes), (T,), device=dev)
        ref_fn, cuda_fn = _fns(gid, sizes, k, "softmax", False, 0.1)
        fwd_bwd_parity(ref_fn, cuda_fn, [z], names=["router_logits"])
    # a group of exactly 128 experts runs the kernel (all 4 slots of every lane)
    z = randn(90, 136, device=dev).requires_grad_(True)
    gid = torch.randint(0, 2, (90,), device=dev)
    ref_fn, cuda_fn = _fns(gid, [128, 8], 8, "sigmoid", True, 0.1)
    fwd_bwd_parity(ref_fn, cuda_fn, [z], names=["router_logits"])


@gpu
def test_cuda_gating_compile_fullgraph(dev):
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


@gpu
def test_cuda_gating_raw_op_errors_name_the_argument(dev):
    ops = _ext.cuda_ops()
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
        ops.moe_gating(z, gid.cpu(), [8], 2, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="router_logits must be a CUDA tensor"):
        ops.moe_gating(z.cpu(), gid, [8], 2, "softmax", False, 0.1)
    with pytest.raises(RuntimeError, match="grad_gates"):
        ops.moe_gating_backward(
            randn(4, 3, device=dev), randn(8, device=dev), randn(1, device=dev), z, gid, [8], 2, "softmax", False, 0.1
        )
    with pytest.raises(ValueError, match="group_ids"):  # the public check, cuda backend selected
        moe_gating(z, torch.tensor([0, 1, 2, 0], device=dev), [3, 5], 2, backend="cuda")
