"""The benchmark peers (benchmarks/peers.py) compute the same math as our reference, so that their
rows in benchmarks/run.py compare like with like: the loss peers give the reference's loss and
gradients on the CE-equivalent cases (α = 0, the same ignored rows), the MoE peers its output and
gradients, the sampling peers draw from the same filtered distribution (support checked exactly,
the law by χ²; p < 1e-4 rejects). A peer that cannot run here (not installed, CUDA only) is
skipped with its reason -- Cut Cross-Entropy's torch_compile implementation runs on CPU when the
package is installed (``pip install --no-deps -r requirements-peers.txt``)."""

import math

import pytest
import torch

from benchmarks import peers
from benchmarks.cases import d3diff, moe_mlp, sampling
from unif2ace.kernels import BackendUnavailableError, ar_sample, masked_sample_step
from unif2ace.kernels.reference.sampling import top_k_filter, top_p_filter
from unif2ace.testing import chi2_pvalue

CPU = torch.device("cpu")


def _grads(case, impl):
    torch.manual_seed(0)
    inp = case.setup()
    out = impl(inp)
    loss = case.backward(out)
    loss.backward()
    leaves = {k: v.grad.clone() for k, v in inp.items() if isinstance(v, torch.Tensor) and v.grad is not None}
    return out, leaves


def _close(a, b, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")
    else:  # bf16 operands on both sides, rounded at different places
        scale = float(b.detach().float().abs().max()) or 1.0
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=2e-2 * scale, msg=lambda m: f"{what}: {m}")


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rate", [1.0, 0.5], ids=["all-rows", "half-ignored"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "from-logits"])
def test_loss_peers_match_reference(fused, rate, dtype):
    """Every loss peer of a CE-equivalent case: same loss, same gradients as our reference."""
    case = d3diff._case(CPU, "t", fused, ("reference",), "CE", 300, 64, 1000, rate, 0.0, dtype)
    assert set(case.peers) == set(peers.loss_peers(fused)) and case.shape["alpha"] == 0
    ref_out, ref_g = _grads(case, case.impls["reference"])
    ran = []
    for name, fn in case.peers.items():
        try:
            out, g = _grads(case, fn)
        except BackendUnavailableError as e:
            assert "CUDA" in str(e) or "not installed" in str(e), (name, e)
            continue
        ran.append(name)
        _close(out[0], ref_out[0], dtype, f"{name} loss")
        assert set(g) == set(ref_g), name
        for k in g:
            _close(g[k], ref_g[k], dtype, f"{name} d{k}")
    assert "eager" in ran


def test_cce_torch_compile_runs_here_when_installed():
    pytest.importorskip("cut_cross_entropy", reason="cut-cross-entropy not installed (requirements-peers.txt)")
    case = d3diff._case(CPU, "t", True, ("reference",), "CE", 256, 64, 512, 0.5, 0.0, torch.float32)
    out, g = _grads(case, case.peers["cce-torch_compile"])
    ref_out, ref_g = _grads(case, case.impls["reference"])
    _close(out[0], ref_out[0], torch.float32, "cce loss")
    _close(g["hidden"], ref_g["hidden"], torch.float32, "cce dhidden")


def test_loss_cases_are_registered_with_peers():
    cases = d3diff.family_cases(CPU, False, "d3diff_head", True, ("reference", "cpu"))
    ce = [c for c in cases if c.peers]
    assert {(c.shape["mask_rate"], c.dtype) for c in ce} == {(r, dt) for r in (1.0, 0.5) for dt in (F32, BF16)}
    assert all(c.shape["alpha"] == 0 for c in ce) and all(not c.peers for c in cases if c.shape["alpha"])
    for c in cases:  # the limit counts only the rows that carry loss
        assert c.limit.gemms[0].m == d3diff.rows_with_loss(c.shape["N"], c.shape["V"], c.shape["mask_rate"])


@pytest.mark.parametrize("activation,dtype", [("gelu", F32), ("swiglu", F32), ("gelu", BF16)], ids=str)
def test_moe_peers_match_reference(activation, dtype):
    case = moe_mlp._mlp_case("t", CPU, 200, 32, 48, 8, 2, dtype, activation=activation)
    ref_out, ref_g = _grads(case, case.impls["reference"])
    for name, fn in case.peers.items():
        try:
            out, g = _grads(case, fn)
        except BackendUnavailableError as e:
            assert name == "torch._grouped_mm" and "_grouped_mm" in str(e), e
            continue
        _close(out, ref_out, dtype, f"{name} out")
        assert set(g) == set(ref_g) == {"x", "w1", "w2", "gates"}
        for k in g:
            _close(g[k], ref_g[k], dtype, f"{name} d{k}")


def test_moe_peers_with_an_empty_expert():
    case = moe_mlp._mlp_case("t", CPU, 16, 8, 8, 4, 1, torch.float32)
    torch.manual_seed(0)
    inp = case.setup()
    inp["expert_ids"] = torch.where(inp["expert_ids"] == 2, 0, inp["expert_ids"])  # expert 2 gets no token
    ref = case.impls["reference"](inp)
    for name, fn in case.peers.items():
        try:
            _close(fn(inp), ref, torch.float32, name)
        except BackendUnavailableError:
            pass


def test_native_sampler_filter_is_ours():
    """vLLM's sort-based top-k / top-p keeps exactly the codes our reference keeps (no ties)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1000, generator=g) * 3
    for temp, k, p in ((1.0, 50, None), (0.8, 50, 0.9), (1.3, None, 0.5), (0.7, 5, 0.99), (1.0, None, None)):
        z = x / temp
        ours = top_p_filter(top_k_filter(z, k), p)
        theirs = peers.top_k_top_p_sort(z, k, p)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), (temp, k, p)
        assert torch.equal(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_native_sampler_distribution_is_ours():
    V, temp, k, top_p, B = 40, 0.8, 20, 0.8, 20000
    row = torch.randn(V, generator=torch.Generator().manual_seed(6)) * 1.5
    probs = torch.softmax(top_p_filter(top_k_filter(row[None].double() / temp, k), top_p)[0], 0)
    assert 2 < int((probs > 0).sum()) < k
    g = torch.Generator().manual_seed(11)
    theirs = peers.native_ar_sample(row.expand(B, V), temp, k, top_p, generator=g)
    ours = ar_sample(row.expand(B, V), seed=5, position=1, temperature=temp, top_k=k, top_p=top_p, backend="reference")
    assert chi2_pvalue(theirs, probs) > 1e-4
    assert chi2_pvalue(ours.tokens, probs) > 1e-4
    assert torch.equal(peers.native_ar_sample(row.expand(4, V), 0.0, k, top_p), row.argmax().expand(4))


def test_native_masked_step_makes_our_decisions():
    """Same number of re-masked positions per row as ours; at the last step (nothing re-masked)
    the codes follow the guided softmax."""
    case = sampling._step_case("t", CPU, 3, 64, 50, torch.float32)
    torch.manual_seed(0)
    inp = case.setup()
    inp["is_masked"][1, :20] = False  # a partly decoded row
    inp["tokens"][1, :20] = 7
    for step in (0, 9):
        kw = dict(step=step, num_steps=sampling.T_STEPS, guidance_scale=sampling.GUIDANCE,
                  confidence_noise=sampling.CONF_NOISE, mask_token_id=50)  # fmt: skip
        tok, mask = peers.native_masked_step(inp["cond"], inp["uncond"], inp["tokens"], inp["is_masked"], **kw)
        ours = masked_sample_step(inp["cond"], inp["tokens"], inp["is_masked"], seed=1, uncond_logits=inp["uncond"],
                                  backend="reference", **kw)  # fmt: skip
        assert torch.equal(mask.sum(-1), ours.is_masked.sum(-1)) and not (mask & ~inp["is_masked"]).any()
        assert torch.equal(tok[~inp["is_masked"]], inp["tokens"][~inp["is_masked"]])
        assert torch.equal(tok == 50, mask)
    # the law of the drawn codes
    L, V, s = 20000, 12, sampling.GUIDANCE
    g = torch.Generator().manual_seed(2)
    cond, unc = torch.randn(V, generator=g), torch.randn(V, generator=g)
    tok, mask = peers.native_masked_step(
        cond.expand(1, L, V), unc.expand(1, L, V), torch.full((1, L), V), torch.ones(1, L, dtype=torch.bool),
        step=sampling.T_STEPS - 1, num_steps=sampling.T_STEPS, guidance_scale=s, confidence_noise=4.5, mask_token_id=V,
    )  # fmt: skip
    assert not mask.any()
    probs = torch.softmax((1 + s) * cond.double() - s * unc.double(), 0)
    assert chi2_pvalue(tok.flatten(), probs) > 1e-4


def test_flashinfer_and_cuda_only_peers_skip_on_cpu():
    x = {"logits": torch.randn(2, 10)}
    fns = peers.ar_sample_peers(1.0, 5, None)
    assert fns["torch-native"](x).shape == (2,)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        fns["flashinfer"](x)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        peers.liger_ce({"logits": x["logits"], "target": torch.zeros(2, dtype=torch.long)})
    assert math.isfinite(float(peers.eager_ce({"logits": x["logits"], "target": torch.zeros(2, dtype=torch.long)})[0]))
