"""Loading a model of any family: from a path by the loading rule, or from a hub id.

The one place that turns "a folder, run or hub id" into a model when the caller does not know
its family: :func:`load_tokenizer` and :func:`load_generator` read the folder's ``config.json``,
pick the family's class from its registry and load the weights the loading rule
(:func:`mstok.storage.locate.locate_model`) picks; official TiTok releases (a hub id, or a folder
holding one) are converted on the fly (:mod:`mstok.persistence.convert`). A model class that
knows its own family loads itself (``DiT.from_pretrained``...); that needs only
:mod:`mstok.storage`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mstok.generators.registry import FAMILIES as GENERATOR_FAMILIES
from mstok.networks.reference import ReferenceNet
from mstok.persistence.convert.generator import (
    is_official_generator_config,
    load_generator_from_hub,
    load_official_generator,
)
from mstok.persistence.convert.titok import is_official_titok_config, load_official_titok
from mstok.persistence.hub import load_from_hub
from mstok.storage.layout import CONFIG_FILE
from mstok.storage.locate import is_hub_id, locate_model
from mstok.storage.saved import read_saved_config, split_saved_config
from mstok.tokenizers.registry import AnyTokenizer, tokenizer_from_config


def load_tokenizer(path: str | Path, weights: str | None = None) -> AnyTokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save_pretrained`, a training checkpoint or a run.

    The rule every CLI command follows too (:func:`mstok.storage.locate.locate_model`): ``path`` is a run
    folder (its newest checkpoint), a checkpoint or saved-model folder, or a weights file in one;
    in a folder the EMA weights (``ema.safetensors``) are read when present, else ``model.safetensors``.

    Official TiTok releases load too, converted on the fly (:mod:`mstok.persistence.convert.titok`): a
    Hugging Face hub id such as ``"yucornetto/tokenizer_titok_l32_imagenet"`` (a string that
    is not a local path; downloaded into the hub cache), or a folder holding such a release's
    ``config.json`` and weights.

    Args:
        path: a model, checkpoint or run folder, a weights file in a model folder, or a hub id.
        weights: ``None`` (EMA when present, else model), ``"ema"``, ``"model"``, or a file name
            inside the folder.
    """
    if isinstance(path, str) and not Path(path).exists() and is_hub_id(path):
        return load_from_hub(path)
    path, weights = locate_model(path, weights, "tokenizer")
    meta = read_saved_config(path, "tokenizer")
    if isinstance(meta, dict) and "family" not in meta and is_official_titok_config(meta):
        return load_official_titok(path)
    family, fields = split_saved_config(meta, path, "tokenizer")
    model = tokenizer_from_config(family, fields, source=path / CONFIG_FILE)
    model.load_weights(path / weights)
    return model.eval()


def load_generator(path: str | Path, weights: str | None = None) -> nn.Module:
    """Load a generator of any family saved by ``save_pretrained``, a training checkpoint or a
    run folder, by the same rule as :func:`mstok.load_tokenizer`
    (:func:`mstok.storage.locate.locate_model`: a run's newest checkpoint; the EMA weights when
    present, else ``model.safetensors``); its ``config.json`` names the family.

    Official TiTok generators load too, converted on the fly (:mod:`mstok.persistence.convert.generator`):
    a Hugging Face hub id such as ``"yucornetto/generator_titok_l32_imagenet"`` (a string that
    is not a local path; downloaded into the hub cache), or a folder holding such a release.

    Args:
        path: a model, checkpoint or run folder, a weights file in a model folder, or a hub id.
        weights: ``None`` (EMA when present, else model), ``"ema"``, ``"model"``, or a file name in the folder.
    """
    if isinstance(path, str) and not Path(path).exists() and is_hub_id(path):
        return load_generator_from_hub(path)
    path, weights = locate_model(path, weights, "generator")
    meta = read_saved_config(path, "generator")
    if isinstance(meta, dict) and "family" not in meta and is_official_generator_config(meta):
        return load_official_generator(path)
    family, _ = split_saved_config(meta, path, "generator")
    if family not in GENERATOR_FAMILIES:
        raise ValueError(f"{path} holds a {family!r} model, not a generator (load it with mstok.load_tokenizer)")
    return GENERATOR_FAMILIES[family].load(path, weights)


def load_reference_net(path: str | Path, weights: str | None = None) -> ReferenceNet:
    """:meth:`ReferenceNet.from_pretrained`, the loader the CLI and the teacher use."""
    return ReferenceNet.from_pretrained(path, weights)


def load_tokenizer_folder(
    path: str | Path, weights: str | None = None, what: str = "checkpoint"
) -> tuple[torch.nn.Module, Path, str]:
    """A tokenizer by the loading rule of :func:`mstok.storage.locate.locate_model` (the one of
    :func:`load_tokenizer`); returns (model, folder, weights file name). ``what`` names ``path``
    in messages (a CLI flag)."""
    folder, weights = locate_model(path, weights, what)
    return load_tokenizer(folder, weights=weights), folder, weights
