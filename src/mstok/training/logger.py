"""Run logging: per-step windows and per-epoch means to JSONL and TensorBoard, and image grids.

Terms arrive as 0-d device tensors and are only converted to numbers when a window is
written, so logging costs one device sync per ``log_every`` steps. Under DDP every rank
calls :meth:`RunLogger.flush` (the means are averaged across ranks there); only rank 0
writes files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mstok.images import label_rows as label_rows  # re-exported: the grids moved to mstok.images
from mstok.images import make_grid
from mstok.training.distributed import DistContext


class RunLogger:
    """Collects step terms and writes window and epoch means.

    Args:
        out_dir: the run folder (``log.jsonl`` and ``tb/`` go there).
        dist: the process's place in the job.
        tensorboard: also write TensorBoard event files.
        purge_step: a resumed run's first new step: TensorBoard drops the events an abandoned
            attempt wrote from there on (``log.jsonl`` is cut back by the resume itself).
    """

    def __init__(
        self, out_dir: Path, dist: DistContext, tensorboard: bool = True, purge_step: int | None = None
    ) -> None:
        self.out_dir, self.dist = out_dir, dist
        self.window: list[dict[str, torch.Tensor]] = []
        self.window_steps: list[int] = []
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0
        self.started = time.perf_counter()
        self.writer = None
        self.file = None
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(out_dir / "log.jsonl", "a")  # noqa: SIM115 (open for the run's lifetime)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

                self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=purge_step)

    def event(self, **fields: Any) -> None:
        """Write a one-off record (run start, resume, ...)."""
        if self.file is not None:
            self.file.write(json.dumps(fields) + "\n")
            self.file.flush()

    def add(self, step: int, terms: dict[str, torch.Tensor]) -> None:
        """Record one step's terms (device tensors)."""
        self.window.append(terms)
        self.window_steps.append(step)

    def first_non_finite(self, keys: tuple[str, ...] = ("loss",)) -> tuple[int, str, dict[str, float]] | None:
        """The first step of the current window where one of the terms ``keys`` is not finite:
        (step, the first such key, all its terms); None when all are finite."""
        if not self.window:
            return None
        keys = tuple(k for k in keys if all(k in t for t in self.window))
        if not keys:
            return None
        values = torch.stack([torch.stack([t[k].float() for k in keys]) for t in self.window]).cpu()  # (steps, keys)
        bad = (~torch.isfinite(values)).nonzero()
        if not len(bad):
            return None
        i, j = int(bad[0, 0]), int(bad[0, 1])
        return self.window_steps[i], keys[j], {k: float(v) for k, v in self.window[i].items()}

    def flush(self, step: int, images: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Average the window over steps and ranks, write it, and return the means.

        Args:
            step: the current step.
            images: images processed in the window (all ranks), for throughput.
            extra: host-side values to log as they are (lr, skipped files, ...).
        """
        if not self.window:
            return {}
        keys = sorted(set.intersection(*(set(t) for t in self.window)))
        stacked = torch.stack([torch.stack([t[k].float() for k in keys]) for t in self.window])  # (steps, terms)
        means = self.dist.all_reduce_mean(stacked.mean(0)).tolist()
        record = dict(zip(keys, means, strict=True))
        elapsed = time.perf_counter() - self.started
        record["images_per_s"] = images / max(elapsed, 1e-9)
        record.update(extra or {})
        for k in keys:
            self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + record[k] * len(self.window)
        self.epoch_count += len(self.window)
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **record}) + "\n")
            self.file.flush()
        if self.writer is not None:
            for k, v in record.items():
                self.writer.add_scalar(f"train/{k}", v, step)
        self.window, self.window_steps, self.started = [], [], time.perf_counter()
        return record

    def exclude_time(self, seconds: float) -> None:
        """Leave ``seconds`` (spent on something else than training, e.g. validation) out of the
        current window's images/s."""
        self.started += seconds

    def validation(self, step: int, metrics: dict[str, float], seconds: float) -> dict[str, Any]:
        """Write a ``val`` event (``val_*`` metrics and the seconds they took) and the metrics as
        TensorBoard scalars ``val/<name>``; returns the record."""
        record = {"event": "val", "step": step, **metrics, "val_seconds": seconds}
        self.event(**record)
        if self.writer is not None:
            for k, v in metrics.items():
                if k.startswith("val_"):
                    self.writer.add_scalar(f"val/{k.removeprefix('val_')}", v, step)
        return record

    def end_epoch(self, epoch: int, step: int) -> None:
        """Write the mean of every flushed window since the last epoch boundary."""
        if not self.epoch_count:
            return
        means = {k: v / self.epoch_count for k, v in self.epoch_sums.items()}
        if self.file is not None:
            self.file.write(json.dumps({"epoch": epoch, "step": step, **means}) + "\n")
            self.file.flush()
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"epoch/{k}", v, epoch)
        self.epoch_sums, self.epoch_count = {}, 0

    def image_grid(
        self, step: int, *rows: torch.Tensor, tag: str = "reconstructions", labels: Sequence[str] | None = None
    ) -> Path | None:
        """Save rows of N images (each (N, 3, H, W) in [0, 1]; e.g. originals over reconstructions)
        as ``<tag>/step_*.png`` (``samples/`` for reconstructions) and to TensorBoard; ``labels``
        name the rows."""
        if not self.dist.is_main:
            return None
        grid = make_grid(torch.stack(rows), labels=labels)
        folder = "samples" if tag == "reconstructions" else tag
        path = self.out_dir / folder / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
