"""Training the reference network (``mstok reference train``) on the shared training engine.

:func:`train_reference` trains a :class:`~mstok.networks.reference.ReferenceNet` on labelled
images (Tiny ImageNet's 50,000 training images as shards, or any folder of class sub-folders)
with cross-entropy (label smoothing 0.1), random resized crops (35-100% of the area) and
horizontal flips, AdamW with a linear warmup and a cosine decay to zero, and bf16 autocast
(twice as fast as fp32 on a CPU with AVX-512 bf16; on other CPUs pass ``precision="fp32"``).
Everything else is the :class:`~mstok.training.engine.Engine`'s: the data stream of
``(index, seed)`` pairs, atomic checkpoints every ``ckpt_every`` steps and at the end under
``out/checkpoints/`` (a crash never loses the newest finished one), bit-identical resume (run the
same command again), ``log.jsonl`` and the progress bar. The trained model is then saved into
``out/`` itself (``config.json`` + ``model.safetensors``), so ``out`` is the path to load.

The defaults were chosen by measurement on this project's 2-core CPU (benchmarks/RESULTS.md,
"Reference network"): a 32 px network (64 px crops resized inside) with widths 32-256 and one
block per stage, batch 128, peak lr 4e-3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mstok.config_schema import FRACTION, NON_NEGATIVE, POSITIVE, Rule
from mstok.data import IndexSubset, RandomResizedCropFlip, open_image_dataset
from mstok.evaluation.reference import evaluate_reference, reference_dataset
from mstok.networks.reference import ReferenceConfig, ReferenceNet
from mstok.training.components import held_out_indices
from mstok.training.config import DataConfig, OptimConfig, RunConfig
from mstok.training.distributed import DistContext
from mstok.training.engine import Engine, MicroBatch

log = logging.getLogger(__name__)

DEFAULT_DATA = "../shared/datasets/tiny-imagenet-64-train"
DEFAULT_STEPS = 5000
DEFAULT_BATCH = 128
DEFAULT_LR = 4e-3


def _optim() -> OptimConfig:
    # a classifier's gradient norm is several times a tokenizer's: clipping at 1 would cut every step
    return OptimConfig(
        lr=DEFAULT_LR, end_lr=0.0, betas=(0.9, 0.999), weight_decay=0.05, warmup_steps=200, grad_clip=5.0
    )


def _data() -> DataConfig:
    return DataConfig(path=DEFAULT_DATA, crop_scale=(0.35, 1.0), num_workers=0)


@dataclass
class ReferenceTrainConfig(RunConfig):
    """A reference-network training run: the engine's settings (:class:`RunConfig`, with this
    task's defaults), the network's config, the data and the loss.

    Attributes:
        model: the network (:class:`ReferenceConfig`); ``model.input_size`` is the crop size.
        data: training images (``data.path``) and held-out ones for validation (``data.val_path``).
        label_smoothing: of the cross-entropy.
        val_every: top-1 on ``val_images`` evenly spaced images of ``data.val_path`` every
            ``val_every`` steps and at the end (0: never), logged and shown on the bar.
    """

    optim: OptimConfig = field(default_factory=_optim)
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    ema_decay: float = 0.99
    out_dir: str = "runs/reference"
    precision: str = "bf16"
    log_every: int = 50
    ckpt_every: int = 500
    keep_last: int = 2
    tensorboard: bool = False
    model: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=_data)
    label_smoothing: float = 0.1
    val_every: int = 0
    val_images: int = 1000

    field_rules: ClassVar[dict[str, Rule]] = {
        "label_smoothing": FRACTION,
        "val_every": NON_NEGATIVE,
        "val_images": POSITIVE,
    }


class ReferenceTrainer(Engine):
    """Trains a reference network according to a :class:`ReferenceTrainConfig`.

    Args:
        config: the run's settings.
        dataset: optional training images indexed by ``(index, seed)`` (default: ``data.path``
            with the training augmentation).
        progress: show the progress bar.
        dist: the process's place in a DDP job (read from the torchrun environment by default).
    """

    config: ReferenceTrainConfig
    postfix_keys = ("loss", "accuracy")
    val_postfix_keys = ("val_top1",)

    def __init__(
        self,
        config: ReferenceTrainConfig,
        dataset: Dataset | None = None,
        progress: bool = True,
        dist: DistContext | None = None,
    ) -> None:
        super().__init__(config, progress, dist, desc="reference")
        model = ReferenceNet(config.model)  # after the engine seeded torch: the init is the seed's
        if dataset is None:
            if not config.data.path:
                raise ValueError("no training data: pass the folder of labelled images or shards (--data DIR)")
            augment = RandomResizedCropFlip(
                config.model.input_size, tuple(config.data.crop_scale), flip=config.data.flip
            )
            dataset = open_image_dataset(config.data.path, augment, config.data.max_pixels)
        classes = getattr(dataset, "classes", None)
        if classes is not None and len(classes) > config.model.num_classes:
            raise ValueError(
                f"{config.data.path} holds {len(classes)} classes but model.num_classes is {config.model.num_classes}"
            )
        self.val_every = config.val_every
        self.val_set: Dataset | None = None
        if self.val_every:
            if not config.data.val_path:
                raise ValueError("val_every > 0 needs held-out images: set data.val_path (--val-data DIR)")
            full = reference_dataset(config.data.val_path, model, config.data.max_pixels)
            count = min(config.val_images, len(full))
            # evenly spaced: a class-sorted folder's first images would all be of its first classes
            self.val_set = full if count == len(full) else IndexSubset(full, held_out_indices(len(full), count))
        # channels_last runs the convolutions about 10% faster on a CPU
        self.setup(model.to(memory_format=torch.channels_last), dataset)

    def start_fields(self) -> dict[str, Any]:
        return {"parameters": sum(p.numel() for p in self.model.parameters())}

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, torch.Tensor]:
        """One AdamW step of label-smoothed cross-entropy over this rank's micro-batches."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = max(1, sum(len(labels) for _, labels in micro_batches))  # unreadable images are dropped
        smoothing = self.config.label_smoothing
        sums: dict[str, torch.Tensor] = {}
        for i, (images, labels) in enumerate(micro_batches):
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            with self.grad_sync(last=i == len(micro_batches) - 1):
                with self.autocast():
                    logits = self.train_model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing, reduction="sum") / total
                self.scaler.scale(loss).backward()
            correct = (logits.detach().argmax(dim=1) == labels).sum() / total
            sums["loss"] = sums.get("loss", 0.0) + loss.detach()
            sums["accuracy"] = sums.get("accuracy", 0.0) + correct
        sums["grad_norm"] = self.optimizer_step()
        return sums

    def validate(self) -> dict[str, float]:
        """Top-1 / top-5 of the current weights on the held-out images (no state changes: BatchNorm in eval mode)."""
        if self.val_set is None:
            return {}
        result = evaluate_reference(self.model, self.val_set, batch_size=256)
        return {"val_top1": 100 * result["top1"], "val_top5": 100 * result["top5"]}


def train_reference(
    data: str | Path = DEFAULT_DATA,
    out: str | Path = "runs/reference",
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    lr: float = DEFAULT_LR,
    threads: int = 0,
    seed: int = 0,
    val_data: str | Path | None = None,
    val_every: int = 0,
    num_workers: int = 0,
    device: str = "auto",
    progress: bool = True,
    model: ReferenceConfig | dict[str, Any] | None = None,
    **settings: Any,
) -> ReferenceNet:
    """Train a reference network (or resume the unfinished run in ``out``) and save it into ``out``.

    Args:
        data: labelled training images: a folder of class sub-folders or WebDataset shards with ``cls``.
        out: the run folder: ``checkpoints/``, ``log.jsonl`` and, at the end, the saved model.
        steps, batch_size, lr: the schedule (warmup then cosine to 0 over ``steps``).
        threads: torch threads (0: the free cores).
        val_data: held-out labelled images for ``val_every`` (top-1 on the bar and in the log).
        num_workers: data-loader processes.
        model: the network's config, or a dict of :class:`ReferenceConfig` fields (default: the defaults).
        settings: other :class:`ReferenceTrainConfig` fields (``ckpt_every``, ``precision``, ...).

    Returns:
        the trained network, in eval mode (also saved in ``out``).

    Raises:
        ValueError: a bad setting, or ``out`` holds a run with other settings (the message lists them).
    """
    if isinstance(model, dict):
        model = ReferenceConfig.from_dict(model)
    optim = settings.pop("optim", None) or _optim()
    optim.lr = lr
    config = ReferenceTrainConfig(
        optim=optim,
        steps=steps,
        batch_size=batch_size,
        threads=threads,
        seed=seed,
        out_dir=str(out),
        device=device,
        model=model or ReferenceConfig(),
        data=DataConfig(
            path=str(data),
            val_path=str(val_data or ""),
            crop_scale=(0.35, 1.0),
            num_workers=num_workers,
        ),
        val_every=val_every,
        **settings,
    )
    trainer = ReferenceTrainer(config, progress=progress)
    try:
        used = trainer.resume("auto")
        if used is not None:
            log.info("resumed from %s (step %d of %d)", used, trainer.step, steps)
        trainer.fit()
        if trainer.dist.is_main:
            trainer.model.save_pretrained(out)
    finally:
        trainer.dist.shutdown()
    net = ReferenceNet(config.model)
    net.load_state_dict(trainer.model.state_dict())
    return net.eval()
