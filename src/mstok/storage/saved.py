"""The saved-model format: a folder with ``config.json`` and ``model.safetensors``.

Shared by every model family, tokenizers, generators and the reference network alike:
:class:`SavedModel` (``save_pretrained`` / ``load_weights``, and :meth:`SavedModel.load_saved`,
which a family's ``from_pretrained`` calls to load *its own* class by the loading rule) and the
readers of a saved ``config.json``. Nothing here knows a family: the family registries map a
saved ``family`` to its class, and :mod:`mstok.persistence.loading` loads a folder of any family.
:class:`~mstok.config_schema.ConfigDict` (the configs' dict conversion) lives in
:mod:`mstok.config_schema` and is re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mstok.config_schema import ConfigDict  # re-exported (it lived in mstok.saved)
from mstok.io import atomic_save_safetensors, load_state_dict_checked, read_safetensors
from mstok.storage.layout import CONFIG_FILE, WEIGHTS_FILE
from mstok.storage.locate import locate_model


class SavedModel:
    """``save_pretrained`` / ``load_weights`` for an ``nn.Module`` with a ``config`` (a family's config)."""

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path`` (``load_tokenizer`` reads it).

        Args:
            path: target folder (created if needed).
            state_dict: weights to save instead of this model's own (e.g. EMA weights).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"family": self.config.family, "config": self.config.to_dict()}
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(path / CONFIG_FILE)
        atomic_save_safetensors(state_dict if state_dict is not None else self.state_dict(), path / WEIGHTS_FILE)
        return path

    def load_weights(self, path: str | Path) -> None:
        """Load a safetensors file into this model strictly, with a clear error on any mismatch."""
        load_state_dict_checked(self, read_safetensors(path), str(path))

    @classmethod
    def load_saved(
        cls,
        path: str | Path,
        weights: str | None,
        config_class: type[ConfigDict],
        name: str,
        what: str | None = None,
        build: Callable[[Any], Any] | None = None,
    ) -> Any:
        """A model of this class saved by :meth:`save_pretrained`, in eval mode: the folder and
        weights by the rule of :func:`mstok.storage.locate.locate_model`, its ``config.json`` checked to
        be of ``config_class``'s family, the model built from the config and its weights loaded.

        Args:
            path, weights: as :func:`~mstok.storage.locate.locate_model` takes them.
            config_class: the family's config dataclass (its ``family`` is the one expected).
            name: the model in messages (``"DiT"``, ``"BitMAR generator"``).
            what: what the folder should hold, in the ``config.json`` messages (default ``name``).
            build: config -> the model before its weights load (default: the class itself).
        """
        what = name if what is None else what
        folder, weights = locate_model(path, weights, name)
        family, fields = split_saved_config(read_saved_config(folder, what), folder, what)
        if family != config_class.family:
            raise ValueError(f"{folder} holds a {family!r} model, not a {name}")
        try:
            config = config_class.from_dict(fields)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{folder / CONFIG_FILE}: {err}") from err
        model = (cls if build is None else build)(config)
        model.load_weights(folder / weights)
        return model.eval()


def read_saved_config(path: Path, what: str) -> Any:
    """The parsed ``config.json`` of a model folder (the inverse of ``save_pretrained``'s write),
    or an error naming ``what`` the folder should hold. Official TiTok ``config.json`` files parse
    too; :func:`split_saved_config` then tells them apart."""
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}: not a saved mstok {what}")
    try:
        return json.loads(config_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{config_path} is not a valid mstok {what} config: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not a valid mstok {what} config: not JSON ({err})") from err


def split_saved_config(meta: Any, path: Path, what: str) -> tuple[str, dict[str, Any]]:
    """``(family, config fields)`` of a parsed mstok ``config.json``: a table with a string
    ``family`` and a table ``config``, else a ValueError naming the file."""
    where = f"{path / CONFIG_FILE} is not a valid mstok {what} config"
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: it must hold a JSON object, got {type(meta).__name__}")
    for key, kind, name in (("family", str, "a string"), ("config", dict, "a table of config fields")):
        if key not in meta:
            raise ValueError(f"{where}: no {key!r} entry")
        if not isinstance(meta[key], kind):
            raise ValueError(f"{where}: {key!r} must be {name}, got {meta[key]!r}")
    return meta["family"], meta["config"]
