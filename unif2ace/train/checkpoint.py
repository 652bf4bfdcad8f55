"""Training checkpoints: model + optimizer + scheduler + RNG + data position in one file, written atomically.

A run directory holds ``checkpoints/step-00000200.pt`` files and ``checkpoints/latest`` (the file
name of the newest good checkpoint). :func:`save_training_checkpoint` writes to a temporary file in
the same directory, fsyncs it and ``os.replace``-s it into place, then rewrites ``latest`` the same
way, so a write killed at any point leaves the previous checkpoint and pointer intact. Loading
checks the format and raises :class:`TrainCheckpointError` with the file and the reason (corrupt /
truncated / not a training checkpoint / incompatible fields).
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch

__all__ = [
    "TrainCheckpointError",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
    "atomic_write_bytes",
]

FORMAT = "unif2ace-train"
VERSION = 1


class TrainCheckpointError(ValueError):
    """A training checkpoint is missing, corrupt, or does not match the run resuming from it."""


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
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _ckpt_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save_training_checkpoint(run_dir: str, step: int, state: Dict[str, Any], keep: int = 2) -> str:
    """Write ``state`` (plus format/version/step) as ``checkpoints/step-XXXXXXXX.pt``; update ``latest``;
    delete all but the newest ``keep`` checkpoints. Returns the path."""
    d = _ckpt_dir(run_dir)
    os.makedirs(d, exist_ok=True)
    name = f"step-{step:08d}.pt"
    path = os.path.join(d, name)
    payload = {"format": FORMAT, "version": VERSION, "step": step, **state}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))
    atomic_write_bytes(os.path.join(d, "latest"), lambda f: f.write(name.encode()))
    ckpts = sorted(n for n in os.listdir(d) if n.startswith("step-") and n.endswith(".pt"))
    for old in ckpts[:-keep]:
        if old != name:
            os.remove(os.path.join(d, old))
    return path


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint ``latest`` names in ``run_dir`` (None when the run has none)."""
    p = os.path.join(_ckpt_dir(run_dir), "latest")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        name = f.read().strip()
    path = os.path.join(_ckpt_dir(run_dir), name)
    if not os.path.isfile(path):
        raise TrainCheckpointError(f"{p} names {name!r}, which does not exist")
    return path


def load_training_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint file or run directory (its ``latest``); errors say which file and why."""
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise TrainCheckpointError(f"resume: {path!r} has no checkpoints/latest (no checkpoint written yet)")
        path = found
    if not os.path.isfile(path):
        raise TrainCheckpointError(f"resume: checkpoint {path!r} does not exist")
    try:
        st = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickle errors
        raise TrainCheckpointError(
            f"resume: checkpoint {path!r} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not isinstance(st, dict) or st.get("format") != FORMAT:
        raise TrainCheckpointError(
            f"resume: {path!r} is not a unif2ace training checkpoint (format "
            f"{st.get('format') if isinstance(st, dict) else type(st).__name__!r})"
        )
    if st.get("version") != VERSION:
        raise TrainCheckpointError(f"resume: {path!r} has version {st.get('version')!r}, this trainer reads {VERSION}")
    missing = [
        k for k in ("model", "optimizer", "scheduler", "rng", "data", "model_config", "train_config") if k not in st
    ]
    if missing:
        raise TrainCheckpointError(f"resume: {path!r} lacks {missing}")
    st["path"] = path
    return st


def check_compatible(st: Dict[str, Any], want: Dict[str, Any], fields: List[str]) -> None:
    """Raise naming every field where the checkpoint's training config differs from ``want``."""
    have = st["train_config"]
    diff = [f"{f}: checkpoint {have.get(f)!r} vs now {want.get(f)!r}" for f in fields if have.get(f) != want.get(f)]
    if diff:
        raise TrainCheckpointError(f"resume: {st['path']!r} is incompatible with this run: " + "; ".join(diff))
