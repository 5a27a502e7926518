"""Shared fixtures. The real-photo datasets live in ``../shared/datasets`` beside the clone:
tests that need them skip with a reason on a user's machine, but fail under CI (CI=true)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def _dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        message = f"dataset {path} not found (it ships beside the repo as ../shared/datasets)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI must provide it")
        pytest.skip(message)
    return path


@pytest.fixture
def tiny_imagenet() -> Path:
    """``../shared/datasets/tiny-imagenet-64``: 200 classes x 40 real 64x64 JPEGs."""
    return _dataset("tiny-imagenet-64")


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
