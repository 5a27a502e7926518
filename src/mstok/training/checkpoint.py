"""Writing and reading training checkpoints: one step-numbered folder each, written atomically.

Layout of ``<out_dir>/checkpoints/step_000500/`` (its names, and finding the newest checkpoint,
belong to :mod:`mstok.storage.layout`; they are re-exported here)::

    config.json           tokenizer config (so ``load_tokenizer`` opens the folder directly)
    model.safetensors     raw weights
    ema.safetensors       EMA weights (``load_tokenizer(dir, weights="ema.safetensors")``)
    train_state.pt        optimizer, scheduler, step, data position, RNG (weights_only-safe)
    train_config.json     the resolved training config

The folder is assembled under a temporary name, every file and the folder are fsynced, and
only then is it renamed into place, so a folder named ``step_*`` is always complete: a crash
mid-write leaves only a ``.tmp-*`` folder that ``--resume auto`` ignores and the next save
removes, and a failed write (a full disk) removes its temporary folder and says which folder
it could not write. Re-saving a step that exists moves the old folder aside (``.old-*``) only
after the new one is complete, and deletes it only once the new one is in place
(:func:`recover_checkpoints` puts it back if a crash fell between the two renames).
Files get the modes the umask asks for (:func:`mstok.io.apply_umask`).

:func:`read_checkpoint` reads a folder completely before anything is restored, and turns a
truncated or corrupt file into a :class:`CorruptCheckpointError` naming it, so a resume can
fall back to the previous checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from mstok.io import apply_umask, atomic_save_safetensors, read_safetensors
from mstok.persistence.loading import load_tokenizer_folder as load_tokenizer_folder  # re-exported (it lived here)
from mstok.storage.layout import (  # the layout's names, re-exported here where they used to live
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    TRAIN_CONFIG_FILE,
    checkpoint_dirs,
    latest_checkpoint,
    step_dir_name,
)
from mstok.storage.layout import (
    STEP_DIR as STEP_DIR,
)
from mstok.storage.layout import (
    step_of as step_of,
)
from mstok.storage.locate import find_model_folder as find_model_folder  # re-exported (it lived here)
from mstok.tokenizers.base import Tokenizer

# what a torch.load of a truncated or garbled file raises
_STATE_READ_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError)
# what every train_state.pt holds (a file without these keys is not one of ours)
_STATE_KEYS = ("step", "samples_seen", "skipped", "optimizer", "scheduler", "scaler", "ema_updates", "torch_rng")
log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
    """A checkpoint folder whose file ``file`` is missing, truncated or unreadable."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"checkpoint file {file} is broken: {reason}")
        self.file, self.reason = file, reason


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, permissions); nothing partial was left."""


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to the disk (folders: where the OS allows)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():
            return  # e.g. Windows cannot open folders: the rename is all there is
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if not path.is_dir() or err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_files(
    folder: Path,
    model: Tokenizer,
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    train_config_json: str,
) -> None:
    """Write every file of a checkpoint into ``folder`` and flush it all to the disk."""
    model.save_pretrained(folder)
    atomic_save_safetensors(ema_state, folder / EMA_FILE)
    torch.save(train_state, folder / STATE_FILE)
    (folder / TRAIN_CONFIG_FILE).write_text(train_config_json + "\n")
    for file in folder.iterdir():
        apply_umask(file)
        _fsync(file)
    _fsync(folder)


def recover_checkpoints(root: str | Path) -> None:
    """Tidy ``root`` after a crash inside :func:`save_checkpoint`: an ``.old-step_*`` folder whose
    ``step_*`` is missing (a crash between the two renames of a re-save) is put back; other
    ``.old-*`` and ``.tmp-*`` leftovers are removed."""
    root = Path(root)
    if not root.is_dir():
        return
    for old in root.glob(".old-step_*"):
        final = root / old.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: Tokenizer,
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    train_config_json: str,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` under ``root`` durably and atomically, then prune to the newest
    ``keep_last``.

    Raises:
        CheckpointWriteError: a file could not be written (the message names the folder; the
            temporary folder is removed and the checkpoints already there are untouched).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recover_checkpoints(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    old = root / f".old-{final.name}"
    try:
        tmp.mkdir()
        _write_files(tmp, model, ema_state, train_state, train_config_json)
        if final.exists():  # re-saving a step: the old folder stays until the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
    except (OSError, SafetensorError) as err:  # safetensors reports its I/O errors as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        last = latest_checkpoint(root)
        code = getattr(err, "errno", None)
        full = code == errno.ENOSPC or f"os error {errno.ENOSPC})" in str(err)
        message = (
            f"could not write checkpoint step {step} into {root}: {getattr(err, 'strerror', None) or err}"
            f"{' (the disk is full)' if full else ''}; nothing partial was left, "
            f"the newest complete checkpoint is {last or 'none'}"
        )
        raise (CheckpointWriteError(code, message) if code else CheckpointWriteError(message)) from err
    shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoint_dirs(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_FILE
    if not file.is_file():
        raise CorruptCheckpointError(file, "it is missing (not a complete training checkpoint)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except _STATE_READ_ERRORS as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptCheckpointError(file, f"truncated or not a train state ({reason})") from err
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CorruptCheckpointError(file, f"it lacks {', '.join(missing)}")
    return state


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = read_safetensors(file)
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(file, str(err)) from err
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CorruptCheckpointError(file, f"tensor {name} holds NaN or infinite values")
    return tensors


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read (model weights, EMA weights, train state) from a checkpoint folder, checking every file.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        CorruptCheckpointError: a file is missing, truncated, unreadable or holds non-finite weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    state = _read_state(path)
    return _read_weights(path / MODEL_FILE), _read_weights(path / EMA_FILE), state


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read (model weights, EMA weights, train state) from a checkpoint folder (:func:`read_checkpoint`)."""
    return read_checkpoint(path)
