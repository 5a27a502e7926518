"""Shared by the benchmark scripts: a description of the machine and appending to RESULTS.md."""

from __future__ import annotations

import math
import os
import platform
import shlex
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``model name``), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_line(device: str = "cpu") -> str:
    """torch / Python versions, CPU model, cores and threads (and the GPU on CUDA)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = (
        f"torch {torch.__version__}, Python {platform.python_version()}, CPU {cpu_name()}, {cores} cores, "
        f"{torch.get_num_threads()} threads"
    )
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return text


def append_section(out: str | Path, section: str, title: str = "# Benchmark results") -> Path:
    """Append a markdown section to ``out`` (created with ``title`` when missing)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = out.read_text() if out.exists() else title + "\n"
    out.write_text(existing.rstrip("\n") + "\n\n" + section)
    print(f"\nAppended to {out}")
    return out


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it (no-op elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_1min() -> float:
    """The 1-minute load average (NaN where the OS has none): above the core count, others compete."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def load_summary(loads: list[float]) -> str:
    """``loads[0]`` taken at the start of a run, the rest after each row."""
    seen = [x for x in loads[1:] if not math.isnan(x)] or [math.nan]
    return f"1-min load average {loads[0]:.2f} at the start, {min(seen):.2f}-{max(seen):.2f} after rows"


def command_line(script: str, argv: list[str] | None) -> str:
    """How a benchmark was invoked: the real command line, or the script with the argv given to ``main``."""
    return shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", script, *argv])


def results_section(title: str, command: str, device: str, blocks: list[str], notes: list[str]) -> str:
    """A dated RESULTS.md section: title, command, machine, the tables in ``blocks``, then notes."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {title} ({stamp})", "", f"Command: `{command}`", "", f"Machine: {machine_line(device)}.", ""]
    for block in blocks:
        lines += [block, ""]
    return "\n".join([*lines, "Notes:", "", *notes, ""])


def with_threads(threads: int, run: Callable[[], T]) -> T:
    """Call ``run`` with ``threads`` torch threads (0 = unchanged), restoring the caller's count after:
    ``mstok bench`` and the tests run benchmarks in-process."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)
