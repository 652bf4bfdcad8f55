"""Semantics of the sampling ops (``masked_sample_step``, ``ar_sample``) through the public API on
the ``reference`` backend (unif2ace/kernels/reference/sampling.py): the oracle's own identities,
against independent implementations written here, and the argument checks. The behaviour and
distribution tests shared by the oracle and the fast backends are in tests/test_sampling.py (the
``reference`` is one of their backend parameters).
"""

from __future__ import annotations

import math

import pytest
import torch
from sampling_testing import GREEDY, special_rows

import unif2ace.kernels as K
from unif2ace.kernels import BackendUnavailableError, ar_sample, masked_sample_step, use_backend
from unif2ace.kernels import sampling as S
from unif2ace.kernels.reference import rng
from unif2ace.kernels.reference import sampling as R
from unif2ace.testing import assert_close

NEG_INF = float("-inf")
FLT_MAX = torch.finfo(torch.float32).max


@pytest.fixture(autouse=True)
def _reference_backend():
    """This file tests the reference oracle; fast backends have their own test files."""
    with use_backend(masked_sample_step="reference", ar_sample="reference"):
        yield


# ------------------------------------------------------------------ helpers


def make_inputs(B, L, V, *, masked_frac=0.7, seed=0, guided=False, mask_id=None):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(B, L, V, generator=g) * 2
    unc = torch.randn(B, L, V, generator=g) * 2 if guided else None
    mask_id = V if mask_id is None else mask_id
    is_masked = torch.rand(B, L, generator=g) < masked_frac
    tokens = torch.randint(0, V, (B, L), generator=g)
    tokens = torch.where(is_masked, mask_id, tokens)
    return cond, unc, tokens, is_masked, mask_id


def gamma_indep(schedule, r, exponent=2.0):
    if schedule == "cosine":
        return math.cos(math.pi / 2 * r)
    if schedule == "linear":
        return max(1 - r, 1e-6)
    if schedule == "pow":
        return max(1 - r**exponent, 1e-6)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    return min(max((sig(3) - sig(6 * r - 3)) / (sig(3) - sig(-3)), 1e-6), 1.0)


def expected_n(L, step, T, masked_count, schedule="cosine", exponent=2.0):
    """The per-row re-mask count written out independently (docs/model.md §4 step 4)."""
    if step == T - 1 or masked_count == 0:
        return 0
    n_raw = math.floor(L * gamma_indep(schedule, (step + 1) / T, exponent))
    return max(0, min(max(n_raw, 1), masked_count - 1))


def independent_greedy_step(cond, unc, s, tokens, is_masked, step, T, mask_id, top_k=None):
    """temperature 0, confidence_noise 0, written as plain per-row / per-position loops."""
    B, L, V = cond.shape
    out_tok = tokens.clone().long()
    out_mask = torch.zeros(B, L, dtype=torch.bool)
    out_sampled = tokens.clone().long()
    out_conf = torch.full((B, L), math.inf)
    for b in range(B):
        confs = []
        for i in range(L):
            if not is_masked[b, i]:
                continue
            x = cond[b, i].float()
            if unc is not None and s != 0:
                a1, a2 = torch.tensor(1 + s, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)
                x = a1 * x - a2 * unc[b, i].float()
            if top_k is not None and top_k < V:
                kth = sorted(x.tolist(), reverse=True)[top_k - 1]
                x = torch.where(x >= kth, x, NEG_INF)
            vals = x.tolist()
            best = max(range(V), key=lambda v: (vals[v], -v))  # max value, lowest index
            lp = float(torch.log_softmax(x.double(), 0)[best])
            out_sampled[b, i] = best
            out_conf[b, i] = lp
            confs.append((lp, i))
        n = expected_n(L, step, T, len(confs))
        remask = {i for _, i in sorted(confs)[:n]}  # lowest confidence, ties -> lowest position
        for _, i in confs:
            if i in remask:
                out_tok[b, i] = mask_id
                out_mask[b, i] = True
            else:
                out_tok[b, i] = out_sampled[b, i]
    return out_tok, out_mask, out_sampled, out_conf


def check_output_contract(out, tokens, is_masked, mask_id, V):
    B, L = tokens.shape
    assert out.tokens.shape == out.is_masked.shape == out.sampled.shape == out.confidence.shape == (B, L)
    assert out.tokens.dtype == torch.int64 and out.sampled.dtype == torch.int64
    assert out.is_masked.dtype == torch.bool and out.confidence.dtype == torch.float32
    assert not torch.isnan(out.confidence).any()
    keep = ~is_masked
    assert torch.equal(out.tokens[keep], tokens[keep].long())
    assert torch.equal(out.sampled[keep], tokens[keep].long())
    assert bool(torch.isposinf(out.confidence[keep]).all())
    assert not bool(torch.isposinf(out.confidence[is_masked]).any())
    sm = out.sampled[is_masked]
    assert bool(((sm >= 0) & (sm < V)).all())
    assert not bool((out.is_masked & ~is_masked).any())
    assert bool((out.tokens[out.is_masked] == mask_id).all())
    dec = is_masked & ~out.is_masked
    assert torch.equal(out.tokens[dec], out.sampled[dec])


# ------------------------------------------------------------------ schedules


def test_mask_schedule_values():
    assert K.mask_schedule("cosine", 0.0) == 1.0
    assert K.mask_schedule("cosine", 0.5) == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert K.mask_schedule("cosine", 1.0) == pytest.approx(0.0, abs=1e-15)
    assert K.mask_schedule("linear", 0.25) == 0.75
    assert K.mask_schedule("linear", 1.0) == 1e-6
    assert K.mask_schedule("pow", 0.5, 3.0) == 0.875
    assert K.mask_schedule("pow", 0.5) == 0.75
    assert K.mask_schedule("sigmoid", 0.0) == pytest.approx(1.0, rel=1e-12)
    assert K.mask_schedule("sigmoid", 0.5) == pytest.approx(0.5, rel=1e-12)
    assert K.mask_schedule("sigmoid", 1.0) == 1e-6
    with pytest.raises(ValueError, match="'name'"):
        K.mask_schedule("cos", 0.5)
    with pytest.raises(ValueError, match="'ratio'"):
        K.mask_schedule("cosine", 1.5)
    with pytest.raises(ValueError, match="'exponent'"):
        K.mask_schedule("pow", 0.5, 0.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "pow", "sigmoid"])
def test_num_to_keep_masked_every_step(schedule):
    T = 18
    for L in (1, 5, 222, 256, 1024, 4096):
        for t in range(T):
            want = 0 if t == T - 1 else math.floor(L * gamma_indep(schedule, (t + 1) / T))
            assert K.num_to_keep_masked(L, t, T, schedule) == want, (L, t)
    # hand-computed: L = 256, T = 18, cosine
    assert [K.num_to_keep_masked(256, t, 18) for t in (0, 8, 16, 17)] == [255, 181, 22, 0]
    assert K.num_to_keep_masked(256, 0, 1) == 0  # single step: everything decoded at once


def test_num_to_keep_masked_bad_args():
    with pytest.raises(ValueError, match="'step'"):
        K.num_to_keep_masked(10, 5, 5)
    with pytest.raises(ValueError, match="'num_steps'"):
        K.num_to_keep_masked(10, 0, 0)
    with pytest.raises(ValueError, match="'seq_len'"):
        K.num_to_keep_masked(-1, 0, 3)
    with pytest.raises(ValueError, match="'schedule'"):
        K.num_to_keep_masked(10, 0, 3, "exp")


# ------------------------------------------------------------------ masked step: exact semantics


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("step", [0, 3, 6])
def test_greedy_matches_independent_implementation(guided, step):
    B, L, V, T = 3, 37, 29, 7
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=guided, seed=step)
    is_masked[2] = False  # a row with nothing masked
    tokens[2] = torch.randint(0, V, (L,))
    s = 1.75 if guided else 0.0
    out = masked_sample_step(
        cond,
        tokens,
        is_masked,
        step=step,
        num_steps=T,
        seed=5,
        mask_token_id=mid,
        uncond_logits=unc,
        guidance_scale=s,
        **GREEDY,
    )
    check_output_contract(out, tokens, is_masked, mid, V)
    want = independent_greedy_step(cond, unc, s, tokens, is_masked, step, T, mid)
    assert torch.equal(out.sampled, want[2])
    assert torch.equal(out.is_masked, want[1])
    assert torch.equal(out.tokens, want[0])
    assert_close(out.confidence, want[3], name="confidence")
    # the row with nothing masked is unchanged
    assert torch.equal(out.tokens[2], tokens[2]) and not out.is_masked[2].any()


def test_guidance_combine():
    B, L, V = 2, 9, 17
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True, masked_frac=1.0)
    s = 2.5

    def first_step(**kw):
        return masked_sample_step(cond, tokens, is_masked, step=0, num_steps=4, seed=3, mask_token_id=mid, **kw)

    out = first_step(uncond_logits=unc, guidance_scale=s, **GREEDY)
    comb = (1 + s) * cond.double() - s * unc.double()
    assert torch.equal(out.sampled, comb.argmax(-1))
    lp = torch.log_softmax(comb, -1).gather(-1, out.sampled[..., None])[..., 0]
    assert_close(out.confidence, lp, name="confidence")
    # guidance_scale 0 ignores uncond entirely
    out0 = first_step(uncond_logits=unc * 100, guidance_scale=0.0)
    ref0 = first_step()
    for a, b in zip(out0, ref0):
        assert torch.equal(a, b)


def test_noise_contract_pins_rng_keys():
    """The draw and the confidence with the documented keys, re-derived here: per position the
    64 random bits r of (seed, step, stream 0, sample id, position, token 0), the integer weights
    q_v = exp_fixed(x_v / T - max, K), the code = the first v whose running sum of q exceeds
    floor(r · sum(q) / 2^64) (Python integers); confidence = (x_code - max) - lse_rel + fp32(τ)·g'
    with g' the stream-1 Gumbel of (seed, step, sample id, position, token 0) -- bit for bit, and
    within 1e-6 of the float64 log-softmax."""
    B, L, V, T, step, seed = 2, 11, 23, 6, 2, 2**40 + 17
    cond, _, tokens, is_masked, mid = make_inputs(B, L, V, masked_frac=1.0)
    ids = torch.tensor([7, 2**33 + 1])
    temp, tau0 = 0.9, 3.0
    kw = dict(step=step, num_steps=T, seed=seed, mask_token_id=mid, temperature=temp, sample_ids=ids)
    out = masked_sample_step(cond, tokens, is_masked, confidence_noise=tau0, **kw)
    pos = torch.arange(L)
    hi, lo = rng.random_words(seed, step, 0, ids[:, None], pos[None, :], 0)
    x = cond.float()
    z = x / torch.tensor(temp, dtype=torch.float32)
    q = rng.exp_fixed(z - z.amax(-1, keepdim=True), rng.sum_bits(V))
    for b in range(B):
        for i in range(L):
            qs = q[b, i].tolist()
            u = ((int(hi[b, i]) << 32 | int(lo[b, i])) * sum(qs)) >> 64
            run, code = 0, None
            for v, w in enumerate(qs):
                run += w
                if run > u:
                    code = v
                    break
            assert int(out.sampled[b, i]) == code
    g1 = rng.gumbel(seed, step, 1, ids[:, None], pos[None, :], 0)
    tau = torch.tensor(tau0 * (1 - (step + 1) / T), dtype=torch.float32)
    m = x.amax(-1, keepdim=True)
    lp = ((x.gather(-1, out.sampled[..., None]) - m) - rng.lse_rel(x, m))[..., 0]
    assert torch.equal(out.confidence, lp + tau * g1)
    plain = masked_sample_step(cond, tokens, is_masked, confidence_noise=0.0, **kw).confidence
    assert (
        float(
            (plain.double() - torch.log_softmax(x.double(), -1).gather(-1, out.sampled[..., None])[..., 0]).abs().max()
        )
        < 1e-6
    )


def test_confidence_uses_top_k_filtered_distribution():
    B, L, V, k = 2, 8, 31, 4
    cond, _, tokens, is_masked, mid = make_inputs(B, L, V, masked_frac=1.0)
    out = masked_sample_step(
        cond,
        tokens,
        is_masked,
        step=0,
        num_steps=3,
        seed=1,
        mask_token_id=mid,
        **GREEDY,
        top_k=k,
    )
    want = independent_greedy_step(cond, None, 0.0, tokens, is_masked, 0, 3, mid, top_k=k)
    assert torch.equal(out.sampled, want[2])
    assert_close(out.confidence, want[3], name="confidence")


def test_schedule_counts_over_a_full_generation():
    """Run all T = 18 steps on rows that start fully masked, half masked and unmasked: after each
    step every row holds exactly the scheduled number of masks; decoded tokens never change."""
    B, L, V, T = 3, 64, 10, 18
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(B, L, V, generator=g)
    mid = V
    is_masked = torch.zeros(B, L, dtype=torch.bool)
    is_masked[0] = True
    is_masked[1, ::2] = True
    tokens = torch.where(is_masked, mid, torch.randint(0, V, (B, L), generator=g))
    start = tokens.clone()
    for t in range(T):
        counts = is_masked.sum(-1).tolist()
        out = masked_sample_step(cond, tokens, is_masked, step=t, num_steps=T, seed=7, mask_token_id=mid)
        check_output_contract(out, tokens, is_masked, mid, V)
        assert out.is_masked.sum(-1).tolist() == [expected_n(L, t, T, m) for m in counts], t
        decoded_before = ~is_masked
        assert torch.equal(out.tokens[decoded_before], tokens[decoded_before])
        tokens, is_masked = out.tokens, out.is_masked
        cond = torch.randn(B, L, V, generator=g)  # the "model" changes its mind every step
    assert not is_masked.any()
    assert bool((tokens < V).all())
    assert torch.equal(tokens[2], start[2])


@pytest.mark.parametrize("schedule", ["linear", "pow", "sigmoid"])
def test_other_schedules_in_the_op(schedule):
    B, L, V, T = 2, 40, 7, 5
    cond, _, tokens, is_masked, mid = make_inputs(B, L, V, masked_frac=0.9)
    for t in range(T):
        out = masked_sample_step(
            cond,
            tokens,
            is_masked,
            step=t,
            num_steps=T,
            seed=2,
            mask_token_id=mid,
            schedule=schedule,
            schedule_exponent=3.0,
        )
        want = [expected_n(L, t, T, int(m), schedule, 3.0) for m in is_masked.sum(-1)]
        assert out.is_masked.sum(-1).tolist() == want


def test_last_step_unmasks_everything_and_unmasked_rows_unchanged():
    B, L, V = 4, 33, 12
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True)
    is_masked[1] = False
    tokens[1] = torch.randint(0, V, (L,))
    out = masked_sample_step(
        cond, tokens, is_masked, step=9, num_steps=10, seed=3, mask_token_id=mid, uncond_logits=unc, guidance_scale=1.0
    )
    check_output_contract(out, tokens, is_masked, mid, V)
    assert not out.is_masked.any()
    assert bool((out.tokens < V).all())
    assert torch.equal(out.tokens[1], tokens[1]) and torch.equal(out.sampled[1], tokens[1])
    assert bool(torch.isposinf(out.confidence[1]).all())
    # a single masked position: clamp to masked - 1 = 0, it is decoded even at step 0
    one = torch.zeros(1, L, dtype=torch.bool)
    one[0, 5] = True
    t1 = torch.where(one, mid, torch.randint(0, V, (1, L)))
    out = masked_sample_step(cond[:1], t1, one, step=0, num_steps=10, seed=3, mask_token_id=mid)
    assert not out.is_masked.any() and int(out.tokens[0, 5]) < V


def test_nan_and_all_neg_inf_rows():
    L, V = 6, 9
    c = special_rows(1, L, V)
    tokens = torch.full((1, L), V)
    is_masked = torch.ones(1, L, dtype=torch.bool)
    for temp in (0.0, 1.0, 0.3):
        out = masked_sample_step(
            c, tokens, is_masked, step=0, num_steps=2, seed=4, mask_token_id=V, temperature=temp, confidence_noise=0.0
        )
        assert out.sampled[0, 2] == 0 and out.sampled[0, 4] == 0
        assert math.isinf(out.confidence[0, 2]) and out.confidence[0, 2] < 0
        assert math.isinf(out.confidence[0, 4]) and out.confidence[0, 4] < 0
        assert int(out.sampled[0, 1]) % 2 == 1
        assert out.sampled[0, 3] == 5 and float(out.confidence[0, 3]) == 0.0
        # n = min(floor(6 cos(π/4)) = 4, 5) = 4 re-masked; the two dead rows come first
        assert int(out.is_masked.sum()) == 4 and out.is_masked[0, 2] and out.is_masked[0, 4]
        assert not out.is_masked[0, 3]  # the most confident position stays
        assert not torch.isnan(out.confidence).any()


def test_chunking_does_not_change_results(monkeypatch):
    B, L, V = 3, 17, 29
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True)
    kw = dict(step=1, num_steps=5, seed=9, mask_token_id=mid, uncond_logits=unc, guidance_scale=1.0, top_k=11)
    base = masked_sample_step(cond, tokens, is_masked, **kw)
    monkeypatch.setattr(R, "CHUNK_ELEMS", 3 * V + 5)  # 3 rows per chunk, ragged last chunk
    out = masked_sample_step(cond, tokens, is_masked, **kw)
    for a, b in zip(out, base):
        assert torch.equal(a, b)
    logits = torch.randn(10, V)
    monkeypatch.setattr(R, "CHUNK_ELEMS", 1 << 20)
    a = ar_sample(logits, seed=1, position=3, top_p=0.9)
    monkeypatch.setattr(R, "CHUNK_ELEMS", 4 * V)
    b = ar_sample(logits, seed=1, position=3, top_p=0.9)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)


def test_low_precision_logits_and_int32_tokens():
    B, L, V = 2, 15, 21
    cond, unc, tokens, is_masked, mid = make_inputs(B, L, V, guided=True)
    kw = dict(step=0, num_steps=3, seed=4, mask_token_id=mid, guidance_scale=1.0)
    for dt in (torch.bfloat16, torch.float16):
        out = masked_sample_step(cond.to(dt), tokens.int(), is_masked, uncond_logits=unc.to(dt), **kw)
        ref = masked_sample_step(cond.to(dt).float(), tokens, is_masked, uncond_logits=unc.to(dt).float(), **kw)
        assert out.tokens.dtype == torch.int64
        for a, b in zip(out, ref):
            assert torch.equal(a, b)


def test_empty_batch_and_sequence():
    for B, L in ((0, 5), (3, 0)):
        out = masked_sample_step(
            torch.randn(B, L, 7),
            torch.zeros(B, L, dtype=torch.long),
            torch.ones(B, L, dtype=torch.bool),
            step=0,
            num_steps=3,
            seed=1,
            mask_token_id=7,
        )
        assert all(t.shape == (B, L) for t in out)
    out = ar_sample(torch.randn(0, 5), seed=1, position=0)
    assert out.tokens.shape == (0,) and out.logprobs.shape == (0,)


# ------------------------------------------------------------------ autoregressive sampling


def test_ar_greedy_is_argmax_with_lowest_index_ties():
    B, V = 16, 100
    logits = torch.randn(B, V)
    logits[3, 17] = logits[3, 60] = logits[3].max() + 1  # tie: lowest index wins
    want = logits.argmax(-1)
    assert int(want[3]) == 17
    lp = torch.log_softmax(logits, -1).gather(-1, want[:, None])[:, 0]
    for kw in (dict(temperature=0.0), dict(top_k=1), dict(temperature=0.0, top_p=0.5)):
        out = ar_sample(logits, seed=1, position=0, **kw)
        assert torch.equal(out.tokens, want)
        assert_close(out.logprobs, lp, name="logprobs")


def test_ar_logprobs_are_unfiltered_temperature_one():
    B, V = 32, 50
    logits = torch.randn(B, V) * 2
    out = ar_sample(logits, seed=5, position=9, temperature=0.6, top_k=10, top_p=0.8)
    lp = torch.log_softmax(logits, -1).gather(-1, out.tokens[:, None])[:, 0]
    assert_close(out.logprobs, lp, name="logprobs")
    assert out.tokens.dtype == torch.int64 and out.logprobs.dtype == torch.float32


# ------------------------------------------------------------------ dispatch and validation


def test_dispatch_forced_backends():
    ops = K.registered_ops()
    assert "reference" in ops["masked_sample_step"].backends and "reference" in ops["ar_sample"].backends
    cond, _, tokens, is_masked, mid = make_inputs(1, 4, 5)
    kw = dict(step=0, num_steps=2, seed=0, mask_token_id=mid)
    a = masked_sample_step(cond, tokens, is_masked, backend="reference", **kw)
    with use_backend(masked_sample_step="reference"):
        b = masked_sample_step(cond, tokens, is_masked, **kw)
    assert torch.equal(a.tokens, b.tokens)
    # the cuda backend exists but cannot take CPU tensors: a clear error, never a silent fallback
    with pytest.raises(BackendUnavailableError, match="masked_sample_step: backend 'cuda'.*CUDA tensors"):
        masked_sample_step(cond, tokens, is_masked, backend="cuda", **kw)
    with pytest.raises(BackendUnavailableError, match="ar_sample: backend 'cuda'.*CUDA tensors"):
        ar_sample(cond[0], seed=0, position=0, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ar_sample(cond[0], seed=0, position=0, backend="fast")
    assert isinstance(a, S.MaskedStepOutput) and isinstance(ar_sample(cond[0], seed=0, position=0), S.ARSample)


def _step_args():
    cond, unc, tokens, is_masked, mid = make_inputs(2, 5, 7, guided=True)
    return (cond, tokens, is_masked), dict(
        step=0, num_steps=3, seed=1, mask_token_id=mid, uncond_logits=unc, guidance_scale=1.0
    )


STEP_BAD = [
    (lambda a, k: ((a[0][0],) + a[1:], k), "cond_logits"),
    (lambda a, k: ((a[0].long(),) + a[1:], k), "cond_logits"),
    (lambda a, k: ((a[0], a[1][:, :4], a[2]), k), "tokens"),
    (lambda a, k: ((a[0], a[1].float(), a[2]), k), "tokens"),
    (lambda a, k: ((a[0], a[1], a[2].int()), k), "is_masked"),
    (lambda a, k: ((a[0], a[1], a[2][:1]), k), "is_masked"),
    (lambda a, k: (a, {**k, "uncond_logits": k["uncond_logits"][..., :6]}), "uncond_logits"),
    (lambda a, k: (a, {**k, "step": -1}), "step"),
    (lambda a, k: (a, {**k, "step": 3}), "step"),
    (lambda a, k: (a, {**k, "step": 1.0}), "step"),
    (lambda a, k: (a, {**k, "num_steps": 0}), "num_steps"),
    (lambda a, k: (a, {**k, "uncond_logits": None}), "guidance_scale"),
    (lambda a, k: (a, {**k, "guidance_scale": float("nan")}), "guidance_scale"),
    (lambda a, k: (a, {**k, "temperature": -0.5}), "temperature"),
    (lambda a, k: (a, {**k, "temperature": float("inf")}), "temperature"),
    (lambda a, k: (a, {**k, "confidence_noise": -1.0}), "confidence_noise"),
    (lambda a, k: (a, {**k, "top_k": 0}), "top_k"),
    (lambda a, k: (a, {**k, "top_k": 2.5}), "top_k"),
    (lambda a, k: (a, {**k, "seed": -1}), "seed"),
    (lambda a, k: (a, {**k, "seed": 1 << 64}), "seed"),
    (lambda a, k: (a, {**k, "seed": 1.0}), "seed"),
    (lambda a, k: (a, {**k, "mask_token_id": 1.5}), "mask_token_id"),
    (lambda a, k: (a, {**k, "schedule": "cos"}), "schedule"),
    (lambda a, k: (a, {**k, "schedule": "pow", "schedule_exponent": 0.0}), "schedule_exponent"),
    (lambda a, k: (a, {**k, "sample_ids": torch.arange(3)}), "sample_ids"),
    (lambda a, k: (a, {**k, "sample_ids": torch.arange(2).float()}), "sample_ids"),
    (lambda a, k: (a, {**k, "sample_ids": torch.tensor([0, -4])}), "sample_ids"),
]


@pytest.mark.parametrize("mutate,arg", STEP_BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(STEP_BAD)])
def test_masked_step_bad_inputs(mutate, arg):
    args, kw = mutate(*_step_args())
    with pytest.raises((ValueError, TypeError)) as ei:
        masked_sample_step(*args, **kw)
    msg = str(ei.value)
    assert f"'{arg}'" in msg and "masked_sample_step" in msg, msg


AR_BAD = [
    (dict(logits=torch.randn(2, 3, 4)), "logits"),
    (dict(logits=torch.randint(0, 5, (2, 4))), "logits"),
    (dict(seed=-1), "seed"),
    (dict(position=-1), "position"),
    (dict(position=1 << 32), "position"),
    (dict(position=torch.zeros(3, dtype=torch.long)), "position"),
    (dict(position=torch.zeros(2)), "position"),
    (dict(position=torch.tensor([0, -1])), "position"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(sample_ids=torch.arange(5)), "sample_ids"),
]


@pytest.mark.parametrize("kw,arg", AR_BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(AR_BAD)])
def test_ar_bad_inputs(kw, arg):
    base = dict(logits=torch.randn(2, 4), seed=1, position=0)
    base.update(kw)
    logits = base.pop("logits")
    with pytest.raises((ValueError, TypeError)) as ei:
        ar_sample(logits, **base)
    msg = str(ei.value)
    assert f"'{arg}'" in msg and "ar_sample" in msg, msg
