"""D3Diff row kernels, cuda backend (csrc/cuda/d3diff_loss.cu): parity of d3diff_loss_from_logits
(loss, parts, logits gradient) against the reference, and the raw row-kernel outputs (lse, tgt,
gradient; every element written). GPU only: skipped without a CUDA device; the file compiles
everywhere (scripts/check_cuda_compile.py checks the .cu)."""

import pytest
import torch

from unif2ace.kernels import d3diff_loss_from_logits
from unif2ace.kernels._dispatch import backend_usable
from unif2ace.testing import assert_all_written, assert_close, fwd_bwd_parity, poison_

pytestmark = pytest.mark.gpu


@pytest.fixture
def dev(gpu_device):
    ok, why = backend_usable("cuda", gpu_device)
    if not ok:
        pytest.skip(why)
    return gpu_device


def _randn(*shape, device, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _target(N, V, device, masked_frac=0.6):
    t = torch.randint(0, V, (N,), device=device)
    t[torch.rand(N, device=device) > masked_frac] = -100
    t[0] = min(1, V - 1)
    return t


def _schedule(N, B, device):
    return (
        torch.randint(0, B, (N,), device=device),
        torch.rand(B, device=device) * 0.8 + 0.1,
        torch.rand(B, device=device) + 0.1,
    )


def _parity(logits, target, *, dtype=torch.float32, **kw):
    def run(be):
        return lambda x: tuple(d3diff_loss_from_logits(x, target, backend=be, **kw))

    fwd_bwd_parity(run("reference"), run("cuda"), [logits.requires_grad_()], dtype=dtype, names=["logits"])


# V: warp rows (<= 2048), 256-thread CTA rows, 512-thread CTA rows; odd V exercises the scalar tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,V", [(1, 111), (33, 111), (37, 2048), (9, 8191), (5, 40001)])
@pytest.mark.parametrize("parametrization", ["posterior", "raw"])
def test_cuda_parity(dev, dtype, N, V, parametrization):
    logits = _randn(N, V, device=dev, dtype=dtype, scale=2.0)
    target = _target(N, V, dev)
    si, m, dm = _schedule(N, 3, dev)
    _parity(
        logits,
        target,
        dtype=dtype,
        sample_index=si,
        mask_rate=m,
        mask_rate_deriv=dm,
        alpha=0.3,
        parametrization=parametrization,
    )


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_reductions_nonuniform_upstream(dev, reduction):
    N, V = 57, 333
    logits, target = _randn(N, V, device=dev), _target(N, V, dev)
    si, m, dm = _schedule(N, 4, dev)
    _parity(
        logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, reduction=reduction, parametrization="raw"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_cuda_misaligned_rows(dev, dtype, offset):
    # rows starting off a 16-byte boundary (column offset) and row strides that are not a multiple
    # of the vector width: scalar head + vector body + scalar tail, input/output phases differ
    N, V = 13, 1000 + offset
    wide = _randn(N, V + 2 * offset + 7, device=dev, dtype=dtype)
    target = _target(N, V, dev)
    si, m, dm = _schedule(N, 2, dev)

    def run(be):
        return lambda w: tuple(
            d3diff_loss_from_logits(
                w[:, offset : offset + V], target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend=be
            )
        )

    fwd_bwd_parity(run("reference"), run("cuda"), [wide.requires_grad_()], dtype=dtype)


def test_cuda_all_rows_ignored(dev):
    N, V = 9, 3000
    logits = _randn(N, V, device=dev).requires_grad_()
    target = torch.full((N,), -100, device=dev)
    si, m, dm = _schedule(N, 2, dev)
    for red in ("mean", "sum", "none"):
        o = d3diff_loss_from_logits(
            logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, reduction=red, backend="cuda"
        )
        for t in o:
            assert torch.isfinite(t).all() and (t == 0).all()
        (g,) = torch.autograd.grad(o.loss.sum(), logits)
        assert (g == 0).all()


@pytest.mark.parametrize("V", [111, 8192])
def test_cuda_extreme_logits(dev, V):
    N = 17
    logits = _randn(N, V, device=dev, scale=1e4).clamp(-1e4, 1e4)
    logits[0, :] = -1e4
    logits[0, 3] = 1e4
    logits[1, :] = 1e4  # uniform row at +1e4
    target = _target(N, V, dev)
    target[:2] = torch.tensor([3, 5], device=dev)
    si, m, dm = _schedule(N, 2, dev)
    _parity(logits, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm)


def test_cuda_alpha_zero_plain_cross_entropy(dev):
    N, V = 45, 5000
    logits, target = _randn(N, V, device=dev), _target(N, V, dev)
    o = d3diff_loss_from_logits(logits, target.to(torch.int32), alpha=0.0, backend="cuda")
    assert_close(o.loss, torch.nn.functional.cross_entropy(logits, target, ignore_index=-100))


def _poison_cache(nbytes, device):
    """Leave NaN-filled blocks in the caching allocator, so the next outputs of about this size
    start as NaN (the ops allocate their outputs themselves)."""
    junk = [poison_(torch.empty(nbytes // 4 + 64, device=device)) for _ in range(2)]
    del junk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V", [(33, 111), (6, 8192), (3, 33333)])
def test_cuda_row_kernels_write_every_element(dev, dtype, N, V):
    from unif2ace.kernels import _ext

    ops = _ext.cuda_ops()
    x, t = _randn(N, V, device=dev, dtype=dtype, scale=2.0), _target(N, V, dev)
    t[1] = V + 5  # out of range: tgt NaN, no one-hot term, no crash
    _poison_cache(N * 4, dev)
    lse, tgt = ops.lse_gather(x, t, -100)
    assert_all_written(lse, "lse")
    valid = (t != -100) & (t < V)
    zero = torch.zeros((), device=dev)
    assert_close(lse, torch.where(t != -100, torch.logsumexp(x.float(), 1), zero), name="lse")
    want_tgt = torch.where(valid, x.float().gather(1, t.clamp(0, V - 1)[:, None]).squeeze(1), zero)
    keep = torch.arange(N, device=dev) != 1
    assert_close(tgt[keep], want_tgt[keep], name="tgt")
    assert torch.isnan(tgt[1])
    gl, gt = torch.randn(N, device=dev), torch.randn(N, device=dev)
    _poison_cache(N * V * x.element_size(), dev)
    g = ops.lse_gather_backward(x, t, lse, gl, gt, -100)
    assert g.dtype == dtype and g.is_contiguous()
    assert_all_written(g, "grad")
    want = gl[:, None] * torch.softmax(x.float(), 1)
    rows = valid.nonzero().squeeze(1)
    want[rows, t[rows]] += gt[rows]
    want[t == -100] = 0
    assert_close(g, want, dtype, name="grad")


def test_cuda_torch_compile_fullgraph(dev):
    N, V = 29, 4099
    logits, target = _randn(N, V, device=dev), _target(N, V, dev)
    si, m, dm = _schedule(N, 2, dev)

    def f(x):
        o = d3diff_loss_from_logits(x, target, sample_index=si, mask_rate=m, mask_rate_deriv=dm, backend="cuda")
        return o.loss, o.mask_loss, o.score_loss

    torch._dynamo.reset()
    fwd_bwd_parity(f, torch.compile(f, fullgraph=True), [logits.requires_grad_()])


def test_cuda_large_row_offsets_64bit(dev):
    # rows whose element offset i * ld exceeds 2^31 (int32 indexing would wrap): a bf16 [rows, V]
    # buffer of just over 2^31 elements (4 GiB), only the last two rows carry loss
    from unif2ace.kernels import _ext

    V = 4096
    rows = 2**31 // V + 2
    if torch.cuda.mem_get_info(dev)[0] < rows * V * 2 * 3:
        pytest.skip("not enough free GPU memory for the 64-bit offset check")
    big = torch.empty(rows, V, device=dev, dtype=torch.bfloat16)
    big[-2:].normal_()
    t = torch.full((rows,), -100, device=dev)
    t[-2:] = torch.tensor([7, 11], device=dev)
    lse, tgt = _ext.cuda_ops().lse_gather(big, t, -100)
    x = big[-2:].float()
    assert_close(lse[-2:], torch.logsumexp(x, 1), name="lse")
    assert_close(tgt[-2:], x.gather(1, t[-2:, None]).squeeze(1), name="tgt")
    assert (lse[:-2] == 0).all()
    gl, gt = torch.ones(rows, device=dev), torch.zeros(rows, device=dev)
    g = _ext.cuda_ops().lse_gather_backward(big, t, lse, gl, gt, -100)
    assert_close(g[-2:].float(), torch.softmax(x, 1), torch.bfloat16, name="grad")
    assert (g[0] == 0).all()
