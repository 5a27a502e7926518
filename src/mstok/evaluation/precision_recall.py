"""Improved precision and recall of generated images (Kynkäänniemi et al. 2019), in any feature space.

Glossary: N real feature rows, M generated feature rows, D feature width, k the neighbourhood size.

Each set of feature rows stands for a manifold: the union of balls around its rows, each ball's
radius the distance from the row to its k-th nearest neighbour in the same set (k = 3 in the
paper). **Precision** is the fraction of generated rows inside the real manifold (are the samples
realistic?); **recall** the fraction of real rows inside the generated manifold (do the samples
cover the real variety?). Both lie in [0, 1]; a generator that copies the real set scores 1 and 1.

Written here because no library that works with this environment's torch computes it
(torchmetrics has FID, KID and IS, not these; the paper's code needs TensorFlow). Distances are
computed in row chunks, so 8,000 x 8,000 rows need about 64 MiB at a time, not the 256 MiB of the
full matrix.
"""

from __future__ import annotations

import numpy as np
import torch

# rows of the query set per chunk of the pairwise-distance matrix
CHUNK_ROWS = 2048


def _as_rows(name: str, features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, D) features as a float64 tensor, with a clear error for another shape or non-finite values."""
    rows = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if rows.dim() != 2:
        raise ValueError(f"{name}: expected feature rows of shape (N, D), got {tuple(rows.shape)}")
    rows = rows.detach().to("cpu", torch.float64)
    if not torch.isfinite(rows).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return rows


def kth_neighbour_radii(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(N, D) -> (N,) the distance from each row to its k-th nearest other row (itself excluded)."""
    radii = []
    for start in range(0, len(rows), CHUNK_ROWS):
        dist = torch.cdist(rows[start : start + CHUNK_ROWS], rows)  # (chunk, N)
        # the smallest distance of each row is to itself (0): the k-th other row is the (k+1)-th smallest
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """The fraction of ``queries`` (M, D) within ``radii[i]`` of some ``centres[i]`` (N, D)."""
    inside = 0
    for start in range(0, len(queries), CHUNK_ROWS):
        dist = torch.cdist(queries[start : start + CHUNK_ROWS], centres)  # (chunk, N)
        inside += int((dist <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(
    real: torch.Tensor | np.ndarray, generated: torch.Tensor | np.ndarray, k: int = 3
) -> dict[str, float]:
    """Improved precision and recall of ``generated`` (M, D) against ``real`` (N, D) feature rows.

    Returns ``{"precision": ..., "recall": ..., "k": k}``. Both sets need more than ``k`` rows
    (a row's k-th neighbour must exist) and the same width D.
    """
    real_rows, gen_rows = _as_rows("real features", real), _as_rows("generated features", generated)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the neighbourhood size) must be a positive integer, got {k!r}")
    if real_rows.shape[1] != gen_rows.shape[1]:
        raise ValueError(
            f"real and generated features differ in width: {real_rows.shape[1]} vs {gen_rows.shape[1]} "
            "(were they computed by the same feature network?)"
        )
    for name, rows in (("real", real_rows), ("generated", gen_rows)):
        if len(rows) <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} rows, got {len(rows)}")
    precision = fraction_inside(gen_rows, real_rows, kth_neighbour_radii(real_rows, k))
    recall = fraction_inside(real_rows, gen_rows, kth_neighbour_radii(gen_rows, k))
    return {"precision": precision, "recall": recall, "k": k}
