"""The layout of everything mstok writes: model folders, checkpoint folders and run folders.

The one owner of these names; every reader and writer imports them from here::

    <model folder>/                 save_pretrained, mstok convert
        config.json                 {"family": ..., "config": {...}}
        model.safetensors           weights
    <run folder>/                   mstok train --out RUN
        train_config.json           the resolved training config
        checkpoints/
            step_0000500/           a checkpoint folder: a model folder plus
                ema.safetensors     EMA weights (what the loading rule reads first)
                train_state.pt      optimizer, scheduler, step, data position, RNG
                train_config.json   the training config of that step

A checkpoint folder named ``step_*`` is always complete (the trainer writes it under a temporary
name and renames it, :mod:`mstok.training.checkpoint`). :func:`latest_checkpoint` and
:func:`newest_checkpoint` find the newest one.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
WEIGHTS_FILE = MODEL_FILE  # the saved-model format's name for it
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
CHECKPOINTS_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """The name of checkpoint ``step``'s folder, ``step_0000500``."""
    return f"step_{step:07d}"


def step_of(path: Path) -> int:
    """The step number of a ``step_*`` folder."""
    match = STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step_* checkpoint folder")
    return int(match.group(1))


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def newest_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint of a run: under ``folder`` itself (a ``checkpoints/`` folder) or
    under its ``checkpoints/`` (a run folder); None when there is none."""
    folder = Path(folder)
    return latest_checkpoint(folder) or latest_checkpoint(folder / CHECKPOINTS_DIR)
