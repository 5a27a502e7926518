"""The loading rule: which folder and weights file a path given to a loader means.

:func:`locate_model` is the one rule of ``mstok.load_tokenizer``, ``mstok.load_generator``,
every model class's ``from_pretrained`` and every CLI command that reads a model: a run folder
(its newest checkpoint), a checkpoint or saved-model folder, or a weights file inside one; in a
folder the EMA weights when present, else ``model.safetensors``. :func:`is_hub_id` says when a
string that is no local path names a Hugging Face hub repository instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from mstok.storage.layout import CONFIG_FILE, EMA_FILE, MODEL_FILE, newest_checkpoint

# the named choices of ``weights=`` / ``--weights``; any other value is a file name in the folder
WEIGHT_CHOICES = {"ema": EMA_FILE, "model": MODEL_FILE}
# owner/name as the hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def locate_model(path: str | Path, weights: str | None = None, what: str = "checkpoint") -> tuple[Path, str]:
    """The one loading rule: ``(model folder, weights file name)`` for ``path`` and ``weights``.

    Args:
        path: a folder holding ``config.json`` (a saved model or a ``step_*`` checkpoint), a run
            folder or its ``checkpoints/`` (the newest ``step_*`` checkpoint is used), or a weights
            file inside a model folder.
        weights: ``None`` (the EMA weights when the folder has them, else ``model.safetensors``),
            ``"ema"``, ``"model"``, or a file name inside the folder.
        what: how the caller names ``path`` in messages (``"--checkpoint"``, ``"tokenizer"``).

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no model, or lacks the asked-for weights.
        ValueError: a weights file was given as ``path`` together with a different ``weights``.
    """
    path, weights = Path(path).expanduser(), weights or None  # "" (an unset config field) means the default
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist, so it holds no {CONFIG_FILE} to load")
    if path.is_file():
        folder = path.parent
        if weights is not None and WEIGHT_CHOICES.get(weights, weights) != path.name:
            raise ValueError(f"{what}: {path} is a weights file, which contradicts weights={weights!r}")
        weights = path.name
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{what}: no {CONFIG_FILE} beside the weights file {path}")
    elif (path / CONFIG_FILE).is_file():
        folder = path
    else:
        folder = newest_checkpoint(path)
        if folder is None:
            raise FileNotFoundError(
                f"no {CONFIG_FILE} in {path}: not a saved mstok {what}, nor a run folder "
                "(no step_* checkpoint in it or in its checkpoints/)"
            )
    if weights is None:
        return folder, EMA_FILE if (folder / EMA_FILE).is_file() else MODEL_FILE
    if weights == "ema" and not (folder / EMA_FILE).is_file():
        raise FileNotFoundError(
            f"{what}: weights 'ema' asked for, but {folder} has no {EMA_FILE} (a saved model holds only "
            f"{MODEL_FILE}: use weights 'model')"
        )
    return folder, WEIGHT_CHOICES.get(weights, weights)


def find_model_folder(path: str | Path, what: str = "checkpoint") -> Path:
    """A folder holding ``config.json``: ``path`` itself, or the newest ``step_*`` checkpoint
    under it or under its ``checkpoints/`` (so a run folder works too)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if (path / CONFIG_FILE).is_file():
        return path
    newest = newest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(f"{what}: {path} holds no saved model (config.json) and no step_* checkpoint")
    return newest


def is_hub_id(name: object) -> bool:
    """Whether ``name`` is a string shaped like a hub repository id (``owner/name``)."""
    return isinstance(name, str) and bool(_HUB_ID.match(name))
