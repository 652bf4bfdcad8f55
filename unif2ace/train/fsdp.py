"""FSDP2 training: parameter/gradient/optimizer sharding with ``fully_shard`` and sharded,
checksummed, atomic checkpoints with ``torch.distributed.checkpoint`` (DCP).

- :func:`shard_model`: ``fully_shard`` on every transformer block, then on the root (embedding,
  final norm and LM head); with ``bf16`` (GPU) a ``MixedPrecisionPolicy`` computes in bf16 and
  reduces gradients in fp32. Parameters, gradients and AdamW state live as 1/world shards (DTensors).
- :func:`save_sharded`: every rank writes its shards into ``checkpoints/.step-N.tmp/`` with DCP
  (files fsynced); rank 0 adds ``train_state.pt`` (scheduler, RNG, data position, configs; with
  its own checksums) and ``checksums.json`` (SHA-256 of every file), then renames the directory to
  ``checkpoints/step-N`` and updates ``index.json`` / ``latest``. A save killed at any point leaves
  the previous checkpoint and pointer untouched; the temporary directory is removed at the next start.
- :func:`load_sharded`: DCP reads the shards this process needs under the *current* world size (the
  checkpoint stores global tensor metadata), so a run saved on N processes resumes on M.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist

from .checkpoint import (
    FORMAT,
    VERSION,
    CheckpointDamagedError,
    TrainCheckpointError,
    _ckpt_dir,
    _remove,
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_name,
    file_sha256,
    find_good_checkpoint,
    fsync_dir,
    read_checkpoint_file,
    record_checkpoint,
    tree_checksums,
)

__all__ = ["shard_model", "save_sharded", "verify_sharded", "load_sharded", "full_model_state", "resolve_sharded"]

STATE_FILE = "train_state.pt"
SUMS_FILE = "checksums.json"
# what train_state.pt must hold (model and optimizer are in the DCP shards)
REQUIRED = ("scheduler", "rng", "data", "model_config", "train_config")


def shard_model(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Shard ``model`` (a :class:`unif2ace.model.UniF2ace`) in place over the default process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _state_dicts(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, opt)


def save_sharded(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    extras: Dict[str, Any],
    *,
    keep: int,
    run_id: str,
) -> Optional[str]:
    """Collective: write checkpoint ``checkpoints/step-N`` (see the module docstring). Returns its path on rank 0."""
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    d = _ckpt_dir(run_dir)
    name = checkpoint_name(step, sharded=True)
    final, tmp = os.path.join(d, name), os.path.join(d, f".{name}.tmp")
    if rank == 0:
        os.makedirs(d, exist_ok=True)
        _remove(tmp)
        os.makedirs(tmp)
    dist.barrier()
    msd, osd = _state_dicts(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)  # FileSystemWriter fsyncs every file
    if rank == 0:
        payload = {"format": FORMAT, "version": VERSION, "step": step, "run_id": run_id, "sharded": True, **extras}
        payload["checksums"] = tree_checksums(payload)
        atomic_write_bytes(os.path.join(tmp, STATE_FILE), lambda f: torch.save(payload, f))
        files = sorted(n for n in os.listdir(tmp) if n != SUMS_FILE)
        atomic_write_json(
            os.path.join(tmp, SUMS_FILE),
            {"algorithm": "sha256", "files": {n: file_sha256(os.path.join(tmp, n)) for n in files}},
        )
        fsync_dir(tmp)
        old = None
        if os.path.lexists(final):  # re-saving a step (after a fallback): the old one goes only after the new is in
            old = os.path.join(d, f".{name}.old")
            _remove(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(d)
        if old:
            _remove(old)
        record_checkpoint(run_dir, name, step, run_id, keep)
    dist.barrier()
    return final if rank == 0 else None


def verify_sharded(path: str) -> Dict[str, Any]:
    """Check every file of sharded checkpoint ``path`` against its ``checksums.json`` and load its
    ``train_state.pt`` (verified too). Returns that state. Raises :class:`CheckpointDamagedError`."""
    import json

    if not os.path.isdir(path):
        if os.path.isfile(path):
            raise TrainCheckpointError(
                f"resume: {path!r} is a single-file checkpoint (written without --fsdp); resume it without --fsdp"
            )
        raise CheckpointDamagedError(f"resume: checkpoint {path!r} does not exist")
    sums_path = os.path.join(path, SUMS_FILE)
    try:
        with open(sums_path) as f:
            sums = json.load(f)
        files = sums["files"]
        if sums.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("not a checksum table")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointDamagedError(f"resume: {sums_path!r} is missing or damaged ({e})") from None
    have = sorted(n for n in os.listdir(path) if n != SUMS_FILE)
    problems = []
    if sorted(files) != have:
        missing, extra = sorted(set(files) - set(have)), sorted(set(have) - set(files))
        problems.append(f"files missing {missing}, unexpected {extra}")
    bad = [n for n in sorted(set(files) & set(have)) if file_sha256(os.path.join(path, n)) != files[n]]
    if bad:
        problems.append(f"{len(bad)} file(s) fail their SHA-256 checksum: {', '.join(bad)}")
    if problems:
        raise CheckpointDamagedError(f"resume: sharded checkpoint {path!r} is damaged: " + "; ".join(problems))
    st = read_checkpoint_file(os.path.join(path, STATE_FILE), required=REQUIRED)
    if not st.get("sharded"):
        raise CheckpointDamagedError(f"resume: {path!r}: {STATE_FILE} is not a sharded checkpoint's state")
    st["path"] = path
    return st


def resolve_sharded(path: str, log: Optional[Callable] = None) -> Dict[str, Any]:
    """A sharded checkpoint directory, or a run directory's newest good one (falling back past
    damaged ones): its verified ``train_state``."""
    from .checkpoint import NAME_RE

    base = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path) and not NAME_RE.fullmatch(base):

        def load(p):
            if not os.path.isdir(p):
                raise TrainCheckpointError(
                    f"resume: {p!r} is a single-file checkpoint (written without --fsdp); resume it without --fsdp"
                )
            return verify_sharded(p)

        return find_good_checkpoint(path, load, log)[1]
    if not os.path.exists(path):
        raise TrainCheckpointError(f"resume: checkpoint {path!r} does not exist")
    return verify_sharded(path)


def load_sharded(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Collective: load the model and optimizer shards of checkpoint ``path`` for this world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    msd, osd = _state_dicts(model, opt)
    # get_state_dict gives a fresh optimizer state for every parameter; parameters that never had a
    # gradient have none in the checkpoint and must stay without one (AdamW's step count)
    saved = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    osd["state"] = {fqn: s for fqn, s in osd["state"].items() if all(f"optim.state.{fqn}.{k}" in saved for k in s)}
    sd = {"model": msd, "optim": osd}
    try:
        dcp.load(sd, checkpoint_id=path)
    except Exception as e:  # e.g. a key this model has and the checkpoint lacks
        raise TrainCheckpointError(f"resume: {path!r} does not fit this model/optimizer: {str(e)[:500]}") from None
    set_model_state_dict(model, sd["model"])
    # strict=False: the parameters left out above load without state, as they were saved
    set_optimizer_state_dict(model, opt, sd["optim"], options=StateDictOptions(strict=False))


def full_model_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Collective: the whole (unsharded) model state dict on rank 0, on CPU (empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
