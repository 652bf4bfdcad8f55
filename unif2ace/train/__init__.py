"""Training: the trainer, atomic checkpoints, the CLI commands and the demo."""

from .config import DEMO_MODEL_OVERRIDES, TrainConfig
from .trainer import Trainer, train

__all__ = ["TrainConfig", "DEMO_MODEL_OVERRIDES", "Trainer", "train"]
