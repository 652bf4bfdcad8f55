"""Tests of unif2ace.train: the trainer, resume, atomic checkpoints, configs, the CLI, DDP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from unif2ace.data.synthetic import SyntheticSpec, build_synthetic
from unif2ace.train import TrainConfig, Trainer, train
from unif2ace.train.checkpoint import TrainCheckpointError, latest_checkpoint, load_training_checkpoint
from unif2ace.train.trainer import lr_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small model so each step takes milliseconds
SMALL = {"text_len": 32, "codebook_size": 64, "hidden_size": 64, "num_layers": 1, "num_heads": 2, "mlp_width": 256}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return build_synthetic(
        SyntheticSpec(num_images=64, num_codes=64, seed=1), str(tmp_path_factory.mktemp("d") / "syn"), cache_dir=cache
    )


def cfg_for(data, out, **kw):
    base = dict(
        model=dict(SMALL),
        data=data,
        out=str(out),
        steps=8,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        ckpt_every=4,
        progress=False,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def losses(summary):
    return [r["loss"] for r in summary["history"]]


def test_short_run_lowers_the_loss_and_writes_outputs(data, tmp_path):
    s = train(cfg_for(data, tmp_path / "run", steps=30, batch_size=16, ckpt_every=10), log=lambda *a: None)
    ls = losses(s)
    assert len(ls) == 30 and all(np.isfinite(ls))
    assert np.mean(ls[-5:]) < 0.7 * np.mean(ls[:3])
    run = tmp_path / "run"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 31))
    assert {
        "loss",
        "mmu_loss",
        "d3diff_loss",
        "mask_loss",
        "score_loss",
        "balance",
        "lr",
        "grad_norm",
        "tokens_per_s",
    } <= set(recs[0])
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "model.safetensors").exists() and (run / "data.json").exists()
    assert latest_checkpoint(str(run)).endswith("step-00000030.pt")
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step-00000020.pt", "step-00000030.pt"]  # keep=2


def test_fused_and_reference_training_curves_agree(data, tmp_path):
    """Same seed, data and init: the per-step losses of the fused (auto) and reference backends stay
    within 2% relative over 8 steps (they differ only by float summation order)."""
    a = losses(train(cfg_for(data, tmp_path / "a", backend="auto"), log=lambda *a: None))
    b = losses(train(cfg_for(data, tmp_path / "b", backend="reference"), log=lambda *a: None))
    np.testing.assert_allclose(a, b, rtol=2e-2)
    assert abs(a[0] - b[0]) <= 1e-4 * abs(b[0])  # the first step sees identical weights


def test_resume_is_exact(data, tmp_path):
    full = losses(train(cfg_for(data, tmp_path / "full"), log=lambda *a: None))
    cfg = cfg_for(data, tmp_path / "part")
    tr = Trainer(cfg, log=lambda *a: None)
    first = [tr.train_step()["loss"] for _ in range(4)]
    tr.save()
    del tr
    torch.manual_seed(12345)  # the resumed run must not depend on the caller's RNG state
    rest = losses(train(cfg, resume=str(tmp_path / "part"), log=lambda *a: None))
    assert first + rest == full  # bit-exact
    recs = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(5, 9))


def test_atomic_checkpoint_survives_a_killed_write(data, tmp_path, monkeypatch):
    cfg = cfg_for(data, tmp_path / "run")
    tr = Trainer(cfg, log=lambda *a: None)
    tr.train_step()
    good = tr.save()
    tr.train_step()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.setattr(torch, "save", real_save)
    d = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(d)) == ["latest", "step-00000001.pt"]  # no partial file, pointer unchanged
    assert latest_checkpoint(str(tmp_path / "run")) == good
    st = load_training_checkpoint(str(tmp_path / "run"))
    assert st["step"] == 1
    Trainer(cfg, resume=str(tmp_path / "run"), log=lambda *a: None)  # resumable


def test_corrupt_and_incompatible_checkpoints_raise_clear_errors(data, tmp_path):
    cfg = cfg_for(data, tmp_path / "run")
    tr = Trainer(cfg, log=lambda *a: None)
    tr.train_step()
    path = tr.save()
    with pytest.raises(TrainCheckpointError, match="different model config: hidden_size"):
        Trainer(cfg_for(data, tmp_path / "x", model=dict(SMALL, hidden_size=32)), resume=path, log=lambda *a: None)
    with pytest.raises(TrainCheckpointError, match="batch_size: checkpoint 8 vs now 4"):
        Trainer(cfg_for(data, tmp_path / "x", batch_size=4), resume=path, log=lambda *a: None)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(path, "rb").read()[:300])
    with pytest.raises(TrainCheckpointError, match="corrupt or truncated"):
        load_training_checkpoint(str(bad))
    torch.save({"hello": 1}, str(tmp_path / "other.pt"))
    with pytest.raises(TrainCheckpointError, match="not a unif2ace training checkpoint"):
        load_training_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(TrainCheckpointError, match="no checkpoints/latest"):
        load_training_checkpoint(str(tmp_path))
    with pytest.raises(TrainCheckpointError, match="does not exist"):
        load_training_checkpoint(str(tmp_path / "nope.pt"))
    # a failed resume never touched the good checkpoint
    assert load_training_checkpoint(path)["step"] == 1


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("steps", 0, "'steps' must be an int >= 1"),
        ("lr", -1.0, "'lr' must be a number > 0"),
        ("backend", "fast", "'backend' must be 'auto' or one of"),
        ("preset", "huge", "'preset' must be one of"),
        ("model", {"hidden_sizee": 3}, "unknown UniF2aceConfig fields \\['hidden_sizee'\\]"),
        ("model", {"top_k": 99}, "top_k=99 exceeds"),
        ("min_lr_ratio", 2.0, "'min_lr_ratio' must be in"),
        ("amp", "fp8", "'amp' must be"),
    ],
)
def test_bad_configs_raise_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value}).validate()


def test_config_files(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"steps": 5, "lr": 1e-3}))
    c = TrainConfig.from_file(str(p), batch_size=4)
    assert (c.steps, c.lr, c.batch_size) == (5, 1e-3, 4)
    p.write_text(json.dumps({"stepz": 5}))
    with pytest.raises(ValueError, match="unknown fields \\['stepz'\\]"):
        TrainConfig.from_file(str(p))
    p.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.from_file(str(p))
    with pytest.raises(ValueError, match="cannot read config file"):
        TrainConfig.from_file(str(tmp_path / "missing.json"))


def test_data_that_does_not_fit_the_model_is_rejected(data, tmp_path):
    with pytest.raises(ValueError, match="image_grid=4 gives 16"):
        Trainer(cfg_for(data, tmp_path / "r", model=dict(SMALL, image_grid=4)), log=lambda *a: None)
    with pytest.raises(ValueError, match="no index.json"):
        Trainer(cfg_for(str(tmp_path), tmp_path / "r"), log=lambda *a: None)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_any_split_of_a_global_batch_sees_the_same_samples(data):
    """Per-sample RNG: the batch built for 8 samples equals the two batches built for its halves
    (so grad accumulation and DDP ranks see exactly the samples, masks and noise of one big batch)."""
    from dataclasses import fields

    from unif2ace.data.shards import TokenDataset
    from unif2ace.model import Batch
    from unif2ace.train.trainer import make_batch

    cfg = TrainConfig(model=dict(SMALL)).model_config()
    ds = TokenDataset(data)
    samples = [ds[i] for i in range(8)]
    keys = list(range(100, 108))
    whole = make_batch(cfg, samples, keys, "cpu")
    a, b = make_batch(cfg, samples[:4], keys[:4], "cpu"), make_batch(cfg, samples[4:], keys[4:], "cpu")
    for f in fields(Batch):
        x, y, z = getattr(whole, f.name), getattr(a, f.name), getattr(b, f.name)
        if x is None:
            assert y is None and z is None
        else:
            assert torch.equal(x, torch.cat([y, z])), f.name
    assert whole.is_masked.any() and (whole.task == 1).any() and (whole.task == 0).any()
    other = make_batch(cfg, samples, [k + 1 for k in keys], "cpu")
    assert not torch.equal(other.is_masked, whole.is_masked)


def test_make_batch_keeps_features_of_a_mixed_batch():
    """Samples without features get zeros (= missing at the feature experts), the others keep theirs."""
    from unif2ace.model import Sample
    from unif2ace.train.trainer import make_batch

    cfg = TrainConfig(model=dict(SMALL)).model_config()
    face = torch.randn(cfg.face_dim)
    L = cfg.image_tokens
    samples = [Sample("mmu", [0] * L, [1], [2], face_embedding=face), Sample("t2i", [1] * L, [3])]
    b = make_batch(cfg, samples, [1, 2], "cpu")
    assert torch.equal(b.face_embeddings, torch.stack([face, torch.zeros_like(face)]))
    assert b.clip_features is None


def test_grad_accumulation_runs_and_learns(data, tmp_path):
    ls = losses(train(cfg_for(data, tmp_path / "b", steps=12, batch_size=4, grad_accum=2), log=lambda *a: None))
    assert all(np.isfinite(ls)) and np.mean(ls[-3:]) < np.mean(ls[:3])


def test_cli_train_generate_answer(data, tmp_path):
    from unif2ace.__main__ import main

    out = tmp_path / "run"
    model = json.dumps(SMALL)
    assert (
        main(
            [
                "train",
                "--data",
                data,
                "--out",
                str(out),
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--model",
                model,
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                data,
                "--out",
                str(out),
                "--steps",
                "4",
                "--batch-size",
                "4",
                "--model",
                model,
                "--no-progress",
                "--resume",
                "auto",
            ]
        )
        != 0
    )  # steps changed: incompatible, clear error, exit 2
    assert (
        main(
            ["generate", str(out), "red hair blue eyes", "pale skin", "--out", str(tmp_path / "g.png"), "--steps", "2"]
        )
        == 0
    )
    assert (tmp_path / "g.png").exists()
    assert (
        main(
            [
                "answer",
                str(out),
                "--attributes",
                "hair_color=red",
                "what",
                "color",
                "is",
                "the",
                "hair",
                "?",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert main(["train", "--steps", "0"]) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process(data, tmp_path):
    """torchrun, gloo, 2 processes x batch 4 vs 1 process x batch 4 x accum 2: same global batch, same
    samples (per-sample RNG), same per-micro-batch normalisation -> the same losses up to reduction order."""
    common = [
        "--data",
        data,
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--model",
        json.dumps(SMALL),
        "--no-progress",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--log-every",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "-m",
            "unif2ace",
            "train",
            "--out",
            str(tmp_path / "ddp"),
        ]
        + common,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    single = losses(
        train(cfg_for(data, tmp_path / "one", steps=4, batch_size=4, grad_accum=2, lr=3e-3), log=lambda *a: None)
    )
    recs = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([x["loss"] for x in recs], single, rtol=1e-3)
