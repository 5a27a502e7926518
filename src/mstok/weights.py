"""Deprecated: split into :mod:`mstok.storage.weights` (pretrained weight files),
:mod:`mstok.storage.locate` (the loading rule, ``locate_model``) and :mod:`mstok.storage.layout`
(file names). This module re-exports the old names and warns once on import."""

from __future__ import annotations

import warnings

from mstok.storage.layout import CONFIG_FILE, EMA_FILE, MODEL_FILE
from mstok.storage.locate import WEIGHT_CHOICES, locate_model
from mstok.storage.weights import (
    CACHE_ENV,
    MissingWeightsError,
    cache_dir,
    command_hints,
    load_torch_state_dict,
    resolve_weights,
)

__all__ = [
    "CACHE_ENV",
    "CONFIG_FILE",
    "EMA_FILE",
    "MODEL_FILE",
    "WEIGHT_CHOICES",
    "MissingWeightsError",
    "cache_dir",
    "command_hints",
    "load_torch_state_dict",
    "locate_model",
    "resolve_weights",
]

warnings.warn(
    "mstok.weights is deprecated: import from mstok.storage.weights (weight files), mstok.storage.locate "
    "(locate_model) or mstok.storage.layout (file names)",
    DeprecationWarning,
    stacklevel=2,
)
