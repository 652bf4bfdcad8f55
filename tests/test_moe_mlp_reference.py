"""Routed expert MLP: the reference semantics (a float64 per-slot loop, the closed-form backward,
the shared expert) and the public op's input validation (unif2ace/kernels/reference/moe_mlp.py)."""

import math

import pytest
import torch

from unif2ace.kernels import moe_expert_mlp, moe_shared_expert
from unif2ace.kernels.reference import moe_mlp as R
from unif2ace.testing import assert_close, randn

REF = dict(backend="reference")


def _mlp_loop(x, w1, w2, ids, gates, b1, b2, activation):
    """Direct per-token, per-slot loop in float64."""
    T, D = x.shape
    E, F = w2.shape[0], w2.shape[1]
    out = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < E:
                continue
            h = x[t].double() @ w1[e].double()
            if b1 is not None:
                h = h + b1[e].double()
            if activation == "gelu":
                a = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            else:
                a = h[:F] * torch.sigmoid(h[:F]) * h[F:]
            o = a @ w2[e].double()
            if b2 is not None:
                o = o + b2[e].double()
            out[t] += float(gates[t, j]) * o
    return out


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_expert_mlp_matches_loop(activation, bias):
    T, D, F, E, k = 13, 6, 5, 4, 3
    F1 = 2 * F if activation == "swiglu" else F
    x, w1, w2 = randn(T, D), randn(E, D, F1, scale=0.5), randn(E, F, D, scale=0.5)
    b1 = randn(E, F1) if bias else None
    b2 = randn(E, D) if bias else None
    ids = torch.randint(-1, E + 1, (T, k))  # includes invalid -1 and E
    ids[0] = torch.tensor([-1, E, -1])  # a token with no valid expert
    gates = torch.rand(T, k)
    out = moe_expert_mlp(x, w1, w2, ids, gates, b1=b1, b2=b2, activation=activation, **REF)
    want = _mlp_loop(x, w1, w2, ids, gates, b1, b2, activation)
    assert out.dtype == x.dtype
    assert_close(out, want)
    assert out[0].abs().max().item() == 0.0


def test_expert_mlp_backward_formula_and_dtype():
    T, D, F, E, k = 9, 5, 4, 3, 2
    for activation, F1 in (("gelu", F), ("gelu_tanh", F), ("swiglu", 2 * F)):
        leaves = [randn(T, D), randn(E, D, F1), randn(E, F, D), torch.rand(T, k), randn(E, F1), randn(E, D)]
        for t in leaves:
            t.requires_grad_(True)
        x, w1, w2, g, b1, b2 = leaves
        ids = torch.randint(-1, E, (T, k))
        out = R.moe_expert_mlp_ref(x, w1, w2, ids, g, b1, b2, activation)
        go = randn(T, D)
        want = torch.autograd.grad(out, leaves, go)
        got = R.moe_expert_mlp_backward_ref(
            go, x.detach(), w1.detach(), w2.detach(), ids, g.detach(), b1.detach(), b2.detach(), activation
        )
        for name, a, b in zip(("dx", "dw1", "dw2", "dgates", "db1", "db2"), got, want):
            assert_close(a, b, name=f"{activation} {name}")
    xb = randn(4, D, dtype=torch.bfloat16)
    outb = moe_expert_mlp(
        xb, randn(E, D, F), randn(E, F, D), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), **REF
    )
    assert outb.dtype == torch.bfloat16


def test_shared_expert_is_plain_mlp():
    x, w1, w2, b1, b2 = randn(7, 6), randn(6, 5), randn(5, 6), randn(5), randn(6)
    out = moe_shared_expert(x, w1, w2, b1=b1, b2=b2, **REF)
    want = torch.nn.functional.gelu(x @ w1 + b1) @ w2 + b2
    assert_close(out, want)


# ------------------------------------------------------------------------------------------------
# bad inputs


def _raises(exc, *words):
    return pytest.raises(exc, match=".*".join(words))


def test_mlp_bad_inputs():
    T, D, F, E = 4, 6, 5, 3
    x, w1, w2 = randn(T, D), randn(E, D, F), randn(E, F, D)
    ids, g = torch.zeros(T, 2, dtype=torch.long), torch.rand(T, 2)
    with _raises(ValueError, "moe_expert_mlp", "w1", "shape"):
        moe_expert_mlp(x, randn(E, D + 1, F), w2, ids, g)
    with _raises(ValueError, "moe_expert_mlp", "w2", "shape"):
        moe_expert_mlp(x, w1, randn(E, F, D + 1), ids, g)
    with _raises(ValueError, "moe_expert_mlp", "w1", "swiglu"):
        moe_expert_mlp(x, w1, w2, ids, g, activation="swiglu")
    with _raises(ValueError, "moe_expert_mlp", "activation"):
        moe_expert_mlp(x, w1, w2, ids, g, activation="relu")
    with _raises(ValueError, "moe_expert_mlp", "gates", "shape"):
        moe_expert_mlp(x, w1, w2, ids, g[:, :1])
    with _raises(TypeError, "moe_expert_mlp", "expert_ids", "dtype"):
        moe_expert_mlp(x, w1, w2, ids.float(), g)
    with _raises(ValueError, "moe_expert_mlp", "b1", "shape"):
        moe_expert_mlp(x, w1, w2, ids, g, b1=randn(E, F + 1))
    with _raises(ValueError, "moe_expert_mlp", "w2", "meta"):
        moe_expert_mlp(x, w1, w2.to("meta"), ids, g)
