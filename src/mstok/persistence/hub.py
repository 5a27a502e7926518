"""Official TiTok releases (tokenizers, generators) from the Hugging Face hub: download and convert.

``mstok.load_tokenizer("yucornetto/tokenizer_titok_l32_imagenet")`` ends here, and so does
``mstok.load_generator("yucornetto/generator_titok_l32_imagenet")`` (through
:func:`mstok.persistence.convert.generator.load_generator_from_hub`). The files go
through ``huggingface_hub.snapshot_download`` into its usual cache ($HF_HOME), so a second
call, or one without network once the files are cached, reads them from disk. Nothing
converted is written: conversion is fast next to the download, and the cache keeps only the
official files. For a checkpoint folder of your own, use ``mstok convert titok`` (or ``titok-generator``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mstok.persistence.convert.titok import HUB_OWNER, is_official_titok_config, load_official_titok
from mstok.storage.locate import is_hub_id as is_hub_id  # re-exported: a hub id is part of the loading rule
from mstok.storage.weights import MissingWeightsError
from mstok.tokenizers.titok import TiTok


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        return os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")


# how each kind of release is loaded and converted once downloaded: (loader, convert sub-command)
_USE = {
    "tokenizer": ("mstok.load_tokenizer", "titok"),
    "generator": ("mstok.load_generator", "titok-generator"),
}


def _how_to_get(repo_id: str, kind: str = "tokenizer") -> str:
    local = repo_id.rsplit("/", 1)[-1]
    loader, command = _USE[kind]
    return (
        f"  To fix: on a machine with internet access run (huggingface_hub's CLI; `huggingface-cli` in old versions)\n"
        f"      hf download {repo_id} --local-dir {local}\n"
        f"  (or download config.json and model.safetensors from https://huggingface.co/{repo_id}),\n"
        f"  copy the folder here and load it with {loader}({local!r}), or convert it once with\n"
        f"      mstok convert {command} {local} OUT\n"
        f"  A copy already in the hub cache ({_hub_cache()}; $HF_HOME moves it) is used without network."
    )


def download(repo_id: str, revision: str | None = None, kind: str = "tokenizer") -> Path:
    """The local folder of ``repo_id``'s config.json and weights, downloaded into the hub cache if needed.

    Fetches ``model.safetensors`` when the repository has one, else ``pytorch_model.bin``.
    ``kind`` (``tokenizer`` or ``generator``) only changes what the error messages advise.

    Raises:
        MissingWeightsError: the files are not cached and cannot be downloaded (offline,
            unknown repository, ...); the message says how to get them by hand.
        ImportError: huggingface_hub is not installed.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ImportError(
            f"loading {repo_id} from the Hugging Face hub needs huggingface_hub: pip install huggingface_hub"
        ) from err
    try:
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", "model.safetensors"])
        )
        if not (folder / "model.safetensors").is_file():  # older uploads have only the pickle-format file
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["pytorch_model.bin"]))
    except Exception as err:  # huggingface_hub raises many types (offline, HTTP, connection, not found)
        raise MissingWeightsError(
            f"{repo_id} is no local folder, and getting it from the Hugging Face hub failed: "
            f"{type(err).__name__}: {err}\n" + _how_to_get(repo_id, kind)
        ) from err
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"{repo_id} has no config.json: not an official TiTok {kind} repository")
    return folder


def read_release_config(
    folder: Path, repo_id: str, is_official: Callable[[Any], bool], kind: str, section: str
) -> None:
    """Check that a downloaded repository's config.json is an official TiTok ``kind`` config
    (it has ``model.<section>``); raise a ValueError naming the repository otherwise."""
    try:
        values = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"the config.json of {repo_id} is not valid JSON ({err})") from err
    if not is_official(values):
        raise ValueError(
            f"{repo_id} is not an official TiTok {kind} (its config.json has no model.{section}); "
            f"mstok converts the {HUB_OWNER}/{kind}_titok_* releases"
        )


def load_from_hub(repo_id: str, revision: str | None = None) -> TiTok:
    """Download (or read from the cache) an official TiTok release and convert it to an mstok TiTok."""
    folder = download(repo_id, revision)
    read_release_config(folder, repo_id, is_official_titok_config, "tokenizer", "vq_model")
    return load_official_titok(folder)
