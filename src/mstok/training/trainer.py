"""The one training loop of mstok: tokenizers, their stages, and the proxy tokenizer.

``Trainer(config).fit()`` trains the model named in the config with the losses and the
stage the config describes (single stage, two-stage stage 1 or 2, or a MaskGIT-VQGAN proxy).
The same command runs on one CPU or under ``torchrun`` on many GPUs (DDP); the global
batch is ``batch_size``, split into ``grad_accum`` micro-steps per rank.

A resumed run continues bit-identically: the data order and every augmentation are
functions of (seed, sample position), and model, EMA, optimizers, schedulers, discriminator,
grad scalers and RNG states are restored. Checkpoints are written atomically by rank 0.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.data import EpochSampler, SkipBroken, collate_skip_broken
from mstok.tokenizers import create_tokenizer
from mstok.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mstok.training.components import (
    build_dataset,
    build_loss,
    check_model_fits_loss,
    fixed_batch,
    load_proxy,
)
from mstok.training.config import TrainConfig
from mstok.training.distributed import DistContext
from mstok.training.logger import RunLogger
from mstok.training.optim import ModelEMA, build_optimizer, build_scheduler
from mstok.training.stages import apply_stage, copy_pixel_decoder, load_initial_weights

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Trains one model according to a :class:`TrainConfig`.

    Args:
        config: the run's configuration.
        dataset: optional dataset indexed by ``(index, seed)`` returning ``(image, label)`` or
            None; defaults to the image folder or shards at ``config.data.path``.
        progress: show a tqdm progress bar (rank 0 only).
        dist: the process's place in a DDP job; read from the torchrun environment by default.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset | None = None,
        progress: bool = True,
        dist: DistContext | None = None,
    ) -> None:
        self.config = config
        self.dist = dist or DistContext.from_env(config.device)
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
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

        self.proxy = load_proxy(config.proxy.checkpoint, config.proxy.weights) if config.proxy.checkpoint else None
        if self.proxy is not None:
            self.proxy.to(self.device)
        overrides = dict(config.model.overrides)
        if config.stage.pixel_decoder_from_proxy:
            if self.proxy is None:
                raise ValueError("stage.pixel_decoder_from_proxy needs proxy.checkpoint")
            overrides.setdefault("pixel_decoder", self.proxy.config.to_dict())
        self.model = create_tokenizer(config.model.preset, **overrides)
        fill = ("pixel_decoder",) if config.stage.pixel_decoder_from_proxy else ()
        if config.model.init_from:
            load_initial_weights(self.model, config.model.init_from, config.model.init_weights, fill=fill)
        if config.stage.pixel_decoder_from_proxy:
            copy_pixel_decoder(self.model, self.proxy)
        self.model.to(self.device)
        self.trainable, self.frozen = apply_stage(self.model, config.stage.train)
        self.ema = ModelEMA(self.model, config.ema_decay, config.ema_warmup)

        self.loss_fn, self.adversarial = build_loss(config, self.device)
        check_model_fits_loss(self.model, self.loss_fn, self.proxy)
        opt = config.optim
        self.optimizer = build_optimizer(self.model, opt.lr, opt.weight_decay, opt.betas, opt.eps)
        self.scheduler = build_scheduler(self.optimizer, config.steps, opt.warmup_steps, opt.lr, opt.end_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        if self.adversarial is not None:
            d = config.discriminator
            self.d_optimizer = build_optimizer(self.adversarial, d.lr, d.weight_decay, d.betas, opt.eps)
            self.d_scheduler = build_scheduler(self.d_optimizer, config.steps, d.warmup_steps, d.lr, d.lr)
            self.d_scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.train_model = self.model
        if self.dist.enabled:
            # buffers (codebook usage counts) are updated identically on every rank from
            # gathered data, so they need no broadcast
            self.train_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False,
            )
        if config.compile:
            self.train_model = torch.compile(self.train_model)

        size = self.model.config.image_size
        self.dataset = dataset if dataset is not None else build_dataset(config, size)
        # grids use the folder or shards of data.path; a dataset passed in gets none
        self.fixed_images = (
            fixed_batch(self.dataset, config.num_samples, size) if dataset is None and config.sample_every else None
        )
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
        self.ema.num_updates = int(state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.adversarial is not None:
            if "discriminator" not in state:
                raise ValueError(f"{path} has no discriminator state, but this config trains a GAN")
            self.adversarial.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])
            self.d_scheduler.load_state_dict(state["d_scheduler"])
            self.d_scaler.load_state_dict(state["d_scaler"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step, self.samples_seen, self.skipped = state["step"], state["samples_seen"], state["skipped"]
        log.info("resumed from %s at step %d", path, self.step)
        return path

    def save(self) -> Path | None:
        """Write a checkpoint for the current step (rank 0; other ranks wait for it)."""
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
            }
            if self.device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            if self.adversarial is not None:
                state["discriminator"] = self.adversarial.state_dict()
                state["d_optimizer"] = self.d_optimizer.state_dict()
                state["d_scheduler"] = self.d_scheduler.state_dict()
                state["d_scaler"] = self.d_scaler.state_dict()
            path = save_checkpoint(
                self.ckpt_dir,
                self.step,
                self.model,
                self.ema.module.state_dict(),
                state,
                self.config.to_json(),
                self.config.keep_last,
            )
        self.dist.barrier()
        return path

    # ----------------------------------------------------------------- data
    def batches(self) -> Iterator[list[torch.Tensor]]:
        """Endless stream of steps, each a list of ``grad_accum`` micro-batches for this rank,
        starting at the current data position."""
        cfg = self.config
        sampler = EpochSampler(
            len(self.dataset),
            cfg.seed,
            start=self.samples_seen,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            chunk=self.micro_batch,
        )
        loader = DataLoader(
            SkipBroken(self.dataset),
            batch_size=self.micro_batch,
            sampler=sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate_skip_broken,
            persistent_workers=cfg.data.num_workers > 0,
            pin_memory=self.device.type == "cuda",
            # a private generator: the loader must not draw from the global RNG, or a resumed
            # run would see a shifted random stream
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        step: list[torch.Tensor] = []
        for images, _labels, skipped in loader:
            self.skipped += skipped
            step.append(images)
            if len(step) == cfg.grad_accum:
                yield step
                step = []

    # ----------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.config.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    @torch.no_grad()
    def proxy_codes(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P) proxy-tokenizer ids of a batch (bf16 autocast on GPU: it is frozen)."""
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            return self.proxy.encode(images, check_values=False)

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimisation step over this rank's micro-batches; returns the terms (device tensors)."""
        cfg = self.config
        self.model.train()
        gan_active = self.adversarial is not None and self.step >= cfg.loss.gan_start_step
        n = len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        latents, indices, reals, fakes = [], [], [], []
        for i, images in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            last = i == n - 1
            sync = self.train_model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with sync:
                codes = self.proxy_codes(images) if self.loss_fn.needs_proxy_codes else None
                with self._autocast():
                    output = self.train_model(images)
                loss, terms = self.loss_fn(output, images, codes, gan_active)
                self.scaler.scale(loss / n).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / n
            latents.append(output.latents.detach())
            indices.append(output.indices)
            if gan_active:
                reals.append(images)
                fakes.append(output.reconstruction.detach().float())
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.ema.update(self.model)
        if gan_active:
            sums.update(self.discriminator_step(reals, fakes))
        all_indices = self.dist.all_gather_cat(torch.cat(indices), same_size=True)  # SkipBroken fixes sizes
        quantizer = self.model.quantizer
        if cfg.dead_code_threshold > 0 and quantizer.embedding.weight.requires_grad:
            all_latents = self.dist.all_gather_cat(torch.cat(latents), same_size=True)
            sums["revived_codes"] = quantizer.revive_dead_codes(
                all_latents, all_indices, threshold=cfg.dead_code_threshold
            ).float()
        sums.update(quantizer.usage_tensors(all_indices))
        sums["grad_norm"] = grad_norm.detach()
        return sums

    def discriminator_step(self, reals: list[torch.Tensor], fakes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One discriminator update on real images and detached reconstructions."""
        n = len(reals)
        self.d_optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for real, fake in zip(reals, fakes, strict=True):
            with self._autocast():
                loss, terms = self.adversarial.discriminator_loss(real, fake)
            self.d_scaler.scale(loss / n).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / n
        self.dist.all_reduce_grads(self.adversarial.parameters())
        self.d_scaler.unscale_(self.d_optimizer)
        torch.nn.utils.clip_grad_norm_(self.adversarial.parameters(), self.config.optim.grad_clip)
        self.d_scaler.step(self.d_optimizer)
        self.d_scaler.update()
        self.d_scheduler.step()
        real_mean = self.dist.all_reduce_mean(sums["logits_real"])
        fake_mean = self.dist.all_reduce_mean(sums["logits_fake"])
        self.adversarial.update_ema(real_mean, fake_mean)
        return sums

    @torch.no_grad()
    def reconstruct_fixed(self) -> torch.Tensor | None:
        """EMA-model reconstructions of the fixed batch (through the proxy for a bare proxy-code head)."""
        if self.fixed_images is None:
            return None
        images = self.fixed_images.to(self.device)
        output = self.ema.module(images)
        if output.reconstruction is not None:
            return output.reconstruction.clamp(0, 1)
        if self.proxy is not None:
            return self.proxy.decode_probabilities(output.logits.float().softmax(-1)).clamp(0, 1)
        return None

    def _check_finite(self, logger: RunLogger) -> None:
        bad = logger.first_non_finite()
        if bad is not None:
            step, terms = bad
            last = latest_checkpoint(self.ckpt_dir)
            raise FloatingPointError(
                f"non-finite loss {terms['loss']} at step {step} (terms: {terms}); "
                f"last good checkpoint: {last or 'none yet'}"
            )

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``config.steps``; returns the logged windows (also in ``log.jsonl``)."""
        cfg = self.config
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(cfg.to_json() + "\n")
        if self.step >= cfg.steps:
            return self.history
        logger = RunLogger(self.out_dir, self.dist, cfg.tensorboard)
        logger.event(
            event="start",
            step=self.step,
            world_size=self.dist.world_size,
            micro_batch=self.micro_batch,
            grad_accum=cfg.grad_accum,
            seed=cfg.seed,
            sample_seeds="per sample: f(seed, epoch, position); rank r reads slice r of each chunk",
            trainable=len(self.trainable),
            frozen=len(self.frozen),
        )
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train", unit="step")
        window_images = 0
        epoch = self.samples_seen // len(self.dataset)
        try:
            for micro_batches in self.batches():
                terms = self.train_step(micro_batches)
                self.step += 1
                self.samples_seen += cfg.batch_size
                window_images += cfg.batch_size
                logger.add(self.step, terms)
                bar.update(1)
                done = self.step >= cfg.steps
                checkpoint = self.step % cfg.ckpt_every == 0 or done
                if self.step % cfg.log_every == 0 or checkpoint:
                    self._check_finite(logger)  # before any save: a checkpoint is always good
                    extra = {"lr": self.optimizer.param_groups[0]["lr"], "skipped": self.skipped}
                    record = logger.flush(self.step, window_images, extra)
                    self.history.append({"step": self.step, **record})
                    window_images = 0
                    bar.set_postfix(loss=f"{record['loss']:.4f}", usage=f"{record['usage']:.2f}")
                    new_epoch = self.samples_seen // len(self.dataset)
                    if new_epoch > epoch:
                        logger.end_epoch(new_epoch - 1, self.step)  # the last epoch completed
                        epoch = new_epoch
                if cfg.sample_every and (self.step % cfg.sample_every == 0 or done):
                    recon = self.reconstruct_fixed()
                    if recon is not None:
                        logger.image_grid(self.step, self.fixed_images, recon.cpu())
                if checkpoint:
                    self.save()
                if done:
                    break
        finally:
            bar.close()
            logger.close()
        return self.history
