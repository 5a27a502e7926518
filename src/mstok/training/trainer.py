"""The tokenizer trainer: tokenizers, their stages, and the proxy tokenizer.

``Trainer(config).fit()`` trains the model named in the config with the losses and the
stage the config describes (single stage, two-stage stage 1 or 2, or a MaskGIT-VQGAN proxy).
The same command runs on one CPU or under ``torchrun`` on many GPUs (DDP); the global
batch is ``batch_size``, split into ``grad_accum`` micro-steps per rank. The loop, resume
and checkpoints are the shared :class:`~mstok.training.engine.Engine`'s; this class adds the
reconstruction losses, the proxy codes, the GAN discriminator and dead-code revival.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mstok.tokenizers import create_tokenizer
from mstok.training.components import (
    build_dataset,
    build_loss,
    check_model_fits_loss,
    fixed_batch,
    load_proxy,
)
from mstok.training.config import TrainConfig
from mstok.training.distributed import DistContext
from mstok.training.engine import Engine, MicroBatch
from mstok.training.logger import RunLogger
from mstok.training.optim import build_optimizer, build_scheduler
from mstok.training.stages import apply_stage, copy_pixel_decoder, load_initial_weights


class Trainer(Engine):
    """Trains one tokenizer according to a :class:`TrainConfig`.

    Args:
        config: the run's configuration.
        dataset: optional dataset indexed by ``(index, seed)`` returning ``(image, label)`` or
            None; defaults to the image folder or shards at ``config.data.path``.
        progress: show a tqdm progress bar (rank 0 only).
        dist: the process's place in a DDP job; read from the torchrun environment by default.
    """

    config: TrainConfig
    postfix_keys = ("loss", "usage")

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset | None = None,
        progress: bool = True,
        dist: DistContext | None = None,
    ) -> None:
        super().__init__(config, progress, dist)
        self.proxy = load_proxy(config.proxy.checkpoint, config.proxy.weights) if config.proxy.checkpoint else None
        if self.proxy is not None:
            self.proxy.to(self.device)
        overrides = dict(config.model.overrides)
        if config.stage.pixel_decoder_from_proxy:
            if self.proxy is None:
                raise ValueError("stage.pixel_decoder_from_proxy needs proxy.checkpoint")
            overrides.setdefault("pixel_decoder", self.proxy.config.to_dict())
        model = create_tokenizer(config.model.preset, **overrides)
        fill = ("pixel_decoder",) if config.stage.pixel_decoder_from_proxy else ()
        if config.model.init_from:
            load_initial_weights(model, config.model.init_from, config.model.init_weights, fill=fill)
        if config.stage.pixel_decoder_from_proxy:
            copy_pixel_decoder(model, self.proxy)
        self.trainable, self.frozen = apply_stage(model, config.stage.train)

        self.loss_fn, self.adversarial = build_loss(config, self.device)
        check_model_fits_loss(model, self.loss_fn, self.proxy)
        if self.adversarial is not None:
            d = config.discriminator
            self.d_optimizer = build_optimizer(self.adversarial, d.lr, d.weight_decay, d.betas, config.optim.eps)
            self.d_scheduler = build_scheduler(self.d_optimizer, config.steps, d.warmup_steps, d.lr, d.lr)
            self.d_scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        size = model.config.image_size
        self.setup(model, dataset if dataset is not None else build_dataset(config, size))
        # grids use the folder or shards of data.path; a dataset passed in gets none
        self.fixed_images = (
            fixed_batch(self.dataset, config.num_samples, size) if dataset is None and config.sample_every else None
        )

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

    def load_extra_state(self, state: dict[str, Any], path: Path) -> None:
        if self.adversarial is None:
            return
        if "discriminator" not in state:
            raise ValueError(f"{path} has no discriminator state, but this config trains a GAN")
        self.adversarial.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.d_scheduler.load_state_dict(state["d_scheduler"])
        self.d_scaler.load_state_dict(state["d_scaler"])

    def start_fields(self) -> dict[str, Any]:
        return {"trainable": len(self.trainable), "frozen": len(self.frozen)}

    def write_samples(self, logger: RunLogger) -> None:
        recon = self.reconstruct_fixed()
        if recon is not None:
            logger.image_grid(self.step, self.fixed_images, recon.cpu())

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
                codes = self.proxy_codes(images) if self.loss_fn.needs_proxy_codes else None
                with self.autocast():
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
        sums["grad_norm"] = self.optimizer_step()
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
        return sums

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
