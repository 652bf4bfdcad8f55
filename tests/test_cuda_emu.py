"""The CPU emulator of the CUDA device code (csrc/cuda/emu, unif2ace/testing/cuda_emu.py).

(a) The emulator itself, through its self-test kernels (csrc/cuda/emu/selftest.cpp): every warp
    primitive against an independent model of CUDA's documented semantics (masks, widths, partial
    warps), barriers and shared memory under every thread order, thread / block numbering,
    atomics, bf16 / fp16 conversions bit-exact against torch's, the bit and *_rn intrinsics, and
    the misuse it must turn into a clear error instead of a hang.
(b) The cuda backend's two test parameters (cuda_emu.cuda_backends): one body on the card and
    through the emulator. The CUDA kernels' own parity tests live with their stems
    (tests/test_d3diff.py, test_moe_gating.py, test_moe_routing.py, test_sampling.py).
"""

from __future__ import annotations

import random

import pytest
import torch

from unif2ace.kernels import _dispatch, _ext, moe_expert_histogram
from unif2ace.kernels.reference import moe_routing as RR
from unif2ace.testing import cuda_emu

FULL = 0xFFFFFFFF


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.ops()  # builds on first use; a build failure fails the tests


# ------------------------------------------------------------------------------------------------
# (a) warp primitives: an independent model of the CUDA programming guide's definitions

POISON = object()  # source lane outside the mask: undefined on the GPU, all-ones bits here


def shfl_model(op, x, mask, arg, width):
    out = list(x)
    for t in range(len(x)):
        lane, base = t % 32, t - t % 32
        if not (mask >> lane) & 1:
            continue
        seg = lane // width * width  # first lane of this lane's width-segment
        if op == "shfl":
            src = seg + arg % width
        elif op == "shfl_up":
            src = lane - arg if lane - arg >= seg else lane
        elif op == "shfl_down":
            src = lane + arg if lane + arg < seg + width else lane
        else:  # xor: may read earlier segments, a later one returns the own value
            src = lane ^ arg if (lane ^ arg) < seg + width else lane
        out[t] = x[base + src] if (mask >> src) & 1 else POISON
    return out


def bits_of(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).tolist()


def poison_bits(dtype):
    return -1  # all ones, as a signed int of the element size


DTYPES = [torch.int32, torch.int64, torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASKS = [FULL, 0x0000FFFF, 0xAAAAAAAA, 0x80000001, 0x13579BDF]


@pytest.mark.parametrize("op", ["shfl", "shfl_up", "shfl_down", "shfl_xor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_shuffles_match_cuda_semantics(emu, op, dtype):
    rng = random.Random(hash((op, str(dtype))) & 0xFFFF)
    n = 64
    if dtype.is_floating_point:
        x = (torch.randn(n) * 100).to(dtype)
    else:
        x = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int64).to(dtype)
    xb = bits_of(x)
    for width in (32, 16, 8, 4, 2, 1):
        for mask in MASKS:
            args = [0, 1, width - 1, rng.randrange(32)] + ([33, -1] if op == "shfl" else [31])
            for arg in args:
                out, _ = emu._emu_warp(op, x, mask, arg, width)
                want = shfl_model(op, xb, mask, arg, width)
                want = [poison_bits(dtype) if w is POISON else w for w in want]
                assert bits_of(out) == want, (op, dtype, width, hex(mask), arg)


def test_shuffle_partial_warp_and_64_bit(emu):
    # 48 threads: warp 1 has 16 lanes, so its mask must not name lanes 16..31
    x = torch.arange(48, dtype=torch.int64) * (1 << 40)
    out, _ = emu._emu_warp("shfl_down", x, 0x0000FFFF, 3, 16)
    assert bits_of(out) == shfl_model("shfl_down", bits_of(x), 0x0000FFFF, 3, 16)


@pytest.mark.parametrize("mask", MASKS)
def test_votes_and_match(emu, mask):
    n = 64
    pred = torch.randint(0, 2, (n,), dtype=torch.int32)
    pred[32:48] = 1  # a warp where every predicate holds
    lanes = [t % 32 for t in range(n)]
    for op in ("ballot", "any", "all"):
        _, vote = emu._emu_warp(op, pred, mask, 0, 32)
        for t in range(n):
            if not (mask >> lanes[t]) & 1:
                assert vote[t] == -1
                continue
            base = t - lanes[t]
            bal = sum(1 << j for j in range(32) if (mask >> j) & 1 and pred[base + j])
            want = {"ballot": bal, "any": int(bal != 0), "all": int(bal == mask)}[op]
            assert vote[t] == want, (op, t)
    for dtype in (torch.int32, torch.int64, torch.float32, torch.float64):
        v = torch.randint(0, 3, (n,)).to(dtype)
        _, vote = emu._emu_warp("match", v, mask, 0, 32)
        for t in range(n):
            if (mask >> lanes[t]) & 1:
                base = t - lanes[t]
                want = sum(1 << j for j in range(32) if (mask >> j) & 1 and v[base + j] == v[t])
                assert vote[t] == want


def test_activemask_counts_live_lanes(emu):
    _, vote = emu._emu_warp("active", torch.zeros(40, dtype=torch.int32), FULL, 0, 32)
    assert vote[:32].tolist() == [FULL] * 32 and vote[32:].tolist() == [0xFF] * 8


def test_bit_intrinsics(emu):
    vals = [0, 1, 2, 3, 0x80000000, 0xFFFFFFFF, 0x00F00000, 1 << 40, -1, -(1 << 62), 0x123456789ABCDEF]
    vals += [random.Random(1).getrandbits(64) - (1 << 63) for _ in range(200)]
    got = emu._emu_bits(torch.tensor(vals, dtype=torch.int64)).tolist()
    for v, row in zip(vals, got):
        lo, u64 = v & 0xFFFFFFFF, v & (2**64 - 1)
        ffs = (lo & -lo).bit_length()
        ffsll = (u64 & -u64).bit_length()
        brev = int(f"{lo:032b}"[::-1], 2)
        want = [bin(lo).count("1"), ffs, 32 - lo.bit_length(), bin(u64).count("1"), ffsll, 64 - u64.bit_length()]
        assert row[:6] == want and (row[6] & 0xFFFFFFFF) == brev, hex(v)


# ------------------------------------------------------------------------------------------------
# (a) numerics


def _float_probe():
    # random bit patterns over every exponent, plus the rounding and range boundaries of bf16/fp16
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    edges = []
    for base in (
        0x00000000,
        0x00800000,
        0x33000000,
        0x33800000,
        0x387FC000,
        0x38800000,
        0x477FE000,
        0x477FF000,
        0x47800000,
        0x7F7F0000,
        0x7F7FFFFF,
        0x7F800000,
        0x3F800000,
        0x3F808000,
        0x3F818000,
    ):
        for d in range(-40, 41):
            edges.append(base + d)
    for h in range(0, 1 << 16, 1):  # every tie point of bf16 (low 16 bits = 0x8000) across exponents
        edges.append((h << 16) | 0x8000)
    e = torch.tensor(edges, dtype=torch.int64) & 0x7FFFFFFF
    e = torch.cat([e, e | (1 << 31)]).to(torch.int64)
    e = torch.where(e >= 2**31, e - 2**32, e).to(torch.int32)
    return torch.cat([rand, e]).view(torch.float32)


def test_bf16_fp16_conversions_bit_exact_against_torch(emu):
    x = _float_probe()
    b, h = emu._emu_narrow(x)
    nan = torch.isnan(x)
    assert torch.equal(b[~nan], x[~nan].to(torch.bfloat16).view(torch.int16))
    assert torch.equal(h[~nan], x[~nan].to(torch.float16).view(torch.int16))
    # NaN -> CUDA's canonical 0x7fff for both (torch keeps sign / payload bits: compare NaN-ness)
    assert (b[nan] == 0x7FFF).all() and (h[nan] == 0x7FFF).all()
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    fb, fh = emu._emu_widen(every)
    tb, th = every.view(torch.bfloat16).float(), every.view(torch.float16).float()
    for got, want in ((fb, tb), (fh, th)):
        n = torch.isnan(want)
        assert torch.equal(torch.isnan(got), n)
        assert torch.equal(got[~n].view(torch.int32), want[~n].view(torch.int32))


def test_rn_intrinsics(emu):
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(4096, generator=g) * 10.0 ** torch.randint(-3, 4, (4096,), generator=g) for _ in range(3))
    out = emu._emu_fp(a, b, c)
    assert torch.equal(out[:, 0], a + b) and torch.equal(out[:, 1], a - b)
    assert torch.equal(out[:, 2], a * b) and torch.equal(out[:, 3], a / b)
    # fmaf rounds once: a*b is exact in float64, the double-rounding case is ~2^-29 per sample
    assert torch.equal(out[:, 4], (a.double() * b.double() + c.double()).float())
    assert torch.equal(out[:, 5], -a)


# ------------------------------------------------------------------------------------------------
# (a) barriers, shared memory, numbering, atomics


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
@pytest.mark.parametrize("block", [(1024, 1, 1), (33, 1, 1), (8, 4, 2), (5, 7, 3), (1, 1, 1)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_barrier_tree_sum(emu, monkeypatch, order, block, dynamic):
    monkeypatch.setenv("UNIF2ACE_EMU_ORDER", order)
    n = block[0] * block[1] * block[2]
    x = torch.randint(-50, 50, (3 * n,)).float()  # integers: the sum is exact in any order
    got = emu._emu_block_sum(x, *block, dynamic)
    assert torch.equal(got, x.view(3, n).sum(1))


def test_thread_and_block_numbering(emu):
    grid, block = [3, 2, 2], [8, 3, 2]
    out = emu._emu_geometry(grid, block)
    n = 48
    rows = out.view(12, n, 14)
    for b in range(12):
        bx, by, bz = b % 3, b // 3 % 2, b // 6
        for t in range(n):
            tx, ty, tz = t % 8, t // 8 % 3, t // 24
            want = [tx, ty, tz, bx, by, bz, 8, 3, 2, 3, 2, 2, t % 32, 32 if t < 32 else 16]
            assert rows[b, t].tolist() == want


def test_atomics(emu):
    blocks, threads = 3, 100
    n = blocks * threads
    i, u, ull, f, d = emu._emu_atomics(blocks, threads)
    assert i.tolist() == [n, n - 1, -(n - 1), n, 7, -2 * n]
    assert u[0] == 2 * n and u[1] == -1  # every bit of 32 set by 300 threads
    xor = 0
    for t in range(n):
        xor ^= 1 << (t % 32)
    assert (u[2].item() & 0xFFFFFFFF) == xor
    assert u[3] == 3 * (n - 1) and u[4] == 0
    assert ull.item() == 3 * n and f.item() == 0.5 * n and d.item() == 0.25 * n


def test_launch_order_exposes_a_missing_barrier(emu, monkeypatch):
    # thread t writes s[t], then reads s[t + 1]: fault 7 without a barrier, fault 9 with one
    want = [(t + 1) % 64 for t in range(64)]
    got = {}
    for order in ("forward", "reverse", "random"):
        monkeypatch.setenv("UNIF2ACE_EMU_ORDER", order)
        assert emu._emu_fault(9, 64, 256, 0)[:64].tolist() == want
        got[order] = emu._emu_fault(7, 64, 256, 0)[:64].tolist()
    # the race shows: the result depends on the order, uninitialised shared memory reads as -1
    assert got["forward"] != got["reverse"] and -1 in got["forward"] and -1 in got["reverse"]


# ------------------------------------------------------------------------------------------------
# (a) misuse ends in a clear error


@pytest.mark.parametrize(
    "which,threads,match",
    [
        (0, 32, r"divergent __syncthreads\(\).*selftest.cpp"),
        (
            1,
            32,
            r"deadlock: no thread can proceed(.|\n)*threads 0-15: wait at __syncthreads(.|\n)*threads 16-31: "
            r"wait at __shfl_xor_sync\(mask 0xffffffff\)",
        ),
        (2, 32, r"(names lane 0 of warp 0, which has exited|exited while lane \d+ waits for it)"),
        (3, 32, r"__shfl_sync at .*: the calling thread \(0,0,0\) \[warp 0 lane 0\] is not in mask 0xfffffffe"),
        (4, 32, r"meet at different warp primitives"),
        (5, 48, r"names lane 16 of warp 1, which does not exist \(48 threads per block\)"),
        (8, 32, r"width 12 is not a power of two"),
        (9, 0, r"invalid configuration argument"),
        (9, 1025, r"invalid configuration argument"),
    ],
)
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_misuse_is_a_clear_error(emu, monkeypatch, which, threads, match, order):
    monkeypatch.setenv("UNIF2ACE_EMU_ORDER", order)
    with pytest.raises(RuntimeError, match=match):
        emu._emu_fault(which, threads, 4 * max(threads, 1), 0)
    # the emulator is usable again afterwards
    assert emu._emu_block_sum(torch.ones(64), 64, 1, 1, False).item() == 64


def test_livelock_times_out(emu, monkeypatch):
    monkeypatch.setenv("UNIF2ACE_EMU_TIMEOUT_S", "0.5")
    with pytest.raises(RuntimeError, match="timeout"):
        emu._emu_fault(6, 32, 0, 0)


def test_dynamic_shared_memory_limit_and_opt_in(emu):
    with pytest.raises(RuntimeError, match="over its limit of 49152"):
        emu._emu_fault(9, 64, 64 << 10, 0)
    assert emu._emu_fault(9, 64, 64 << 10, 100 << 10)[:64].tolist() == [(t + 1) % 64 for t in range(64)]
    with pytest.raises(RuntimeError, match="over its limit of 232448"):
        emu._emu_fault(9, 64, 228 << 10, 227 << 10)


def test_not_a_user_backend(emu):
    assert "cuda_emu" not in _dispatch.BACKENDS and not _ext.cuda_emulated()
    assert not _dispatch.backend_usable("cuda", torch.device("cpu"))[0]
    with cuda_emu.emulated_cuda():
        assert _dispatch.backend_usable("cuda", torch.device("cpu"))[0]
    assert not _ext.cuda_emulated()


# ------------------------------------------------------------------------------------------------
# the cuda backend's parameters


@pytest.mark.parametrize("backend", cuda_emu.cuda_backends())
def test_one_body_on_the_card_and_the_emulator(backend):
    # the same test body: on a GPU (marked gpu) and through the emulator (marked cuda_emu)
    dev = cuda_emu.device(backend)
    assert _ext.cuda_emulated() == (dev.type == "cpu")
    ids = torch.randint(0, 9, (50, 2), device=dev)
    assert torch.equal(moe_expert_histogram(ids, 9, backend=backend), RR.moe_expert_histogram_ref(ids, 9))
