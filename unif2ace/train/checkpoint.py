"""Run directories and training checkpoints: atomic, checksummed, owned.

A run directory (``--out``) holds::

    run.json                      {"format": "unif2ace-run", "run_id": ..., "origin": "train" | "demo"}
    metrics.jsonl, train_config.json, data.json, loss_curve.png, model.safetensors
    checkpoints/step-00000200.pt  one file per checkpoint (model, optimizer, scheduler, RNG, data position)
    checkpoints/step-00000200/    or one directory per sharded (FSDP2, torch.distributed.checkpoint) checkpoint
    checkpoints/index.json        the checkpoints this program wrote here, with the run each belongs to
    checkpoints/latest            the name of the newest good checkpoint

Rules (see also the README's "Run directories"):

- A run never starts in a non-empty directory unless it resumes the run that lives there
  (``--resume``) or the caller asked to replace it (``--overwrite``); replacing deletes only the files
  this program writes (the names above, and only the checkpoints listed in ``index.json``).
- Every write goes to a temporary name next to its target, is fsynced and ``os.replace``-d into
  place (directories: renamed), then ``index.json`` and ``latest`` are rewritten the same way; a write
  killed at any point leaves the previous checkpoint and pointer intact, and its temporary files are
  removed when the next run starts in the directory (:func:`clean_stale_temps`).
- The keep-N cleanup deletes only checkpoints ``index.json`` lists for the same run, never a file it
  did not write.
- Every checkpoint carries SHA-256 checksums (:func:`tree_checksums`: one per tensor plus one over
  every other field; a sharded checkpoint adds ``checksums.json`` over its files) that loading verifies;
  a damaged checkpoint raises :class:`CheckpointDamagedError` naming what failed, and resuming a run
  directory falls back to its previous good checkpoint (:func:`find_good_checkpoint`).
- ``latest`` and ``index.json`` may only name ``step-NNNNNNNN[.pt]`` entries of the run's own
  ``checkpoints/`` directory (no paths, no symlinks leading out of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "TrainCheckpointError",
    "CheckpointDamagedError",
    "RunDirectoryError",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "latest_checkpoint",
    "find_good_checkpoint",
    "rng_state",
    "set_rng_state",
    "atomic_write_bytes",
    "tree_checksums",
    "verify_checksums",
    "prepare_run_dir",
    "clear_run_outputs",
    "clean_stale_temps",
    "read_run_info",
]

FORMAT = "unif2ace-train"
VERSION = 2  # 2: checksums, run ids, checkpoints/index.json
RUN_FILE = "run.json"
RUN_FORMAT = "unif2ace-run"
INDEX = "index.json"
INDEX_FORMAT = "unif2ace-checkpoints"
# the files a run writes into its directory (besides checkpoints/): the only ones --overwrite deletes
OUTPUT_FILES = ("metrics.jsonl", "train_config.json", "data.json", "loss_curve.png", "model.safetensors")
NAME_RE = re.compile(r"step-(\d{8})(\.pt)?")
# temporaries of killed writes: atomic_write_bytes (.NAME.tmpPID), sharded saves (.step-N.tmp / .step-N.old)
TEMP_RE = re.compile(r"\.(.+)\.tmp\d*|\.step-\d{8}\.(tmp|old)\d*")
TEMP_TARGETS = set(OUTPUT_FILES) | {RUN_FILE, INDEX, "latest", "train_state.pt", "checksums.json"}


class TrainCheckpointError(ValueError):
    """A training checkpoint is missing, corrupt, or does not match the run resuming from it."""


class CheckpointDamagedError(TrainCheckpointError):
    """A checkpoint's bytes are not what was written (checksum mismatch, truncated, unreadable, missing)."""


class RunDirectoryError(ValueError):
    """A run directory cannot be used as asked (it holds another run, or files this program did not write)."""


# ------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_tuplify(st["python"]))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------------
# atomic writes


def fsync_dir(d: str) -> None:
    """Make a rename inside ``d`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, write) -> None:
    """``write(fileobj)`` into a temp file next to ``path``, fsync, rename over ``path``. On any error
    the temp file is removed and ``path`` is untouched."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(d)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


# ------------------------------------------------------------------------------------------------
# checksums


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach()
    if hasattr(t, "full_tensor"):  # a DTensor: the checksum is of the whole tensor
        t = t.full_tensor()
    t = t.cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def tree_checksums(obj: Any) -> Dict[str, Any]:
    """SHA-256 of every tensor in a nested dict/list/tuple (keyed by its path, e.g.
    ``model/blocks.0.attn.q_proj.weight`` or ``optimizer/state/3/exp_avg``) and one SHA-256 over the
    structure and every other value (step, configs, RNG state, scheduler, data position)."""
    tensors: Dict[str, str] = {}
    other = hashlib.sha256()

    def walk(path: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            tensors[path] = _tensor_digest(v)
            other.update(f"{path}\0tensor\n".encode())
        elif isinstance(v, dict):
            other.update(f"{path}\0dict\0{len(v)}\n".encode())
            for k, x in sorted(v.items(), key=lambda kv: repr(kv[0])):
                other.update(f"{path}\0key\0{k!r}\n".encode())
                walk(f"{path}/{k}" if path else str(k), x)
        elif isinstance(v, (list, tuple)):
            other.update(f"{path}\0{type(v).__name__}\0{len(v)}\n".encode())
            for i, x in enumerate(v):
                walk(f"{path}/{i}", x)
        else:
            other.update(f"{path}\0{type(v).__name__}\0{v!r}\n".encode())

    walk("", obj)
    return {"algorithm": "sha256", "tensors": tensors, "other": other.hexdigest()}


def verify_checksums(obj: Any, stored: Any, where: str) -> None:
    """Raise :class:`CheckpointDamagedError` naming every tensor (and/or the other fields) whose
    checksum differs from ``stored``."""
    ok = isinstance(stored, dict) and stored.get("algorithm") == "sha256" and isinstance(stored.get("tensors"), dict)
    if not ok:
        raise CheckpointDamagedError(f"{where}: its checksum table is missing or damaged")
    now = tree_checksums(obj)
    have, want = now["tensors"], stored["tensors"]
    bad = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    problems = []
    if bad:
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        problems.append(f"{len(bad)} tensor(s) fail their SHA-256 checksum: {', '.join(bad[:4])}{more}")
    if now["other"] != stored.get("other"):
        problems.append("its non-tensor fields (step, configs, RNG, scheduler, data position) fail their checksum")
    if problems:
        raise CheckpointDamagedError(f"{where} is damaged: " + "; ".join(problems))


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


# ------------------------------------------------------------------------------------------------
# run directories


def _ckpt_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def read_run_info(run_dir: str) -> Optional[Dict[str, Any]]:
    """``run.json`` of ``run_dir`` (None when absent or not a unif2ace run marker)."""
    p = os.path.join(run_dir, RUN_FILE)
    try:
        with open(p) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT or not isinstance(info.get("run_id"), str):
        return None
    return info


def write_run_info(run_dir: str, run_id: str, origin: str) -> None:
    if (read_run_info(run_dir) or {}).get("run_id") == run_id:
        return
    os.makedirs(run_dir, exist_ok=True)
    info = {"format": RUN_FORMAT, "run_id": run_id, "origin": origin, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(os.path.join(run_dir, RUN_FILE), info)


def new_run_id() -> str:
    return uuid.uuid4().hex


def _entries(run_dir: str) -> List[str]:
    try:
        return sorted(os.listdir(run_dir))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise RunDirectoryError(f"--out {run_dir!r} is a file, not a directory") from None


def prepare_run_dir(
    run_dir: str, *, resuming: bool, checkpoint_run_id: Optional[str], overwrite: bool, clear: bool = True
) -> Optional[str]:
    """Check that a run may start in ``run_dir`` (see the module rules); with ``overwrite`` (and
    ``clear``) delete the previous run's outputs. Returns the run id the directory already has when
    the run continues it, else None. Raises :class:`RunDirectoryError` saying what to do."""
    if not [n for n in _entries(run_dir) if not _our_temp(n)]:  # (stale temporaries of our writers do not count)
        return None
    info = read_run_info(run_dir)
    if overwrite:
        if resuming:
            raise RunDirectoryError("--overwrite and --resume exclude each other (overwrite starts a new run)")
        if info is None:
            raise RunDirectoryError(
                f"--out {run_dir!r} is not empty and is not a unif2ace run directory (no valid {RUN_FILE}); "
                "--overwrite only replaces runs this program wrote; choose another --out"
            )
        if clear:
            clear_run_outputs(run_dir)
        return None
    if info is None:
        raise RunDirectoryError(
            f"--out {run_dir!r} is not empty and is not a unif2ace run directory (no valid {RUN_FILE}); "
            "choose an empty or new --out"
        )
    if not resuming:
        raise RunDirectoryError(
            f"--out {run_dir!r} already holds run {info['run_id'][:8]}; pass --resume auto to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if checkpoint_run_id is not None and checkpoint_run_id != info["run_id"]:
        raise RunDirectoryError(
            f"--out {run_dir!r} holds run {info['run_id'][:8]} but the checkpoint belongs to run "
            f"{checkpoint_run_id[:8]}; resume into that run's directory or into an empty --out"
        )
    return info["run_id"]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def clear_run_outputs(run_dir: str) -> List[str]:
    """Delete what a previous run wrote into ``run_dir``: the checkpoints its ``index.json`` lists,
    ``index.json``, ``latest``, stale temporaries, the output files and ``run.json``. Anything else
    (files this program did not write) stays. Returns the removed paths."""
    removed = []
    d = _ckpt_dir(run_dir)
    if os.path.isdir(d) and not os.path.islink(d):
        for e in _read_index(d)[0]:
            p = os.path.join(d, e["name"])
            if os.path.lexists(p):
                _remove(p)
                removed.append(p)
        for n in (INDEX, "latest"):
            p = os.path.join(d, n)
            if os.path.lexists(p):
                os.remove(p)
                removed.append(p)
        removed += clean_stale_temps(run_dir)
        if not os.listdir(d):
            os.rmdir(d)
    for n in OUTPUT_FILES + (RUN_FILE,):
        p = os.path.join(run_dir, n)
        if os.path.isfile(p) or os.path.islink(p):
            os.remove(p)
            removed.append(p)
    return removed


def _our_temp(name: str) -> bool:
    """Whether ``name`` is a temporary of one of this module's writers."""
    m = TEMP_RE.fullmatch(name)
    return bool(m) and (m.group(1) is None or m.group(1) in TEMP_TARGETS or bool(NAME_RE.fullmatch(m.group(1))))


def clean_stale_temps(run_dir: str) -> List[str]:
    """Remove the temporary files and directories killed writes leave behind (only names this
    program's writers use). Call when no other process writes to the run."""
    removed = []
    for d in (run_dir, _ckpt_dir(run_dir)):
        for n in _entries(d) if os.path.isdir(d) else []:
            if _our_temp(n):
                p = os.path.join(d, n)
                _remove(p)
                removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------
# the checkpoint index and `latest`


def checkpoint_name(step: int, sharded: bool = False) -> str:
    return f"step-{step:08d}" + ("" if sharded else ".pt")


def _check_name(d: str, name: Any, where: str) -> str:
    """The path of checkpoint ``name`` in checkpoints dir ``d``; refuses anything but a
    ``step-NNNNNNNN[.pt]`` entry that resolves inside ``d``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise CheckpointDamagedError(
            f"{where} names {name!r}, which is not a checkpoint of this run directory (expected step-NNNNNNNN[.pt])"
        )
    path = os.path.join(d, name)
    real, root = os.path.realpath(path), os.path.realpath(d)
    if os.path.islink(path) or os.path.dirname(real) != root:
        raise CheckpointDamagedError(f"{where} names {name!r}, which leads outside {d!r} (a symlink)")
    if not os.path.exists(path):
        raise CheckpointDamagedError(f"{where} names {name!r}, which does not exist")
    return path


def _read_index(d: str) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """(entries, problem): the index's valid entries, and what was wrong with it (None if nothing)."""
    p = os.path.join(d, INDEX)
    if not os.path.exists(p):
        return [], None
    try:
        with open(p) as f:
            idx = json.load(f)
        ok = isinstance(idx, dict) and idx.get("format") == INDEX_FORMAT
        if not ok or not isinstance(idx.get("checkpoints"), list):
            raise ValueError("not a checkpoint index")
    except (OSError, ValueError) as e:
        return [], f"{p} is unreadable ({e})"
    good = [
        e
        for e in idx["checkpoints"]
        if isinstance(e, dict)
        and isinstance(e.get("name"), str)
        and NAME_RE.fullmatch(e["name"])
        and isinstance(e.get("step"), int)
        and isinstance(e.get("run_id"), str)
    ]
    return good, None if len(good) == len(idx["checkpoints"]) else f"{p} has malformed entries (ignored)"


def _write_index(d: str, entries: List[Dict[str, Any]]) -> None:
    atomic_write_json(os.path.join(d, INDEX), {"format": INDEX_FORMAT, "checkpoints": entries})


def record_checkpoint(run_dir: str, name: str, step: int, run_id: str, keep: int) -> List[str]:
    """After ``checkpoints/name`` is in place: list it in ``index.json``, point ``latest`` at it, and
    delete this run's checkpoints beyond the newest ``keep`` (only ones the index lists for
    ``run_id``). Returns the deleted paths."""
    d = _ckpt_dir(run_dir)
    entries, _ = _read_index(d)
    entries = [e for e in entries if e["name"] != name] + [{"name": name, "step": step, "run_id": run_id}]
    _write_index(d, entries)
    atomic_write_bytes(os.path.join(d, "latest"), lambda f: f.write(name.encode()))
    mine = sorted((e for e in entries if e["run_id"] == run_id), key=lambda e: e["step"])
    drop = [e for e in mine[:-keep] if e["name"] != name] if keep > 0 else []
    removed = []
    for e in drop:
        p = os.path.join(d, e["name"])
        if os.path.lexists(p) and not os.path.islink(p):
            _remove(p)
            removed.append(p)
    if drop:
        names = {e["name"] for e in drop}
        _write_index(d, [e for e in entries if e["name"] not in names])
    return removed


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint ``latest`` names in ``run_dir`` (None when the run has none). Raises
    :class:`CheckpointDamagedError` when ``latest`` names anything but an existing checkpoint of
    this directory."""
    d = _ckpt_dir(run_dir)
    p = os.path.join(d, "latest")
    if not os.path.lexists(p):
        return None
    try:
        with open(p, "rb") as f:
            name = f.read(256).decode().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointDamagedError(f"{p} is unreadable ({e})") from None
    return _check_name(d, name, p)


def checkpoint_candidates(run_dir: str) -> Tuple[List[str], List[str]]:
    """(paths, problems): the run's checkpoints to try, newest first -- ``latest``'s, then the others
    ``index.json`` lists by step -- and why any listed one cannot be used."""
    d = _ckpt_dir(run_dir)
    out: List[str] = []
    problems: List[str] = []
    try:
        p = latest_checkpoint(run_dir)
        if p is not None:
            out.append(p)
    except CheckpointDamagedError as e:
        problems.append(str(e))
    entries, bad = _read_index(d)
    if bad:
        problems.append(bad)
    for e in sorted(entries, key=lambda e: -e["step"]):
        try:
            p = _check_name(d, e["name"], os.path.join(d, INDEX))
        except CheckpointDamagedError as err:
            problems.append(str(err))
            continue
        if p not in out:
            out.append(p)
    return out, problems


def find_good_checkpoint(run_dir: str, load: Callable[[str], Any], log: Optional[Callable] = None) -> Tuple[str, Any]:
    """Try the run's checkpoints newest first with ``load(path)``; a damaged one
    (:class:`CheckpointDamagedError`) is reported through ``log`` and the previous one is tried.
    Returns (path, load's result); raises when none is usable. Other errors (an incompatible
    checkpoint) propagate."""
    paths, problems = checkpoint_candidates(run_dir)
    for pr in problems:
        if log:
            log(f"resume: {pr}; falling back to an earlier checkpoint")
    for path in paths:
        try:
            return path, load(path)
        except CheckpointDamagedError as e:
            problems.append(str(e))
            if log:
                log(f"{e}; falling back to an earlier checkpoint")
    if not paths and not problems:
        raise TrainCheckpointError(f"resume: {run_dir!r} has no checkpoints/latest (no checkpoint written yet)")
    raise CheckpointDamagedError(f"resume: no usable checkpoint in {run_dir!r}: " + " | ".join(problems))


# ------------------------------------------------------------------------------------------------
# single-file checkpoints


def save_training_checkpoint(
    run_dir: str, step: int, state: Dict[str, Any], keep: int = 2, run_id: Optional[str] = None
) -> str:
    """Write ``state`` (plus format/version/step/run id and checksums) as
    ``checkpoints/step-XXXXXXXX.pt``; update ``index.json`` and ``latest``; delete this run's
    checkpoints beyond the newest ``keep``. Returns the path."""
    run_id = run_id or (read_run_info(run_dir) or {}).get("run_id") or new_run_id()
    d = _ckpt_dir(run_dir)
    os.makedirs(d, exist_ok=True)
    name = checkpoint_name(step)
    path = os.path.join(d, name)
    payload = {"format": FORMAT, "version": VERSION, "step": step, "run_id": run_id, **state}
    payload["checksums"] = tree_checksums(payload)
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    record_checkpoint(run_dir, name, step, run_id, keep)
    return path


REQUIRED = ("model", "optimizer", "scheduler", "rng", "data", "model_config", "train_config")


def read_checkpoint_file(path: str, map_location="cpu", required=REQUIRED) -> Dict[str, Any]:
    """Load and verify one checkpoint file (format, version, checksums, required fields)."""
    if not os.path.isfile(path):
        raise CheckpointDamagedError(f"resume: checkpoint {path!r} does not exist")
    try:
        st = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickle errors
        raise CheckpointDamagedError(
            f"resume: checkpoint {path!r} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not isinstance(st, dict) or st.get("format") != FORMAT:
        raise CheckpointDamagedError(
            f"resume: {path!r} is not a unif2ace training checkpoint (format "
            f"{st.get('format') if isinstance(st, dict) else type(st).__name__!r})"
        )
    if st.get("version") != VERSION:
        old = " (version 1 checkpoints have no checksums; retrain or use an older unif2ace)"
        raise TrainCheckpointError(
            f"resume: {path!r} has version {st.get('version')!r}, this trainer reads {VERSION}"
            + (old if st.get("version") == 1 else "")
        )
    stored = st.pop("checksums", None)
    verify_checksums(st, stored, f"resume: checkpoint {path!r}")
    missing = [k for k in required if k not in st]
    if missing:
        raise TrainCheckpointError(f"resume: {path!r} lacks {missing}")
    st["path"] = path
    return st


def load_training_checkpoint(path: str, map_location="cpu", log: Optional[Callable] = None) -> Dict[str, Any]:
    """Read a checkpoint file, or a run directory's newest good one (falling back past damaged
    ones, reported through ``log``); errors say which file and why."""
    if os.path.isdir(path) and not NAME_RE.fullmatch(os.path.basename(os.path.normpath(path))):

        def load(p):
            if os.path.isdir(p):
                raise TrainCheckpointError(f"resume: {p!r} is a sharded (--fsdp) checkpoint; resume it with --fsdp")
            return read_checkpoint_file(p, map_location)

        return find_good_checkpoint(path, load, log)[1]
    if os.path.isdir(path):
        raise TrainCheckpointError(f"resume: {path!r} is a sharded (--fsdp) checkpoint; resume it with --fsdp")
    if not os.path.exists(path):
        raise TrainCheckpointError(f"resume: checkpoint {path!r} does not exist")
    return read_checkpoint_file(path, map_location)


def check_compatible(st: Dict[str, Any], want: Dict[str, Any], fields: List[str]) -> None:
    """Raise naming every field where the checkpoint's training config differs from ``want``."""
    have = st["train_config"]
    diff = [f"{f}: checkpoint {have.get(f)!r} vs now {want.get(f)!r}" for f in fields if have.get(f) != want.get(f)]
    if diff:
        raise TrainCheckpointError(f"resume: {st['path']!r} is incompatible with this run: " + "; ".join(diff))
