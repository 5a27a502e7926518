"""The training loop, its configuration, optimizer and checkpoints."""

from mstok.storage.layout import latest_checkpoint
from mstok.training.checkpoint import load_checkpoint, save_checkpoint
from mstok.training.config import (
    GeneratorTrainConfig,
    RunConfig,
    TrainConfig,
    load_train_config,
    train_config_from_dict,
)
from mstok.training.engine import Engine
from mstok.training.trainer import Trainer

__all__ = [
    "Engine",
    "GeneratorTrainConfig",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "latest_checkpoint",
    "load_checkpoint",
    "load_train_config",
    "save_checkpoint",
    "train_config_from_dict",
]
