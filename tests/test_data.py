"""Tests of unif2ace.data: the synthetic face set, its tokenizers, the shard format, PNG output."""

import json
import os

import numpy as np
import pytest

from unif2ace.data import faces
from unif2ace.data.png import image_grid, read_png, write_png
from unif2ace.data.shards import DataFormatError, EpochSampler, ShardWriter, TokenDataset
from unif2ace.data.synthetic import SyntheticSpec, build_synthetic, held_out_split, text_tokenizer
from unif2ace.data.tokenizers import PatchVQ, WordTokenizer, fitted_vq
from unif2ace.model import preset


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def vq(cache):
    return fitted_vq(64, 4, num_images=200, cache_dir=cache)


# -- the renderer -------------------------------------------------------------------------------


def test_attributes_are_many_and_rendered_deterministically():
    assert len(faces.ATTRIBUTES) >= 10
    a = faces.sample_attributes(np.random.default_rng(3))
    b = faces.sample_attributes(np.random.default_rng(3))
    assert a == b
    img = faces.render(a)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(img, faces.render(b))


@pytest.mark.parametrize("attr", list(faces.ATTRIBUTES))
def test_every_attribute_value_changes_the_image(attr):
    base = faces.sample_attributes(np.random.default_rng(0))
    base["hat"] = "none"  # (a hat hides nothing we vary here, but keep the base plain)
    imgs = [faces.render(dict(base, **{attr: v})) for v in faces.ATTRIBUTES[attr]]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert not np.array_equal(imgs[i], imgs[j]), (attr, faces.ATTRIBUTES[attr][i], faces.ATTRIBUTES[attr][j])


def test_hand_checked_pixels():
    a = dict(
        face_shape="round",
        skin="pale",
        hair_color="black",
        hair_style="short",
        eye_color="blue",
        brows="thin",
        glasses="no",
        beard="no",
        expression="neutral",
        earrings="no",
        hat="none",
        background="green",
    )
    img = faces.render(a)
    assert tuple(img[0, 0]) == (150, 214, 150)  # background corner
    assert tuple(img[18, 12]) == (250, 222, 200)  # cheek: pale skin
    assert tuple(img[13, 10]) == (40, 96, 230)  # left iris (eye patch row 3, col 2): blue
    assert tuple(img[6, 16]) == (28, 28, 30)  # hair cap: black
    assert tuple(img[12, 8]) == (250, 222, 200)  # no glasses: skin around the iris
    assert tuple(faces.render(dict(a, hat="red"))[2, 16]) == (220, 28, 40)
    assert tuple(faces.render(dict(a, glasses="yes"))[12, 8]) == (20, 20, 20)  # the frame fills the eye patch


def test_render_batch_and_patch_alignment():
    """The renderer draws on the 8 x 8 grid of 4-pixel patches: every patch position shows few
    variants, and all faces together fewer distinct patches than the demo's 512 codes."""
    rng = np.random.default_rng(5)
    attrs = [faces.sample_attributes(rng) for _ in range(600)]
    imgs = faces.render_batch(attrs)
    assert imgs.shape == (600, 32, 32, 3) and imgs.dtype == np.uint8
    assert all(np.array_equal(imgs[i], faces.render(attrs[i])) for i in range(0, 600, 37))
    patches = imgs.reshape(600, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(600, 64, 48)
    per_position = [len(np.unique(patches[:, i], axis=0)) for i in range(64)]
    assert max(per_position) <= 48  # e.g. a temple: face shape x skin x hair colour
    assert len(np.unique(patches.reshape(-1, 48), axis=0)) <= 512
    assert faces.render_batch([]).shape == (0, 32, 32, 3)


def test_captions_and_vqa():
    rng = np.random.default_rng(1)
    tok = text_tokenizer()
    out_of_order = 0
    for _ in range(200):
        a = faces.sample_attributes(rng)
        words, mentioned = faces.caption(a, rng)
        assert 1 <= len(words) <= 29 and len(mentioned) >= 8
        assert 0 not in tok.encode(words)  # every word is in the vocabulary
        for name in mentioned:
            if a[name] not in ("no", "yes", "none"):
                assert a[name] in words
        for name, q, ans in faces.vqa_pairs(a, rng, 3):
            assert ans == a[name] and 0 not in tok.encode(q + [ans])
        order = [list(faces.ATTRIBUTES).index(n) for n in mentioned]
        assert order == sorted(order)  # the canonical order by default
        _, mentioned = faces.caption(a, rng, shuffle=True)
        order = [list(faces.ATTRIBUTES).index(n) for n in mentioned]
        out_of_order += order != sorted(order)
    assert out_of_order > 150  # shuffle=True: random order (a sorted one is rare)
    full, mentioned = faces.caption(a, full=True)
    assert mentioned == list(faces.ATTRIBUTES)
    chunks = faces.caption_chunks(a)
    assert [w for words, _ in chunks for w in words] == full and [c for _, c in chunks] == list(faces.ATTRIBUTES)
    with pytest.raises(ValueError, match="rng"):
        faces.caption(a)
    assert len(tok) + 2 <= preset("tiny").text_vocab_size  # fits under the tiny preset's bos/eos ids


def test_held_out_split_is_disjoint_and_deterministic():
    h = held_out_split(50, seed=4)
    assert h == held_out_split(50, seed=4)
    assert all(faces.is_held_out(a) for a in h)
    rng = np.random.default_rng(0)
    frac = np.mean([faces.is_held_out(faces.sample_attributes(rng)) for _ in range(3000)])
    assert 0.07 < frac < 0.13


def test_attribute_decoder_reads_renders(vq):
    dec = faces.AttributeDecoder(per_value=8)
    attrs = held_out_split(12, seed=9)
    pred = dec.predict(np.stack([faces.render(a) for a in attrs]))
    acc = np.mean([[p[k] == t[k] for k in faces.ATTRIBUTES] for p, t in zip(pred, attrs)])
    assert acc > 0.97
    with pytest.raises(ValueError, match="images"):
        dec.predict(np.zeros((2, 16, 16, 3), np.uint8))


def test_tokenizer_keeps_every_attribute(cache):
    """The demo's tokenizer (512 patch codes) is lossless on the renders: the attributes read back
    from VQ round trips of held-out faces are right (the decoder ceiling)."""
    vq = fitted_vq(512, 4, num_images=300, cache_dir=cache)
    attrs = held_out_split(24, seed=11)
    truth = faces.render_batch(attrs)
    rt = vq.roundtrip(truth)
    assert np.mean([np.array_equal(r, t) for r, t in zip(rt, truth)]) > 0.9
    pred = faces.AttributeDecoder(per_value=8, roundtrip=vq.roundtrip).predict(rt)
    assert np.mean([[p[k] == t[k] for k in faces.ATTRIBUTES] for p, t in zip(pred, attrs)]) >= 0.97


# -- tokenizers -----------------------------------------------------------------------------------


def test_word_tokenizer_roundtrip_and_unknown():
    tok = WordTokenizer(["b", "a"])
    assert tok.encode("a b zzz") == [2, 1, 0]
    assert tok.decode([2, 1, 0]) == "a b <unk>"
    assert WordTokenizer.from_json(tok.to_json()).words == tok.words
    with pytest.raises(ValueError, match="duplicates"):
        WordTokenizer(["a", "a"])


def test_patch_vq_encode_decode_and_cache(vq, cache):
    assert vq.num_codes == 64 and vq.patch == 4
    imgs = np.stack([faces.render(faces.sample_attributes(np.random.default_rng(i))) for i in range(4)])
    codes = vq.encode(imgs)
    assert codes.shape == (4, 64) and codes.min() >= 0 and codes.max() < 64
    rec = vq.decode(codes)
    assert rec.shape == imgs.shape
    assert np.abs(rec.astype(float) - imgs).mean() < 25  # a coarse but faithful reconstruction
    assert np.array_equal(vq.encode(rec), codes)  # decoded patches are their own nearest codes
    files = [f for f in os.listdir(cache) if f.startswith("patchvq-64x4")]
    assert len(files) == 1
    again = fitted_vq(64, 4, num_images=200, cache_dir=cache)  # from the cache file
    assert np.array_equal(again.codebook, vq.codebook)
    # a hand-made codebook: two flat colours
    cb = np.stack([np.full(48, 0.0), np.full(48, 200.0)]).astype(np.float32)
    two = PatchVQ(cb, 4)
    img = np.zeros((8, 8, 3), np.uint8)
    img[:4, 4:] = 190
    assert two.encode(img[None]).tolist() == [[0, 1, 0, 0]]
    with pytest.raises(ValueError, match="codes must be in"):
        two.decode([[0, 2, 0, 0]])
    with pytest.raises(ValueError, match="codebook"):
        PatchVQ(np.zeros((2, 5)), 4)


# -- the shard format ---------------------------------------------------------------------------


def _write(path, n_images=7, per_shard=3, L=4, K=10, T=20, seed=0):
    rng = np.random.default_rng(seed)
    w = ShardWriter(str(path), image_tokens=L, codebook_size=K, text_vocab_size=T, images_per_shard=per_shard)
    expect = []
    for _ in range(n_images):
        c = rng.integers(0, K, L)
        i = w.add_image(c)
        cap = rng.integers(0, T, rng.integers(1, 5)).tolist()
        w.add_caption(i, cap)
        expect.append(("t2i", c.tolist(), cap, None))
        q, a = rng.integers(0, T, 3).tolist(), rng.integers(0, T, 1).tolist()
        w.add_vqa(i, q, a)
        expect.append(("mmu", c.tolist(), q, a))
    w.close()
    return expect


def test_shards_roundtrip(tmp_path):
    expect = _write(tmp_path / "d")
    ds = TokenDataset(str(tmp_path / "d"))
    assert len(ds) == len(expect) == 14
    assert len(ds.index["shards"]) == 3
    for i, (task, codes, text, ans) in enumerate(expect):
        s = ds[i]
        assert s.task == task and s.image_codes.tolist() == codes and list(s.text) == text
        assert (s.answer is None and ans is None) or list(s.answer) == ans
    assert isinstance(ds.codes[0], np.memmap)
    ds.check_config(
        preset("tiny", image_grid=2, codebook_size=10, text_vocab_size=20, bos_token_id=18, eos_token_id=19)
    )
    with pytest.raises(DataFormatError, match="image_grid"):
        ds.check_config(preset("tiny"))


def test_shard_writer_rejects_bad_input(tmp_path):
    w = ShardWriter(str(tmp_path / "d"), image_tokens=4, codebook_size=10, text_vocab_size=20)
    with pytest.raises(ValueError, match="expected 4 codes"):
        w.add_image([1, 2, 3])
    with pytest.raises(ValueError, match=r"codes must be in \[0, 10\)"):
        w.add_image([1, 2, 3, 10])
    i = w.add_image([1, 2, 3, 4])
    with pytest.raises(ValueError, match="text ids"):
        w.add_caption(i, [25])
    with pytest.raises(ValueError, match="answer_ids"):
        w.add_vqa(i, [1], [])
    with pytest.raises(ValueError, match="image 5"):
        w.add_caption(5, [1])
    with pytest.raises(ValueError, match="image_tokens"):
        ShardWriter(str(tmp_path / "e"), image_tokens=0, codebook_size=10, text_vocab_size=20)


def test_bad_data_directories_raise_clear_errors(tmp_path):
    with pytest.raises(DataFormatError, match="no index.json"):
        TokenDataset(str(tmp_path))
    _write(tmp_path / "d")
    idx = tmp_path / "d" / "index.json"
    good = idx.read_text()
    idx.write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        TokenDataset(str(tmp_path / "d"))
    d = json.loads(good)
    idx.write_text(json.dumps(dict(d, format="other")))
    with pytest.raises(DataFormatError, match="'format'"):
        TokenDataset(str(tmp_path / "d"))
    idx.write_text(json.dumps(dict(d, version=99)))
    with pytest.raises(DataFormatError, match="version"):
        TokenDataset(str(tmp_path / "d"))
    d["shards"][1]["images"] = 5
    idx.write_text(json.dumps(d))
    with pytest.raises(DataFormatError, match="shard-00001.codes.npy has shape"):
        TokenDataset(str(tmp_path / "d"))
    idx.write_text(good)
    (tmp_path / "d" / "shard-00002.text.npy").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="shard-00002.text.npy"):
        TokenDataset(str(tmp_path / "d"))


def test_epoch_sampler_shuffles_covers_and_shards():
    s = EpochSampler(50, 8, seed=3)
    assert s.steps_per_epoch == 6
    epoch0 = np.concatenate([s.global_batch(i) for i in range(6)])
    assert len(set(epoch0.tolist())) == 48  # no repeats within an epoch, the last partial batch dropped
    assert not np.array_equal(epoch0, np.arange(48))  # shuffled
    assert not np.array_equal(s.global_batch(6), s.global_batch(0))  # a new permutation next epoch
    assert np.array_equal(EpochSampler(50, 8, seed=3).global_batch(7), s.global_batch(7))  # pure in (seed, step)
    assert not np.array_equal(EpochSampler(50, 8, seed=4).global_batch(0), s.global_batch(0))
    k0, r0 = s.rank_slice(2, 0, 2)
    k1, r1 = s.rank_slice(2, 1, 2)
    assert (k0, k1) == (0, 4) and np.array_equal(np.concatenate([r0, r1]), s.global_batch(2))
    assert s.position(13) == {"epoch": 2, "batch_in_epoch": 1, "samples_seen": 104}
    with pytest.raises(ValueError, match="divisible"):
        s.rank_slice(0, 0, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochSampler(5, 8)


def test_synthetic_set_is_deterministic_and_excludes_held_out(tmp_path, cache):
    spec = SyntheticSpec(num_images=40, num_codes=64, seed=5)
    p1 = build_synthetic(spec, str(tmp_path / "a"), cache_dir=cache)
    p2 = build_synthetic(spec, str(tmp_path / "b"), cache_dir=cache)
    for name in ("shard-00000.codes.npy", "shard-00000.records.npy", "shard-00000.text.npy"):
        assert np.array_equal(np.load(os.path.join(p1, name)), np.load(os.path.join(p2, name)))
    ds = TokenDataset(p1)
    assert len(ds) == 40 * (spec.captions_per_image + spec.vqa_per_image)
    tasks = [ds[i].task for i in range(10)]  # two images' records: 2 captions and 3 VQA pairs each
    assert tasks.count("t2i") == 4 and tasks.count("mmu") == 6
    other = build_synthetic(SyntheticSpec(num_images=40, num_codes=64, seed=6), str(tmp_path / "c"), cache_dir=cache)
    assert not np.array_equal(
        np.load(os.path.join(p1, "shard-00000.codes.npy")), np.load(os.path.join(other, "shard-00000.codes.npy"))
    )
    tok = text_tokenizer()
    # answers are attribute values
    for i in range(40):
        s = ds[i]
        if s.task == "t2i":
            continue
        assert tok.decode(s.answer) in {v for vals in faces.ATTRIBUTES.values() for v in vals}
    with pytest.raises(ValueError, match="num_images"):
        build_synthetic(SyntheticSpec(num_images=0), str(tmp_path / "x"), cache_dir=cache)
    with pytest.raises(ValueError, match="field 'caption_order' must be 'canonical' or 'random', got 'sorted'"):
        build_synthetic(SyntheticSpec(caption_order="sorted"), str(tmp_path / "x"), cache_dir=cache)


# -- PNG ------------------------------------------------------------------------------------------


def test_png_roundtrip_and_grid(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_png(str(tmp_path / "a.png"), x)
    assert np.array_equal(read_png(str(tmp_path / "a.png")), x)
    g = image_grid(np.stack([x, x, x]), cols=2, scale=2, pad=1)
    assert g.shape == (2 * (10 + 1) + 1, 2 * (14 + 1) + 1, 3)
    assert np.array_equal(g[1:11, 1:15], x.repeat(2, 0).repeat(2, 1))
    with pytest.raises(ValueError, match="img"):
        write_png(str(tmp_path / "b.png"), np.zeros((4, 4)))
    (tmp_path / "c.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a PNG"):
        read_png(str(tmp_path / "c.png"))


def test_training_faces_never_use_held_out_combinations():
    from unif2ace.data.synthetic import _train_attrs

    rng = np.random.default_rng(0)
    spec = SyntheticSpec()
    drawn = [_train_attrs(rng, spec) for _ in range(500)]
    assert not any(faces.is_held_out(a) for a in drawn)
    assert len({faces.attribute_key(a) for a in drawn}) > 450  # still varied


# the columns of a shard's records.npy (unif2ace/data/shards.py)
FIELDS = ("kind", "image", "text_start", "text_len", "answer_start", "answer_len")


def _set_record(d, shard, rec, field, value):
    p = d / f"shard-{shard:05d}.records.npy"
    r = np.load(p)
    r[rec, FIELDS.index(field)] = value
    np.save(p, r)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: (d / "shard-00001.codes.npy").write_bytes(b""), r"shard-00001.codes.npy: EOFError"),
        (lambda d: _edit_index(d, shards=None), r"field 'shards' must be a non-empty list"),
        (lambda d: _edit_index(d, shards=[]), r"field 'shards' must be a non-empty list"),
        (lambda d: _edit_index(d, shards=[{"name": "../x", "images": 1, "records": 1, "text_tokens": 1}]), "'name'"),
        (lambda d: _edit_index(d, image_tokens="4"), r"field 'image_tokens' must be an int >= 1"),
        (lambda d: _edit_index(d, num_records=99), r"'num_records' is 99 but the shards hold 14"),
        (lambda d: _set_record(d, 0, 1, "image", -1), r"record 1 .*field 'image' must index .*got -1"),
        (lambda d: _set_record(d, 1, 0, "text_start", -3), r"field 'text_start' must be in .*got -3"),
        (lambda d: _set_record(d, 1, 0, "text_start", 10**9), r"field 'text_start' must be in .*got 1000000000"),
        (lambda d: _set_record(d, 2, 0, "text_len", 50), r"field 'text_len'"),
        (lambda d: _set_record(d, 0, 2, "kind", 7), r"field 'kind' must be 0 \(caption\) or 1 \(VQA pair\), got 7"),
        (lambda d: _set_record(d, 0, 0, "answer_len", 2), r"must be 0 for a caption"),
        (lambda d: _set_record(d, 0, 1, "answer_len", 0), r"must be >= 1 for a VQA pair"),
        (lambda d: np.save(d / "shard-00000.codes.npy", np.full((3, 4), 10, np.uint16)), r"image code 10 .*\[0, 10\)"),
        (lambda d: np.save(d / "shard-00000.text.npy", -1 - np.load(d / "shard-00000.text.npy")), r"text id -\d+ "),
        (lambda d: np.save(d / "shard-00000.codes.npy", np.zeros((3, 4), np.float32)), "integer array"),
    ],
)
def test_hostile_data_directories_are_refused_when_opened(tmp_path, damage, match):
    """Every index field and every record field is checked when the dataset is opened: nothing trains
    silently on wrong data (a record with image -1 used to read the shard's last image) and nothing
    ends in a raw EOFError/TypeError."""
    _write(tmp_path / "d")
    TokenDataset(str(tmp_path / "d"))  # intact: opens
    damage(tmp_path / "d")
    with pytest.raises(DataFormatError, match=match):
        TokenDataset(str(tmp_path / "d"))


def _edit_index(d, **fields):
    idx = d / "index.json"
    idx.write_text(json.dumps(dict(json.loads(idx.read_text()), **fields)))
