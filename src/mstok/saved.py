"""Deprecated: the saved-model format moved to :mod:`mstok.storage.saved` (``ConfigDict`` to
:mod:`mstok.config_schema`). This module re-exports the old names and warns once on import."""

from __future__ import annotations

import warnings

from mstok.config_schema import ConfigDict
from mstok.storage.layout import CONFIG_FILE, WEIGHTS_FILE
from mstok.storage.saved import SavedModel, read_saved_config, split_saved_config

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ConfigDict", "SavedModel", "read_saved_config", "split_saved_config"]

warnings.warn(
    "mstok.saved is deprecated: import from mstok.storage.saved (ConfigDict from mstok.config_schema)",
    DeprecationWarning,
    stacklevel=2,
)
