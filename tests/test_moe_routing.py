"""Grouped MoE routing metadata, fast backends against the reference: the expert histogram and
moe_align on the cpu (csrc/cpu/moe_routing.cpp), triton (unif2ace/kernels/triton/moe_routing.py,
under the interpreter on CPU tensors) and cuda (csrc/cuda/moe_routing.cu: on a GPU, marked ``gpu``,
and through the CPU emulator of the CUDA kernels, marked ``cuda_emu``) backends, and the custom ops
behind them."""

import pytest
import torch
from moe_testing import CUDA, CUDA_GPU, backend_cases, device_fixture, poison_fixture, random_ids

from unif2ace.kernels import _ext, moe_align, moe_expert_histogram
from unif2ace.kernels import moe as M
from unif2ace.kernels._custom_ops import moe as C
from unif2ace.kernels.reference import moe_routing as R
from unif2ace.testing import assert_all_written, poison_

TS, KS, ES = (1, 33, 222, 1000), (1, 2, 4, 8), (4, 8, 64)

# the interpreter turns runtime loop bounds into numpy scalars this way (fine with numpy < 2.4)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


dev = device_fixture()  # the device of the test's backend
poison = poison_fixture("moe_routing")  # poisoned triton allocations when the backend is triton


def _ids(T, k, E, dtype=torch.int32, device="cpu"):
    return random_ids(T, k, E, dtype, device)


def _dirty_heap(device, *numels):
    """Allocate and free poisoned int32 buffers of the output sizes, so freshly allocated outputs
    likely reuse poisoned memory (best effort; equality with the reference is the real check)."""
    for n in numels:
        poison_(torch.empty(max(n, 1), dtype=torch.int32, device=device))


def _assert_align_equal(got, want):
    names = ("sorted_token_ids", "block_expert_ids", "num_tokens_post_padded", "expert_counts")
    for name, a, b in zip(names, got, want):
        assert_all_written(a, name)
        assert a.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs from the reference"


def _grid_cases(Ts, Ks, Es):
    # id dtype and block size vary with the case
    return [
        (T, k, E, (16, 1, 64, 7)[(T + E) % 4], "int32" if (T + k) % 2 else "int64") for T in Ts for k in Ks for E in Es
    ]


ALIGN_CASES = {
    "cpu": _grid_cases(TS, KS, ES),
    "triton": [
        (1, 1, 4, 16, "int32"),
        (33, 2, 8, 1, "int32"),
        (33, 4, 4, 7, "int32"),
        (222, 8, 8, 64, "int64"),
        (100, 4, 64, 16, "int64"),
        (600, 4, 200, 32, "int64"),  # several chunks of ids and several tiles of experts
    ],
    "cuda": _grid_cases(TS + (32768,), KS, ES + (128, 1024)),
    # the emulator: one tile, several tiles and partial tiles; few, many and mostly empty experts
    "cuda_emu": _grid_cases((1, 33, 1000), (1, 8), (4, 64, 1024)) + [(3000, 2, 1000, 7, "int32")],
}


@pytest.mark.parametrize("backend,T,k,E,bs,id_dtype", backend_cases(ALIGN_CASES))
def test_histogram_and_align_parity(backend, T, k, E, bs, id_dtype, dev, poison):
    ids = _ids(T, k, E, dtype=getattr(torch, id_dtype), device=dev)
    want = R.moe_align_ref(ids.cpu(), E, bs)
    if backend in M.MOE_HISTOGRAM.backends:  # triton has no histogram kernel
        _dirty_heap(dev, E)
        h = moe_expert_histogram(ids, E, backend=backend)
        assert_all_written(h, "histogram")
        assert torch.equal(h.cpu(), R.moe_expert_histogram_ref(ids.cpu(), E))
    max_len, max_blocks = R.moe_align_size_bound(T * k, E, bs)
    _dirty_heap(dev, max_len, max_blocks, 1, E)
    got = moe_align(ids, E, bs, backend=backend)
    _assert_align_equal(got, want)
    again = moe_align(ids, E, bs, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.parametrize("backend", ["cpu", CUDA_GPU])  # emulated, 2^31 loads would take minutes
def test_histogram_64bit_indexing(backend, dev):
    # 2**31 + 192 entries, read through a stride-0 view (no memory): an int32 element counter
    # or offset would wrap and miscount.
    E = 64
    M_ = 2**31 // E + 3
    ids = torch.arange(E, dtype=torch.int32, device=dev).view(1, E).expand(M_, E)
    assert ids.numel() > 2**31
    h = moe_expert_histogram(ids, E, backend=backend)
    assert h.tolist() == [M_] * E


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_routing_custom_ops_opcheck(backend):
    ids = _ids(20, 2, 8)
    if backend in M.MOE_HISTOGRAM.backends:
        torch.library.opcheck(C.histogram_op, (ids, 8, backend))
    torch.library.opcheck(C.align_op, (ids, 8, 4, backend))


# ------------------------------------------------------------------------------------------------
# cpu


def test_cpu_auto_selected_and_strided_input():
    ids = _ids(300, 4, 8, dtype=torch.int64)
    assert M.MOE_ALIGN.select(ids.device) == "cpu" and M.MOE_HISTOGRAM.select(ids.device) == "cpu"
    t = ids.t()  # non-contiguous [k, T] view: read in place with its strides
    _assert_align_equal(moe_align(t, 8, 16), R.moe_align_ref(t, 8, 16))
    col = ids[:, 1]  # strided 1-D
    assert torch.equal(moe_expert_histogram(col, 8), R.moe_expert_histogram_ref(col, 8))
    empty = torch.empty(0, 4, dtype=torch.int32)
    _assert_align_equal(moe_align(empty, 8, 16), R.moe_align_ref(empty, 8, 16))


def test_cpu_deterministic_across_runs_and_threads():
    ids = _ids(50000, 4, 64)  # several chunks
    base = moe_align(ids, 64, 32, backend="cpu")
    n = torch.get_num_threads()
    try:
        for threads in (1, 2, n):
            torch.set_num_threads(threads)
            for _ in range(2):
                again = moe_align(ids, 64, 32, backend="cpu")
                assert all(torch.equal(a, b) for a, b in zip(base, again))
                assert torch.equal(moe_expert_histogram(ids, 64, backend="cpu"), base.expert_counts)
    finally:
        torch.set_num_threads(n)
    _assert_align_equal(base, R.moe_align_ref(ids, 64, 32))


def test_cpu_align_compiles_fullgraph():
    ids = _ids(40, 2, 8)

    @torch.compile(fullgraph=True, dynamic=False)
    def f(x):
        a = moe_align(x, 8, 16, backend="cpu")
        return a.sorted_token_ids, a.block_expert_ids, a.num_tokens_post_padded, a.expert_counts

    _assert_align_equal(f(ids), R.moe_align_ref(ids, 8, 16))


# ------------------------------------------------------------------------------------------------
# triton (under the interpreter on CPU tensors; gpu-marked tests at real sizes on a CUDA device)


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_align_edge_cases(backend, poison):
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


def test_triton_align_hand_computed():
    ids = torch.tensor([[2, 0], [0, 5], [2, -1]])  # flat 0..5; 5 and -1 are invalid for E=3
    a = moe_align(ids, 3, 4, backend="triton")
    N = 6
    assert a.sorted_token_ids.tolist()[:8] == [1, 2, N, N, 0, 4, N, N]
    assert a.block_expert_ids.tolist()[:3] == [0, 2, -1]
    assert a.num_tokens_post_padded.tolist() == [8]
    assert a.expert_counts.tolist() == [2, 0, 2]


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E,bs", [(1, 8, 128, 16), (4096, 4, 16, 64), (32768, 8, 128, 64), (3000, 2, 2000, 16)])
def test_triton_gpu_align_parity(T, k, E, bs, gpu_device):
    ids = _ids(T, k, E, device=gpu_device)
    _assert_align_equal(moe_align(ids, E, bs, backend="triton"), R.moe_align_ref(ids.cpu(), E, bs))


# ------------------------------------------------------------------------------------------------
# cuda (on a GPU, and through the CPU emulator)


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_strided_large_experts_and_compile(backend, dev):
    ids = _ids(500, 8, 64, dtype=torch.int64, device=dev)
    t = ids.t()
    _assert_align_equal(moe_align(t, 64, 16, backend="cuda"), R.moe_align_ref(t.cpu(), 64, 16))
    assert torch.equal(
        moe_expert_histogram(ids[:, 3], 64, backend="cuda").cpu(), R.moe_expert_histogram_ref(ids[:, 3].cpu(), 64)
    )
    big = _ids(300, 4, 20000, device=dev)  # global-atomics histogram, reference align fallback
    assert torch.equal(
        moe_expert_histogram(big, 20000, backend="cuda").cpu(), R.moe_expert_histogram_ref(big.cpu(), 20000)
    )
    _assert_align_equal(moe_align(big, 20000, 16, backend="cuda"), R.moe_align_ref(big.cpu(), 20000, 16))

    @torch.compile(fullgraph=True)
    def f(x):
        a = moe_align(x, 64, 16, backend="cuda")
        return a.sorted_token_ids, a.block_expert_ids, a.num_tokens_post_padded, a.expert_counts

    _assert_align_equal(f(ids), R.moe_align_ref(ids.cpu(), 64, 16))


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_routing_raw_op_errors(backend, dev):
    ops = _ext.cuda_ops()
    elsewhere = torch.device("meta") if dev.type == "cpu" else torch.device("cpu")
    ids = _ids(10, 2, 8, device=dev)
    with pytest.raises(RuntimeError, match="expert_ids must be a CUDA"):
        ops.moe_expert_histogram(ids.to(elsewhere), 8)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        ops.moe_align(ids.float(), 8, 4)
    with pytest.raises(RuntimeError, match="1-D or 2-D"):
        ops.moe_align(ids.view(2, 5, 2), 8, 4)
    with pytest.raises(RuntimeError, match="num_experts"):
        ops.moe_expert_histogram(ids, 0)
    with pytest.raises(RuntimeError, match="num_experts must be <= 1024"):
        ops.moe_align(ids, 1025, 4)
    with pytest.raises(RuntimeError, match="block_size"):
        ops.moe_align(ids, 8, 0)
