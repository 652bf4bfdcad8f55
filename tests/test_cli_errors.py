"""Every user error of ``unif2ace train | generate | answer | demo`` is one clear line on stderr and
exit status 2 -- no traceback, no silent nonsense (issue 18, item 6)."""

import json
import shutil

import numpy as np
import pytest
import torch

from unif2ace.__main__ import main
from unif2ace.data.synthetic import SyntheticSpec, build_synthetic
from unif2ace.train import TrainConfig, Trainer
from unif2ace.train.config import DEMO_MODEL_OVERRIDES

SMALL = {"text_len": 32, "codebook_size": 64, "hidden_size": 64, "num_layers": 1, "num_heads": 2, "mlp_width": 256}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return build_synthetic(
        SyntheticSpec(num_images=64, num_codes=64, seed=1), str(tmp_path_factory.mktemp("d") / "syn"), cache_dir=cache
    )


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A trained (one step) run directory to generate from."""
    out = str(tmp_path_factory.mktemp("r") / "run")
    cfg = TrainConfig(model=dict(SMALL), data=data, out=out, steps=1, batch_size=4, progress=False, threads=1)
    Trainer(cfg, log=lambda *a: None).run()
    return out


def fails_in_one_line(capfd, argv, *needles):
    """Run the CLI; it must exit 2 with exactly one stderr line naming the problem."""
    rc = main(argv)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"unif2ace {argv[0]}: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _train(data, out, *extra):
    return ["train", "--data", data, "--out", str(out), "--steps", "1", "--batch-size", "4", "--no-progress"] + list(
        extra
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_cuda_device_without_a_gpu(capfd, data, tmp_path, device):
    fails_in_one_line(capfd, _train(data, tmp_path / "o", "--device", device), f"--device {device} needs a CUDA GPU")
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() > 7, reason="needs 1-7 GPUs")
def test_missing_cuda_index(capfd, data, tmp_path):  # pragma: no cover - GPU machines
    fails_in_one_line(capfd, _train(data, tmp_path / "o", "--device", "cuda:7"), "cuda:7 does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton is usable here")
def test_triton_backend_on_cpu(capfd, data, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # (the test session turns the interpreter on)
    fails_in_one_line(capfd, _train(data, tmp_path / "o", "--backend", "triton"), "backend 'triton' cannot run on cpu")


def test_model_overrides_merge_into_the_configs_overrides(capfd, data, tmp_path):
    """--model '{"num_layers": 1, ...}' used to replace the default overrides and silently reset alpha."""
    out = tmp_path / "o"
    assert main(_train(data, out, "--model", json.dumps(SMALL))) == 0
    model = json.loads((out / "train_config.json").read_text())["model"]
    assert model == {**DEMO_MODEL_OVERRIDES, **SMALL}
    assert model["alpha"] == DEMO_MODEL_OVERRIDES["alpha"]
    # a config file's overrides are the base; null drops an override (the preset's value applies)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {**SMALL, "alpha": 0.5, "balance_coef": 0.02}}))
    out2 = tmp_path / "o2"
    argv = _train(data, out2, "--config", str(cfg), "--model", '{"balance_coef": null, "num_layers": 1}')
    assert main(argv) == 0
    assert json.loads((out2 / "train_config.json").read_text())["model"] == {**SMALL, "alpha": 0.5}
    capfd.readouterr()
    fails_in_one_line(capfd, _train(data, tmp_path / "o3", "--model", "[1, 2]"), "--model must be a JSON object")
    fails_in_one_line(capfd, _train(data, tmp_path / "o3", "--model", "{"), "--model must be a JSON object")


def _damaged_copy(data, tmp_path, damage):
    d = tmp_path / "shards"
    shutil.copytree(data, d)
    damage(d)
    return str(d)


FIELDS = ("kind", "image", "text_start", "text_len", "answer_start", "answer_len")  # records.npy columns


def _record(d, field, value):
    p = d / "shard-00000.records.npy"
    r = np.load(p)
    r[0, FIELDS.index(field)] = value
    np.save(p, r)


def _index(d, **kw):
    p = d / "index.json"
    p.write_text(json.dumps(dict(json.loads(p.read_text()), **kw)))


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda d: (d / "shard-00000.codes.npy").write_bytes(b""), "EOFError"),
        (lambda d: _index(d, shards=None), "field 'shards' must be a non-empty list"),
        (lambda d: _record(d, "image", -1), "field 'image'"),
        (lambda d: _record(d, "text_start", -3), "field 'text_start'"),
        (lambda d: _record(d, "text_start", 10**9), "field 'text_start'"),
        (lambda d: _record(d, "kind", 5), "field 'kind'"),
    ],
)
def test_bad_shards(capfd, data, tmp_path, damage, needle):
    bad = _damaged_copy(data, tmp_path, damage)
    fails_in_one_line(capfd, _train(bad, tmp_path / "o", "--model", json.dumps(SMALL)), needle)


@pytest.mark.parametrize("flags,needle", [(["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps")])
def test_generate_steps_below_one(capfd, run, tmp_path, flags, needle):
    out = tmp_path / "g.png"
    fails_in_one_line(capfd, ["generate", run, "red hair", "--out", str(out), *flags], needle)
    assert not out.exists()  # used to write an all-zero image and exit 0


def test_generate_per_caption_zero(capfd, run, tmp_path):
    out = tmp_path / "g.png"
    fails_in_one_line(capfd, ["generate", run, "red hair", "--out", str(out), "--per-caption", "0"], "--per-caption")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton is usable here")
def test_generate_backend_that_cannot_run(capfd, run, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv = ["generate", run, "red hair", "--out", str(tmp_path / "g.png"), "--backend", "triton", "--steps", "1"]
    fails_in_one_line(capfd, argv, "backend 'triton' cannot run on cpu")


def test_answer_bad_codes(capfd, run, tmp_path):
    q = ["what", "color", "is", "the", "hair", "?"]
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    fails_in_one_line(capfd, ["answer", run, "--codes", str(empty), *q], "cannot read --codes")
    np.save(tmp_path / "short.npy", np.zeros(3, np.int64))
    fails_in_one_line(capfd, ["answer", run, "--codes", str(tmp_path / "short.npy"), *q], "64 integer image codes")
    np.save(tmp_path / "big.npy", np.full(64, 999, np.int64))
    fails_in_one_line(capfd, ["answer", run, "--codes", str(tmp_path / "big.npy"), *q], "values must be in [0, 64)")
    np.save(tmp_path / "ok.npy", np.zeros(64, np.int64))
    assert main(["answer", run, "--codes", str(tmp_path / "ok.npy"), *q, "--max-new-tokens", "1"]) == 0
