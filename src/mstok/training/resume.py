"""What a resume decides before it restores anything: which checkpoint, whether the settings
still describe the same run, and which timeline the run keeps.

- **Which checkpoint**: ``"auto"`` takes the newest intact ``step_*`` folder; a broken one
  (truncated ``train_state.pt``, corrupt or non-finite weights) is skipped with a warning that
  names the broken file (:func:`pick_checkpoint`). A folder named explicitly must be intact.
- **Same run**: the config the checkpoint was saved with (its ``train_config.json``) is compared
  with the new one. A difference in anything that changes the schedule, the data stream or the
  model (steps, batch size, lr, warmup, seed, data, preset, ...) is refused, listing every key
  as ``old -> new``, unless changes are allowed explicitly (:func:`config_changes`); settings
  that only change bookkeeping (logging, checkpoint cadence, workers, threads, ...) may differ.
- **Timeline**: checkpoints past the resume point, the sample grids past it and the
  ``log.jsonl`` records past it belong to an abandoned future. They are moved to
  ``<run>/abandoned-<timestamp>/`` (the full ``log.jsonl`` is copied there and cut back to the
  resume step), so pruning, ``--resume auto`` and every command that picks a run's newest
  checkpoint see only the kept timeline (:func:`archive_future`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from mstok.storage.layout import CHECKPOINTS_DIR, STATE_FILE, STEP_DIR, TRAIN_CONFIG_FILE, checkpoint_dirs, step_of
from mstok.training.checkpoint import CorruptCheckpointError, read_checkpoint

log = logging.getLogger(__name__)
Loaded = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]

# settings that change neither the schedule, the data stream nor the model: free to change on resume
BOOKKEEPING_KEYS = frozenset(
    {
        "out_dir",
        "device",
        "compile",
        "log_every",
        "ckpt_every",
        "keep_last",
        "sample_every",
        "num_samples",
        "tensorboard",
        "threads",
        "data.num_workers",
        "perceptual.vgg_weights",
        "perceptual.lpips_weights",
        "perceptual.cache",
        "perceptual.download",
        "model.init_from",  # only the start of a run reads them; a resume loads the checkpoint
        "model.init_weights",
        "tokenizer",  # a generator's sample grids only
        "tokenizer_weights",
    }
)
BOOKKEEPING_PREFIXES = ("sampling.", "dit_sampling.")  # the sample grids only
ARCHIVE_PREFIX = "abandoned-"
GRID_FOLDERS = ("samples", "generated")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "model.overrides":
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _comparable(values: dict[str, Any]) -> dict[str, Any]:
    """The settings that define the run, as JSON values (tuples as lists)."""
    flat = _flatten(json.loads(json.dumps(values)))
    if "val_every" in flat:  # how often validation runs is bookkeeping; whether it holds images out is not
        flat["val_every"] = "on" if flat["val_every"] else "off"
    return {k: v for k, v in flat.items() if k not in BOOKKEEPING_KEYS and not k.startswith(BOOKKEEPING_PREFIXES)}


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for every run-defining setting that differs. Keys the
    saved config does not have (written by an older mstok) are not compared."""
    old, cur = _comparable(saved), _comparable(new)
    return {k: (old[k], cur.get(k)) for k in sorted(old) if k in cur and old[k] != cur[k]}


def check_config(path: Path, new: dict[str, Any], allow_changes: bool) -> dict[str, tuple[Any, Any]]:
    """Compare the config a checkpoint was saved with against ``new``; refuse differences unless
    ``allow_changes``. Returns the differences (empty when none, or when the checkpoint has no
    saved config)."""
    file = path / TRAIN_CONFIG_FILE
    if not file.is_file():
        log.warning("%s has no %s: cannot check that the settings match the saved run", path, TRAIN_CONFIG_FILE)
        return {}
    try:
        saved = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(file, f"not valid JSON ({err})") from err
    changes = config_changes(saved, new)
    if not changes:
        return changes
    listed = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())
    if not allow_changes:
        raise ValueError(
            f"cannot resume from {path}: these settings differ from the saved run's ({file}): {listed}. "
            "They change the schedule, the data or the model. Resume with the saved settings, or allow the "
            "change explicitly (--allow-changes, or resume(..., allow_changes=True))"
        )
    log.warning("resuming from %s with changed settings (allowed): %s", path, listed)
    return changes


def saved_run_config(folder: str | Path) -> tuple[Path, str, Path]:
    """The saved config of a checkpoint or run folder, what to resume from and the run folder:
    ``(its train_config.json, the folder, the run folder)`` for a checkpoint,
    ``(the run's train_config.json, "auto", the folder)`` for a run folder (its newest intact
    checkpoint). The run folder is where the resumed run writes, wherever the run was moved.

    Raises:
        FileNotFoundError: the folder does not exist or has no saved config.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such folder")
    if not (path / TRAIN_CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {path}: it has no {TRAIN_CONFIG_FILE}, so without --config there is no config to resume "
            "with; give --config, or a checkpoint folder (runs/NAME/checkpoints/step_...) or a run folder"
        )
    if (path / STATE_FILE).is_file():  # a checkpoint: runs/NAME/checkpoints/step_...
        run = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent
        return path / TRAIN_CONFIG_FILE, str(path), run
    return path / TRAIN_CONFIG_FILE, "auto", path


def pick_checkpoint(ckpt_dir: Path, which: str | Path) -> tuple[Path, Loaded] | None:
    """The checkpoint to resume from and its contents, read completely.

    ``"auto"``: the newest intact checkpoint under ``ckpt_dir`` (None when there is none), each
    broken one skipped with a warning naming the broken file. A folder: that one.

    Raises:
        CorruptCheckpointError: the named folder is broken, or every checkpoint of ``"auto"`` is.
        FileNotFoundError: the named folder does not exist.
    """
    if str(which) != "auto":
        path = Path(which)
        if path.is_dir() and not (path / STATE_FILE).exists() and not STEP_DIR.match(path.name):
            raise FileNotFoundError(
                f"{path} is not a training checkpoint (no {STATE_FILE}): pass a step_* folder, or 'auto' for the "
                "newest checkpoint of this run's out_dir"
            )
        try:
            return path, read_checkpoint(path)
        except CorruptCheckpointError as err:
            in_run = STEP_DIR.match(path.name) is not None
            earlier = [p for p in checkpoint_dirs(path.parent) if p.name < path.name] if in_run else []
            hint = f"; the checkpoint before it is {earlier[-1]}" if earlier else ""
            raise CorruptCheckpointError(err.file, err.reason + hint) from err
    broken: list[CorruptCheckpointError] = []
    for path in reversed(checkpoint_dirs(ckpt_dir)):
        try:
            loaded = read_checkpoint(path)
        except CorruptCheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            broken.append(err)
            continue
        return path, loaded
    if broken:
        listed = "; ".join(map(str, broken))
        raise CorruptCheckpointError(broken[-1].file, f"no intact checkpoint is left in {ckpt_dir} ({listed})")
    return None


def _archive_folder(out_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = out_dir / f"{ARCHIVE_PREFIX}{stamp}", 1
    while folder.exists():
        n += 1
        folder = out_dir / f"{ARCHIVE_PREFIX}{stamp}-{n}"
    return folder


def _records_after(log_file: Path, step: int) -> tuple[list[str], list[str]]:
    """The lines of ``log.jsonl`` to keep (records up to ``step``, and records without one) and to drop."""
    keep, drop = [], []
    for line in log_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: it belongs to no timeline
            drop.append(line)
            continue
        past = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
        (drop if past else keep).append(line)
    return keep, drop


def _grid_step(path: Path) -> int:
    match = STEP_DIR.match(path.stem)
    return int(match.group(1)) if match else -1


def archive_future(out_dir: Path, ckpt_dir: Path, step: int) -> Path | None:
    """Move what lies past ``step`` in the run ``out_dir`` (checkpoints, sample grids, log records)
    to a new ``abandoned-<timestamp>/`` folder in it; returns that folder, or None when nothing
    lies past ``step``."""
    future = [p for p in checkpoint_dirs(ckpt_dir) if step_of(p) > step]
    grids = [p for name in GRID_FOLDERS for p in sorted((out_dir / name).glob("step_*.png")) if _grid_step(p) > step]
    log_file = out_dir / "log.jsonl"
    keep, drop = _records_after(log_file, step) if log_file.is_file() else ([], [])
    if not (future or grids or drop):
        return None
    archive = _archive_folder(out_dir)
    (archive / CHECKPOINTS_DIR).mkdir(parents=True)
    for path in future:
        os.replace(path, archive / CHECKPOINTS_DIR / path.name)
    for path in grids:
        (archive / path.parent.name).mkdir(exist_ok=True)
        os.replace(path, archive / path.parent.name / path.name)
    if drop:
        shutil.copy2(log_file, archive / "log.jsonl")
        tmp = log_file.with_name(log_file.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, log_file)
    log.warning(
        "resuming at step %d: moved what the run did past it (%d checkpoint(s)%s, %d log record(s), %d grid(s)) to %s",
        step,
        len(future),
        f": {', '.join(p.name for p in future)}" if future else "",
        len(drop),
        len(grids),
        archive,
    )
    return archive
