"""Single-stage pixel training of a tokenizer: the one training loop of mstok.

``Trainer(config).fit()`` trains the preset named in the config on a folder of images
(or any dataset indexed by ``(index, seed)``) with L1 + MSE + quantizer losses, AdamW,
warmup + cosine, gradient clipping and EMA weights, logging to ``log.jsonl`` and writing
atomic checkpoints. A run resumed from a checkpoint continues bit-identically: the data
order and every augmentation are functions of (seed, sample position), and the model,
EMA, optimizer, scheduler and RNG states are restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.data import EpochSampler, ImageFolder, RandomResizedCropFlip, collate_skip_broken
from mstok.losses import ReconstructionLoss
from mstok.tokenizers import Tokenizer, create_tokenizer
from mstok.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mstok.training.config import TrainConfig
from mstok.training.optim import build_optimizer, build_scheduler, ema_update_fn

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Trains one tokenizer according to a :class:`TrainConfig`.

    Args:
        config: the run's configuration.
        dataset: optional dataset indexed by ``(index, seed)`` returning ``(image, label)``;
            defaults to an :class:`ImageFolder` over ``config.data.path``.
        progress: show a tqdm progress bar.
    """

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None, progress: bool = True) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.progress = progress
        torch.manual_seed(config.seed)
        self.model: Tokenizer = create_tokenizer(config.model.preset, **config.model.overrides).to(self.device)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_update_fn(config.ema_decay, config.ema_warmup))
        self.loss_fn = ReconstructionLoss(**dataclasses.asdict(config.loss))
        opt = config.optim
        self.optimizer = build_optimizer(self.model, opt.lr, opt.weight_decay, opt.betas, opt.eps)
        self.scheduler = build_scheduler(self.optimizer, config.steps, opt.warmup_steps, opt.lr, opt.end_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        if dataset is None:
            if not config.data.path:
                raise ValueError("no training data: set data.path in the config or pass --set data.path=DIR")
            transform = RandomResizedCropFlip(
                self.model.config.image_size, tuple(config.data.crop_scale), flip=config.data.flip
            )
            dataset = ImageFolder(config.data.path, transform)
        self.dataset = dataset
        self.out_dir = Path(config.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.step = 0
        self.samples_seen = 0
        self.skipped = 0
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- state
    def resume(self, which: str | Path) -> Path | None:
        """Restore from a checkpoint folder, or the newest one with ``"auto"``.

        Returns the folder used, or None when ``"auto"`` finds nothing (a fresh start).
        """
        path = latest_checkpoint(self.ckpt_dir) if str(which) == "auto" else Path(which)
        if path is None:
            return None
        model_state, ema_state, state = load_checkpoint(path)
        self.model.load_state_dict(model_state)
        self.ema.module.load_state_dict(ema_state)
        self.ema.n_averaged.fill_(int(state["ema_n_averaged"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.samples_seen, self.skipped = state["step"], state["samples_seen"], state["skipped"]
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def save(self) -> Path:
        """Write a checkpoint for the current step."""
        state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped": self.skipped,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema_n_averaged": int(self.ema.n_averaged),
            "torch_rng": torch.get_rng_state(),
        }
        return save_checkpoint(
            self.ckpt_dir,
            self.step,
            self.model,
            self.ema.module.state_dict(),
            state,
            self.config.to_json(),
            self.config.keep_last,
        )

    # ----------------------------------------------------------------- data
    def batches(self) -> Iterator[tuple[torch.Tensor, int]]:
        """Endless (images, samples consumed) stream starting at the current data position."""
        cfg = self.config
        loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=EpochSampler(len(self.dataset), cfg.seed, start=self.samples_seen),
            num_workers=cfg.data.num_workers,
            collate_fn=collate_skip_broken,
            persistent_workers=cfg.data.num_workers > 0,
        )
        broken_in_a_row = 0
        for images, _labels, skipped in loader:
            self.skipped += skipped
            broken_in_a_row = broken_in_a_row + skipped if images.numel() == 0 else 0
            if broken_in_a_row >= len(self.dataset):
                raise ValueError(f"no readable image in the dataset ({self.skipped} files failed to decode)")
            if images.numel():
                yield images, len(images) + skipped
            else:
                self.samples_seen += skipped

    # ----------------------------------------------------------------- training
    def train_step(self, images: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch; returns the logged terms."""
        cfg = self.config
        self.model.train()
        images = images.to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[cfg.precision])
            if cfg.precision in AUTOCAST_DTYPES
            else contextlib.nullcontext()
        )
        with autocast:
            output = self.model(images)
        loss, terms = self.loss_fn(output, images)
        if not torch.isfinite(loss):
            last = latest_checkpoint(self.ckpt_dir)
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.step + 1} (terms: {terms}); "
                f"last good checkpoint: {last or 'none yet'}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.ema.update_parameters(self.model)
        revived = 0
        if cfg.dead_code_threshold > 0:
            revived = self.model.quantizer.revive_dead_codes(
                output.latents.detach(), output.indices, threshold=cfg.dead_code_threshold
            )
        stats = self.model.quantizer.usage_statistics(output.indices)
        return {
            **terms,
            "revived_codes": revived,
            "grad_norm": float(grad_norm),
            "lr": self.optimizer.param_groups[0]["lr"],
            **stats,
        }

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``config.steps``; returns the per-step history (also in ``log.jsonl``)."""
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "train_config.json").write_text(cfg.to_json() + "\n")
        if self.step >= cfg.steps:
            return self.history
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        window: list[dict[str, float]] = []
        started = time.perf_counter()
        with open(self.out_dir / "log.jsonl", "a") as log_file:
            for images, consumed in self.batches():
                terms = self.train_step(images)
                self.step += 1
                self.samples_seen += consumed
                record = {"step": self.step, **terms}
                self.history.append(record)
                window.append(terms)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - started
                    mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                    entry = {
                        "step": self.step,
                        **mean,
                        "images_per_s": len(window) * cfg.batch_size / elapsed,
                        "skipped": self.skipped,
                    }
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{mean['loss']:.4f}", usage=f"{mean['usage']:.2f}")
                    window, started = [], time.perf_counter()
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save()
                if self.step >= cfg.steps:
                    break
        bar.close()
        return self.history
