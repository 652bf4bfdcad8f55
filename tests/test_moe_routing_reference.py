"""Grouped MoE routing metadata: the reference semantics of the expert histogram and moe_align
(hand-computed cases, the contract on random ids) and the public ops' input validation
(unif2ace/kernels/reference/moe_routing.py)."""

import pytest
import torch

from unif2ace.kernels import moe_align, moe_expert_histogram

REF = dict(backend="reference")


def test_histogram_hand():
    ids = torch.tensor([[0, 2], [2, -1], [0, 0], [4, 3]])
    assert moe_expert_histogram(ids, 4, **REF).tolist() == [3, 0, 2, 1]
    assert moe_expert_histogram(ids, 4, **REF).dtype == torch.int32


def test_align_hand():
    ids = torch.tensor([[0, 2], [2, -1], [0, 0]], dtype=torch.int32)  # flat 0..5; N = 6
    a = moe_align(ids, 4, 4, **REF)
    S = 6
    assert a.sorted_token_ids.tolist() == [0, 4, 5, S, 1, 2, S, S] + [S] * 10  # len 6 + 4*3
    assert a.block_expert_ids.tolist() == [0, 2, -1, -1, -1]  # cdiv(18, 4) blocks
    assert a.num_tokens_post_padded.tolist() == [8]
    assert a.expert_counts.tolist() == [3, 0, 2, 0]
    for t in a:
        assert t.dtype == torch.int32


def test_align_contract_random_and_invalid_dropped():
    T, k, E, bs = 97, 3, 10, 8
    ids = torch.randint(-2, E + 2, (T, k))
    a = moe_align(ids, E, bs, **REF)
    N = T * k
    flat = ids.flatten()
    assert a.sorted_token_ids.numel() == N + E * (bs - 1)
    assert a.block_expert_ids.numel() == -(-(N + E * (bs - 1)) // bs)
    total = int(a.num_tokens_post_padded)
    assert total % bs == 0
    listed = a.sorted_token_ids[a.sorted_token_ids != N]
    valid = ((flat >= 0) & (flat < E)).nonzero().flatten()
    assert sorted(listed.tolist()) == valid.tolist()  # every valid entry once, no invalid ones
    assert bool((a.sorted_token_ids[total:] == N).all())
    for b in range(total // bs):
        e = int(a.block_expert_ids[b])
        blk = a.sorted_token_ids[b * bs : (b + 1) * bs]
        real = blk[blk != N]
        assert real.numel() > 0 and bool((flat[real.long()] == e).all())
        assert bool((real.diff() > 0).all())
    assert bool((a.block_expert_ids[total // bs :] == -1).all())
    # blocks in ascending expert order; an expert with no tokens owns no block
    owned = a.block_expert_ids[: total // bs]
    assert bool((owned.diff() >= 0).all())
    assert set(owned.tolist()) == {e for e in range(E) if int(a.expert_counts[e]) > 0}
    assert a.expert_counts.tolist() == [int((flat == e).sum()) for e in range(E)]


def test_align_all_tokens_one_expert():
    ids = torch.full((10, 2), 3)
    a = moe_align(ids, 5, 4, **REF)
    assert a.expert_counts.tolist() == [0, 0, 0, 20, 0]
    assert int(a.num_tokens_post_padded) == 20
    assert a.sorted_token_ids[:20].tolist() == list(range(20))
    assert a.block_expert_ids.tolist()[:5] == [3] * 5 and set(a.block_expert_ids.tolist()[5:]) == {-1}
    none = moe_align(torch.full((4, 2), -1), 3, 4, **REF)
    assert int(none.num_tokens_post_padded) == 0 and set(none.block_expert_ids.tolist()) == {-1}
    assert set(none.sorted_token_ids.tolist()) == {8}


# ------------------------------------------------------------------------------------------------
# bad inputs


def _raises(exc, *words):
    return pytest.raises(exc, match=".*".join(words))


def test_align_and_histogram_bad_inputs():
    ids = torch.randint(0, 4, (5, 2))
    with _raises(TypeError, "moe_align", "expert_ids", "dtype"):
        moe_align(ids.float(), 4, 16)
    with _raises(ValueError, "moe_align", "expert_ids", "1-D or 2-D"):
        moe_align(ids.view(5, 2, 1), 4, 16)
    with _raises(ValueError, "moe_align", "block_size", ">= 1"):
        moe_align(ids, 4, 0)
    with _raises(ValueError, "moe_expert_histogram", "num_experts", ">= 1"):
        moe_expert_histogram(ids, 0)
    with _raises(TypeError, "moe_expert_histogram", "num_experts", "int"):
        moe_expert_histogram(ids, 4.0)
    with _raises(ValueError, "moe_align", "2\\*\\*31"):
        moe_align(torch.zeros(1, 1, dtype=torch.int32).expand(2**31, 1), 4, 16)
