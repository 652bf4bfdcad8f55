"""The training loop: AdamW, warmup + cosine, gradient clipping and accumulation, bf16 autocast on
GPU, DDP under ``torchrun`` (gloo on CPU, nccl on CUDA), JSONL metrics + loss-curve PNG, atomic
checkpoints and exact resume.

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

import torch
import torch.distributed as dist

from unif2ace.model import Batch, UniF2ace, collate

from .checkpoint import (
    TrainCheckpointError,
    check_compatible,
    load_training_checkpoint,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
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
]


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


def _sample_key(seed: int, step: int, k: int) -> int:
    return (seed * 1_000_003 + step * 8191 + k * 131) % (2**62) + 1


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: Optional[str] = None, dataset=None, log=print):
        from unif2ace.data.shards import EpochSampler, TokenDataset

        self.cfg = cfg.validate()
        self.log = log
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cuda" and self.world > 1:
            dev = f"cuda:{self.local_rank}"
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
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
        self.model.set_backend(cfg.backend)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step = 0
        if resume:
            self._resume(resume)
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # experts a micro-batch does not route to get no gradient, hence find_unused_parameters
            self.ddp = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        os.makedirs(cfg.out, exist_ok=True)
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")

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

    def _resume(self, path: str):
        st = load_training_checkpoint(path, map_location="cpu")
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
        check_compatible(st, self.train_config_dict(), RESUME_FIELDS)
        want = {"num_records": len(self.data), "global_batch": self.sampler.gb}
        got = {k: st["data"].get(k) for k in want}
        if got != want:
            raise TrainCheckpointError(f"resume: {st['path']!r} was trained on data with {got}, this run has {want}")
        try:
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainCheckpointError(f"resume: {st['path']!r} does not fit this model/optimizer: {e}") from None
        set_rng_state(st["rng"])
        self.step = int(st["step"])
        if self.rank == 0:
            self.log(f"resumed from {st['path']} at step {self.step}")

    def checkpoint_state(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
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
        if self.rank != 0:
            return None
        return save_training_checkpoint(
            self.cfg.out, self.step, self.checkpoint_state(), keep=self.cfg.keep_checkpoints
        )

    def _truncate_metrics(self):
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        with open(self.metrics_path, "w") as f:
            f.writelines(keep)

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
            ctx = model.no_sync() if (self.ddp is not None and not last) else _null()
            with ctx:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
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
        if self.rank == 0:
            from unif2ace.model import save_checkpoint

            tmp = os.path.join(cfg.out, ".model.safetensors.tmp")
            try:
                save_checkpoint(self.model, tmp)
                os.replace(tmp, os.path.join(cfg.out, "model.safetensors"))
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
    plot_curves(png_path, {k: [r[k] for r in recs] for k in ("loss", "mmu_loss", "d3diff_loss", "mask_loss")})


def train(cfg: TrainConfig, resume: Optional[str] = None, log=print) -> Dict[str, Any]:
    """Build a :class:`Trainer` and run it; returns the run summary."""
    return Trainer(cfg, resume=resume, log=log).run()
