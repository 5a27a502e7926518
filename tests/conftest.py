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


@pytest.fixture
def tiny_imagenet_train() -> Path:
    """``../shared/datasets/tiny-imagenet-64-train``: 50,000 training images as ten WebDataset shards."""
    return _dataset("tiny-imagenet-64-train")


# One torch thread per pytest-xdist worker (make test runs two), else up to two: workers times
# threads must not exceed the cores, or spin-waiting threads slow every test down.
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _seed_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(TEST_THREADS)
    # The engine's automatic thread count follows the machine's load, so two runs of one test
    # could get different counts (hence different float summation orders) and tests that compare
    # runs bit for bit would turn flaky: keep the count above unless a config sets ``threads``.
    from mstok.training import engine, threads

    def fixed_unless_set(requested: int, *args, **kwargs) -> tuple[int | None, str]:
        return threads.resolve_threads(requested, *args, **kwargs) if requested else (None, "fixed by conftest")

    monkeypatch.setattr(engine, "resolve_threads", fixed_unless_set)


# The longest tests first (the convergence runs, then the other slow ones), so that with
# `--dist load --maxschedchunk 1` (make test) the two workers start them at once and the short
# tests fill in around them: the suite's time is then about half its total, not the sum of the
# long tests one worker happened to draw.
_LONGEST_MODULES = ("test_convergence.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        if item.path.name in _LONGEST_MODULES:
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)  # stable: the order within each group stays pytest's
