"""The training loop: AdamW, warmup + cosine, gradient clipping and accumulation, bf16 autocast on
GPU, DDP or FSDP2 (``fsdp=True``) under ``torchrun`` (gloo on CPU, nccl on CUDA), JSONL metrics +
loss-curve PNG, atomic checksummed checkpoints and exact resume, and the run-directory rules of
:mod:`unif2ace.train.checkpoint` (no run starts over another one).

Determinism: every sample's randomness (D3Diff masking, caption dropout, the Noise expert's
features) comes from a generator keyed by (seed, step, position in the global batch), and the data
order is a pure function of (seed, step) (:class:`unif2ace.data.shards.EpochSampler`). So a resumed
run sees exactly the batches an uninterrupted run sees, and any split of the global batch over
processes and accumulation steps sees the same samples (``world_size x grad_accum`` may change
the gradient only by the per-micro-batch loss normalisation and float reduction order).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import fields
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from unif2ace.model import Batch, UniF2ace, collate

from .checkpoint import (
    RunDirectoryError,
    TrainCheckpointError,
    check_compatible,
    checkpoint_candidates,
    clean_stale_temps,
    load_training_checkpoint,
    new_run_id,
    prepare_run_dir,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
    write_run_info,
)
from .config import TrainConfig

__all__ = ["Trainer", "train", "make_batch", "lr_lambda"]

# training-config fields a resumed run must share with its checkpoint
RESUME_FIELDS = [
    "preset",
    "model",
    "data",
    "synthetic_images",
    "steps",
    "batch_size",
    "grad_accum",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "betas",
    "grad_clip",
    "seed",
    "world_size",
    "fsdp",
]
# an FSDP2 checkpoint resumes on any number of processes: only the global batch must stay
FSDP_FREE_FIELDS = ("world_size", "batch_size", "grad_accum")


def lr_lambda(cfg: TrainConfig):
    W, T, lo = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < W:
            return (step + 1) / W
        p = min(1.0, (step - W) / max(1, T - W))
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def make_batch(mcfg, samples, keys: List[int], device) -> Batch:
    """Collate each sample with its own generator (seeded by ``keys[i]``) and stack: the batch is the
    same whichever way a global batch is split. Noise-expert features are drawn from the same generators."""
    parts = []
    for s, k in zip(samples, keys):
        g = torch.Generator().manual_seed(int(k))
        b = collate(mcfg, [s], generator=g)
        b.noise_features = torch.randn(1, mcfg.noise_tokens, mcfg.noise_dim, generator=g)
        parts.append(b)
    out = {}
    for f in fields(Batch):
        vals = [getattr(p, f.name) for p in parts]
        have = next((v for v in vals if v is not None), None)  # optional features: zeros = missing
        out[f.name] = None if have is None else torch.cat([torch.zeros_like(have) if v is None else v for v in vals])
    return Batch(**out).to(device)


def init_image_embeddings_from_codebook(model, dataset, seed: int) -> None:
    """``TrainConfig.image_embedding_init = "codebook"``: each image code's input embedding and LM-head
    row become a fixed random projection (seeded by ``seed``) of the code's patch pixels, centred over
    the codebook and scaled to std 0.02 (the embedding's init scale); codes that look alike start
    alike. Needs the data set's patch VQ (``dataset.meta``: the synthetic set carries one)."""
    from unif2ace.data.synthetic import vq_from_meta

    vq = vq_from_meta(getattr(dataset, "meta", None))
    if vq is None:
        raise ValueError(
            "TrainConfig: field 'image_embedding_init' is 'codebook' but the data set carries no patch VQ "
            "(only the synthetic set does); use 'random'"
        )
    cfg = model.cfg
    if vq.num_codes != cfg.codebook_size:
        raise ValueError(
            f"TrainConfig: image_embedding_init='codebook': the data's VQ has {vq.num_codes} codes, "
            f"the model's codebook_size is {cfg.codebook_size}"
        )
    x = torch.from_numpy(np.asarray(vq.codebook)).double().reshape(vq.num_codes, -1) / 255.0
    x = x - x.mean(0)
    g = torch.Generator().manual_seed(seed)
    e = x @ torch.randn(x.shape[1], cfg.hidden_size, generator=g, dtype=torch.float64)
    e = (e / e.std() * 0.02).float()
    lo = cfg.image_token_offset
    with torch.no_grad():
        for w in (model.embed.weight, model.lm_head.weight):
            w[lo : lo + vq.num_codes] = e.to(w.device, w.dtype)


def _sample_key(seed: int, step: int, k: int) -> int:
    return (seed * 1_000_003 + step * 8191 + k * 131) % (2**62) + 1


def resolve_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a device that exists here, or a ValueError saying why not."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"train: --device {name} needs a CUDA GPU, but {why}; use --device cpu (or auto)")
    if name == "cuda":
        if world > 1:
            name = f"cuda:{local_rank}"
        else:
            return torch.device("cuda")
    idx = int(name.split(":", 1)[1])
    if idx >= n:
        raise ValueError(
            f"train: device {name} does not exist: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})"
        )
    return torch.device(name)


class Trainer:
    """One training run. ``resume``: a checkpoint (file, or sharded directory with ``fsdp``), a run
    directory (its newest good checkpoint), or ``"auto"`` (``cfg.out``'s newest good checkpoint;
    a fresh start when it has none). ``overwrite``: replace the run in a non-empty ``cfg.out``
    (deleting only the files a run writes). Without either, a non-empty ``cfg.out`` is refused."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume: Optional[str] = None,
        dataset=None,
        log=print,
        *,
        overwrite: bool = False,
        origin: str = "train",
    ):
        from unif2ace.kernels import backend_usable

        self.cfg = cfg.validate()
        self.log = log
        self.origin = origin
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(cfg.device, self.local_rank, self.world)
        if cfg.backend not in ("auto", "reference"):
            ok, why = backend_usable(cfg.backend, self.device)
            if not ok:
                raise ValueError(f"train: backend {cfg.backend!r} cannot run on {self.device.type}: {why}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._own_pg = False
        if (self.world > 1 or cfg.fsdp) and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.world > 1:
                dist.init_process_group(backend)
            else:  # --fsdp in one process (no torchrun): a one-member group
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_pg = True
        try:
            self._setup(cfg, resume, dataset, overwrite)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: TrainConfig, resume: Optional[str], dataset, overwrite: bool) -> None:
        from unif2ace.data.shards import EpochSampler, TokenDataset

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.mcfg = cfg.model_config()
        # data
        if dataset is None:
            path = cfg.data
            if path == "synthetic":
                from unif2ace.data.synthetic import SyntheticSpec, build_synthetic

                path = self._rank0_first(
                    lambda: build_synthetic(
                        SyntheticSpec(num_images=cfg.synthetic_images, num_codes=self.mcfg.codebook_size),
                        verbose=self.rank == 0,
                    )
                )
            dataset = TokenDataset(path)
        self.data = dataset
        self.data.check_config(self.mcfg)
        gb = cfg.global_batch * self.world
        self.sampler = EpochSampler(len(self.data), gb, seed=cfg.seed)
        # model and optimisation
        torch.manual_seed(cfg.seed)
        self.model = UniF2ace(self.mcfg).to(self.device)
        if cfg.image_embedding_init == "codebook":
            init_image_embeddings_from_codebook(self.model, self.data, cfg.seed)
        self.model.set_backend(cfg.backend)
        # parameter groups by name before sharding (FSDP2 keeps the names, the parameters become DTensors)
        no_decay_names = {
            n
            for n, p in self.model.named_parameters()
            if not (p.dim() >= 2 and "embed" not in n and "image_pos" not in n)
        }
        if cfg.fsdp:
            from .fsdp import shard_model

            # bf16 compute with fp32 gradient reduction on GPU; CPU stays fp32
            shard_model(self.model, self.device, bf16=self.amp and self.device.type == "cuda")
        decay = [p for n, p in self.model.named_parameters() if n not in no_decay_names]
        no_decay = [p for n, p in self.model.named_parameters() if n in no_decay_names]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step = 0
        # the run directory and the checkpoint to resume from
        st = self._find_resume(resume)
        self.run_id = self._check_run_dir(
            resuming=resume is not None, checkpoint_run_id=st.get("run_id") if st else None, overwrite=overwrite
        )
        if st is not None:
            self._resume(st)
        self.ddp = None
        if self.world > 1 and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # experts a micro-batch does not route to get no gradient, hence find_unused_parameters
            self.ddp = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        self.forward = self.model
        if cfg.compile:
            if self.world > 1 or cfg.fsdp:
                raise ValueError("train: compile=true runs in one process without --fsdp")
            # one graph for the whole forward (the backward follows from it); batches are validated
            # before the call (validation reads values: a host sync the graph must not hold)
            self.forward = torch.compile(self.model, fullgraph=True)

    # -- collectives helpers
    def _collective(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _from_rank0(self, fn):
        """Run ``fn`` on rank 0 and hand its result (or its exception) to every rank."""
        res, err = None, None
        if self.rank == 0:
            try:
                res = fn()
            except Exception as e:
                err = e
        if self._collective():
            box = [(res, err)]
            dist.broadcast_object_list(box, src=0)
            res, err = box[0]
        if err is not None:
            raise err
        return res

    def _find_resume(self, resume: Optional[str]) -> Optional[Dict[str, Any]]:
        """The verified checkpoint state to resume from (model/optimizer tensors excluded for sharded
        checkpoints), or None for a fresh start."""
        if resume is None:
            return None
        log = self.log if self.rank == 0 else None
        if resume == "auto":
            resume = self.cfg.out
            paths, problems = checkpoint_candidates(resume) if os.path.isdir(resume) else ([], [])
            if not paths and not problems:
                if self.rank == 0:
                    self.log(f"train: no checkpoint in {resume}, starting fresh")
                return None
        if self.cfg.fsdp:
            from .fsdp import resolve_sharded

            return self._from_rank0(lambda: resolve_sharded(resume, log))
        return load_training_checkpoint(resume, map_location="cpu", log=log)

    def _check_run_dir(self, *, resuming: bool, checkpoint_run_id: Optional[str], overwrite: bool) -> str:
        """Apply the run-directory rules on rank 0 (clearing on ``overwrite``, removing stale temporaries);
        returns this run's id (the directory's or the checkpoint's when continuing, else a new one)."""
        out = self.cfg.out

        def check():
            if os.path.exists(out) and not os.path.isdir(out):
                raise RunDirectoryError(f"train: --out {out!r} is a file, not a directory")
            have = prepare_run_dir(out, resuming=resuming, checkpoint_run_id=checkpoint_run_id, overwrite=overwrite)
            removed = clean_stale_temps(out)
            if removed:
                self.log(f"train: removed {len(removed)} temporary file(s) of interrupted writes in {out}")
            return have or checkpoint_run_id or new_run_id()

        try:
            return self._from_rank0(check)
        except RunDirectoryError as e:
            raise RunDirectoryError(f"train: {e}") from None

    def _ensure_run_dir(self) -> None:
        if self.rank == 0:
            write_run_info(self.cfg.out, self.run_id, self.origin)

    def close(self) -> None:
        """Tear down the process group this trainer created for a one-process ``fsdp`` run."""
        if self._own_pg and self.world == 1 and dist.is_initialized():
            dist.destroy_process_group()
            self._own_pg = False

    def _rank0_first(self, fn):
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.rank == 0:
            out = fn()
        if self.world > 1:
            dist.barrier()
        if self.rank != 0:
            out = fn()
        return out

    def train_config_dict(self) -> Dict[str, Any]:
        d = self.cfg.to_dict()
        d["world_size"] = self.world
        return d

    def _resume(self, st: Dict[str, Any]):
        if st["model_config"] != self.mcfg.to_json():
            old = json.loads(st["model_config"])
            new = json.loads(self.mcfg.to_json())
            diff = [
                f"{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
            raise TrainCheckpointError(
                f"resume: {st['path']!r} was trained with a different model config: " + "; ".join(diff)
            )
        if bool(st["train_config"].get("fsdp")) != bool(self.cfg.fsdp):
            raise TrainCheckpointError(
                f"resume: {st['path']!r} was written {'with' if st['train_config'].get('fsdp') else 'without'} "
                f"--fsdp; resume it {'with' if st['train_config'].get('fsdp') else 'without'} --fsdp"
            )
        fields = [f for f in RESUME_FIELDS if not (self.cfg.fsdp and f in FSDP_FREE_FIELDS)]
        check_compatible(st, self.train_config_dict(), fields)
        want = {"num_records": len(self.data), "global_batch": self.sampler.gb}
        got = {k: st["data"].get(k) for k in want}
        if got != want:
            raise TrainCheckpointError(f"resume: {st['path']!r} was trained on data with {got}, this run has {want}")
        try:
            if self.cfg.fsdp:
                from .fsdp import load_sharded

                load_sharded(st["path"], self.model, self.opt)
            else:
                self.model.load_state_dict(st["model"])
                self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            if isinstance(e, TrainCheckpointError):
                raise
            raise TrainCheckpointError(f"resume: {st['path']!r} does not fit this model/optimizer: {e}") from None
        set_rng_state(st["rng"])
        self.step = int(st["step"])
        if self.rank == 0:
            self.log(f"resumed from {st['path']} at step {self.step}")

    def checkpoint_state(self) -> Dict[str, Any]:
        """Everything but the model/optimizer tensors for sharded checkpoints (those go through DCP)."""
        st = {} if self.cfg.fsdp else {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        return {
            **st,
            "scheduler": self.sched.state_dict(),
            "rng": rng_state(),
            "data": {
                **self.sampler.position(self.step),
                "num_records": len(self.data),
                "global_batch": self.sampler.gb,
                "seed": self.cfg.seed,
            },
            "model_config": self.mcfg.to_json(),
            "train_config": self.train_config_dict(),
        }

    def save(self) -> Optional[str]:
        """Write a checkpoint of the current step (collective under FSDP; rank 0 writes otherwise)."""
        self._ensure_run_dir()
        if self.cfg.fsdp:
            from .fsdp import save_sharded

            return save_sharded(
                self.cfg.out,
                self.step,
                self.model,
                self.opt,
                self.checkpoint_state(),
                keep=self.cfg.keep_checkpoints,
                run_id=self.run_id,
            )
        if self.rank != 0:
            return None
        return save_training_checkpoint(
            self.cfg.out, self.step, self.checkpoint_state(), keep=self.cfg.keep_checkpoints, run_id=self.run_id
        )

    def _truncate_metrics(self):
        from .checkpoint import atomic_write_bytes

        if not os.path.exists(self.metrics_path):
            return
        keep = []
        with open(self.metrics_path) as f:
            for ln in f:
                try:
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step:
                        keep.append(ln if ln.endswith("\n") else ln + "\n")
                except ValueError:  # a line cut by a killed run
                    pass
        atomic_write_bytes(self.metrics_path, lambda f: f.write("".join(keep).encode()))

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over this rank's share of the global batch. Returns the metrics."""
        cfg, step = self.cfg, self.step
        k0, idx = self.sampler.rank_slice(step, self.rank, self.world)
        model = self.ddp or self.model
        model.train()
        sums = torch.zeros(6, dtype=torch.float64)
        ntok = 0
        bs = cfg.batch_size
        for a in range(cfg.grad_accum):
            sel = idx[a * bs : (a + 1) * bs]
            keys = [_sample_key(cfg.seed, step, k0 + a * bs + j) for j in range(len(sel))]
            batch = make_batch(self.mcfg, [self.data[int(i)] for i in sel], keys, self.device)
            ntok += int(batch.valid.sum())
            last = a == cfg.grad_accum - 1
            if self.cfg.fsdp:
                self.model.set_requires_gradient_sync(last)
            ctx = model.no_sync() if (self.ddp is not None and not last) else _null()
            with ctx:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    if self.ddp is None:
                        out = self.forward(batch.validate(self.mcfg), validate=False)
                    else:
                        out = model(batch)
                (out.loss / cfg.grad_accum).backward()
            sums += torch.tensor(
                [
                    out.loss.item(),
                    out.mmu_loss.item(),
                    out.d3diff_loss.item(),
                    out.mask_loss.item(),
                    out.score_loss.item(),
                    (out.token_balance.sum() + out.seq_balance.sum()).item(),
                ],
                dtype=torch.float64,
            )
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        sums /= cfg.grad_accum
        stats = torch.cat([sums, torch.tensor([float(ntok)], dtype=torch.float64)])
        if self.world > 1:
            dist.all_reduce(stats)
            stats[:6] /= self.world
        self.step += 1
        names = ["loss", "mmu_loss", "d3diff_loss", "mask_loss", "score_loss", "balance"]
        rec = {
            "step": self.step,
            **{n: float(v) for n, v in zip(names, stats[:6])},
            "lr": lr,
            "grad_norm": float(gnorm),
            "tokens": int(stats[6]),
        }
        return rec

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self._ensure_run_dir()
        if self.rank == 0:
            with open(os.path.join(cfg.out, "train_config.json"), "w") as f:
                json.dump(self.train_config_dict(), f, indent=1)
            with open(os.path.join(cfg.out, "data.json"), "w") as f:
                json.dump(
                    {"path": os.path.abspath(self.data.path), "num_records": len(self.data), "meta": self.data.meta},
                    f,
                    indent=1,
                )
            self._truncate_metrics()
        bar = None
        if self.rank == 0 and cfg.progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                bar = None
        t_start = time.perf_counter()
        tok_window, t_window = 0, time.perf_counter()
        history: List[Dict[str, Any]] = []
        stopped_early = False
        metrics = open(self.metrics_path, "a") if self.rank == 0 else None
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                rec = self.train_step()
                dt = time.perf_counter() - t0
                rec["step_time"] = dt
                rec["tokens_per_s"] = rec["tokens"] / dt
                tok_window += rec["tokens"]
                history.append(rec)
                if not all(math.isfinite(rec[k]) for k in ("loss", "grad_norm")):
                    raise FloatingPointError(f"train: non-finite loss/grad at step {self.step}: {rec}")
                if metrics is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps or self.step == 1):
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                if bar is not None:
                    now = time.perf_counter()
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.3f}",
                        mmu=f"{rec['mmu_loss']:.3f}",
                        d3=f"{rec['d3diff_loss']:.3f}",
                        tok_s=f"{tok_window / max(now - t_window, 1e-9):.0f}",
                        refresh=False,
                    )
                    if now - t_window > 5:
                        tok_window, t_window = 0, now
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
                if cfg.max_minutes and (time.perf_counter() - t_start) > 60 * cfg.max_minutes and self.step < cfg.steps:
                    stopped_early = True
                    self.save()
                    break
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
        wall = time.perf_counter() - t_start
        export = self.model
        if cfg.fsdp:
            from .fsdp import full_model_state

            full = full_model_state(self.model)  # collective
            if self.rank == 0:
                export = UniF2ace(self.mcfg)
                export.load_state_dict(full)
        if self.rank == 0:
            from unif2ace.model import save_checkpoint

            from .checkpoint import fsync_dir

            tmp = os.path.join(cfg.out, ".model.safetensors.tmp")
            try:
                save_checkpoint(export, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(cfg.out, "model.safetensors"))
                fsync_dir(cfg.out)
            except ImportError as e:  # safetensors is optional: the training checkpoint has the weights too
                self.log(f"train: not writing model.safetensors ({e})")
            write_loss_curve(self.metrics_path, os.path.join(cfg.out, "loss_curve.png"))
        steps_done = len(history)
        return {
            "steps": self.step,
            "steps_this_run": steps_done,
            "wall_s": wall,
            "stopped_early": stopped_early,
            "tokens_per_s": sum(r["tokens"] for r in history) / max(sum(r["step_time"] for r in history), 1e-9),
            "final_loss": history[-1]["loss"] if history else None,
            "history": history,
        }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def write_loss_curve(metrics_path: str, png_path: str) -> None:
    from unif2ace.data.png import plot_curves

    recs = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            recs = [json.loads(ln) for ln in f if ln.strip()]
    plot_curves(
        png_path,
        {k: [r[k] for r in recs] for k in ("loss", "mmu_loss", "d3diff_loss", "mask_loss")},
        x=[r["step"] for r in recs],
    )


def train(cfg: TrainConfig, resume: Optional[str] = None, log=print, *, overwrite: bool = False) -> Dict[str, Any]:
    """Build a :class:`Trainer` and run it; returns the run summary (see :class:`Trainer` for
    ``resume`` and ``overwrite``)."""
    tr = Trainer(cfg, resume=resume, log=log, overwrite=overwrite)
    try:
        return tr.run()
    finally:
        tr.close()
