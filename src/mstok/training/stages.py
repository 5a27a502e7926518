"""Training stages as data: which parameters train, where the starting weights come from.

A stage never changes a model's ``forward``; it only sets ``requires_grad`` and loads
weights. The two-stage recipe of TiTok and MsTok, for example, is::

    stage 1: train = ["encoder", "quantizer", "decoder"]      (proxy-code cross-entropy)
    stage 2: train = ["decoder", "pixel_decoder"]             (pixels through the proxy decoder)
             MsTok adds "encoder.query_tokens" (the paper's "unfreeze query tokens")

Frozen parameters are left out of the optimizer, so neither updates nor weight decay
touch them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mstok.io import read_safetensors
from mstok.storage.locate import locate_model

log = logging.getLogger(__name__)


def parameter_groups(model: nn.Module) -> list[str]:
    """The model's top-level parameter groups (first name component), e.g. ``encoder``."""
    return sorted({name.split(".")[0] for name, _ in model.named_parameters()})


def apply_stage(model: nn.Module, train: Sequence[str]) -> tuple[list[str], list[str]]:
    """Make exactly the parameters under the prefixes in ``train`` trainable (a parameter marked
    ``updated_by_hook``, such as an EMA codebook, counts as trained but keeps ``requires_grad``
    off: its module updates it, not the optimizer).

    Args:
        model: the model to configure in place.
        train: parameter-name prefixes (a prefix matches whole name components:
            ``encoder`` matches ``encoder.proj.weight``, not ``encoder2.x``); empty = all.

    Returns:
        (trainable names, frozen names).

    Raises:
        ValueError: for a prefix that matches no parameter (a typo must not freeze a model).
    """
    names = [name for name, _ in model.named_parameters()]

    def matches(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for prefix in train:
        if not any(matches(n, prefix) for n in names):
            raise ValueError(
                f"stage.train entry {prefix!r} matches no parameter of the model; "
                f"top-level groups: {', '.join(parameter_groups(model))}"
            )
    trainable, frozen = [], []
    for name, param in model.named_parameters():
        on = not train or any(matches(name, p) for p in train)
        # a parameter its module updates itself (an EMA codebook) is trained by the stage but
        # never handed to the optimizer: it keeps requires_grad False
        param.requires_grad_(on and not getattr(param, "updated_by_hook", False))
        (trainable if on else frozen).append(name)
    if not trainable:
        raise ValueError("the stage trains no parameter")
    return trainable, frozen


def resolve_weights_file(path: str | Path, weights: str = "") -> Path:
    """A weights file from a file path, a model or checkpoint folder, or a run (its newest
    checkpoint), by the one loading rule (:func:`mstok.storage.locate.locate_model`): ``weights`` empty
    takes the EMA weights when the folder has them, else ``model.safetensors``."""
    path = Path(path)
    if path.is_file():
        return path  # a bare weights file: its keys are checked against the model
    folder, name = locate_model(path, weights or None, "model.init_from")
    return folder / name


def load_initial_weights(model: nn.Module, path: str | Path, weights: str = "", fill: Sequence[str] = ()) -> Path:
    """Start ``model`` from the weights of an earlier stage.

    Every parameter and buffer must be found with the right shape, except those under the
    prefixes in ``fill`` (e.g. ``pixel_decoder``, which stage 2 adds and takes from the
    proxy tokenizer instead). Returns the file read.
    """
    file = resolve_weights_file(path, weights)
    state = read_safetensors(file)
    expected = model.state_dict()
    problems = []
    for name, tensor in expected.items():
        if any(name == p or name.startswith(p + ".") for p in fill):
            continue
        if name not in state:
            problems.append(f"missing {name}")
        elif state[name].shape != tensor.shape:
            problems.append(f"{name}: file {tuple(state[name].shape)} vs model {tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}")
    if problems:
        shown = "\n  ".join(problems[:10])
        raise ValueError(f"model.init_from: {file} does not fit the model:\n  {shown}")
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor)
    log.info("initialised from %s", file)
    return file


def copy_pixel_decoder(model: nn.Module, proxy: nn.Module) -> None:
    """Copy the proxy tokenizer's codebook and pixel decoder into ``model.pixel_decoder``."""
    target = getattr(model, "pixel_decoder", None)
    if target is None:
        raise ValueError(
            "stage.pixel_decoder_from_proxy needs a tokenizer with a pixel decoder "
            "(head = 'proxy_codes' and the proxy's config in pixel_decoder)"
        )
    target.load_from_vqgan(proxy)
