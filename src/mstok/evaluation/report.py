"""Shared by the benchmark scripts: a description of the machine and appending to RESULTS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


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
