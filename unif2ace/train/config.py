"""Training configuration: one dataclass, loadable from a JSON file, validated with errors naming the field."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict

from unif2ace.model.config import require_int_field

__all__ = ["TrainConfig", "DEMO_MODEL_OVERRIDES"]

# The tiny preset with room for the synthetic set's captions (<= 25 words); 512 image codes, so the
# synthetic set's patch VQ is lossless (< 300 distinct patches: decoder ceiling 100%, 95.6% at 64
# codes); a learned image position embedding (the 2-layer model cannot place a [MASK] token from
# rotary positions alone: +12 points of generated-attribute accuracy at 300 steps); and a smaller
# score-entropy weight: with alpha = 0.01 the score term (~400 per sample early on) dominates the
# clipped gradient and the mask CE learns slower in a few-minute CPU budget. Generation: no
# classifier-free guidance and greedy tokens (the confidence noise still orders the unmasking):
# +3 points of attribute accuracy over guidance 1.75 at temperature 1. Ablations: README.md.
DEMO_MODEL_OVERRIDES = {
    "text_len": 32,
    "alpha": 0.001,
    "codebook_size": 512,
    "image_pos_embedding": True,
    "guidance_scale": 0.0,
    "temperature": 0.0,
}


@dataclass
class TrainConfig:
    preset: str = "tiny"
    model: Dict[str, Any] = field(default_factory=lambda: dict(DEMO_MODEL_OVERRIDES))  # config field overrides
    data: str = "synthetic"  # "synthetic" (built-in, built and cached on first use) or a shard directory
    synthetic_images: int = 6000
    out: str = "out/train"
    steps: int = 1000
    batch_size: int = 32  # micro-batch per process
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    backend: str = "auto"  # model.set_backend: "auto" (fused ops) | "reference" | a backend name
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    amp: str = "auto"  # "auto" -> bf16 autocast on CUDA only | "bf16" | "none"
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    max_minutes: float = 0.0  # > 0: stop (with a checkpoint) after this wall time
    progress: bool = True
    threads: int = 0  # > 0: torch.set_num_threads
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP; sharded torch.distributed.checkpoint checkpoints
    # torch.compile(fullgraph=True) the model's forward (one process). Off by default: on the demo config (CPU)
    # a compiled step takes ~4% less CPU time than eager, which does not pay back the compile (README.md, Demo recipe)
    compile: bool = False
    # "random" (the model's init) | "codebook": each image code's input embedding and LM-head row start as a
    # fixed random projection of the code's patch pixels (the data set's patch VQ: the synthetic set), so codes
    # that look alike start alike (the demo: +7 points of generated-attribute accuracy at 1200 steps)
    image_embedding_init: str = "random"

    def validate(self) -> "TrainConfig":
        c = "TrainConfig"
        for f in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "ckpt_every",
            "keep_checkpoints",
            "synthetic_images",
        ):
            require_int_field(self, c, f, 1)
        for f in ("warmup_steps", "seed", "threads"):
            require_int_field(self, c, f, 0)
        for f, lo in (("lr", 0.0), ("grad_clip", 0.0)):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not v > lo:
                raise ValueError(f"{c}: field '{f}' must be a number > {lo}, got {v!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"{c}: field 'weight_decay' must be a number >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{c}: field 'min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio!r}")
        if not isinstance(self.max_minutes, (int, float)) or self.max_minutes < 0:
            raise ValueError(f"{c}: field 'max_minutes' must be a number >= 0, got {self.max_minutes!r}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{c}: field 'betas' must be two numbers in [0, 1), got {self.betas!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"{c}: field 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for f in ("fsdp", "progress", "compile"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{c}: field '{f}' must be true or false, got {getattr(self, f)!r}")
        if self.image_embedding_init not in ("random", "codebook"):
            raise ValueError(
                f"{c}: field 'image_embedding_init' must be 'random' or 'codebook', got {self.image_embedding_init!r}"
            )
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"{c}: field 'amp' must be 'auto', 'bf16' or 'none', got {self.amp!r}")
        from unif2ace.kernels import BACKENDS
        from unif2ace.model import PRESETS

        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"{c}: field 'backend' must be 'auto' or one of {list(BACKENDS)}, got {self.backend!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"{c}: field 'preset' must be one of {list(PRESETS)}, got {self.preset!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"{c}: field 'model' must be a dict of UniF2aceConfig field overrides, got {self.model!r}")
        self.model_config()  # validates the overrides (UniF2aceConfig names the bad field)
        return self

    def model_config(self):
        from unif2ace.model import UniF2aceConfig, preset

        known = {f.name for f in dataclasses.fields(UniF2aceConfig)}
        unknown = sorted(set(self.model) - known)
        if unknown:
            raise ValueError(f"TrainConfig: field 'model' has unknown UniF2aceConfig fields {unknown}")
        return preset(self.preset, **self.model)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "config") -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig: {where} must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: {where} has unknown fields {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**d).validate()
        except TypeError as e:  # a value of the wrong type (e.g. "betas": 5) fails a comparison
            raise ValueError(f"TrainConfig: {where} has a value of the wrong type: {e}") from None

    @staticmethod
    def read_file(path: str) -> Dict[str, Any]:
        """The JSON object of a config file (errors name the file)."""
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError as e:
            raise ValueError(f"TrainConfig: cannot read config file {path!r}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"TrainConfig: config file {path!r} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig: config file {path!r} must hold a JSON object")
        return d

    @classmethod
    def from_file(cls, path: str, **overrides) -> "TrainConfig":
        d = cls.read_file(path)
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d, where=f"config file {path!r}")
