"""Training checkpoints: one step-numbered folder each, written atomically.

Layout of ``<out_dir>/checkpoints/step_000500/``::

    config.json           tokenizer config (so ``load_tokenizer`` opens the folder directly)
    model.safetensors     raw weights
    ema.safetensors       EMA weights (``load_tokenizer(dir, weights="ema.safetensors")``)
    train_state.pt        optimizer, scheduler, step, data position, RNG (weights_only-safe)
    train_config.json     the resolved training config

The folder is assembled under a temporary name and renamed into place, so a folder named
``step_*`` is always complete: a crash mid-write leaves only a ``.tmp-*`` folder that
``--resume auto`` ignores and the next save removes.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mstok.io import atomic_save_safetensors, read_safetensors
from mstok.tokenizers.base import Tokenizer

STEP_DIR = re.compile(r"^step_(\d+)$")
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"


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


def find_model_folder(path: str | Path, what: str = "checkpoint") -> Path:
    """A folder holding ``config.json``: ``path`` itself, or the newest ``step_*`` checkpoint
    under it or under its ``checkpoints/`` (so a run folder works too)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if (path / "config.json").is_file():
        return path
    newest = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
    if newest is None:
        raise FileNotFoundError(f"{what}: {path} holds no saved model (config.json) and no step_* checkpoint")
    return newest


def default_weights(folder: str | Path, given: str | None = None) -> str:
    """The weights file to read from a model folder: ``given`` when set, else the EMA weights
    of a training checkpoint when present, else ``model.safetensors``."""
    if given:
        return given
    return EMA_FILE if (Path(folder) / EMA_FILE).is_file() else "model.safetensors"


def load_tokenizer_folder(
    path: str | Path, weights: str | None = None, what: str = "checkpoint"
) -> tuple[torch.nn.Module, Path, str]:
    """A tokenizer by the loading rule of :func:`mstok.weights.locate_model` (the one of
    ``mstok.load_tokenizer``); returns (model, folder, weights file name)."""
    from mstok.tokenizers import load_tokenizer  # lazy: the registry imports the converters lazily too
    from mstok.weights import locate_model

    folder, weights = locate_model(path, weights, what)
    return load_tokenizer(folder, weights=weights), folder, weights


def save_checkpoint(
    root: str | Path,
    step: int,
    model: Tokenizer,
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    train_config_json: str,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and prune to the newest ``keep_last``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    atomic_save_safetensors(ema_state, tmp / EMA_FILE)
    torch.save(train_state, tmp / STATE_FILE)
    (tmp / TRAIN_CONFIG_FILE).write_text(train_config_json + "\n")
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read (model weights, EMA weights, train state) from a checkpoint folder."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_FILE})")
    model_state = read_safetensors(path / "model.safetensors")
    ema_state = read_safetensors(path / EMA_FILE)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return model_state, ema_state, state
