"""Improved precision/recall (Kynkäänniemi et al. 2019) on point clouds whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mstok.evaluation import precision_recall as pr


def brute_force(real: np.ndarray, gen: np.ndarray, k: int) -> tuple[float, float]:
    """The definition written out with loops over rows."""

    def radii(rows: np.ndarray) -> np.ndarray:
        return np.array([np.sort(np.linalg.norm(rows - row, axis=1))[k] for row in rows])

    def inside(queries: np.ndarray, centres: np.ndarray, r: np.ndarray) -> float:
        return float(np.mean([np.any(np.linalg.norm(centres - q, axis=1) <= r) for q in queries]))

    return inside(gen, real, radii(real)), inside(real, gen, radii(gen))


def test_points_on_a_line():
    real = np.arange(10.0)[:, None]  # each real row's nearest other row is 1 away
    gen = np.array([[0.5], [100.0]])  # each generated row's nearest other row is 99.5 away
    result = pr.precision_recall(real, gen, k=1)
    # 0.5 lies within 1 of 0; 100 lies outside every real ball
    assert result["precision"] == 0.5
    # every real row lies within 99.5 of 0.5
    assert result["recall"] == 1.0


def test_a_copy_scores_one_and_a_distant_cloud_zero():
    real = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert pr.precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0, "k": 3}
    far = pr.precision_recall(real, real + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_mode_collapse_keeps_precision_and_loses_recall():
    """Samples from one half of the real distribution are realistic but miss the other half."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 4))
    gen = real[real[:, 0] > 0.5] + rng.normal(scale=0.01, size=(int((real[:, 0] > 0.5).sum()), 4))
    result = pr.precision_recall(real, gen)
    assert result["precision"] > 0.95
    assert result["recall"] < 0.6


def test_chunked_matches_the_definition(monkeypatch):
    monkeypatch.setattr(pr, "CHUNK_ROWS", 7)  # several chunks, the last one short
    rng = np.random.default_rng(1)
    real, gen = rng.normal(size=(50, 3)), rng.normal(loc=0.4, size=(37, 3))
    for k in (1, 3, 5):
        result = pr.precision_recall(real, gen, k=k)
        assert (result["precision"], result["recall"]) == pytest.approx(brute_force(real, gen, k))


@pytest.mark.parametrize(
    ("real", "gen", "k", "message"),
    [
        (np.zeros((10, 4)), np.zeros((10, 5)), 3, "differ in width"),
        (np.zeros((10, 4)), np.zeros((3, 4)), 3, "more than 3 generated rows"),
        (np.zeros(10), np.zeros((10, 4)), 3, "shape \\(N, D\\)"),
        (np.full((10, 4), np.nan), np.zeros((10, 4)), 3, "NaN"),
        (np.zeros((10, 4)), np.zeros((10, 4)), 0, "positive integer"),
    ],
)
def test_bad_input_is_named(real, gen, k, message):
    with pytest.raises(ValueError, match=message):
        pr.precision_recall(real, gen, k=k)
