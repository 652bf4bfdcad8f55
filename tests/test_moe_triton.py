"""Grouped MoE, Triton backend (unif2ace/kernels/triton/moe.py) against the reference.

On a machine without a GPU these run under Triton's CPU interpreter (the root conftest sets
TRITON_INTERPRET=1 and patches bf16), forcing ``backend="triton"`` on CPU tensors; shapes are
small because each program instance costs ~1 ms there. ``@pytest.mark.gpu`` tests repeat the
parity checks at real sizes on a CUDA device.
"""

import math

import pytest
import torch

from unif2ace.kernels import (
    BackendUnavailableError,
    moe_align,
    moe_expert_mlp,
    moe_gating,
    moe_shared_expert,
)
from unif2ace.kernels import moe as M
from unif2ace.kernels.reference import moe as R
from unif2ace.testing import assert_all_written, assert_close, fwd_bwd_parity, poison_, randn

triton_moe = pytest.importorskip("unif2ace.kernels.triton.moe")

# the interpreter turns runtime loop bounds into numpy scalars this way (fine with numpy < 2.4)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# multi-tile configuration: loops over D/F tiles, expert segments spanning several blocks
SMALL_TILES = dict(BLOCK_M=16, BLOCK_F=16, BLOCK_D=16)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the Triton launchers allocate starts as poison (NaN / sentinel int)."""

    def empty(*shape, **kw):
        return poison_(torch.empty(*shape, **kw))

    def empty_like(t, **kw):
        return poison_(torch.empty_like(t, **kw))

    monkeypatch.setattr(triton_moe, "_empty", empty)
    monkeypatch.setattr(triton_moe, "_empty_like", empty_like)


def _ids(T, k, E, dtype=torch.int32, device="cpu", invalid=0.1):
    """Random ids in [0, E) with a fraction replaced by null (-1) and out-of-range (E) ids."""
    ids = torch.randint(0, E, (T, k))
    drop = torch.rand(T, k) < invalid
    ids[drop] = torch.where(torch.rand(int(drop.sum())) < 0.5, -1, E)
    return ids.to(device=device, dtype=dtype)


def _distinct_ids(T, k, E, device="cpu"):
    """Top-k style ids: k distinct experts per token (as gating produces)."""
    return torch.rand(T, E).argsort(dim=1)[:, :k].to(device=device, dtype=torch.int32)


# ------------------------------------------------------------------------------------------------
# gating


GATING_CASES = [
    # (group_sizes, k, score, renormalize)
    ([4], 1, "softmax", False),
    ([8], 4, "sigmoid", True),
    ([4, 8], 2, "softmax", False),
    ([8, 4], 4, "softmax", True),
    ([4, 8], 2, "sigmoid", False),
    ([8, 8, 4], 1, "sigmoid", True),
    ([128, 8], 8, "softmax", False),  # a real-model group (E=128, k=8) next to a small one
]


@pytest.mark.parametrize("sizes,k,score,renorm", GATING_CASES)
def test_gating_fwd_bwd_parity(sizes, k, score, renorm, poisoned):
    T = 53
    logits = randn(T, sum(sizes), scale=2.0).requires_grad_(True)
    gid = torch.randint(0, len(sizes), (T,))

    def ref_fn(z):
        return R.moe_gating_ref(z, gid, sizes, k, score, renorm, 0.1)

    def tri_fn(z):
        out = moe_gating(z, gid, sizes, k, score=score, renormalize=renorm, balance_coef=0.1, backend="triton")
        for name, t in zip(out._fields, out):
            assert_all_written(t, name)
        return tuple(out)

    fwd_bwd_parity(ref_fn, tri_fn, [logits], names=["router_logits"])


def test_gating_ties_empty_group_strided_and_int32_ids(poisoned):
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


def test_gating_hand_computed():
    # one token, group of 4: softmax of [0, ln 2, ln 2, ln 4] = [1, 2, 2, 4] / 9
    z = torch.tensor([[0.0, math.log(2), math.log(2), math.log(4)]])
    out = moe_gating(z, torch.zeros(1, dtype=torch.long), [4], 2, renormalize=True, balance_coef=1.0, backend="triton")
    assert out.expert_ids.tolist() == [[3, 1]]  # tie between 1 and 2 -> 1
    assert_close(out.gates, torch.tensor([[4 / 6, 2 / 6]]))
    assert_close(out.expert_fraction, torch.tensor([0.0, 0.5, 0.0, 0.5]))
    assert_close(out.expert_prob, torch.tensor([1, 2, 2, 4]) / 9.0)
    assert_close(out.balance_loss, torch.tensor([4 * (0.5 * 2 / 9 + 0.5 * 4 / 9)]))


def test_gating_bf16_and_deterministic():
    T, sizes, k = 61, [8, 4], 2
    logits = randn(T, 12, dtype=torch.bfloat16).requires_grad_(True)
    gid = torch.randint(0, 2, (T,))

    def ref_fn(z):
        return R.moe_gating_ref(z, gid, sizes, k, "softmax", True, 0.1)

    def tri_fn(z):
        return tuple(moe_gating(z, gid, sizes, k, renormalize=True, balance_coef=0.1, backend="triton"))

    fwd_bwd_parity(ref_fn, tri_fn, [logits], names=["router_logits"])
    a = moe_gating(logits.detach(), gid, sizes, k, backend="triton")
    b = moe_gating(logits.detach(), gid, sizes, k, backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gating_many_blocks():
    # more tokens than one program's block: partial statistics reduced over several rows
    T, sizes = 300, [8, 8]
    logits = randn(T, 16)
    gid = torch.randint(0, 2, (T,), dtype=torch.int64)
    got = moe_gating(logits, gid, sizes, 4, backend="triton")
    want = R.moe_gating_ref(logits, gid, sizes, 4, "softmax", False, 0.01)
    assert torch.equal(got.expert_ids, want[0])
    for name, a, b in zip(got._fields[1:], got[1:], want[1:]):
        assert_close(a, b, name=name)


# ------------------------------------------------------------------------------------------------
# align


def _assert_align_equal(got, want):
    names = ("sorted_token_ids", "block_expert_ids", "num_tokens_post_padded", "expert_counts")
    for name, a, b in zip(names, got, want):
        assert_all_written(a, name)
        assert a.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs from the reference"


@pytest.mark.parametrize(
    "T,k,E,bs",
    [
        (1, 1, 4, 16),
        (33, 2, 8, 1),
        (33, 4, 4, 7),
        (222, 8, 8, 64),
        (100, 4, 64, 16),
        (600, 4, 200, 32),  # several chunks of ids and several tiles of experts
    ],
)
def test_align_parity(T, k, E, bs, poisoned):
    ids = _ids(T, k, E, dtype=torch.int32 if T % 2 else torch.int64)
    _assert_align_equal(moe_align(ids, E, bs, backend="triton"), R.moe_align_ref(ids, E, bs))


def test_align_edge_cases(poisoned):
    # all to one expert, no valid id at all, empty input, strided input
    one = torch.full((70, 2), 3, dtype=torch.int32)
    _assert_align_equal(moe_align(one, 8, 16, backend="triton"), R.moe_align_ref(one, 8, 16))
    none = torch.full((9, 2), -1, dtype=torch.int64)
    got = moe_align(none, 4, 8, backend="triton")
    _assert_align_equal(got, R.moe_align_ref(none, 4, 8))
    assert got.num_tokens_post_padded.item() == 0 and (got.sorted_token_ids == 18).all()
    empty = torch.empty(0, 4, dtype=torch.int32)
    _assert_align_equal(moe_align(empty, 8, 16, backend="triton"), R.moe_align_ref(empty, 8, 16))
    t = _ids(50, 4, 8, dtype=torch.int64).t()
    _assert_align_equal(moe_align(t, 8, 4, backend="triton"), R.moe_align_ref(t, 8, 4))


def test_align_hand_computed():
    ids = torch.tensor([[2, 0], [0, 5], [2, -1]])  # flat 0..5; 5 and -1 are invalid for E=3
    a = moe_align(ids, 3, 4, backend="triton")
    N = 6
    assert a.sorted_token_ids.tolist()[:8] == [1, 2, N, N, 0, 4, N, N]
    assert a.block_expert_ids.tolist()[:3] == [0, 2, -1]
    assert a.num_tokens_post_padded.tolist() == [8]
    assert a.expert_counts.tolist() == [2, 0, 2]


# ------------------------------------------------------------------------------------------------
# grouped expert MLP


def _mlp_inputs(T, D, F, E, k, activation, bias, dtype=torch.float32, ids=None, scale=1.0):
    F1 = 2 * F if activation == "swiglu" else F
    ids = _ids(T, k, E, torch.int64) if ids is None else ids
    x = randn(T, D, scale=scale, dtype=dtype)
    w1 = randn(E, D, F1, scale=D**-0.5, dtype=dtype)
    w2 = randn(E, F, D, scale=F**-0.5, dtype=dtype)
    gates = torch.rand(T, k).to(dtype)
    inputs = [x, w1, w2, gates] + ([randn(E, F1, dtype=dtype), randn(E, D, dtype=dtype)] if bias else [])
    return ids, [t.requires_grad_(True) for t in inputs]


def _mlp_parity(ids, inputs, activation, bias, dtype=torch.float32, scale=1.0):
    def unpack(args):
        x, w1, w2, g = args[:4]
        b1, b2 = (args[4], args[5]) if bias else (None, None)
        return x, w1, w2, g, b1, b2

    def ref_fn(*args):
        x, w1, w2, g, b1, b2 = unpack(args)
        return R.moe_expert_mlp_ref(x, w1, w2, ids, g, b1, b2, activation)

    def tri_fn(*args):
        x, w1, w2, g, b1, b2 = unpack(args)
        out = moe_expert_mlp(x, w1, w2, ids, g, b1=b1, b2=b2, activation=activation, backend="triton")
        assert_all_written(out, "out")
        return out

    fwd_bwd_parity(ref_fn, tri_fn, inputs, names=["x", "w1", "w2", "gates", "b1", "b2"], dtype=dtype, scale=scale)


@pytest.mark.parametrize(
    "activation,bias,E,k",
    [
        ("gelu", True, 4, 1),
        ("gelu", False, 8, 2),
        ("gelu_tanh", True, 8, 4),
        ("swiglu", False, 4, 2),
        ("swiglu", True, 8, 4),
    ],
)
def test_mlp_fwd_bwd_parity(activation, bias, E, k, poisoned):
    ids, inputs = _mlp_inputs(45, 40, 24, E, k, activation, bias)
    _mlp_parity(ids, inputs, activation, bias)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_mlp_small_tiles_skewed_routing(activation, poisoned):
    # several D/F tiles (D, F not multiples of 16), one expert owning most rows (many blocks),
    # experts without tokens, invalid ids; kernels called directly with a small-tile config
    T, D, F, E, k = 50, 40, 24, 6, 2
    ids = torch.zeros(T, k, dtype=torch.int32)
    ids[:, 1] = 3
    ids[::7, 1] = -1
    ids[5, 0] = 6  # out of range: dropped
    _, (x, w1, w2, g, b1, b2) = _mlp_inputs(T, D, F, E, k, activation, True)
    args = [t.detach() for t in (x, w1, w2, g)]
    bs = [b1.detach(), b2.detach()]
    out = triton_moe.expert_mlp_forward(*args[:3], ids, args[3], *bs, activation, config=SMALL_TILES)
    assert_all_written(out, "out")
    assert_close(out, R.moe_expert_mlp_ref(*args[:3], ids, args[3], *bs, activation), name="out")
    go = randn(T, D)
    got = triton_moe.expert_mlp_backward(go, *args[:3], ids, args[3], *bs, activation, config=SMALL_TILES)
    want = R.moe_expert_mlp_backward_ref(go, *args[:3], ids, args[3], *bs, activation)
    for name, a, b in zip(("dx", "dw1", "dw2", "dgates", "db1", "db2"), got, want):
        assert_all_written(a, name)
        assert_close(a, b, name=name)
    # experts 1, 2, 4, 5 got no token: zero weight gradients
    assert got[1][[1, 2, 4, 5]].eq(0).all() and got[2][[1, 2, 4, 5]].eq(0).all()


def test_mlp_hand_computed():
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


def test_mlp_bf16_and_mixed_dtypes():
    # bf16 end to end (vLLM practice: inputs scaled by 1/10); fp32 x with bf16 weights (fp32 path)
    # scale=4: atol 2e-2 (docs/kernels.md's MoE tolerance); h, dh and gate*grad_out are bf16 dot operands, as on GPUs
    ids, inputs = _mlp_inputs(37, 48, 32, 4, 2, "swiglu", True, dtype=torch.bfloat16, scale=0.1)
    _mlp_parity(ids, inputs, "swiglu", True, dtype=torch.bfloat16, scale=4.0)
    ids = _distinct_ids(21, 2, 4)
    x = randn(21, 32)
    w1, w2 = randn(4, 32, 16, dtype=torch.bfloat16, scale=0.2), randn(4, 16, 32, dtype=torch.bfloat16, scale=0.25)
    g = torch.rand(21, 2)
    out = moe_expert_mlp(x, w1, w2, ids, g, activation="gelu_tanh", backend="triton")
    assert out.dtype == torch.float32
    assert_close(out, R.moe_expert_mlp_ref(x, w1, w2, ids, g, None, None, "gelu_tanh"))


def test_mlp_deterministic_and_shared_expert():
    ids, (x, w1, w2, g) = _mlp_inputs(30, 32, 16, 4, 4, "gelu", False)
    ids = _distinct_ids(30, 4, 4)
    a = moe_expert_mlp(x.detach(), w1.detach(), w2.detach(), ids, g.detach(), backend="triton")
    b = moe_expert_mlp(x.detach(), w1.detach(), w2.detach(), ids, g.detach(), backend="triton")
    assert torch.equal(a, b)
    xs, ws1, ws2, bs1 = randn(13, 32), randn(32, 16, scale=0.2), randn(16, 32, scale=0.25), randn(16)
    got = moe_shared_expert(xs, ws1, ws2, b1=bs1, backend="triton")
    assert_close(got, torch.nn.functional.gelu(xs @ ws1 + bs1) @ ws2, name="shared expert")


def test_gating_custom_op_opcheck():
    logits = randn(12, 8).requires_grad_(True)
    gid = torch.randint(0, 2, (12,))
    # aot_dispatch sums every output, which fails on the int32 expert_ids (see test_moe_kernels.py)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(M._gating_op, (logits, gid, [3, 5], 2, "softmax", True, 0.1, "triton"), test_utils=utils)
    torch.library.opcheck(M._align_op, (_ids(20, 2, 8), 8, 4, "triton"))


def test_mlp_custom_op_opcheck():
    T, D, F, E, k = 9, 16, 16, 3, 2
    x, w1, w2 = randn(T, D).requires_grad_(True), randn(E, D, 2 * F).requires_grad_(True), randn(E, F, D)
    torch.library.opcheck(
        M._mlp_op, (x, w1, w2, _ids(T, k, E, torch.int64), torch.rand(T, k), None, randn(E, D), "swiglu", "triton")
    )


# ------------------------------------------------------------------------------------------------
# selection and errors


def test_triton_not_auto_selected_on_cpu_and_needs_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    for op in (M.MOE_GATING, M.MOE_ALIGN, M.MOE_MLP):
        assert "triton" in op.impls and op.select(cpu) != "triton"
    assert M.MOE_MLP.cuda_order[0] == "triton" and M.MOE_GATING.cuda_order[0] == "triton"
    assert "triton" in M.MOE_ALIGN.cuda_order
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="moe_gating.*triton.*TRITON_INTERPRET"):
        moe_gating(randn(4, 4), torch.zeros(4, dtype=torch.long), [4], 2, backend="triton")


def test_bad_inputs_name_the_argument():
    z, gid = randn(6, 8), torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="top_k"):
        moe_gating(z, gid, [4, 4], 5, backend="triton")
    with pytest.raises(ValueError, match="group_sizes"):
        moe_gating(z, gid, [4, 5], 2, backend="triton")
    with pytest.raises(ValueError, match="w1"):
        moe_expert_mlp(
            randn(3, 8),
            randn(2, 8, 6),
            randn(2, 4, 8),
            torch.zeros(3, 1, dtype=torch.long),
            torch.ones(3, 1),
            activation="swiglu",
            backend="triton",
        )
    with pytest.raises(ValueError, match="block_size"):
        moe_align(torch.zeros(3, 2, dtype=torch.int32), 4, 0, backend="triton")


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("T,sizes,k", [(4096, [8, 8], 4), (8192, [128], 8), (1000, [64, 32, 8], 2)])
def test_cuda_gating_parity(T, sizes, k, gpu_device):
    logits = randn(T, sum(sizes), device=gpu_device, dtype=torch.bfloat16).requires_grad_(True)
    gid = torch.randint(0, len(sizes), (T,), device=gpu_device)

    def ref_fn(z):
        return R.moe_gating_ref(z, gid, sizes, k, "softmax", True, 0.01)

    def tri_fn(z):
        return tuple(moe_gating(z, gid, sizes, k, renormalize=True, backend="triton"))

    fwd_bwd_parity(ref_fn, tri_fn, [logits], names=["router_logits"], dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E,bs", [(1, 8, 128, 16), (4096, 4, 16, 64), (32768, 8, 128, 64), (3000, 2, 2000, 16)])
def test_cuda_align_parity(T, k, E, bs, gpu_device):
    ids = _ids(T, k, E, device=gpu_device)
    _assert_align_equal(moe_align(ids, E, bs, backend="triton"), R.moe_align_ref(ids.cpu(), E, bs))


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
def test_cuda_mlp_parity(T, D, F, E, k, activation, dtype, gpu_device):
    ids, inputs = _mlp_inputs(T, D, F, E, k, activation, True, dtype=dtype, scale=0.1)
    ids = ids.to(gpu_device)
    inputs = [t.detach().to(gpu_device).requires_grad_(True) for t in inputs]
    _mlp_parity(ids, inputs, activation, True, dtype=dtype, scale=4.0 if dtype == torch.bfloat16 else 1.0)


@pytest.mark.gpu
def test_cuda_mlp_64bit_offsets(gpu_device):
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
