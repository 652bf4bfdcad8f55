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
from unif2ace.train.config import DEMO_MODEL_OVERRIDES
from unif2ace.train.trainer import lr_lambda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small model so each step takes milliseconds
SMALL = {"text_len": 32, "codebook_size": 64, "hidden_size": 64, "num_layers": 1, "num_heads": 2, "mlp_width": 256}
# what `unif2ace train --model SMALL` trains: --model merges into the default overrides
CLI_SMALL = {**DEMO_MODEL_OVERRIDES, **SMALL}


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
    assert sorted(os.listdir(run / "checkpoints")) == ["index.json", "latest", "step-00000020.pt", "step-00000030.pt"]


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
    assert sorted(os.listdir(d)) == ["index.json", "latest", "step-00000001.pt"]  # no partial file, pointer unchanged
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
    # micro-batches of 4 make single-step losses noisy (the mask rate and the task mix of each
    # batch): compare the first and the last four of 20 steps
    ls = losses(train(cfg_for(data, tmp_path / "b", steps=20, batch_size=4, grad_accum=2), log=lambda *a: None))
    assert all(np.isfinite(ls)) and np.mean(ls[-4:]) < 0.8 * np.mean(ls[:4])


def test_cli_train_generate_answer(data, tmp_path):
    from unif2ace.__main__ import main

    out = tmp_path / "run"
    train_argv = ["train", "--data", data, "--out", str(out), "--batch-size", "4", "--model", json.dumps(SMALL)]
    assert main([*train_argv, "--steps", "3", "--no-progress"]) == 0
    # steps changed: incompatible, clear error, exit 2
    assert main([*train_argv, "--steps", "4", "--no-progress", "--resume", "auto"]) != 0
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


def _torchrun(nproc, out, data, *extra):
    """`train` under torchrun (gloo, nproc processes) with the small model; its metrics records."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
        "-m",
        "unif2ace",
        "train",
        "--out",
        str(out),
        "--data",
        data,
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
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_processes_match_one_process(data, tmp_path):
    """torchrun, gloo, 2 processes x batch 4 vs 1 process x batch 4 x accum 2: same global batch, same
    samples (per-sample RNG), same per-micro-batch normalisation -> the same losses up to reduction order."""
    recs = _torchrun(2, tmp_path / "ddp", data, "--steps", "4")
    single = losses(
        train(
            cfg_for(data, tmp_path / "one", model=CLI_SMALL, steps=4, batch_size=4, grad_accum=2, lr=3e-3),
            log=lambda *a: None,
        )
    )
    np.testing.assert_allclose([x["loss"] for x in recs], single, rtol=1e-3)


# -- run directories (issue 18, item 4) ------------------------------------------------------------


def test_a_run_never_starts_over_another_run(data, tmp_path):
    """`train --out EXISTING_RUN` without --resume used to truncate metrics.jsonl, overwrite the model and
    mix checkpoints. Now it is refused, unless --resume continues the run or --overwrite replaces it
    (deleting only the files a run writes)."""
    from unif2ace.__main__ import main
    from unif2ace.train.checkpoint import RunDirectoryError

    run = tmp_path / "run"
    train(cfg_for(data, run, steps=4, ckpt_every=2), log=lambda *a: None)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    (run / "notes.txt").write_text("mine")  # a file the program did not write
    with pytest.raises(RunDirectoryError, match="already holds run .*--resume auto.*--overwrite"):
        train(cfg_for(data, run, steps=4, ckpt_every=2), log=lambda *a: None)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "notes.txt"} == before
    argv = ["train", "--data", data, "--out", str(run), "--steps", "4", "--model", json.dumps(SMALL), "--no-progress"]
    assert main(argv) == 2  # the CLI: one line, exit 2
    # a directory of someone else's files is never a run directory, --overwrite or not
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(RunDirectoryError, match="not a unif2ace run directory"):
            train(cfg_for(data, other), log=lambda *a: None, **kw)
    assert (other / "data.bin").read_bytes() == b"x"
    # --overwrite replaces the run: its checkpoints and outputs go, other files stay
    s = train(cfg_for(data, run, steps=2, ckpt_every=1), log=lambda *a: None, overwrite=True)
    assert s["steps"] == 2 and (run / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(run / "checkpoints")) == ["index.json", "latest", "step-00000001.pt", "step-00000002.pt"]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    with pytest.raises(RunDirectoryError, match="exclude each other"):
        Trainer(cfg_for(data, run), resume="auto", overwrite=True, log=lambda *a: None)


def test_keep_cleanup_removes_only_this_runs_checkpoints(data, tmp_path):
    """The keep-2 cleanup used to delete every older step-*.pt in checkpoints/ (whoever wrote it)."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg_for(data, b, steps=1, ckpt_every=1), log=lambda *a: None)
    tr = Trainer(cfg_for(data, a, steps=8, ckpt_every=2), log=lambda *a: None)
    for _ in range(2):
        tr.train_step(), tr.train_step(), tr.save()  # checkpoints at steps 2 and 4
    foreign = a / "checkpoints" / "step-00000001.pt"  # a user's copy of another run's checkpoint
    foreign.write_bytes((b / "checkpoints" / "step-00000001.pt").read_bytes())
    (a / "checkpoints" / "step-00000003.pt").write_bytes(b"a user's file")
    train(cfg_for(data, a, steps=8, ckpt_every=2), resume="auto", log=lambda *a: None)
    assert sorted(os.listdir(a / "checkpoints")) == [
        "index.json",
        "latest",
        "step-00000001.pt",
        "step-00000003.pt",
        "step-00000006.pt",
        "step-00000008.pt",
    ]


def test_demo_never_deletes_what_it_did_not_write(tmp_path, monkeypatch):
    """`demo --out DIR` used to rmtree DIR/run without a word."""
    import unif2ace.data.synthetic as synthetic
    from unif2ace.train import demo
    from unif2ace.train.checkpoint import RunDirectoryError

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(synthetic, "build_synthetic", stop)  # the demo's first heavy step
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirectoryError, match="files unif2ace did not write"):
        demo.run_demo(str(tmp_path), log=lambda *a: None)
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"
    # a previous demo run is replaced (with a message), and only its own files go
    from unif2ace.train.checkpoint import write_run_info

    write_run_info(str(tmp_path / "run"), "0" * 32, "demo")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    msgs = []
    with pytest.raises(Stop):
        demo.run_demo(str(tmp_path), log=msgs.append)
    assert any("replacing the previous demo run" in m for m in msgs)
    # nothing is deleted before training starts; the trainer (overwrite) deletes only run outputs
    from unif2ace.train.checkpoint import clear_run_outputs

    clear_run_outputs(str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run")) == ["precious.txt"]


# -- checkpoint integrity (issue 18, item 5) -------------------------------------------------------


def _flip(path, n=32, seed=0):
    """Flip ``n`` bytes in the middle half of a file (where the tensors are)."""
    b = bytearray(open(path, "rb").read())
    rng = np.random.default_rng(seed)
    for i in rng.integers(len(b) // 4, 3 * len(b) // 4, n):
        b[i] ^= 0xFF
    open(path, "wb").write(bytes(b))


@pytest.mark.parametrize("seed", range(3))
def test_damaged_checkpoints_are_refused(data, tmp_path, seed):
    """Flipped bytes used to load silently (changed weights/moments; the next step died in a raw
    FloatingPointError). Every checkpoint carries SHA-256 checksums that loading verifies."""
    from unif2ace.train.checkpoint import CheckpointDamagedError

    tr = Trainer(cfg_for(data, tmp_path / "run"), log=lambda *a: None)
    tr.train_step()
    path = tr.save()
    assert load_training_checkpoint(path)["step"] == 1
    _flip(path, n=20 + 10 * seed, seed=seed)
    with pytest.raises(CheckpointDamagedError, match="damaged|corrupt"):
        load_training_checkpoint(path)
    with pytest.raises(TrainCheckpointError):
        Trainer(cfg_for(data, tmp_path / "x"), resume=path, log=lambda *a: None)


def test_checksums_name_the_damaged_tensor(tmp_path):
    from unif2ace.train.checkpoint import CheckpointDamagedError, tree_checksums, verify_checksums

    st = {"model": {"w": torch.ones(3), "b": torch.zeros(2)}, "step": 4, "rng": (1, [2, 3])}
    sums = tree_checksums(st)
    verify_checksums(st, sums, "x")
    st["model"]["w"][1] = 1.0000001
    with pytest.raises(CheckpointDamagedError, match="1 tensor.*model/w"):
        verify_checksums(st, sums, "x")
    st["model"]["w"][1] = 1.0
    st["rng"][1][0] = 5
    with pytest.raises(CheckpointDamagedError, match="non-tensor fields"):
        verify_checksums(st, sums, "x")


def test_resume_auto_falls_back_to_the_previous_good_checkpoint(data, tmp_path):
    full = train(cfg_for(data, tmp_path / "full"), log=lambda *a: None)
    run = tmp_path / "run"
    train(cfg_for(data, run), log=lambda *a: None)  # checkpoints at steps 4 and 8
    _flip(run / "checkpoints" / "step-00000008.pt")
    msgs = []
    tr = Trainer(cfg_for(data, run), resume="auto", log=msgs.append)
    assert tr.step == 4 and any("step-00000008.pt" in m and "falling back" in m for m in msgs)
    rest = losses(tr.run())
    assert rest == losses(full)[4:]  # continues exactly
    assert load_training_checkpoint(str(run))["step"] == 8  # the damaged one was rewritten
    # nothing good left: a clear error, not a crash
    for n in ("step-00000004.pt", "step-00000008.pt"):
        _flip(run / "checkpoints" / n)
    with pytest.raises(TrainCheckpointError, match="no usable checkpoint"):
        Trainer(cfg_for(data, run), resume="auto", log=lambda *a: None)


def test_temp_files_of_killed_writes_are_removed_at_the_next_start(data, tmp_path):
    run = tmp_path / "run"
    tr = Trainer(cfg_for(data, run), log=lambda *a: None)
    tr.train_step()
    tr.save()
    d = run / "checkpoints"
    stale = [d / ".step-00000002.pt.tmp4242", d / ".latest.tmp17", d / ".index.json.tmp3"]
    stale.append(run / ".model.safetensors.tmp")
    for p in stale:
        p.write_bytes(b"half")
    (d / ".step-00000006.tmp").mkdir()  # a killed sharded save
    (d / ".step-00000006.tmp" / "__0_0.distcp").write_bytes(b"half")
    (run / ".my.tmp").write_text("not ours")
    msgs = []
    Trainer(cfg_for(data, run), resume="auto", log=msgs.append)
    assert not any(p.exists() for p in stale) and not (d / ".step-00000006.tmp").exists()
    assert (run / ".my.tmp").exists() and any("temporary file" in m for m in msgs)


def test_latest_only_names_a_checkpoint_inside_the_run(data, tmp_path):
    """`latest` used to be joined to the directory as given: an absolute path or ../ escaped it."""
    from unif2ace.train.checkpoint import CheckpointDamagedError

    a, b = tmp_path / "a", tmp_path / "b"
    for r in (a, b):
        tr = Trainer(cfg_for(data, r), log=lambda *a: None)
        tr.train_step()
        tr.save()
    outside = str(b / "checkpoints" / "step-00000001.pt")
    latest = a / "checkpoints" / "latest"
    for name in (outside, "../../b/checkpoints/step-00000001.pt", "step-00000001.pt/../../../b/checkpoints/x"):
        latest.write_text(name)
        with pytest.raises(CheckpointDamagedError, match="not a checkpoint of this run directory"):
            latest_checkpoint(str(a))
    os.remove(a / "checkpoints" / "step-00000001.pt")
    os.symlink(outside, a / "checkpoints" / "step-00000001.pt")
    latest.write_text("step-00000001.pt")
    with pytest.raises(CheckpointDamagedError, match="leads outside"):
        latest_checkpoint(str(a))
    with pytest.raises(TrainCheckpointError, match="no usable checkpoint"):
        load_training_checkpoint(str(a))


# -- FSDP2 (issue 21, item 5) ------------------------------------------------------------------------


def fsdp_cfg(data, out, **kw):
    return cfg_for(data, out, **{"model": CLI_SMALL, "batch_size": 4, "grad_accum": 2, "fsdp": True, **kw})


def test_fsdp_two_processes_match_one_process_and_resume_on_one(data, tmp_path):
    """torchrun --fsdp, gloo, 2 processes x batch 4 vs 1 process (plain) x batch 4 x accum 2: same global
    batch, same samples -> the same losses. Then the 2-process sharded checkpoint of step 2 resumes on ONE
    process (DCP reshards) and continues with the 2-process run's losses."""
    recs = _torchrun(2, tmp_path / "fsdp", data, "--fsdp", "--steps", "4", "--ckpt-every", "2")
    single = losses(
        train(cfg_for(data, tmp_path / "one", model=CLI_SMALL, steps=4, batch_size=4, grad_accum=2), log=lambda *a: 0)
    )
    np.testing.assert_allclose([x["loss"] for x in recs], single, rtol=1e-3)
    ck = tmp_path / "fsdp" / "checkpoints"
    assert sorted(os.listdir(ck)) == ["index.json", "latest", "step-00000002", "step-00000004"]
    assert sorted(os.listdir(ck / "step-00000002")) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "checksums.json",
        "train_state.pt",
    ]
    tr = Trainer(fsdp_cfg(data, tmp_path / "resumed", steps=4), resume=str(ck / "step-00000002"), log=lambda *a: 0)
    try:
        assert tr.step == 2
        rest = losses(tr.run())
    finally:
        tr.close()
    np.testing.assert_allclose(rest, [x["loss"] for x in recs][2:], rtol=1e-5)
    # the run exports a whole model; a sharded checkpoint also loads without a process group
    from unif2ace.train.evaluate import load_run

    ref = load_run(str(tmp_path / "fsdp")).model.state_dict()
    for src in (tmp_path / "resumed", ck / "step-00000004"):
        got = load_run(str(src)).model.state_dict()
        # 1 vs 2 processes reduce in a different order; Adam turns ~1e-7 gradient differences into
        # ~1e-6 parameter differences (a lost optimizer state would move them by ~lr = 3e-3)
        bad = {k: float((got[k] - ref[k]).abs().max()) for k in ref if not torch.allclose(got[k], ref[k], atol=2e-5)}
        assert not bad, bad


def test_fsdp_resume_is_exact_and_survives_damage_and_killed_saves(data, tmp_path, monkeypatch):
    """One process, --fsdp (a one-member group): stop + resume is bit-exact; a damaged shard makes
    --resume auto fall back to the previous checkpoint; a killed sharded save leaves the last good one
    and its temporary directory is removed at the next start."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    full = losses(train(fsdp_cfg(data, tmp_path / "full"), log=lambda *a: 0))
    assert not dist.is_initialized()  # train() tore its group down
    tr = Trainer(fsdp_cfg(data, tmp_path / "part"), log=lambda *a: 0)
    try:
        first = [tr.train_step()["loss"] for _ in range(4)]
        tr.save()
        tr.train_step()

        def killed(*a, **k):
            os.makedirs(k["checkpoint_id"], exist_ok=True)
            open(os.path.join(k["checkpoint_id"], "__0_0.distcp"), "wb").write(b"half")
            raise KeyboardInterrupt("killed mid-save")

        monkeypatch.setattr(dcp, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            tr.save()
        monkeypatch.undo()
    finally:
        tr.close()
    ck = tmp_path / "part" / "checkpoints"
    assert (ck / "latest").read_text() == "step-00000004" and (ck / ".step-00000005.tmp").is_dir()
    torch.manual_seed(12345)
    rest = losses(train(fsdp_cfg(data, tmp_path / "part"), resume="auto", log=lambda *a: 0))
    assert first + rest == full  # bit-exact
    assert not (ck / ".step-00000005.tmp").exists()
    _flip(ck / "step-00000008" / "__0_0.distcp", n=8)
    msgs = []
    tr = Trainer(fsdp_cfg(data, tmp_path / "part"), resume="auto", log=msgs.append)
    try:
        assert tr.step == 4 and any("__0_0.distcp" in m and "falling back" in m for m in msgs)
        assert losses(tr.run()) == full[4:]
    finally:
        tr.close()
    with pytest.raises(TrainCheckpointError, match="resume it with --fsdp"):
        Trainer(cfg_for(data, tmp_path / "x"), resume=str(ck / "step-00000008"), log=lambda *a: 0)


@pytest.mark.slow
def test_fsdp_one_process_checkpoint_resumes_on_two(data, tmp_path):
    """The other direction: a checkpoint written by one process resumes under torchrun on two, and the
    two-process continuation matches the one-process run."""
    s = train(fsdp_cfg(data, tmp_path / "one", steps=4, ckpt_every=2), log=lambda *a: 0)
    recs = _torchrun(
        2,
        tmp_path / "two",
        data,
        "--fsdp",
        "--steps",
        "4",
        "--ckpt-every",
        "2",
        "--resume",
        str(tmp_path / "one" / "checkpoints" / "step-00000002"),
    )
    np.testing.assert_allclose([x["loss"] for x in recs], losses(s)[2:], rtol=1e-5)


def test_demo_trains_its_fixed_steps_and_reports(tmp_path, monkeypatch):
    """The demo trains exactly its step count whatever the machine's speed (no time budget), from
    fixed seeds: evaluating its run again gives the same figures; it writes the report, the
    captioned samples picture and the loss curves, and its time estimate."""
    from unif2ace.data import faces
    from unif2ace.data.png import read_png
    from unif2ace.data.synthetic import held_out_split
    from unif2ace.train import demo
    from unif2ace.train.evaluate import eval_generation, eval_vqa, load_run

    monkeypatch.setenv("UNIF2ACE_CACHE", str(tmp_path / "cache"))
    msgs = []
    r = demo.run_demo(
        str(tmp_path / "out"),
        steps=3,
        n_gen=4,
        n_vqa_images=3,
        questions_per_image=2,
        benchmark=False,
        timing_steps=1,
        progress=False,
        model_overrides=SMALL,
        train_overrides={"synthetic_images": 96, "batch_size": 8},
        log=msgs.append,
    )
    assert r["training"]["steps"] == 3 and not r["training"]["stopped_early"]
    assert r["generation"]["n"] == 4 and r["vqa"]["n"] == 6
    assert any("estimate from the timed steps" in m for m in msgs) and r["timing"]["estimate"]["train_s"] > 0
    out = tmp_path / "out"
    for f in ("report.md", "report.json", "samples.png", "loss_curve.png"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    assert "3 steps, fixed" in md and "![samples](samples.png)" in md and "fused ops" in md
    assert read_png(str(out / "samples.png")).shape[0] > 4 * 32  # pairs plus caption lines
    run = load_run(str(out / "run"))
    dec = faces.AttributeDecoder(roundtrip=run.vq.roundtrip)
    again = eval_generation(run, held_out_split(4, seed=1001), dec, seed=0)
    assert again["accuracy"] == r["generation"]["accuracy"]
    assert eval_vqa(run, held_out_split(3, seed=2002), per_image=2, seed=0)["accuracy"] == r["vqa"]["accuracy"]


@pytest.mark.slow
def test_compiled_training_step_matches_eager(data, tmp_path):
    """TrainConfig.compile: the forward is torch.compile(fullgraph=True)d and trains like eager."""
    pytest.importorskip("torch._inductor")
    eager = train(cfg_for(data, tmp_path / "e", steps=2), log=lambda *a: None)
    compiled = train(cfg_for(data, tmp_path / "c", steps=2, compile=True), log=lambda *a: None)
    np.testing.assert_allclose(losses(compiled), losses(eager), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="yes").validate()


def test_codebook_image_embedding_init(data, tmp_path):
    """image_embedding_init="codebook": the image-code rows of the input embedding and of the LM head
    are one projection of the VQ's patch pixels (std 0.02; codes that look alike start alike); every
    other parameter keeps the model's init; a data set without a patch VQ is refused."""
    from unif2ace.data.shards import TokenDataset
    from unif2ace.data.synthetic import vq_from_meta

    tr = Trainer(cfg_for(data, tmp_path / "c", image_embedding_init="codebook"), log=lambda *a: None)
    ref = Trainer(cfg_for(data, tmp_path / "r"), log=lambda *a: None)
    lo, K = tr.mcfg.image_token_offset, tr.mcfg.codebook_size
    e = tr.model.embed.weight[lo : lo + K].detach()
    assert torch.equal(e, tr.model.lm_head.weight[lo : lo + K].detach())
    assert abs(float(e.std()) - 0.02) < 1e-3 and not torch.equal(e, ref.model.embed.weight[lo : lo + K])
    x = torch.from_numpy(np.asarray(vq_from_meta(tr.data.meta).codebook)).double().reshape(K, -1)
    d_pix, d_emb = torch.pdist(x), torch.pdist(e.double())
    assert float(torch.corrcoef(torch.stack([d_pix, d_emb]))[0, 1]) > 0.5
    for (n, p), (_, q) in zip(tr.model.named_parameters(), ref.model.named_parameters()):
        if n in ("embed.weight", "lm_head.weight"):
            p, q = torch.cat([p[:lo], p[lo + K :]]), torch.cat([q[:lo], q[lo + K :]])
        assert torch.equal(p, q), n
    bare = TokenDataset(data)
    bare.meta = {}
    with pytest.raises(ValueError, match="image_embedding_init.*no patch VQ"):
        Trainer(cfg_for(data, tmp_path / "b", image_embedding_init="codebook"), dataset=bare, log=lambda *a: None)
    with pytest.raises(ValueError, match="image_embedding_init"):
        TrainConfig(image_embedding_init="pixels").validate()


def test_demo_cli_trains_with_the_same_thread_count_on_every_machine(monkeypatch):
    """`python -m unif2ace demo` runs with DEMO_THREADS torch threads unless --threads says otherwise
    (0: torch's default): the figures depend on the thread count (README.md, Demo recipe)."""
    from unif2ace.__main__ import main
    from unif2ace.train import demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: seen.append(kw["threads"]))
    assert main(["demo", "--out", "unused"]) == 0
    assert main(["demo", "--out", "unused", "--threads", "0"]) == 0
    assert main(["demo", "--out", "unused", "--threads", "1"]) == 0
    assert seen == [demo.DEMO_THREADS, 0, 1] and demo.DEMO_THREADS == 2
