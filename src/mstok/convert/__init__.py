"""Deprecated: the official-release importers moved to :mod:`mstok.persistence.convert`
(``mstok.convert.hub`` to :mod:`mstok.persistence.hub`). The old module paths still import (each
warns once); the old names of this package resolve with a warning."""

from __future__ import annotations

import warnings
from typing import Any

from mstok.persistence import convert as _convert


def __getattr__(name: str) -> Any:
    """Deprecation shim: this package's names, from :mod:`mstok.persistence.convert`."""
    if name in _convert.__all__:
        warnings.warn(
            f"mstok.convert.{name} moved to mstok.persistence.convert.{name}", DeprecationWarning, stacklevel=2
        )
        return getattr(_convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
