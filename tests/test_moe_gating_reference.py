"""Grouped MoE gating: the reference semantics (hand-computed cases, the closed-form backward,
sequence-level routing) and the public op's input validation (unif2ace/kernels/reference/moe_gating.py)."""

import math

import pytest
import torch

from unif2ace.kernels import moe_gating, moe_sequence_gating
from unif2ace.kernels.reference import moe_gating as R
from unif2ace.testing import assert_close, randn

REF = dict(backend="reference")


def _softmax(xs):
    m = max(xs)
    ex = [math.exp(v - m) for v in xs]
    return [v / sum(ex) for v in ex]


def test_gating_hand_softmax_two_uneven_groups():
    # group 0: 3 experts (global 0..2); group 1: 5 experts (global 3..7)
    logits = torch.tensor(
        [
            [1.0, 3.0, 2.0, 9.0, 9.0, 9.0, 9.0, 9.0],  # group 0: ignore the huge group-1 columns
            [9.0, 9.0, 9.0, 0.5, -1.0, 2.0, 1.5, 0.0],  # group 1
            [0.0, -2.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],  # group 0
        ]
    )
    gid = torch.tensor([0, 1, 0])
    out = moe_gating(logits, gid, [3, 5], 2, balance_coef=0.1, **REF)
    assert out.expert_ids.dtype == torch.int32 and out.gates.dtype == torch.float32
    s0 = _softmax([1.0, 3.0, 2.0])
    s1 = _softmax([0.5, -1.0, 2.0, 1.5, 0.0])
    s2 = _softmax([0.0, -2.0, 0.5])
    assert out.expert_ids.tolist() == [[1, 2], [5, 6], [2, 0]]
    want_gates = torch.tensor([[s0[1], s0[2]], [s1[2], s1[3]], [s2[2], s2[0]]])
    assert_close(out.gates, want_gates)
    # f: group 0 has 2 tokens * k=2 = 4 assignments: expert0 1, expert1 1, expert2 2
    f = [1 / 4, 1 / 4, 2 / 4, 0, 0, 1 / 2, 1 / 2, 0]
    P = [(s0[i] + s2[i]) / 2 for i in range(3)] + s1
    assert_close(out.expert_fraction, torch.tensor(f))
    assert_close(out.expert_prob, torch.tensor(P))
    loss0 = 0.1 * 3 * sum(f[i] * P[i] for i in range(3))
    loss1 = 0.1 * 5 * sum(f[i] * P[i] for i in range(3, 8))
    assert_close(out.balance_loss, torch.tensor([loss0, loss1]))


def test_gating_hand_sigmoid_and_renormalize():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.7]])
    gid = torch.tensor([0])
    sig = [1 / (1 + math.exp(-v)) for v in [0.3, -1.0, 2.0, 0.7]]
    out = moe_gating(logits, gid, [4], 2, score="sigmoid", **REF)
    assert out.expert_ids.tolist() == [[2, 3]]
    assert_close(out.gates, torch.tensor([[sig[2], sig[3]]]))
    assert_close(out.expert_prob, torch.tensor(sig))
    outn = moe_gating(logits, gid, [4], 2, score="sigmoid", renormalize=True, **REF)
    s = sig[2] + sig[3]
    assert_close(outn.gates, torch.tensor([[sig[2] / s, sig[3] / s]]))
    sm = _softmax([0.3, -1.0, 2.0, 0.7])
    outs = moe_gating(logits, gid, [4], 3, renormalize=True, **REF)
    s = sm[2] + sm[3] + sm[0]
    assert outs.expert_ids.tolist() == [[2, 3, 0]]
    assert_close(outs.gates, torch.tensor([[sm[2] / s, sm[3] / s, sm[0] / s]]))
    assert_close(outs.gates.sum(-1), torch.ones(1))


def test_gating_ties_lowest_index():
    logits = torch.tensor(
        [
            [0.5, 2.0, 2.0, 2.0, 0.0, 1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0],
            [7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0],
        ]
    )
    gid = torch.tensor([0, 1, 1])
    for score in ("softmax", "sigmoid"):
        out = moe_gating(logits, gid, [5, 3], 2, score=score, **REF)
        assert out.expert_ids.tolist() == [[1, 2], [5, 6], [5, 6]], score
    # many exact ties in a wide row: the order must be ascending index
    row = torch.zeros(1, 64)
    out = moe_gating(row, torch.tensor([0]), [64], 8, **REF)
    assert out.expert_ids.tolist() == [list(range(8))]


def test_gating_routing_never_crosses_groups():
    T, sizes = 300, [3, 5, 8]
    offs = R.group_offsets(sizes)
    logits = randn(T, 16, scale=3.0)
    gid = torch.randint(0, 3, (T,))
    out = moe_gating(logits, gid, sizes, 3, **REF)
    lo = torch.tensor(offs[:-1])[gid].unsqueeze(1)
    hi = torch.tensor(offs[1:])[gid].unsqueeze(1)
    assert bool(((out.expert_ids >= lo) & (out.expert_ids < hi)).all())
    # descending gate order, distinct experts per token
    assert bool((out.gates[:, :-1] >= out.gates[:, 1:]).all())
    assert bool((out.expert_ids.sort(-1).values.diff(dim=-1) > 0).all())
    # changing another group's columns changes nothing for a token
    logits2 = logits.clone()
    mask0 = gid == 0
    logits2[mask0, 3:] = randn(int(mask0.sum()), 13) * 100
    out2 = moe_gating(logits2, gid, sizes, 3, **REF)
    assert torch.equal(out.expert_ids, out2.expert_ids) and torch.equal(out.gates, out2.gates)
    # f sums to 1 per group, P sums to 1 per group (softmax)
    for g in range(3):
        assert_close(out.expert_fraction[offs[g] : offs[g + 1]].sum(), torch.tensor(1.0))
        assert_close(out.expert_prob[offs[g] : offs[g + 1]].sum(), torch.tensor(1.0))


def test_gating_empty_group_has_zero_stats():
    logits = randn(6, 7)
    gid = torch.zeros(6, dtype=torch.int32)
    out = moe_gating(logits, gid, [4, 3], 2, balance_coef=0.5, **REF)
    assert out.balance_loss.shape == (2,)
    assert out.balance_loss[1].item() == 0.0 and out.balance_loss[0].item() > 0
    assert out.expert_fraction[4:].tolist() == [0.0] * 3 and out.expert_prob[4:].tolist() == [0.0] * 3
    # uniform logits: f*P balanced -> loss = coef * N * sum(1/N * 1/N) = coef
    u = moe_gating(torch.zeros(8, 4), torch.zeros(8, dtype=torch.long), [4], 4, balance_coef=0.5, **REF)
    assert_close(u.balance_loss, torch.tensor([0.5]))


def test_gating_grads_flow_to_logits():
    logits = randn(20, 8).requires_grad_(True)
    gid = torch.randint(0, 2, (20,))
    out = moe_gating(logits, gid, [3, 5], 2, balance_coef=0.1, **REF)
    assert out.gates.requires_grad and out.balance_loss.requires_grad
    assert not out.expert_fraction.requires_grad
    (g,) = torch.autograd.grad(out.balance_loss.sum(), logits, retain_graph=True)
    assert g.abs().sum() > 0
    (g2,) = torch.autograd.grad((out.gates * randn(20, 2)).sum(), logits)
    assert g2.abs().sum() > 0


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_gating_backward_formula_matches_autograd(score, renormalize):
    logits = randn(40, 11, scale=2.0).requires_grad_(True)
    gid = torch.randint(0, 3, (40,))
    sizes = [3, 5, 3]
    _, gates, _, prob, loss = R.moe_gating_ref(logits, gid, sizes, 2, score, renormalize, 0.2)
    gg, gp, gl = randn(40, 2), randn(11), randn(3)
    (want,) = torch.autograd.grad((gates, prob, loss), logits, (gg, gp, gl))
    got = R.moe_gating_backward_ref(gg, gp, gl, logits.detach(), gid, sizes, 2, score, renormalize, 0.2)
    assert_close(got, want)


def test_gating_low_precision_logits():
    logits = randn(16, 8, dtype=torch.bfloat16)
    gid = torch.randint(0, 2, (16,))
    out = moe_gating(logits, gid, [4, 4], 2, **REF)
    ref32 = moe_gating(logits.float(), gid, [4, 4], 2, **REF)
    assert out.gates.dtype == torch.float32
    assert torch.equal(out.expert_ids, ref32.expert_ids)
    assert_close(out.gates, ref32.gates)


# ------------------------------------------------------------------------------------------------
# sequence gating


def test_sequence_gating_masked_mean_and_all_pad_row():
    B, S, D = 3, 5, 4
    hidden = randn(B, S, D)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    W, bias = randn(8, D), randn(8)
    gid = torch.tensor([1, 0, 1])
    out = moe_sequence_gating(hidden, mask, W, gid, [4, 4], 2, router_bias=bias, **REF)
    pooled = torch.stack([hidden[0, [0, 1, 3]].mean(0), torch.zeros(D), hidden[2].mean(0)])
    want = moe_gating(pooled @ W.t() + bias, gid, [4, 4], 2, balance_coef=0.0, **REF)
    for a, b in zip(out, want):
        assert_close(a, b)
    # the all-pad row routes on the bias alone
    assert out.expert_ids[1].tolist() == torch.sort(bias[:4], descending=True, stable=True).indices[:2].tolist()
    h = hidden.clone().requires_grad_(True)
    o = moe_sequence_gating(h, mask, W, gid, [4, 4], 2, **REF)
    (g,) = torch.autograd.grad(o.gates.sum() + (o.gates[:, 0] ** 2).sum(), h)
    assert g[1].abs().max().item() == 0.0 and g[0, 2].abs().max().item() == 0.0 and g[0, 0].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# bad inputs


def _raises(exc, *words):
    return pytest.raises(exc, match=".*".join(words))


def test_gating_bad_inputs():
    logits, gid = randn(4, 8), torch.tensor([0, 1, 1, 0])
    with _raises(ValueError, "moe_gating", "top_k", "group 0", "3 experts"):
        moe_gating(logits, gid, [3, 5], 4)
    with _raises(ValueError, "moe_gating", "group_ids", r"\[0, 2\)"):
        moe_gating(logits, torch.tensor([0, 2, 1, 0]), [3, 5], 2)
    with _raises(ValueError, "moe_gating", "group_ids", r"\[0, 2\)"):
        moe_gating(logits, torch.tensor([0, -1, 1, 0]), [3, 5], 2)
    with _raises(ValueError, "moe_gating", "sum", "group_sizes", "8"):
        moe_gating(logits, gid, [3, 4], 2)
    with _raises(ValueError, "moe_gating", "score", "softmax"):
        moe_gating(logits, gid, [3, 5], 2, score="relu")
    with _raises(TypeError, "moe_gating", "group_ids", "dtype"):
        moe_gating(logits, gid.float(), [3, 5], 2)
    with _raises(TypeError, "moe_gating", "router_logits", "dtype"):
        moe_gating(logits.long(), gid, [3, 5], 2)
    with _raises(ValueError, "moe_gating", "group_ids", "shape"):
        moe_gating(logits, gid[:3], [3, 5], 2)
    with _raises(ValueError, "moe_gating", "top_k", ">= 1"):
        moe_gating(logits, gid, [3, 5], 0)
    with _raises(ValueError, "moe_gating", "group_ids", "meta"):
        moe_gating(logits, gid.to("meta"), [3, 5], 2)


def test_sequence_gating_bad_inputs():
    D = 6
    hidden, mask = randn(2, 3, D), torch.ones(2, 3, dtype=torch.bool)
    with _raises(ValueError, "moe_sequence_gating", "router_weight", "=8", "D=6", r"got \[8, 7\]"):
        moe_sequence_gating(hidden, mask, randn(8, D + 1), torch.tensor([0, 1]), [4, 4])
    with _raises(TypeError, "moe_sequence_gating", "valid_mask", "dtype"):
        moe_sequence_gating(hidden, mask.float(), randn(8, D), torch.tensor([0, 1]), [4, 4])
    with _raises(ValueError, "moe_sequence_gating", "top_k", "group 1"):
        moe_sequence_gating(hidden, mask, randn(5, D), torch.tensor([0, 1]), [4, 1], 2)
