"""Deprecated: training the reference network moved to :mod:`mstok.training.reference` (training
sits above evaluation, so this module cannot re-export it at import); the old names resolve on
first use, with a DeprecationWarning."""

from __future__ import annotations

import warnings
from typing import Any

# the names of mstok.training.reference that this module used to define
_MOVED = (
    "DEFAULT_BATCH",
    "DEFAULT_DATA",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "ReferenceTrainConfig",
    "ReferenceTrainer",
    "train_reference",
)


def __getattr__(name: str) -> Any:
    """Deprecation shim: a name in ``_MOVED`` resolves from :mod:`mstok.training.reference`."""
    if name in _MOVED:
        from mstok.training import reference  # deprecation shim: the one allowed upward import

        warnings.warn(
            f"mstok.evaluation.reference_train.{name} moved to mstok.training.reference.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
