"""Smoke tests of the benchmark scripts: they run end to end on tiny presets (no timing asserted)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_train_step_benchmark_runs(tmp_path: Path) -> None:
    """The train-step benchmark times one real trainer step and returns a positive rate, writing nothing."""
    bench = _load("train_step")
    out = tmp_path / "RESULTS.md"
    # one thread: with OpenMP on a busy 2-core machine, 2 threads can make a step many times slower
    argv = ["--presets", "vqgan_tiny", "--stage-presets", "", "--modes", "fp32", "--batch-size", "2", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        results = bench.main([*argv, "--warmup", "1", "--steps", "1", "--no-append", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert [(r.row.preset, r.row.stage, r.row.mode) for r in results] == [("vqgan_tiny", "single", "fp32")]
    for r in results:
        assert r.error is None
        assert len(r.step_times) == 1
        assert r.samples_per_s > 0 and math.isfinite(r.samples_per_s)
    assert not out.exists()
    table = bench.make_table(results)
    assert "| vqgan_tiny | single" in table
