"""Tests of the model layer (unif2ace/model) on the tiny preset, CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unif2ace.kernels import use_backend
from unif2ace.kernels._custom_ops.moe import OPS as MOE_OPS
from unif2ace.kernels.d3diff import OP_HEAD
from unif2ace.model import (
    IGNORE_INDEX,
    Batch,
    Sample,
    UniF2ace,
    bidirectional_span,
    collate,
    load_checkpoint,
    load_phi_state_dict,
    mask_image_tokens,
    mmu_sequence,
    omni_attention_mask,
    preset,
    save_checkpoint,
    t2i_sequence,
)
from unif2ace.model.checkpoint import CheckpointError
from unif2ace.model.modules import KVCache, SequenceMoE, TokenMoE
from unif2ace.testing import TOLERANCES

FP32_ATOL, FP32_RTOL = TOLERANCES[torch.float32]


def assert_close(actual, expected, atol=FP32_ATOL, rtol=FP32_RTOL, name=""):
    torch.testing.assert_close(
        actual.float() if actual.is_floating_point() else actual,
        expected.float() if expected.is_floating_point() else expected,
        atol=atol,
        rtol=rtol,
        msg=(lambda m: f"{name}: {m}") if name else None,
    )


CFG = preset("tiny")
L = CFG.image_tokens


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = preset("tiny", **overrides) if overrides else CFG
    m = UniF2ace(cfg)
    # non-trivial biases/norms so that every parameter matters in the parity checks
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or ".b1" in n or ".b2" in n or "shared_b" in n:
                p.normal_(0, 0.02)
    return m


def make_batch(cfg=CFG, tasks=("t2i", "mmu", "t2i", "mmu"), seed=0, features=True):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, t in enumerate(tasks):
        codes = torch.randint(0, cfg.codebook_size, (cfg.image_tokens,), generator=g)
        text = torch.randint(0, cfg.text_vocab_size - 2, (3 + i,), generator=g).tolist()
        ans = torch.randint(0, cfg.text_vocab_size - 2, (2 + i,), generator=g).tolist() if t == "mmu" else None
        feats = (
            dict(
                clip_features=torch.randn(cfg.clip_tokens, cfg.clip_dim, generator=g),
                face_embedding=torch.randn(cfg.face_dim, generator=g),
            )
            if features and t == "mmu"
            else {}
        )
        samples.append(Sample(t, codes, text, ans, **feats))
    b = collate(cfg, samples, generator=g, drop_caption_prob=0.0)
    b.noise_features = torch.randn(len(tasks), cfg.noise_tokens, cfg.noise_dim, generator=g)
    return b


# ------------------------------------------------------------------------------------------------
# config


def test_presets_and_vocabulary_layout():
    paper = preset("paper")
    assert paper.vocab_size == 58498 and paper.mask_token_id == 58497
    assert paper.image_token_offset == 50305 and paper.image_tokens == 256
    assert (paper.hidden_size, paper.num_layers, paper.num_heads, paper.head_dim) == (2048, 24, 32, 64)
    assert (paper.expert_width, paper.shared_expert_width) == (512, 1024) and paper.rotary_dim == 32
    assert CFG.seq_len == CFG.text_len + L + 2 and CFG.hidden_size == 128 and CFG.image_grid == 8
    assert preset("small").seq_len == 32 + 256 + 2


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny", {}),
        ("small", {}),
        ("paper", {}),
        ("showo", {}),
        ("tiny", {"expert_activation": "swiglu", "block_layout": "parallel", "resampler_mode": "per_position"}),
        ("tiny", {"expert_bias": False, "face_tokens": 1, "resampler_depth": 3, "resampler_ff_mult": 1}),
        ("tiny", {"seq_moe": False}),
        ("tiny", {"image_pos_embedding": True}),
    ],
)
def test_parameter_count_per_part(name, overrides):
    """The analytic count equals the built model's (on the meta device: nothing allocated)."""
    cfg = preset(name, **overrides)
    with torch.device("meta"):
        model = UniF2ace(cfg)
    counts = cfg.parameter_counts()
    assert counts == model.parameter_counts()
    assert counts["total"] == model.num_parameters() == sum(v for k, v in counts.items() if k != "total")


def test_paper_preset_is_about_1_8b_as_documented():
    import unif2ace.model.config as config_module

    c = preset("paper").parameter_counts()
    assert 1.78e9 < c["total"] < 1.85e9  # the paper: about 1.8B
    documented = {
        "embedding + LM head": "239.7M",
        "attention": "402.8M",
        "routed experts": "806.3M",
        "shared experts": "201.5M",
        "feature experts (resamplers)": "174.3M",
        "token routers": "0.8M",
        "sequence routers + gains": "0.4M",
        "layer norms": "0.3M",
        "total": "1,826.1M",
    }
    doc = config_module.__doc__
    for part, text in documented.items():
        assert f"{c[part] / 1e6:,.1f}M" == text, part
        assert any(line.strip().startswith(part) and text in line for line in doc.splitlines()), part
    assert f"{preset('showo').parameter_counts()['total'] / 1e6:,.1f}M" in doc


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="top_k"):
        preset("tiny", top_k=9)
    with pytest.raises(ValueError, match="parametrization"):
        preset("tiny", parametrization="nope")
    with pytest.raises(ValueError, match="seq_experts_gen"):
        preset("tiny", seq_experts_gen=("copy", "bogus", "noise", "copy"))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    assert preset("tiny").to_json() == type(CFG).from_json(CFG.to_json()).to_json()


# ------------------------------------------------------------------------------------------------
# sequence layouts and corruption


def test_sequence_layouts_by_hand():
    c = CFG
    img = list(range(c.image_token_offset, c.image_token_offset + L))
    ids, valid = t2i_sequence(c, [5, 6], img)
    t2i, soi, eoi, pad, mmu = (c.special_token_id(s) for s in ("<|t2i|>", "<|soi|>", "<|eoi|>", "[PAD]", "<|mmu|>"))
    npad = c.text_len - 3 - 2
    # Show-o: the pads come before <|t2i|>
    assert ids == [pad] * npad + [t2i, c.bos_token_id, 5, 6, c.eos_token_id, soi] + img + [eoi]
    assert valid == [False] * npad + [True] * (len(ids) - npad)
    assert len(ids) == c.seq_len and ids.index(soi) == c.text_len

    ids, valid, labels = mmu_sequence(c, img, [7, 8], [9, 10, 11])
    head = [mmu, soi] + img + [eoi, c.bos_token_id, 7, 8]
    assert ids[: len(head) + 4] == head + [9, 10, 11, c.eos_token_id]
    assert ids[len(head) + 4 :] == [pad] * (c.seq_len - len(head) - 4) and len(ids) == c.seq_len
    assert labels == [IGNORE_INDEX] * len(head) + [9, 10, 11, c.eos_token_id] + [IGNORE_INDEX] * (
        c.seq_len - len(head) - 4
    )
    assert valid == [True] * (len(head) + 4) + [False] * (c.seq_len - len(head) - 4)
    # a caption longer than the text budget is truncated (with a warning), <eos> kept
    with pytest.warns(UserWarning, match="truncated"):
        ids, valid = t2i_sequence(c, list(range(c.text_len)), img)
    assert ids[: c.text_len + 1] == [t2i, c.bos_token_id] + list(range(c.text_len - 3)) + [c.eos_token_id, soi]
    assert all(valid) and len(ids) == c.seq_len
    with pytest.raises(ValueError, match="answer"):
        mmu_sequence(c, img, [1], [2] * c.text_len)
    with pytest.raises(ValueError, match="question"):
        mmu_sequence(c, img, [c.text_vocab_size], [1])


def test_mask_image_tokens_cosine_exact_count():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, CFG.codebook_size, (200, L), generator=g)
    tokens, masked, m, dm = mask_image_tokens(CFG, codes, generator=g)
    assert masked.dtype == torch.bool and m.shape == dm.shape == (200,)
    assert bool((m >= 1.0 / L - 1e-7).all()) and bool((m <= 1).all())
    n = torch.round(L * m.double()).clamp(min=1)
    assert torch.equal(masked.sum(1).double(), n)
    # m = cos(πu/2), m' = (π/2) sin(πu/2)  =>  m'^2 + (π/2)^2 m^2 = (π/2)^2 for unclamped rows
    unclamped = m > 1.0 / L
    assert_close(
        (dm[unclamped] ** 2 + (math.pi / 2 * m[unclamped]) ** 2), torch.full_like(m[unclamped], (math.pi / 2) ** 2)
    )
    assert torch.equal(tokens[masked], torch.full_like(tokens[masked], CFG.mask_token_id))
    assert torch.equal(tokens[~masked], codes[~masked] + CFG.image_token_offset)
    # positions are chosen uniformly: every position masked at a similar rate
    rate = masked.float().mean(0)
    assert float(rate.std()) < 0.1 and masked.float().mean() > 0.2


def test_mask_image_tokens_loglinear():
    cfg = preset("tiny", train_schedule="loglinear")
    codes = torch.randint(0, cfg.codebook_size, (400, L), generator=torch.Generator().manual_seed(1))
    _, masked, m, dm = mask_image_tokens(cfg, codes, generator=torch.Generator().manual_seed(2))
    eps = cfg.loglinear_eps
    assert bool((m >= (1 - eps) * eps).all()) and bool((m <= 1 - eps).all())
    assert torch.allclose(dm, torch.full_like(dm, 1 - eps))
    # Bernoulli(m) per position: the masked fraction tracks m
    assert float((masked.float().mean(1) - m).abs().mean()) < 0.08


# ------------------------------------------------------------------------------------------------
# omni-attention masks


def test_omni_attention_mask_by_hand():
    # T2I row (Show-o): [pad, t2i, cap, cap, soi, img, img, eoi]; MMU row: [mmu, soi, img, img, eoi, txt, txt, pad]
    valid = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    img_pos = torch.tensor([[5, 6], [2, 3]])
    span = bidirectional_span(img_pos, torch.tensor([0, 1]), 8)
    assert span.int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]]
    m = omni_attention_mask(valid, span)[:, 0].int()
    t2i = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],  # pad row: only itself (never attended; keeps SDPA finite)
            [0, 1, 0, 0, 0, 0, 0, 0],  # <|t2i|>: causal, never the pad
            [0, 1, 1, 0, 0, 0, 0, 0],  # caption: causal
            [0, 1, 1, 1, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 1, 1],  # image span: every non-pad position
            [0, 1, 1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    mmu = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0, 0, 0],  # <|mmu|> sees the image (Show-o: every row sees up to <|eoi|>)
            [1, 1, 1, 1, 1, 0, 0, 0],  # image prefix: bidirectional within the prefix, not the text after
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],  # text: causal
            [1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],  # trailing pad: never attended, sees the past and itself
        ]
    )
    assert torch.equal(m[0], t2i) and torch.equal(m[1], mmu)


def test_showo_token_ids_and_layout():
    """Special-token ids equal Show-o's (its tokenizer adds [PAD] first), text part 129 tokens."""
    paper = preset("paper")
    want = {
        "[PAD]": 50295,
        "<|soi|>": 50296,
        "<|eoi|>": 50297,
        "<|sov|>": 50298,
        "<|eov|>": 50299,
        "<|t2i|>": 50300,
        "<|mmu|>": 50301,
        "<|t2v|>": 50302,
        "<|v2v|>": 50303,
        "<|lvg|>": 50304,
    }
    assert {name: paper.special_token_id(name) for name in want} == want
    assert paper.pad_token_id == 50295 and paper.image_token_offset == 50305
    assert paper.text_len == 129 and paper.seq_len == 387  # Show-o: max_seq_length 128 + task token + 258
    img = [paper.mask_token_id] * paper.image_tokens
    ids, valid = t2i_sequence(paper, [10, 11], img)
    assert ids[123:130] == [50295, 50300, paper.bos_token_id, 10, 11, paper.eos_token_id, 50296]
    assert valid[:124] == [False] * 124 and all(valid[124:])


def test_batch_masks_follow_layout():
    b = make_batch()
    span = bidirectional_span(b.image_positions, b.task, CFG.seq_len)
    m = omni_attention_mask(b.valid, span)[:, 0]
    for i in range(b.size):
        assert not bool(m[i][b.valid[i]][:, ~b.valid[i]].any())  # no valid row sees a pad
        img = b.image_positions[i]
        # every image row sees the whole image span
        assert bool(m[i][img][:, img].all())
    # T2I: the first image row sees the caption and the last image token; MMU: image rows don't see the text
    assert bool(m[0, b.image_positions[0, 0], b.image_positions[0, -1]])
    txt = CFG.image_tokens + 4
    assert not bool(m[1, b.image_positions[1, 0], txt])
    assert bool(m[1, txt + 1, txt]) and not bool(m[1, txt, txt + 1])
    assert bool(m[1, 0, b.image_positions[1]].all())  # the <|mmu|> row sees the image


# ------------------------------------------------------------------------------------------------
# MoE modules


def test_token_moe_routes_within_groups_and_matches_hand_computation():
    torch.manual_seed(1)
    moe = TokenMoE(CFG)
    with torch.no_grad():
        moe.b1.normal_(0, 0.1), moe.b2.normal_(0, 0.1), moe.shared_b1.normal_(0, 0.1), moe.shared_b2.normal_(0, 0.1)
        moe.router.normal_(0, 1.0)
    T, D, N, k = 13, CFG.hidden_size, CFG.num_routed_experts, CFG.top_k
    x = torch.randn(T, D)
    group = torch.tensor([0, 1] * 6 + [1])
    out, bal = moe(x, group)

    def mlp(x, w1, b1, w2, b2):
        return F.gelu(x @ w1 + b1) @ w2 + b2

    want = torch.empty_like(out)
    chosen = []
    for t in range(T):
        g = int(group[t])
        probs = torch.softmax(x[t] @ moe.router[g * N : (g + 1) * N].t(), -1)
        p, e = probs.topk(k)
        chosen.append(e + g * N)
        y = mlp(x[t], moe.shared_w1[g], moe.shared_b1[g], moe.shared_w2[g], moe.shared_b2[g])
        for pj, ej in zip(p, e + g * N):
            y = y + pj * mlp(x[t], moe.w1[ej], moe.b1[ej], moe.w2[ej], moe.b2[ej])
        want[t] = y
    assert_close(out, want.detach(), atol=1e-5, rtol=1e-4)
    assert bal.shape == (2,) and bool((bal > 0).all())
    # the gating the module used never leaves the token's group
    from unif2ace.kernels import moe_gating

    ids = moe_gating(x @ moe.router.t(), group, [N, N], k).expert_ids
    assert bool(((ids // N) == group[:, None]).all())


def _seq_moe_with_route(bias_gen, bias_und):
    torch.manual_seed(2)
    moe = SequenceMoE(CFG)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.tensor(bias_gen + bias_und, dtype=torch.float32))
    return moe


def test_sequence_moe_copy_and_zero_are_exact():
    # gen experts: copy, zero, noise, copy. Force (copy0, zero): output = gate_copy * x exactly
    moe = _seq_moe_with_route([5.0, 5.0, -5.0, -5.0], [0.0, 0.0, 0.0, 0.0])
    B, S, D = 3, 7, CFG.hidden_size
    x = torch.randn(B, S, D)
    valid = torch.ones(B, S, dtype=torch.bool)
    group = torch.zeros(B, dtype=torch.int64)
    r = moe.route(x, valid, group)
    assert sorted(r.expert_ids[0].tolist()) == [0, 1]
    feats = {"noise": torch.randn(B, CFG.noise_tokens, CFG.noise_dim)}
    y = moe(x, group, r.expert_ids, r.gates, feats)
    g_copy = torch.where(r.expert_ids == 0, r.gates, 0).sum(1)
    assert torch.equal(y, torch.zeros_like(x) + g_copy[:, None, None] * x)
    # both copies chosen: (g0 + g3) * x
    moe = _seq_moe_with_route([5.0, -5.0, -5.0, 5.0], [0.0] * 4)
    r = moe.route(x, valid, group)
    y = moe(x, group, r.expert_ids, r.gates, feats)
    assert_close(y, r.gates.sum(1)[:, None, None] * x, atol=1e-6, rtol=1e-6)


def test_sequence_moe_feature_experts_and_groups():
    # und experts: clip, face, copy, copy; force (clip, face) for und sequences
    moe = _seq_moe_with_route([0.0] * 4, [5.0, 5.0, -5.0, -5.0])
    B, S, D = 2, 5, CFG.hidden_size
    x = torch.randn(B, S, D)
    group = torch.ones(B, dtype=torch.int64)
    r = moe.route(x, torch.ones(B, S, dtype=torch.bool), group)
    assert bool((r.expert_ids >= 4).all())  # und sequences never use gen experts
    clip = torch.randn(B, CFG.clip_tokens, CFG.clip_dim)
    face = torch.randn(B, CFG.face_dim)
    y = moe(x, group, r.expert_ids, r.gates, {"clip": clip, "face": face})
    want = torch.zeros_like(x)
    for e, f in ((4, clip), (5, face)):
        ex = moe.experts[str(e)]
        w = torch.softmax(ex.mix(x), -1)
        s = ex.resampler(f, x)  # [B, 1, D] pooled, broadcast
        assert s.shape == (B, 1, D)
        gate = torch.where(r.expert_ids == e, r.gates, 0).sum(1)[:, None, None]
        want = want + gate * (w[..., :1] * x + w[..., 1:] * s)
    assert_close(y, want.detach(), atol=1e-6, rtol=1e-5)
    # features change the output; missing features -> w0 * x only
    y2 = moe(x, group, r.expert_ids, r.gates, {"clip": clip + 1, "face": face})
    assert not torch.allclose(y, y2)
    y0 = moe(x, group, r.expert_ids, r.gates, {})
    w4 = torch.softmax(moe.experts["4"].mix(x), -1)[..., :1]
    w5 = torch.softmax(moe.experts["5"].mix(x), -1)[..., :1]
    g = lambda e: torch.where(r.expert_ids == e, r.gates, 0).sum(1)[:, None, None]  # noqa: E731
    assert_close(y0, (g(4) * w4 * x + g(5) * w5 * x).detach(), atol=1e-6, rtol=1e-5)


def test_face_expert_sees_several_tokens_through_a_deep_resampler():
    """The 512-d face embedding becomes face_tokens feature tokens, and the resampler is
    resampler_depth layers with FFNs, so different queries read different things (one key would
    make every query's attention output the same)."""
    cfg = preset("tiny", resampler_depth=2, face_tokens=3)
    torch.manual_seed(0)
    moe = SequenceMoE(cfg)
    face_e = cfg.seq_experts_gen.__len__() + cfg.seq_experts_und.index("face")
    res = moe.experts[str(face_e)].resampler
    assert len(res.layers) == 2 and all(isinstance(layer.ff, torch.nn.Sequential) for layer in res.layers)
    keys, per_query = [], []
    h1 = res.layers[0].norm_feats.register_forward_hook(lambda m, i, o: keys.append(o))
    h2 = res.proj_out.register_forward_hook(lambda m, i, o: per_query.append(o))
    B = 2
    with torch.no_grad():
        y = res(torch.randn(B, cfg.face_dim), torch.randn(B, 5, cfg.hidden_size))
    h1.remove(), h2.remove()
    assert y.shape == (B, 1, cfg.hidden_size)
    assert keys[0].shape == (B, 3, cfg.resampler_dim)  # three face tokens, distinct
    assert float((keys[0][:, 0] - keys[0][:, 1]).abs().max()) > 1e-3
    q = per_query[0]  # [B, queries, D] before pooling
    assert q.shape[1] == cfg.resampler_queries
    assert float((q[:, 0] - q[:, 1]).abs().max()) > 1e-3


def test_missing_features_rule_holds_after_training():
    """A sample without features gets zeros from collate, and zeros mean exactly "missing" at the
    experts (S(f) = 0), also once training has moved every bias away from zero."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(3):  # a few steps with features present: biases and norms move
        opt.zero_grad()
        model(make_batch(seed=step)).loss.backward()
        opt.step()
    model.eval()
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, CFG.codebook_size, (2, L), generator=g)
    with_feats = Sample(
        "mmu",
        codes[0],
        [1, 2],
        [3],
        clip_features=torch.randn(CFG.clip_tokens, CFG.clip_dim, generator=g),
        face_embedding=torch.randn(CFG.face_dim, generator=g),
    )
    without = Sample("mmu", codes[1], [4, 5], [6])
    noise = torch.randn(2, CFG.noise_tokens, CFG.noise_dim, generator=g)
    mixed = collate(CFG, [with_feats, without], generator=torch.Generator().manual_seed(0))
    alone = collate(CFG, [without], generator=torch.Generator().manual_seed(0))
    assert mixed.face_embeddings is not None and alone.face_embeddings is None
    assert not bool(mixed.face_embeddings[1].any()) and not bool(mixed.clip_features[1].any())
    mixed.noise_features, alone.noise_features = noise, noise[1:]
    with torch.no_grad():
        h_mixed, _ = _training_forward_hidden(model, mixed)
        h_alone, _ = _training_forward_hidden(model, alone)
    assert_close(h_mixed[1], h_alone[0], atol=1e-5, rtol=1e-5, name="zero-filled features vs None")
    # and at the expert itself: all-zero rows give exactly w0·x
    und = CFG.seq_experts_und
    ex = model.blocks[0].seq_moe.experts[str(len(CFG.seq_experts_gen) + und.index("face"))]
    x = torch.randn(2, 3, CFG.hidden_size)
    with torch.no_grad():
        assert torch.equal(ex(x, torch.zeros(2, CFG.face_dim)), ex(x, None))
        assert not torch.equal(ex(x, torch.randn(2, CFG.face_dim)), ex(x, None))


# ------------------------------------------------------------------------------------------------
# losses


def test_loss_parts_match_explicit_computation():
    model = make_model()
    b = make_batch()
    with use_backend("reference"):
        out = model(b)
        h, tb, sb = model.batch_hidden(b)
    assert_close(out.loss, out.mmu_loss + out.d3diff_loss + out.token_balance.sum() + out.seq_balance.sum())
    assert_close(out.d3diff_loss, out.mask_loss + CFG.alpha * out.score_loss)
    logits = model.lm_head(h).double()
    # MMU: shifted next-token CE over the answer labels
    lp = torch.log_softmax(logits[:, :-1], -1)
    tgt = b.labels[:, 1:]
    keep = tgt != IGNORE_INDEX
    assert int(keep.sum()) == (2 + 1 + 1) + (2 + 3 + 1)  # answers + eos of samples 1 and 3
    mmu = -lp[keep].gather(1, tgt[keep][:, None]).mean()
    assert_close(out.mmu_loss.double(), mmu, atol=1e-5, rtol=1e-5)
    # D3Diff: codebook-restricted CE at masked image tokens of T2I samples
    off = CFG.image_token_offset
    ce_sum, score = 0.0, 0.0
    for i in range(b.size):
        if b.task[i] != 0:
            continue
        lc = torch.log_softmax(logits[i, b.image_positions[i], off : off + CFG.codebook_size], -1)
        ce = -lc.gather(1, b.image_codes[i][:, None])[:, 0][b.is_masked[i]]
        m, dm = b.mask_rate[i].double(), b.mask_rate_deriv[i].double()
        r, sigma = (1 - m) / m, -torch.log1p(-m)
        ce_sum = ce_sum + ce.sum()
        score = score + (dm / (1 - m) * (r * ce + 1 - r * sigma)).sum()  # σ'·DSE, posterior
    n_masked = int(b.is_masked.sum())
    assert_close(out.mask_loss.double(), ce_sum / n_masked, atol=1e-5, rtol=1e-5)
    assert_close(out.score_loss.double(), score / 2, atol=1e-4, rtol=1e-5)
    assert bool((out.token_balance > 0).all())
    assert torch.equal(out.seq_balance, torch.zeros(2))  # no sequence-level balance loss unless asked


def test_defaults_follow_paper_and_showo():
    paper = preset("paper")
    assert paper.seq_balance_coef == 0.0 and paper.balance_coef == 0.01
    assert (paper.confidence_noise, paper.confidence_schedule) == (1.0, "showo")
    assert paper.expert_activation == "gelu_tanh"  # Phi's gelu_new: the paper's weights come from Phi/Show-o
    assert (paper.alpha, paper.mask_weight) == (0.01, 1.0)
    b = make_batch()
    out = make_model(seq_balance_coef=0.01)(b)
    assert bool((out.seq_balance > 0).all())  # asked for: the f·P loss per group
    with pytest.raises(ValueError, match="mask_weight"):
        preset("tiny", mask_weight=-1.0)


def test_only_score_and_only_mask_ablations():
    """The paper's D3Diff ablation (Table 3): mask_weight = 0 ("Only Score"), alpha = 0 ("Only Mask")."""
    b = make_batch()
    full = make_model()(b)
    only_score = make_model(mask_weight=0.0)(b)
    only_mask = make_model(alpha=0.0)(b)
    # same parameters and batch: the parts agree, only the weighted sum changes
    assert_close(only_score.mask_loss, full.mask_loss) and assert_close(only_score.score_loss, full.score_loss)
    assert_close(only_score.d3diff_loss, CFG.alpha * full.score_loss)
    assert_close(only_mask.d3diff_loss, full.mask_loss)
    assert_close(only_score.loss, full.loss - full.mask_loss)
    # no gradient from the mask term: Only Score's gradient is exactly α·∇score (+ MMU + balance)
    m = make_model(mask_weight=0.0)
    m(b).d3diff_loss.backward()
    g0 = m.lm_head.weight.grad.clone()
    m.zero_grad()
    (CFG.alpha * m(b).score_loss).backward()
    assert_close(m.lm_head.weight.grad, g0)


def test_confidence_noise_schedules(monkeypatch):
    """Show-o's schedule (default): τ_t = 1.0·Π_{s<=t}(1 − (s+1)/T); MaskGIT's: 4.5·(1 − (t+1)/T)."""
    import unif2ace.model.generate as gen

    seen = []
    real = gen.masked_sample_step

    def spy(*args, **kwargs):
        seen.append((kwargs["step"], kwargs["num_steps"], kwargs["seed"], kwargs["confidence_noise"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "masked_sample_step", spy)
    model = make_model().eval()
    T = 5
    model.generate_images([[1, 2]], steps=T, seed=7)
    assert [s[:3] for s in seen] == [(t, T, 7) for t in range(T)]  # the step goes to every call
    effective = [tau * (1 - (t + 1) / T) for t, _, _, tau in seen]  # what the kernel anneals to
    want = [math.prod(1 - (s + 1) / T for s in range(t + 1)) for t in range(T)]
    assert effective == pytest.approx(want, rel=1e-12)
    seen.clear()
    model.generate_images([[1, 2]], steps=T, seed=7, confidence_schedule="maskgit", confidence_noise=4.5)
    assert [tau for *_, tau in seen] == [4.5] * T
    with pytest.raises(ValueError, match="confidence_schedule"):
        model.generate_images([[1]], steps=2, confidence_schedule="muse")


def ModelOutputDetached(out):
    return type(out)(*(t.detach() for t in out))


def test_single_task_batches_have_zero_other_loss():
    model = make_model()
    out = model(make_batch(tasks=("t2i", "t2i")))
    out = ModelOutputDetached(out)
    assert float(out.mmu_loss) == 0.0 and float(out.d3diff_loss) > 0
    assert float(out.token_balance[1]) == 0.0 and float(out.token_balance[0]) > 0
    out = ModelOutputDetached(model(make_batch(tasks=("mmu",))))
    assert float(out.d3diff_loss) == 0.0 and float(out.mmu_loss) > 0


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"parametrization": "raw", "d3diff_vocab": "full", "train_schedule": "loglinear"},
        {
            "expert_activation": "swiglu",
            "gate_renormalize": True,
            "block_layout": "parallel",
            "seq_router_pool": "prefix",
            "resampler_mode": "per_position",
        },
    ],
)
def test_backend_parity_loss_and_gradients(overrides):
    """Same parameters and batch: every op on reference vs the fastest backends -> same loss and grads."""
    model = make_model(**overrides)
    b = make_batch(model.cfg)
    results = []
    for be in ("reference", "auto"):
        model.set_backend(be)
        model.zero_grad(set_to_none=True)
        out = model(b)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (o_ref, g_ref), (o_fast, g_fast) = results
    for a, c in zip(o_ref, o_fast):
        assert_close(c, a)
    assert g_ref.keys() == g_fast.keys() and len(g_ref) == len(list(model.parameters()))
    for n in g_ref:
        assert_close(g_fast[n], g_ref[n], name=n)
    with pytest.raises(ValueError, match="name"):
        model.set_backend("fastest")


def _training_forward_hidden(model, batch):
    """The final hidden states of a training-mode ``model(batch)`` (captured at ``ln_f``) and the loss."""
    seen = []
    hook = model.ln_f.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    try:
        out = model(batch)
    finally:
        hook.remove()
    return seen[0], out


def test_mmu_training_forward_is_causal():
    """A future answer token never changes earlier positions (the sequence router pools the prompt only)."""
    model = make_model().train()
    b = make_batch(tasks=("mmu", "t2i", "mmu"))
    answer_pos = (b.labels[2] != IGNORE_INDEX).nonzero()[:, 0]
    p = int(answer_pos[-2])  # the last answer token before <eos>
    ids = b.input_ids.clone()
    ids[2, p] = (ids[2, p] + 1) % CFG.text_vocab_size
    labels = b.labels.clone()
    labels[2, p] = ids[2, p]
    b2 = Batch(**{**b.__dict__, "input_ids": ids, "labels": labels})
    h1, _ = _training_forward_hidden(model, b)
    h2, _ = _training_forward_hidden(model, b2)
    assert_close(h2[2, :p], h1[2, :p], atol=1e-6, rtol=1e-6, name="hidden before the changed answer token")
    logits = lambda h: model.lm_head(h[2, :p])  # noqa: E731
    assert_close(logits(h2), logits(h1), atol=1e-6, rtol=1e-6, name="logits")
    assert not torch.allclose(h2[2, p:], h1[2, p:])  # the change itself is seen from p on
    # the other samples do not see sample 2 at all
    assert_close(h2[:2], h1[:2], atol=1e-6, rtol=1e-6)
    # "nonpad" pools the answer too: the earlier positions move
    leaky = make_model(seq_router_pool="nonpad").train()
    g1, _ = _training_forward_hidden(leaky, b)
    g2, _ = _training_forward_hidden(leaky, b2)
    assert float((g2[2, :p] - g1[2, :p]).abs().max()) > 1e-5


# ------------------------------------------------------------------------------------------------
# generation and understanding


def test_kv_cache_matches_full_recompute():
    model = make_model().eval()
    B, P, extra = 2, 12, 4
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, CFG.vocab_size - 1, (B, P + extra), generator=g)
    valid = torch.ones(B, P + extra, dtype=torch.bool)
    valid[0, 3] = False  # a pad inside the prompt
    span = torch.zeros_like(valid)
    span[:, 1:6] = True
    task = torch.tensor([1, 1])
    route = valid.clone()
    route[:, P:] = False
    feats = {
        "clip": torch.randn(B, CFG.clip_tokens, CFG.clip_dim),
        "face": torch.randn(B, CFG.face_dim),
        "noise": torch.randn(B, CFG.noise_tokens, CFG.noise_dim),
    }
    with torch.no_grad():
        full, _, _ = model.hidden(ids, valid, task, span=span, route_mask=route, features=feats)
        cache = KVCache(CFG, B, P + extra, "cpu", torch.float32)
        pre, _, _ = model.hidden(
            ids[:, :P], valid[:, :P], task, span=span[:, :P], route_mask=route[:, :P], features=feats, cache=cache
        )
        steps = [pre]
        for p in range(P, P + extra):
            pos = torch.full((B, 1), p)
            h, _, _ = model.hidden(
                ids[:, p : p + 1], valid[:, p : p + 1], task, positions=pos, features=feats, cache=cache
            )
            steps.append(h)
    inc = torch.cat(steps, 1)
    keep = valid
    assert_close(inc[keep], full[keep], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pos", [False, True])
def test_answer_cache_and_no_cache_agree(pos):
    model = make_model(image_pos_embedding=pos).eval()
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, CFG.codebook_size, (3, L), generator=g)
    qs = [[1, 2, 3], [4], [5, 6]]
    clip = torch.randn(3, CFG.clip_tokens, CFG.clip_dim, generator=g)
    face = torch.randn(3, CFG.face_dim, generator=g)
    kw = dict(max_new_tokens=6, clip_features=clip, face_embeddings=face)
    for temp in (0.0, 1.0):
        a = model.answer(codes, qs, temperature=temp, seed=3, use_cache=True, **kw)
        b = model.answer(codes, qs, temperature=temp, seed=3, use_cache=False, **kw)
        assert a == b
        assert all(0 <= t < CFG.text_vocab_size for row in a for t in row)
    # a batch answer equals the answers decoded one at a time
    single = [
        model.answer(
            codes[i : i + 1],
            qs[i : i + 1],
            temperature=0.0,
            max_new_tokens=6,
            clip_features=clip[i : i + 1],
            face_embeddings=face[i : i + 1],
        )[0]
        for i in range(3)
    ]
    assert single == model.answer(codes, qs, temperature=0.0, **kw)


def test_generate_images_deterministic_and_backend_independent():
    model = make_model().eval()
    caps = [[1, 2, 3], [4, 5]]
    a = model.generate_images(caps, steps=4, temperature=1.0, seed=11)
    b = model.generate_images(caps, steps=4, temperature=1.0, seed=11)
    c = model.generate_images(caps, steps=4, temperature=1.0, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, L) and bool(((a >= 0) & (a < CFG.codebook_size)).all())
    model.set_backend("reference")
    r = model.generate_images(caps, steps=4, temperature=0.0, seed=5)
    model.set_backend("auto")
    f = model.generate_images(caps, steps=4, temperature=0.0, seed=5)
    assert torch.equal(r, f)
    # no guidance works without the unconditional rows
    assert model.generate_images(caps, steps=2, guidance=0.0, seed=1).shape == (2, L)


def test_image_position_embedding_is_added_at_the_image_positions():
    """cfg.image_pos_embedding: grid cell i's vector is added to the i-th image token, in T2I (after
    the text part) and MMU (after <|mmu|> <|soi|>) alike, and nowhere else."""
    model = make_model(image_pos_embedding=True)
    b = make_batch(model.cfg)
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        model(b)
        with torch.no_grad():
            model.image_pos.zero_()
        model(b)
    finally:
        hook.remove()
    diff = seen[0] - seen[1]
    at_image = torch.zeros(diff.shape[:2], dtype=torch.bool).scatter(1, b.image_positions, True)
    assert not bool(diff[~at_image].any())  # nothing outside the image positions
    pos = make_model(image_pos_embedding=True).image_pos.detach()  # the same initialisation
    for i in range(b.size):
        assert_close(diff[i, b.image_positions[i]], pos)
    assert b.image_positions[0, 0] == model.cfg.text_len + 1 and b.image_positions[1, 0] == 2


def test_static_token_routing_matches_eager_and_compiles_as_one_graph():
    """The token MoE without the nonzero() gather (every position routed, pads masked; what runs
    under torch.compile) gives the eager losses and gradients, and the training forward traces as
    one graph (no graph break: no host sync)."""
    model = make_model(image_pos_embedding=True)
    b = make_batch(model.cfg)
    results = []
    for static in (False, True):
        model.static_routing = static
        model.zero_grad(set_to_none=True)
        out = model(b)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (o_e, g_e), (o_s, g_s) = results
    for a, c in zip(o_e, o_s):
        assert_close(c, a)
    assert g_e.keys() == g_s.keys()
    for n in g_e:
        assert_close(g_s[n], g_e[n], name=n)
    model.static_routing = False
    explain = torch._dynamo.explain(model)(b, validate=False)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


# ------------------------------------------------------------------------------------------------
# bad batches


def test_bad_batches_raise_clear_errors():
    model = make_model()
    b = make_batch()
    bad = Batch(**{**b.__dict__, "input_ids": b.input_ids[:, :-1]})
    with pytest.raises(ValueError, match=r"batch\.input_ids.*shape"):
        model(bad)
    ids = b.input_ids.clone()
    ids[1, 5] = CFG.vocab_size
    with pytest.raises(ValueError, match=r"batch\.input_ids.*\[0, 171\)"):
        model(Batch(**{**b.__dict__, "input_ids": ids}))
    with pytest.raises(ValueError, match=r"batch\.task"):
        model(Batch(**{**b.__dict__, "task": torch.tensor([0, 1, 2, 0])}))
    with pytest.raises(ValueError, match=r"batch\.task.*'vqa'"):
        collate(CFG, [Sample("vqa", [0] * L, [1])])
    with pytest.raises(ValueError, match=r"batch\.labels"):
        lab = b.labels.clone()
        lab[0, 0] = -5
        model(Batch(**{**b.__dict__, "labels": lab}))
    with pytest.raises(ValueError, match=r"batch\.image_codes"):
        collate(CFG, [Sample("t2i", [0] * (L - 1), [1])])
    with pytest.raises(ValueError, match=r"batch\.mask_rate"):
        model(Batch(**{**b.__dict__, "mask_rate": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"batch\.clip_features"):
        model(Batch(**{**b.__dict__, "clip_features": torch.randn(4, 3, 3)}))
    with pytest.raises(ValueError, match=r"batch\.labels.*no answer"):
        collate(CFG, [Sample("mmu", [0] * L, [1])])


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_safetensors_roundtrip(tmp_path):
    model = make_model(seed=3)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg
    b = make_batch()
    assert_close(loaded(b).loss, model(b).loss, atol=0, rtol=0)
    # missing / unexpected / mismatched keys are listed
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    sd.pop("blocks.0.attn.q_proj.bias")
    sd["extra.weight"] = torch.zeros(2)
    sd["ln_f.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata={"config": model.cfg.to_json()})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "blocks.0.attn.q_proj.bias" in msg and "extra.weight" in msg and "ln_f.weight" in msg
    # a checkpoint of the old model format (no model_format in its config) says so
    import json

    old = json.loads(model.cfg.to_json())
    del old["model_format"]
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={"config": json.dumps(old)})
    for target in (None, model):
        with pytest.raises(CheckpointError, match="model format 1.*train again"):
            load_checkpoint(tmp_path / "old.safetensors", target)


def _random_phi(cfg, vocab_rows, mlp, layers, seed=0):
    """A Phi-1.5-shaped state dict (HF ``PhiForCausalLM`` tensor names) with random, well-scaled weights."""
    g = torch.Generator().manual_seed(seed)
    D = cfg.hidden_size

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def b(n, scale=0.1):
        return torch.randn(n, generator=g) * scale

    sd = {
        "model.embed_tokens.weight": torch.randn(vocab_rows, D, generator=g),
        "lm_head.weight": w(vocab_rows, D),
        "lm_head.bias": b(vocab_rows),
        "model.final_layernorm.weight": 1 + b(D),
        "model.final_layernorm.bias": b(D),
    }
    for i in range(layers):
        s = f"model.layers.{i}."
        sd[s + "input_layernorm.weight"], sd[s + "input_layernorm.bias"] = 1 + b(D), b(D)
        for p in ("q_proj", "k_proj", "v_proj", "dense"):
            sd[f"{s}self_attn.{p}.weight"], sd[f"{s}self_attn.{p}.bias"] = w(D, D), b(D)
        sd[s + "mlp.fc1.weight"], sd[s + "mlp.fc1.bias"] = w(mlp, D), b(mlp)
        sd[s + "mlp.fc2.weight"], sd[s + "mlp.fc2.bias"] = w(D, mlp), b(D)
    return sd


SHOWO_ORDER = "[PAD] <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|>".split()


def _showo_mask(ids, cfg, task):
    """Show-o's attention masks, written from its rules (training/prompting_utils.py), ``[S, S]`` bool.

    T2I (``create_attention_mask_predict_next`` with ``rm_pad_in_image``): causal; rows after the
    leading pads never see them; rows of <|soi|>...<|eoi|> see every non-pad position.
    MMU (``create_attention_mask_for_mmu``): causal, and every row sees the prefix up to <|eoi|>.
    """
    S = len(ids)
    ids = torch.tensor(ids)
    m = torch.ones(S, S).tril().bool()
    soi = int((ids == cfg.special_token_id("<|soi|>")).nonzero()[0])
    eoi = int((ids == cfg.special_token_id("<|eoi|>")).nonzero()[0])
    pad = ids == cfg.pad_token_id
    if task == "t2i":
        if pad.any():
            last = int(pad.nonzero()[-1])
            m[last + 1 :, : last + 1] = False
        m[soi : eoi + 1] = ~pad[None, :]
    else:
        m[:, : eoi + 1] = True
    return m


def _dense_phi_logits(sd, cfg, ids, mask):
    """The dense Phi-1.5 / Show-o forward (parallel block, partial NeoX rotary, tanh gelu), fp64."""
    sd = {k: v.double() for k, v in sd.items()}
    D, H = cfg.hidden_size, cfg.num_heads
    hd, r = D // H, cfg.rotary_dim
    B, S = ids.shape
    x = sd["model.embed_tokens.weight"][ids]
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()

    def rope(t):  # [B, H, S, hd]
        t1, t2 = t[..., : r // 2], t[..., r // 2 : r]
        return torch.cat((t[..., :r] * cos + torch.cat((-t2, t1), -1) * sin, t[..., r:]), -1)

    def lin(a, name):
        return a @ sd[name + ".weight"].t() + sd[name + ".bias"]

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = F.layer_norm(x, (D,), sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"], 1e-5)
        q, k, v = (lin(a, p + f"self_attn.{n}_proj").view(B, S, H, hd).transpose(1, 2) for n in "qkv")
        att = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
        y = lin((att @ v).transpose(1, 2).reshape(B, S, D), p + "self_attn.dense")
        mlp = lin(F.gelu(lin(a, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
        x = x + y + mlp
    x = F.layer_norm(x, (D,), sd["model.final_layernorm.weight"], sd["model.final_layernorm.bias"], 1e-5)
    return lin(x, "lm_head")


def test_showo_import_reproduces_the_dense_forward(tmp_path):
    """A Show-o checkpoint (random weights, Show-o's tensor names and vocabulary) imports into the
    model's "showo" form and gives the dense model's logits; special tokens are mapped by name."""
    from safetensors.torch import save_file

    cfg = preset(
        "tiny", block_layout="parallel", expert_activation="gelu_tanh", shared_width=512, image_pos_embedding=True
    )
    sd = _random_phi(cfg, cfg.vocab_size, cfg.mlp_width, cfg.num_layers)  # Show-o: the full vocabulary
    save_file({f"showo.{k}": v for k, v in sd.items()}, str(tmp_path / "showo.safetensors"))
    torch.manual_seed(0)
    model = UniF2ace(cfg).eval()
    report = load_phi_state_dict(model, tmp_path / "showo.safetensors")
    assert "blocks.1.token_moe.w2" in report["zeroed"] and "blocks.0.seq_gain" in report["zeroed"]
    assert "image_pos" in report["zeroed"]  # Phi has no absolute positions: zero keeps the import exact
    assert "blocks.0.ln3.weight" in report["initialised"] and "blocks.0.token_moe.router" in report["initialised"]
    # special tokens by name: Show-o's row of each name lands on our id of that name
    T = cfg.text_vocab_size
    for name in SHOWO_ORDER:
        i, j = cfg.special_token_id(name), T + SHOWO_ORDER.index(name)
        assert torch.equal(model.embed.weight[i], sd["model.embed_tokens.weight"][j]), name
        assert torch.equal(model.lm_head.weight[i], sd["lm_head.weight"][j]), name
    assert torch.equal(model.embed.weight[cfg.special_token_id("<|mmu|>")], sd["model.embed_tokens.weight"][T + 6])
    # the same sequences through the imported model and through a dense Phi forward with Show-o's masks
    g = torch.Generator().manual_seed(3)
    img = (torch.randint(0, cfg.codebook_size, (L,), generator=g) + cfg.image_token_offset).tolist()
    t2i, t2i_valid = t2i_sequence(cfg, [5, 6, 7], img)
    mmu, mmu_valid, _ = mmu_sequence(cfg, img, [8, 9], [10])
    ids = torch.tensor([t2i, mmu])
    valid = torch.tensor([t2i_valid, mmu_valid])
    task = torch.tensor([0, 1])
    img_pos = torch.stack([torch.arange(cfg.text_len + 1, cfg.text_len + 1 + L), torch.arange(2, 2 + L)])
    mask = torch.stack([_showo_mask(t2i, cfg, "t2i"), _showo_mask(mmu, cfg, "mmu")])
    want = _dense_phi_logits(sd, cfg, ids, mask)
    for backend in ("reference", "auto"):
        model.set_backend(backend)
        with torch.no_grad():
            span = bidirectional_span(img_pos, task, cfg.seq_len)
            h, _, _ = model.hidden(ids, valid, task, span=span, image_positions=img_pos)
            got = model.lm_head(h)
        assert_close(got[valid], want[valid].float(), name=f"logits ({backend})")  # fp32 tolerance
    # a Phi checkpoint (padded text vocabulary): text rows only, the rest keeps its initialisation
    m2 = UniF2ace(cfg)
    before = m2.embed.weight.detach().clone()
    phi = _random_phi(cfg, T + 4, cfg.mlp_width, cfg.num_layers, seed=1)
    load_phi_state_dict(m2, phi)
    assert torch.equal(m2.embed.weight[:T], phi["model.embed_tokens.weight"][:T])
    assert torch.equal(m2.embed.weight[T:], before[T:])
    # the imported model trains from there: routed experts and the sequence MoE get gradients
    model.set_backend("auto").train()
    out = model(make_batch(cfg))
    out.loss.backward()
    assert float(model.blocks[0].token_moe.w2.grad.abs().sum()) > 0
    assert float(model.blocks[0].seq_gain.grad.abs().sum()) > 0


def test_phi_import_refuses_models_it_cannot_reproduce():
    base = dict(block_layout="parallel", expert_activation="gelu_tanh", shared_width=512)
    sd = _random_phi(CFG, 100, CFG.mlp_width, CFG.num_layers)
    for overrides, match in (
        ({"block_layout": "sequential"}, "block_layout='parallel'"),
        ({"expert_activation": "gelu"}, "gelu_tanh"),
        ({"shared_width": 64}, "shared_width=512"),
    ):
        with pytest.raises(CheckpointError, match=match):
            load_phi_state_dict(UniF2ace(preset("tiny", **{**base, **overrides})), sd)
    assert preset("showo").shared_expert_width == preset("showo").mlp_width  # the import form of the paper model


def test_phi_import_errors_list_keys():
    cfg = preset("tiny")
    sd = _random_phi(cfg, 100, cfg.mlp_width, cfg.num_layers)
    sd.pop("model.layers.1.mlp.fc2.bias")
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as e:
        load_phi_state_dict(UniF2ace(cfg), sd)
    msg = str(e.value)
    assert "model.layers.1.mlp.fc2.bias" in msg and "rotary_emb.inv_freq" in msg and "q_proj.weight" in msg
    cfg = preset("tiny", block_layout="parallel", expert_activation="gelu_tanh", shared_width=512)
    with pytest.raises(CheckpointError, match="dense MLP width 96"):
        load_phi_state_dict(UniF2ace(cfg), _random_phi(cfg, 100, 96, cfg.num_layers))


class _KernelOperandDtypes:
    """Records the dtypes of the GEMM operands every cpu kernel entry point of the fused head
    (hidden, weight, bias) and of the expert MLP (x, w1, w2) receives."""

    def __init__(self, monkeypatch):
        self.seen = []
        head = OP_HEAD.kernels("cpu")
        mlp = MOE_OPS["moe_expert_mlp"].kernels("cpu")
        for name in ("head_lse_gather", "head_lse_gather_backward", "head_lse_gather_eager_grad"):
            if hasattr(head, name):
                monkeypatch.setattr(head, name, self._wrap(name, getattr(head, name), 0))
        monkeypatch.setattr(mlp, "moe_expert_mlp", self._wrap("mlp", mlp.moe_expert_mlp, 0))
        monkeypatch.setattr(mlp, "moe_expert_mlp_backward", self._wrap("mlp_bwd", mlp.moe_expert_mlp_backward, 1))

    def _wrap(self, name, fn, first):
        def f(*args, **kw):
            self.seen.append((name, *(a.dtype for a in args[first : first + 3] if isinstance(a, torch.Tensor))))
            return fn(*args, **kw)

        return f


def test_bf16_autocast_training_step_feeds_bf16_to_the_fused_kernels(monkeypatch):
    """Issue 16 item 4, at the model level: under the trainer's bf16 autocast, a training step sends
    bf16 GEMM operands to the fused D3Diff head and the expert MLP kernels (forward and backward,
    although the final LayerNorm output and the parameters are fp32), and its loss and gradients
    match the reference backend under the same autocast within bf16 tolerance."""
    model = make_model()
    b = make_batch(model.cfg)
    rec = _KernelOperandDtypes(monkeypatch)
    results = []
    for be in ("reference", "cpu"):
        model.set_backend(be)
        model.zero_grad(set_to_none=True)
        rec.seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(b)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, list(rec.seen)))
    (o_ref, g_ref, _), (o_cpu, g_cpu, seen) = results
    kinds = {name for name, *_ in seen}
    assert "mlp" in kinds and "mlp_bwd" in kinds and kinds & {"head_lse_gather", "head_lse_gather_eager_grad"}, seen
    assert all(dt == torch.bfloat16 for _, *dts in seen for dt in dts), seen
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert o_cpu.loss.dtype == torch.float32
    assert_close(o_cpu.loss, o_ref.loss, atol=atol, rtol=rtol, name="loss")
    assert g_ref.keys() == g_cpu.keys() and len(g_ref) == len(list(model.parameters()))
    for n in g_ref:
        assert g_cpu[n].dtype == torch.float32, n
        scale = g_ref[n].abs().max().clamp_min(1e-3)
        assert_close(g_cpu[n] / scale, g_ref[n] / scale, atol=4 * atol, rtol=4 * rtol, name=n)
    rec.seen.clear()  # control: without autocast the same kernels get the fp32 operands
    model(b).loss.backward()
    assert {name for name, *_ in rec.seen} == kinds, rec.seen
    assert all(dt == torch.float32 for _, *dts in rec.seen for dt in dts), rec.seen
