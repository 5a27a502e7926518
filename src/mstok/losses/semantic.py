"""SemTok's semantic alignment constraint: re-exported from :mod:`mstok.tokenizers.semtok_semantic`,
where it lives with the model that owns its learned projections (it moved there from here)."""

from mstok.tokenizers.semtok_semantic import (
    MAX_LOGIT_SCALE,
    RESIZE_MODES,
    ContrastiveLoss,
    DistillationLoss,
    SemanticLoss,
    gather_rows,
    resize_grid,
)

__all__ = [
    "MAX_LOGIT_SCALE",
    "RESIZE_MODES",
    "ContrastiveLoss",
    "DistillationLoss",
    "SemanticLoss",
    "gather_rows",
    "resize_grid",
]
