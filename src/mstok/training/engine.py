"""The training engine every mstok trainer runs on: one loop for tokenizers and generators.

:class:`Engine` owns what does not depend on the model: devices and DDP, micro-batching
and gradient accumulation, autocast and grad scaling, ``torch.compile``, AdamW with warmup +
cosine, the weight EMA, the data stream, atomic checkpoints, bit-identical resume, JSONL /
TensorBoard logging and the progress bar. A trainer subclass builds its model and data,
calls :meth:`Engine.setup`, and implements :meth:`Engine.train_step` (plus the optional hooks
for extra checkpoint state, sample grids and held-out validation).

A resumed run continues bit-identically: the data order and every augmentation are
functions of (seed, sample position), and model, EMA, optimizer, scheduler, scaler, the
subclass's extra state and RNG states are restored. A resume falls back past broken
checkpoints, refuses changed run settings unless allowed, and archives what an abandoned
attempt did past the resume point (resume.py). Checkpoints are written atomically and durably
by rank 0, and only when the loss, the gradient norm and the weights are finite: a checkpoint
is always one to go back to. Ctrl-C finishes the current step, saves it and raises
:class:`TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.data import EpochSampler, SkipBroken, collate_skip_broken
from mstok.io import load_state_dict_checked
from mstok.storage.layout import (
    CHECKPOINTS_DIR,
    EMA_FILE,
    MODEL_FILE,
    TRAIN_CONFIG_FILE,
    checkpoint_dirs,
    step_dir_name,
    step_of,
)
from mstok.training.checkpoint import recover_checkpoints, save_checkpoint
from mstok.training.config import RunConfig
from mstok.training.distributed import DistContext
from mstok.training.interrupt import DeferredInterrupt
from mstok.training.logger import RunLogger
from mstok.training.optim import ModelEMA, build_optimizer, build_scheduler, load_optimizer_state
from mstok.training.resume import archive_future, check_config, pick_checkpoint
from mstok.training.threads import resolve_threads

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels) of one micro-step
# optimizer settings a resume with allowed changes takes from the new config, not the checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at a step boundary; the message says which checkpoint holds it."""


class Engine:
    """The shared training loop (module docstring).

    Args:
        config: the run's shared settings (a subclass of :class:`RunConfig`).
        progress: show a tqdm progress bar (rank 0 only).
        dist: the process's place in a DDP job; read from the torchrun environment by default.
        desc: the progress bar's label (e.g. ``"titok_tiny (1/2, mstok_tiny next)"``).
        bar_position: the bar's line (tqdm's ``position``) when several processes train at once
            and share a terminal (``mstok demo`` trains its two models side by side).

    Setting up sets torch's intra-op thread count for the process (``config.threads``; see
    threads.py), and the ``start`` log event records it with the reason.
    """

    postfix_keys: tuple[str, ...] = ("loss",)  # logged terms shown on the progress bar
    val_postfix_keys: tuple[str, ...] = ("val_psnr",)  # validation results shown on it

    def __init__(
        self,
        config: RunConfig,
        progress: bool = True,
        dist: DistContext | None = None,
        desc: str = "train",
        bar_position: int | None = None,
    ) -> None:
        self.config = config
        self.bar_position = bar_position
        self.dist = dist or DistContext.from_env(config.device)
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        self.desc = desc
        workers = getattr(getattr(config, "data", None), "num_workers", 0)
        # DDP ranks on one machine share its cores (torchrun tells how many run here)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.dist.enabled else 1
        threads, self.threads_reason = resolve_threads(config.threads, self.device, workers, local_ranks)
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        per_step = self.dist.world_size * config.grad_accum
        if config.batch_size % per_step:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by world size x grad_accum = {per_step}"
            )
        self.micro_batch = config.batch_size // per_step
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(config.seed)
        self.out_dir = Path(config.out_dir)
        self.ckpt_dir = self.out_dir / CHECKPOINTS_DIR
        self.step = 0
        self.samples_seen = 0
        self.skipped = 0
        self.history: list[dict[str, Any]] = []
        self.val_every = 0  # a subclass implementing validate() sets it (0: never)
        self.train_seconds = 0.0  # this process's training time (data + steps), for val events
        self.val_history: list[dict[str, Any]] = []  # the val events of this process (rank 0)
        self.saved_step = -1  # the step of the newest checkpoint written or resumed from
        self.resume_record: dict[str, Any] | None = None  # the resume event fit() logs
        self.interrupt = DeferredInterrupt(enabled=False)  # fit() installs the Ctrl-C handler

    def setup(self, model: nn.Module, dataset: Dataset) -> None:
        """Take the model (with ``requires_grad`` already set per the stage) and the dataset:
        builds the EMA, the optimizer over the trainable parameters, and the DDP/compiled view."""
        cfg, opt = self.config, self.config.optim
        self.model = model.to(self.device)
        self.ema = ModelEMA(self.model, cfg.ema_decay, cfg.ema_warmup)
        self.optimizer = build_optimizer(self.model, opt.lr, opt.weight_decay, opt.betas, opt.eps, opt.name)
        self.scheduler = build_scheduler(self.optimizer, cfg.steps, opt.warmup_steps, opt.lr, opt.end_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.train_model = self.model
        if self.dist.enabled:
            # buffers (codebook usage counts) are updated identically on every rank from
            # gathered data, so they need no broadcast
            self.train_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False,
            )
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.dataset = dataset
        # the settings the run is built with (the schedule above is fixed now): saved with every
        # checkpoint and compared on resume, even if ``config`` is changed afterwards
        self.run_config_json = cfg.to_json()

    # ----------------------------------------------------------------- hooks
    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, torch.Tensor]:
        """One optimisation step over this rank's micro-batches; returns the logged terms."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Subclass state saved with each checkpoint (e.g. a discriminator)."""
        return {}

    def load_extra_state(self, state: dict[str, Any], path: Path, changed: bool = False) -> None:
        """Restore what :meth:`extra_state` saved (``changed``: keep this run's optimizer settings)."""

    def write_samples(self, logger: RunLogger) -> None:
        """Write an image grid for the current step (every ``sample_every`` steps)."""

    def validate(self) -> dict[str, float]:
        """Measure the model on held-out data; ``{name: value}`` with ``val_`` names, logged as a
        ``val`` event. Called every ``val_every`` steps and at the last step, on rank 0 only (the
        other ranks wait at a barrier), so it must not use collectives; it must not change the
        training state either (RNG included), or resumed runs would differ."""
        return {}

    # ----------------------------------------------------------------- state
    def resume(self, which: str | Path, allow_changes: bool = False) -> Path | None:
        """Restore from a checkpoint folder, or the newest intact one with ``"auto"``.

        The checkpoint's saved settings must match this run's, except for bookkeeping (logging,
        checkpoint cadence, workers...): a difference that changes the schedule, the data or the
        model is a ValueError listing each key (old -> new), unless ``allow_changes``; then the
        new settings apply from here on, with a warning and a ``resume`` event in ``log.jsonl``.
        What the run did past the resume point is archived (resume.py).

        Returns the folder used, or None when ``"auto"`` finds nothing (a fresh start).

        Raises:
            CorruptCheckpointError: the named checkpoint, or every one ``"auto"`` found, is broken.
            ValueError: the settings differ (see above) or the checkpoint does not fit the model.
        """
        if self.dist.is_main:
            recover_checkpoints(self.ckpt_dir)  # a crash inside a save may have left its old folder aside
        self.dist.barrier()
        picked = pick_checkpoint(self.ckpt_dir, which)
        if picked is None:
            return None
        path, (model_state, ema_state, state) = picked
        changes = check_config(path, json.loads(self.run_config_json), allow_changes)
        self._restore(path, model_state, ema_state, state, changed=bool(changes))
        self.dist.barrier()  # every rank has read the checkpoint before rank 0 moves anything
        archive = archive_future(self.out_dir, self.ckpt_dir, self.step) if self.dist.is_main else None
        self.dist.barrier()
        self.saved_step = self.step
        self.resume_record = {
            "event": "resume",
            "step": self.step,
            "from": str(path),
            "changes": {k: [old, new] for k, (old, new) in changes.items()},
            "archived": str(archive) if archive else None,
        }
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def _restore(
        self,
        path: Path,
        model_state: dict[str, torch.Tensor],
        ema_state: dict[str, torch.Tensor],
        state: dict[str, Any],
        changed: bool,
    ) -> None:
        """Load a checkpoint read by :func:`pick_checkpoint` into the model, EMA, optimizer...;
        with ``changed`` settings, the optimizer's settings and the schedule follow the new config."""
        try:
            load_state_dict_checked(self.model, model_state, str(path / MODEL_FILE))
            load_state_dict_checked(self.ema.module, ema_state, str(path / EMA_FILE))
            # with changed settings the checkpoint's groups hold the old lr, betas...: the new config's apply
            load_optimizer_state(self.optimizer, self.scheduler, state["optimizer"], state["scheduler"], changed)
            self.scaler.load_state_dict(state["scaler"])
            self.load_extra_state(state, path, changed)
        except (ValueError, RuntimeError, KeyError) as err:
            raise ValueError(f"checkpoint {path} does not fit this run's model or optimizer: {err}") from err
        self.ema.num_updates = int(state["ema_updates"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step, self.samples_seen, self.skipped = state["step"], state["samples_seen"], state["skipped"]

    def _last_good(self, before: int) -> Path | None:
        """The newest checkpoint of this run older than step ``before`` (every saved one passed
        the finiteness checks)."""
        older = [p for p in checkpoint_dirs(self.ckpt_dir) if step_of(p) < before]
        return older[-1] if older else None

    def _check_weights(self) -> None:
        """FloatingPointError when the model or the EMA holds a non-finite parameter (checked on
        every rank: they hold the same weights, so all raise together)."""
        for what, module in (("model", self.model), ("EMA", self.ema.module)):
            params = dict(module.named_parameters())
            if not params or bool(torch.stack([p.isfinite().all() for p in params.values()]).all()):
                continue
            bad = [name for name, p in params.items() if not bool(p.isfinite().all())]
            raise FloatingPointError(
                f"non-finite {what} weights at step {self.step} ({', '.join(bad[:5])}"
                f"{f', ... ({len(bad)} in all)' if len(bad) > 5 else ''}); not saved; "
                f"last good checkpoint: {self._last_good(self.step) or 'none yet'}"
            )

    def save(self) -> Path | None:
        """Write a checkpoint for the current step (rank 0; other ranks wait for it).

        Raises:
            FloatingPointError: a weight is not finite (nothing is written).
            CheckpointWriteError: the disk is full or not writable (nothing partial is left).
        """
        self._check_weights()
        path = None
        if self.dist.is_main:
            state = {
                "step": self.step,
                "samples_seen": self.samples_seen,
                "skipped": self.skipped,
                "world_size": self.dist.world_size,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema_updates": self.ema.num_updates,
                "torch_rng": torch.get_rng_state(),
                **self.extra_state(),
            }
            if self.device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            path = save_checkpoint(
                self.ckpt_dir,
                self.step,
                self.model,
                self.ema.module.state_dict(),
                state,
                self.run_config_json,
                self.config.keep_last,
            )
        self.dist.barrier()
        self.saved_step = self.step
        return path

    # ----------------------------------------------------------------- data
    def batches(self) -> Iterator[list[MicroBatch]]:
        """Endless stream of steps, each a list of ``grad_accum`` (inputs, labels) micro-batches
        for this rank, starting at the current data position."""
        cfg = self.config
        sampler = EpochSampler(
            len(self.dataset),
            cfg.seed,
            start=self.samples_seen,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            chunk=self.micro_batch,
        )
        workers = cfg.data.num_workers
        loader = DataLoader(
            SkipBroken(self.dataset),
            batch_size=self.micro_batch,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_skip_broken,
            persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda",
            # a private generator: the loader must not draw from the global RNG, or a resumed
            # run would see a shifted random stream
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        step: list[MicroBatch] = []
        for inputs, labels, skipped in loader:
            self.skipped += skipped
            step.append((inputs, labels))
            if len(step) == cfg.grad_accum:
                yield step
                step = []

    # ----------------------------------------------------------------- training
    def autocast(self) -> contextlib.AbstractContextManager:
        """The configured autocast context (a no-op for fp32)."""
        dtype = AUTOCAST_DTYPES.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Wrap one micro-step's forward and backward: DDP all-reduces gradients on the last
        micro-step only (its forward must run inside the context too)."""
        return self.train_model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()

    def optimizer_step(self) -> torch.Tensor:
        """Unscale, clip, step optimizer + scheduler, update the EMA; returns the grad norm."""
        with record_function("optimizer"):
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        with record_function("ema"):
            self.ema.update(self.model)
        return grad_norm.detach()

    def _check_finite(self, logger: RunLogger) -> None:
        """FloatingPointError when a step of the log window had a non-finite loss or gradient norm
        (with fp16 loss scaling an infinite gradient norm is routine: the scaler skips that step)."""
        keys = ("loss",) if self.scaler.is_enabled() else ("loss", "grad_norm")
        bad = logger.first_non_finite(keys)
        if bad is not None:
            step, key, terms = bad
            raise FloatingPointError(
                f"non-finite {key} {terms[key]} at step {step} (terms: {terms}); "
                f"last good checkpoint: {self._last_good(step) or 'none yet'}"
            )

    def start_fields(self) -> dict[str, Any]:
        """Extra fields for the run's ``start`` log event."""
        return {}

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``config.steps``; returns the logged windows (also in ``log.jsonl``). The
        ``val`` events of :meth:`validate` go to ``log.jsonl`` and, on rank 0, ``val_history``.

        Raises:
            TrainingInterrupted: Ctrl-C (SIGINT) came; the step under way was finished and saved
                (when finite). Outside the main thread or under DDP, Ctrl-C acts as usual.
            FloatingPointError: a loss, gradient norm or weight went non-finite (nothing saved).
        """
        cfg = self.config
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / TRAIN_CONFIG_FILE).write_text(self.run_config_json + "\n")
        if self.step >= cfg.steps:
            return self.history
        if cfg.optim.warmup_steps >= cfg.steps and self.dist.is_main:
            log.warning(
                "optim.warmup_steps = %d is not shorter than steps = %d: the learning rate only rises and the run "
                "ends at %s of its peak, never decaying",
                cfg.optim.warmup_steps,
                cfg.steps,
                f"{min(1.0, cfg.steps / cfg.optim.warmup_steps):.0%}",
            )
        resumed = self.resume_record is not None
        logger = RunLogger(self.out_dir, self.dist, cfg.tensorboard, purge_step=self.step + 1 if resumed else None)
        if self.resume_record is not None:
            logger.event(**self.resume_record)
            self.resume_record = None
        logger.event(
            event="start",
            step=self.step,
            world_size=self.dist.world_size,
            micro_batch=self.micro_batch,
            grad_accum=cfg.grad_accum,
            seed=cfg.seed,
            sample_seeds="per sample: f(seed, epoch, position); rank r reads slice r of each chunk",
            threads=self.threads,
            threads_reason=self.threads_reason,
            **self.start_fields(),
        )
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not self.progress,
            desc=self.desc,
            unit="step",
            position=self.bar_position,
        )
        postfix: dict[str, str] = {}
        self._window_items = 0
        self._epoch = self.samples_seen // len(self.dataset)
        try:
            with DeferredInterrupt() as self.interrupt:
                self._loop(logger, bar, postfix)
        finally:
            bar.close()
            logger.close()
        return self.history

    def _loop(self, logger: RunLogger, bar: tqdm, postfix: dict[str, str]) -> None:
        """The steps of :meth:`fit`, until ``config.steps`` or an interrupt."""
        cfg = self.config
        batches = self.batches()
        tick = time.perf_counter()
        while True:
            try:
                with record_function("data"):
                    micro_batches = next(batches)
            except Exception:
                if self.interrupt.requested:  # Ctrl-C also reaches loader workers; no step had begun
                    break
                raise
            terms = self.train_step(micro_batches)
            # data + step time only: validation, grids and checkpoints are left out, so
            # val events can be read against training time (benchmarks/convergence.py)
            self.train_seconds += time.perf_counter() - tick
            self.step += 1
            self.samples_seen += cfg.batch_size
            self._window_items += cfg.batch_size
            with record_function("logging"):
                logger.add(self.step, terms)
                bar.update(1)
            done = self.step >= cfg.steps
            checkpoint = self.step % cfg.ckpt_every == 0 or done
            if self.step % cfg.log_every == 0 or checkpoint:
                record = self._flush(logger)
                postfix.update({k: f"{record[k]:.4f}" for k in self.postfix_keys if k in record})
                if "images_per_s" in record:
                    postfix["img/s"] = f"{record['images_per_s']:.1f}"  # of this log window
                bar.set_postfix(postfix)
            if self.val_every and (self.step % self.val_every == 0 or done):
                metrics = self._validate(logger)
                postfix.update({k: f"{metrics[k]:.1f}" for k in self.val_postfix_keys if k in metrics})
                bar.set_postfix(postfix)
            if cfg.sample_every and (self.step % cfg.sample_every == 0 or done):
                self.write_samples(logger)
            if checkpoint:
                self.save()
            if done:
                return
            if self._stop_requested(boundary=self.step % cfg.log_every == 0 or checkpoint):
                break
            tick = time.perf_counter()
        self._stop_interrupted(logger)

    def _flush(self, logger: RunLogger) -> dict[str, float]:
        """Check the log window is finite (before any save: a checkpoint is always good), write it,
        and close the epochs it completed; returns the window's record."""
        self._check_finite(logger)
        extra = {"lr": self.optimizer.param_groups[0]["lr"], "skipped": self.skipped}
        record = logger.flush(self.step, self._window_items, extra)
        self.history.append({"step": self.step, **record})
        self._window_items = 0
        new_epoch = self.samples_seen // len(self.dataset)
        if new_epoch > self._epoch:
            logger.end_epoch(new_epoch - 1, self.step)  # the last epoch completed
            self._epoch = new_epoch
        return record

    def _stop_requested(self, boundary: bool) -> bool:
        """Whether Ctrl-C asks to stop after this step. One process: as soon as it was pressed.
        DDP: every rank must stop at the same step (a rank that stopped alone would hang the
        others in their next collective), so the ranks agree, stopping when any of them was
        interrupted, at log boundaries only: a flag read waits for the device, which the log
        flush does anyway."""
        if not self.dist.enabled:
            return self.interrupt.requested
        if not boundary:
            return False
        flag = torch.tensor([float(self.interrupt.requested)], device=self.device)
        return bool(self.dist.all_reduce_mean(flag).item() > 0)

    def _stop_interrupted(self, logger: RunLogger) -> None:
        """After Ctrl-C, at a step boundary: log and save the current step unless it is saved
        already, then raise :class:`TrainingInterrupted` naming the checkpoint."""
        if self.saved_step != self.step:
            if logger.window:
                self._flush(logger)
            self.save()
        where = self.ckpt_dir / step_dir_name(self.step)
        raise TrainingInterrupted(f"stopped at step {self.step}; saved {where} (continue with --resume auto)")

    def _validate(self, logger: RunLogger) -> dict[str, float]:
        """Run :meth:`validate` on rank 0 and log it; every rank leaves together."""
        started = time.perf_counter()
        metrics = self.validate() if self.dist.is_main else {}
        self.dist.barrier()  # the other ranks wait here rather than in the next step's all-reduce
        seconds = time.perf_counter() - started
        logger.exclude_time(seconds)  # the window's images/s measures training alone
        if metrics:
            metrics = {**metrics, "train_seconds": self.train_seconds}
            self.val_history.append(logger.validation(self.step, metrics, seconds))
        return metrics
