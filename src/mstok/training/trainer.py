"""The tokenizer trainer: tokenizers, their stages, and the proxy tokenizer.

``Trainer(config).fit()`` trains the model named in the config with the losses and the
stage the config describes (single stage, two-stage stage 1 or 2, or a MaskGIT-VQGAN proxy).
With ``val_every`` set, the EMA model is measured on a fixed held-out batch as it trains.
The same command runs on one CPU or under ``torchrun`` on many GPUs (DDP); the global
batch is ``batch_size``, split into ``grad_accum`` micro-steps per rank. The loop, resume
and checkpoints are the shared :class:`~mstok.training.engine.Engine`'s; this class adds the
reconstruction losses, the proxy codes, the GAN discriminator, dead-code revival and validation.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from torch.utils.data import Dataset

from mstok.evaluation.evaluate import load_lpips
from mstok.evaluation.metrics import mean_colour, psnr, ssim
from mstok.tokenizers.nested import prefix_lengths
from mstok.tokenizers.registry import build_tokenizer, preset_config
from mstok.training.components import (
    build_dataset,
    build_loss,
    build_validation,
    check_model_fits_loss,
    fixed_batch,
    load_proxy,
)
from mstok.training.config import TrainConfig
from mstok.training.distributed import DistContext
from mstok.training.engine import Engine, MicroBatch
from mstok.training.logger import RunLogger
from mstok.training.optim import build_optimizer, build_scheduler, load_optimizer_state
from mstok.training.stages import apply_stage, copy_pixel_decoder, load_initial_weights


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def tokenizer_model_config(config: TrainConfig, proxy: torch.nn.Module | None = None) -> Any:
    """The model config a run of ``config`` trains: preset ``model.preset`` with ``model.overrides``, the tail
    token when nested dropout trains, and ``proxy``'s pixel decoder when the stage copies it. Cheap (no model
    is built): a finished run's saved config can be checked against what its train config means today."""
    overrides = dict(config.model.overrides)
    if config.nested.distribution != "none":
        overrides["nested"] = True  # the tail token nested dropout trains (config.py checked the rest)
    if config.stage.pixel_decoder_from_proxy:
        if proxy is None:
            raise ValueError("stage.pixel_decoder_from_proxy needs proxy.checkpoint")
        overrides.setdefault("pixel_decoder", proxy.config.to_dict())
    return preset_config(config.model.preset, **overrides)


class Trainer(Engine):
    """Trains one tokenizer according to a :class:`TrainConfig`.

    Args:
        config: the run's configuration.
        dataset: optional dataset indexed by ``(index, seed)`` returning ``(image, label)`` or
            None; defaults to the image folder or shards at ``config.data.path``.
        progress: show a tqdm progress bar (rank 0 only).
        dist: the process's place in a DDP job; read from the torchrun environment by default.
        val_images: the held-out batch for ``config.val_every``, (N, 3, S, S) in [0, 1] at the
            model's resolution. Without it the batch comes from ``data.val_path``, else it is
            held out of ``data.path`` (and taken out of training); a ``dataset`` passed in is
            never split, so validating with one needs ``val_images`` or ``data.val_path``.
        desc: the progress bar's label.
        bar_position: the bar's line when several processes share a terminal (the demo).
    """

    config: TrainConfig
    postfix_keys = ("loss", "usage")

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset | None = None,
        progress: bool = True,
        dist: DistContext | None = None,
        val_images: torch.Tensor | None = None,
        desc: str = "train",
        bar_position: int | None = None,
    ) -> None:
        super().__init__(config, progress, dist, desc, bar_position)
        self.val_every = config.val_every
        if self.val_every and val_images is None and dataset is not None and not config.data.val_path:
            raise ValueError(
                "val_every > 0 needs held-out images: set data.val_path (or data.path instead of passing a "
                "dataset) or pass val_images= to Trainer"
            )
        self.proxy = load_proxy(config.proxy.checkpoint, config.proxy.weights) if config.proxy.checkpoint else None
        if self.proxy is not None:
            self.proxy.to(self.device)
        self.nested = config.nested.distribution != "none"
        model_config = tokenizer_model_config(config, self.proxy)
        model = build_tokenizer(model_config)
        fill = ("pixel_decoder",) if config.stage.pixel_decoder_from_proxy else ()
        if self.nested:
            fill += ("decoder.tail_token",)  # a model trained without nested tokens may start a nested run
        if config.model.init_from:
            load_initial_weights(model, config.model.init_from, config.model.init_weights, fill=fill)
        if config.stage.pixel_decoder_from_proxy:
            copy_pixel_decoder(model, self.proxy)
        self.trainable, self.frozen = apply_stage(model, config.stage.train)
        if getattr(model.config, "nested", False) and not self.nested:
            # no prefix is dropped, so the tail token gets no gradient (DDP refuses such a parameter): keep it
            model.decoder.tail_token.requires_grad_(False)
        # a stage that freezes the quantizer (TiTok's stage 2) must not move its codes either:
        # no EMA / k-means update in forward, no step_hook
        model.quantizer.frozen = any(name.startswith("quantizer.") for name in self.frozen)

        self.loss_fn, self.adversarial = build_loss(config, self.device)
        check_model_fits_loss(model, self.loss_fn, self.proxy)
        if self.adversarial is not None:
            d = config.discriminator
            self.d_optimizer = build_optimizer(self.adversarial, d.lr, d.weight_decay, d.betas, config.optim.eps)
            self.d_scheduler = build_scheduler(self.d_optimizer, config.steps, d.warmup_steps, d.lr, d.lr)
            self.d_scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        size = model.config.image_size
        full = dataset if dataset is not None else build_dataset(config, size)
        train = full
        self.val_images: torch.Tensor | None = None
        if self.val_every:
            if val_images is not None:
                self.val_images = _checked_val_images(val_images, size)
            else:  # from data.val_path, or held out of data.path (never of a dataset passed in)
                split, self.val_images = build_validation(config, full if dataset is None else None, size)
                train = split if split is not None else full
        self.setup(model, train)
        # grids show held-out images when there are some (else the folder or shards of data.path;
        # a dataset passed in without val_images gets none)
        self.fixed_images = None
        if config.sample_every and self.val_images is not None:
            self.fixed_images = self.val_images[: config.num_samples]
        elif config.sample_every and dataset is None:
            self.fixed_images = fixed_batch(full, config.num_samples, size)
        self.val_lpips, self.val_lpips_missing = None, None
        self.val_mean_colour_psnr = 0.0
        if self.val_images is not None and self.dist.is_main:
            self._setup_validation()

    def _setup_validation(self) -> None:
        """LPIPS for validation (the loss's when it has one; else only from local files, never a
        download), and the PSNR of painting each held-out image in its mean colour, a floor to
        read the reconstructions' PSNR against."""
        self.val_lpips = self.loss_fn.perceptual
        if self.val_lpips is None:
            p = self.config.perceptual
            # an extra, so its absence is logged at info level (and in the start event), not warned
            self.val_lpips, self.val_lpips_missing = load_lpips(
                self.device, (p.vgg_weights or None, p.lpips_weights or None), p.cache or None, False, logging.INFO
            )
        self.val_mean_colour_psnr = _mean(psnr(self.val_images, mean_colour(self.val_images)))

    # ----------------------------------------------------------------- engine hooks
    def extra_state(self) -> dict[str, Any]:
        if self.adversarial is None:
            return {}
        return {
            "discriminator": self.adversarial.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
            "d_scheduler": self.d_scheduler.state_dict(),
            "d_scaler": self.d_scaler.state_dict(),
        }

    def load_extra_state(self, state: dict[str, Any], path: Path, changed: bool = False) -> None:
        if self.adversarial is None:
            return
        if "discriminator" not in state:
            raise ValueError(f"{path} has no discriminator state, but this config trains a GAN")
        self.adversarial.load_state_dict(state["discriminator"])
        load_optimizer_state(self.d_optimizer, self.d_scheduler, state["d_optimizer"], state["d_scheduler"], changed)
        self.d_scaler.load_state_dict(state["d_scaler"])

    def start_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"trainable": len(self.trainable), "frozen": len(self.frozen)}
        fields["train_images"] = len(self.dataset)
        if self.val_images is not None:
            fields["val_images"] = len(self.val_images)
            if self.val_lpips_missing:
                fields["val_lpips_unavailable"] = self.val_lpips_missing.splitlines()[0]
        return fields

    def write_samples(self, logger: RunLogger) -> None:
        recon = self.reconstruct_fixed()
        if recon is not None:
            stage = self.config.stage.name
            labels = ("original", "reconstruction" if stage == "single" else f"reconstruction ({stage})")
            logger.image_grid(self.step, self.fixed_images, recon.cpu(), labels=labels)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PSNR, SSIM (and LPIPS when available) of the EMA model's reconstructions of the
        held-out batch, means over its images; in micro-batches, so it fits where training does."""
        if self.val_images is None:
            return {}
        model = self.ema.module.eval()
        recons, distances = [], []
        # the RNG is forked so that a stochastic module (a VAE's sampling) cannot shift the
        # training stream: validating must leave resumed runs bit-identical
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for chunk in self.val_images.split(self.micro_batch):
                images = chunk.to(self.device)
                recon = self.reconstruct(model, images)
                if recon is None:
                    return {}  # a proxy-code head without the proxy: no pixels to measure
                recons.append(recon.float().cpu())
                if self.val_lpips is not None:
                    distances += self.val_lpips(recon.float(), images).tolist()
        recon = torch.cat(recons)
        metrics = {"val_psnr": _mean(psnr(self.val_images, recon)), "val_ssim": _mean(ssim(self.val_images, recon))}
        if distances:
            metrics["val_lpips"] = _mean(distances)
        metrics["val_mean_colour_psnr"] = self.val_mean_colour_psnr
        return metrics

    # ----------------------------------------------------------------- training
    @torch.no_grad()
    def proxy_codes(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P) proxy-tokenizer ids of a batch (bf16 autocast on GPU: it is frozen)."""
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            return self.proxy.encode(images, check_values=False)

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, torch.Tensor]:
        """One optimisation step over this rank's micro-batches; returns the terms (device tensors)."""
        cfg = self.config
        self.model.train()
        gan_active = self.adversarial is not None and self.step >= cfg.loss.gan_start_step
        n = len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        latents, indices, reals, fakes = [], [], [], []
        for i, (images, _labels) in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            with self.grad_sync(last=i == n - 1):
                with record_function("forward"):
                    codes = self.proxy_codes(images) if self.loss_fn.needs_proxy_codes else None
                    inputs = self.loss_fn.model_inputs(images)  # e.g. a semantic teacher's features; usually none
                    if self.nested:
                        inputs["lengths"] = self.prefix_lengths(i, len(images))
                    with self.autocast():
                        output = self.train_model(images, **inputs)
                    loss, terms = self.loss_fn(output, images, codes, gan_active, step=self.step)
                with record_function("backward"):
                    self.scaler.scale(loss / n).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / n
            latents.append(output.latents.detach())
            indices.append(output.indices)
            if gan_active:
                reals.append(images)
                fakes.append(output.reconstruction.detach().float())
        sums["grad_norm"] = self.optimizer_step()
        if gan_active:
            with record_function("discriminator"):
                sums.update(self.discriminator_step(reals, fakes))
        if indices[0] is None:  # a continuous bottleneck: no codes to revive or count
            return sums
        with record_function("quantizer bookkeeping"):
            sums.update(self.codebook_step(latents, indices))
        return sums

    def codebook_step(self, latents: list[torch.Tensor], indices: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The quantizer's own update after the optimizer (VQ: dead-code revival) and its usage
        statistics, over every rank's ids of this step."""
        cfg = self.config
        sums: dict[str, torch.Tensor] = {}
        all_indices = self.dist.all_gather_cat(torch.cat(indices), same_size=True)  # SkipBroken fixes sizes
        quantizer = self.model.quantizer
        settings = {"dead_code_threshold": cfg.dead_code_threshold}
        if not quantizer.frozen and quantizer.uses_step_hook(**settings):  # its own update (VQ: dead-code revival)
            all_latents = self.dist.all_gather_cat(torch.cat(latents), same_size=True)
            sums.update(quantizer.step_hook(all_latents, all_indices, **settings))
        sums.update(quantizer.usage_tensors(all_indices))
        return sums

    def prefix_lengths(self, micro_step: int, count: int) -> torch.Tensor:
        """Nested dropout's prefix lengths (count,) for this rank's ``micro_step`` of the current step.

        One length per slot of the global batch, drawn from (seed, step) alone and sliced like the
        data (rank r reads slice r of each micro-step's chunk): any number of ranks, and a
        resumed run, train each sample slot with the same length."""
        cfg = self.config
        state = np.random.SeedSequence([cfg.seed, self.step, 0x6E6573746564]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        total = self.model.config.num_latent_tokens
        lengths = prefix_lengths(
            cfg.nested.distribution, total, cfg.batch_size, generator, cfg.nested.min_tokens, cfg.nested.full_fraction
        )  # (global batch,)
        start = (micro_step * self.dist.world_size + self.dist.rank) * self.micro_batch
        return lengths[start : start + count].to(self.device)

    def discriminator_step(self, reals: list[torch.Tensor], fakes: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One discriminator update on real images and detached reconstructions."""
        n = len(reals)
        self.d_optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for real, fake in zip(reals, fakes, strict=True):
            with self.autocast():
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
        """EMA-model reconstructions of the fixed batch."""
        if self.fixed_images is None:
            return None
        return self.reconstruct(self.ema.module, self.fixed_images.to(self.device))

    @torch.no_grad()
    def reconstruct(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        """``model``'s reconstructions of ``images`` clamped to [0, 1] (through the proxy for a bare
        proxy-code head), or None when it has no way to pixels."""
        output = model(images)
        if output.reconstruction is not None:
            return output.reconstruction.clamp(0, 1)
        if self.proxy is not None:
            return self.proxy.decode_probabilities(output.logits.float().softmax(-1)).clamp(0, 1)
        return None


def _checked_val_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """``images`` as a float (N, 3, S, S) CPU batch, or a ValueError saying what is wrong."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (image_size, image_size):
        raise ValueError(f"val_images must be (N, 3, {image_size}, {image_size}), got {tuple(images.shape)}")
    if not len(images):
        raise ValueError("val_images is empty")
    return images.detach().float().cpu()
