"""Linear probing of a frozen tokenizer's latent tokens (TiTok 4.1, MsTok Table 2 / appendix B).

The representation of an image is ``encode_features(image).mean(1)``: the K continuous latent
tokens before quantization, after the encoder's final LayerNorm, mean-pooled to one D-vector.
A ``BatchNorm1d`` without affine parameters and a linear layer are trained on top with the MAE
linear-probe recipe: LARS, momentum 0.9, weight decay 0, ``lr = base_lr * batch / 256`` with
``base_lr = 0.1``, 10 warmup epochs then cosine decay, 90 epochs.

Protocol note, one deliberate departure from MAE: features are extracted **once**, from a
resize + center crop at the tokenizer's resolution, with no augmentation. MAE feeds every epoch
fresh RandomResizedCrops through the frozen encoder; dropping that makes the probe a cheap,
deterministic function of the features, so 90 epochs on ~8k images take seconds instead of 90
encoder passes. Accuracies are therefore comparable between tokenizers probed here, not
digit-for-digit with numbers published under the augmented protocol.

Scale note: LARS moves a weight matrix by about ``lr * 0.001`` of its norm per step and ``lr``
follows the batch, so how far the probe gets in 90 epochs grows with the dataset. MAE's
ImageNet probe takes ~7k steps at lr 6.4; 7k images at batch 256 give ~2.4k steps at lr 0.1,
and the default barely leaves its initialisation (loss 5.31 -> 5.10 on tiny-imagenet-64).
On small sets raise ``base_lr`` and compare tokenizers only at equal settings.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.data import center_crop_transform, collate_skip_broken, open_image_dataset
from mstok.device import resolve_device
from mstok.evaluation.metrics import topk_correct
from mstok.persistence import load_tokenizer
from mstok.storage.locate import locate_model

log = logging.getLogger(__name__)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017), as in MAE's linear probe.

    ``torch.optim`` ships no LARS, hence this one. For a parameter with two or more dimensions the
    step direction ``d = grad + weight_decay * p`` is rescaled by ``trust * ||p|| / ||d||`` (1 when
    either norm is 0), so each weight matrix moves by a fixed fraction of its own norm whatever
    its gradient scale. One-dimensional parameters (biases, norm scales) skip both the weight
    decay and the rescaling: their norms carry no layer scale worth adapting to.
    Then ``buf = momentum * buf + d`` and ``p -= lr * buf``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS needs lr, momentum, weight_decay >= 0 and trust_coefficient > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = p.grad
                if p.ndim > 1:
                    direction = direction.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(direction)
                    ratio = group["trust_coefficient"] * p_norm / d_norm
                    ratio = torch.where((p_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio))
                    direction = direction * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(direction)
                p.add_(buf, alpha=-group["lr"])
        return loss


class LinearProbe(nn.Module):
    """``BatchNorm1d(D, affine=False)`` then ``Linear(D, num_classes)``: MAE's probe head.

    The BatchNorm keeps a cumulative (not exponential) average of batch statistics: the features
    are fixed, so this converges to the training set's statistics, and short runs are not biased
    towards the initial mean 0 / variance 1.
    """

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, momentum=None)
        self.head = nn.Linear(dim, num_classes)
        # MAE's probe init: tiny weights so the initial logits are ~uniform
        nn.init.trunc_normal_(self.head.weight, std=0.01, a=-0.02, b=0.02, generator=generator)
        nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (B, num_classes) logits."""
        return self.head(self.norm(features))


@torch.no_grad()
def extract_features(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str = "cpu", progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled latent tokens of every readable image of ``dataset``, in dataset order.

    The dataset's transform must already produce the tokenizer's resolution (see
    :func:`center_crop_transform`). Undecodable images are dropped with a warning.

    Returns:
        features (N, D) float32 on the CPU, labels (N,) int64.
    """
    if not hasattr(model, "encode_features"):
        raise ValueError(f"{type(model).__name__} has no encode_features(): only TiTok/MsTok tokenizers can be probed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dev = resolve_device(device)
    model.eval().to(dev)
    # the seed in each (index, seed) key is irrelevant: the center-crop transform draws nothing
    keys = [(i, 0) for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, collate_fn=collate_skip_broken)
    feats, labels, skipped = [], [], 0
    for images, batch_labels, batch_skipped in tqdm(loader, desc="features", disable=not progress, leave=False):
        skipped += batch_skipped
        if not len(images):
            continue
        feats.append(model.encode_features(images.to(dev)).mean(1).float().cpu())
        labels.append(batch_labels)
    if skipped:
        log.warning("dropped %d undecodable image(s) from the probe", skipped)
    if not feats:
        raise ValueError("no readable image to extract features from")
    return torch.cat(feats), torch.cat(labels)


def split_per_class(
    labels: torch.Tensor | Sequence[int], train_per_class: int, val_per_class: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``train_per_class`` + ``val_per_class`` disjoint indices of every class, at random.

    For datasets without a separate validation split (tiny-imagenet-64: 35 / 5 of 40 per class).
    Every class present in ``labels`` must have enough images; surplus images go unused.

    Returns:
        (train indices, val indices), each sorted, int64.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(
            f"split needs at least 1 train and 1 val image per class, got {train_per_class},{val_per_class}"
        )
    generator = torch.Generator().manual_seed(seed)
    need = train_per_class + val_per_class
    train_idx, val_idx = [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        if len(members) < need:
            raise ValueError(
                f"class {cls} has {len(members)} image(s), fewer than the split {train_per_class}+{val_per_class}"
                f" = {need}; use a smaller split"
            )
        members = members[torch.randperm(len(members), generator=generator)]
        train_idx.append(members[:train_per_class])
        val_idx.append(members[train_per_class:need])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def probe_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Per-iteration schedule: linear warmup to ``peak_lr``, then cosine decay to 0."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest logits (``k`` capped at the class count)."""
    if not len(labels):
        return float("nan")
    return topk_correct(logits, labels, k) / len(labels)


def train_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 256,
    base_lr: float = 0.1,
    warmup_epochs: int = 10,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train a :class:`LinearProbe` with LARS on fixed features; report val top-1 / top-5.

    The batch is ``min(batch_size, N)`` and the last incomplete batch of each epoch is dropped
    (as MAE does), so BatchNorm never sees a batch of one. The learning rate follows the batch
    actually used. Deterministic for a given seed on a given device.

    Returns:
        ``top1``, ``top5`` (on val, after the last epoch), ``curve`` (per epoch: lr at its end,
        mean train loss, train top-1 over its batches, val top-1) and the ``settings`` used.
    """
    if train_feats.dim() != 2 or val_feats.dim() != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) with one D, got {tuple(train_feats.shape)}, {tuple(val_feats.shape)}"
        )
    if len(train_feats) != len(train_labels) or len(val_feats) != len(val_labels):
        raise ValueError("features and labels differ in length")
    if len(train_feats) < 2:
        raise ValueError(f"linear probing needs at least 2 training samples, got {len(train_feats)}")
    if epochs < 1 or not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"need epochs >= 1 and 0 <= warmup_epochs <= epochs, got {epochs}, {warmup_epochs}")
    dev = resolve_device(device)
    generator = torch.Generator().manual_seed(seed)
    probe = LinearProbe(train_feats.shape[1], num_classes, generator=generator).to(dev)
    x, y = train_feats.float().to(dev), train_labels.long().to(dev)
    xv, yv = val_feats.float().to(dev), val_labels.long().to(dev)

    batch = min(batch_size, len(x))
    steps_per_epoch = len(x) // batch
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    peak_lr = base_lr * batch / 256
    optimizer = LARS(probe.parameters(), lr=peak_lr, momentum=0.9, weight_decay=weight_decay)
    curve, step = [], 0
    for epoch in range(epochs):
        probe.train()
        order = torch.randperm(len(x), generator=generator).to(dev)
        loss_sum, correct = torch.zeros((), device=dev), torch.zeros((), device=dev)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            lr = probe_lr(step, total, warmup, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = probe(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y[idx]).sum()
            step += 1
        probe.eval()
        with torch.no_grad():
            val_top1 = topk_accuracy(probe(xv), yv, 1)
        curve.append(
            {
                "epoch": epoch + 1,
                "lr": lr,
                "loss": loss_sum.item() / steps_per_epoch,
                "train_top1": correct.item() / (steps_per_epoch * batch),
                "val_top1": val_top1,
            }
        )
    with torch.no_grad():
        logits = probe(xv)
    settings = {
        "epochs": epochs,
        "batch_size": batch,
        "base_lr": base_lr,
        "lr": peak_lr,
        "warmup_epochs": warmup_epochs,
        "weight_decay": weight_decay,
        "momentum": 0.9,
        "optimizer": "LARS",
        "seed": seed,
    }
    return {
        "top1": topk_accuracy(logits, yv, 1),
        "top5": topk_accuracy(logits, yv, 5),
        "curve": curve,
        "settings": settings,
    }


def load_probe_tokenizer(checkpoint: str | Path, weights: str | None = None) -> tuple[nn.Module, Path]:
    """Load a tokenizer for probing by the loading rule of ``mstok.load_tokenizer``
    (:func:`mstok.storage.locate.locate_model`: the EMA weights when present, else ``model.safetensors``).

    ``checkpoint`` is a saved tokenizer, a ``step_N`` checkpoint, or a run folder (its newest checkpoint).

    Returns:
        the model (eval mode) and the path of the weights file actually loaded.
    """
    path, used = locate_model(checkpoint, weights, "checkpoint")
    return load_tokenizer(path, weights=used), path / used


def _align_val_labels(train_classes: list[str], val_classes: list[str], labels: torch.Tensor) -> torch.Tensor:
    """Re-index val labels by class name so they match the train folder's numbering."""
    position = {name: i for i, name in enumerate(train_classes)}
    missing = [name for name in val_classes if name not in position]
    if missing:
        raise ValueError(f"val classes {missing[:5]} are not in the train folder ({len(missing)} in all)")
    mapping = torch.tensor([position[name] for name in val_classes], dtype=torch.long)
    return mapping[labels]


def run_probe(
    checkpoint: str | Path,
    train: str | Path,
    val: str | Path | None = None,
    weights: str | None = None,
    split: tuple[int, int] = (35, 5),
    epochs: int = 90,
    batch_size: int = 256,
    base_lr: float = 0.1,
    warmup_epochs: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Linear-probe the tokenizer saved in ``checkpoint`` on image folders (or shard folders).

    Args:
        checkpoint: a ``save_pretrained`` folder, a training checkpoint ``step_N`` or a run folder.
        train: training images, the class being the first-level sub-folder.
        val: validation images with the same class names; without it ``train`` is split with
            :func:`split_per_class` (``split`` = images per class for train, val).
        weights: ``None`` (EMA when present, else model), ``"ema"``, ``"model"`` or a file name.
        warmup_epochs: default keeps MAE's 10-of-90 proportion (10 at 90 epochs).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...; used for extraction and training.
        max_pixels: images with more pixels are skipped (and counted) as unreadable.

    Returns:
        a JSON-able dict: ``top1``, ``top5``, sizes, feature dim, classes, settings, timings, curve.
    """
    model, weights_path = load_probe_tokenizer(checkpoint, weights)
    transform = center_crop_transform(model.config.image_size)
    train_set = open_image_dataset(train, transform, max_pixels)
    classes = list(train_set.classes)
    if len(classes) < 2:
        raise ValueError(f"{train} holds {len(classes)} class ({classes[0]!r}); linear probing needs at least 2")
    if warmup_epochs is None:
        warmup_epochs = round(epochs * 10 / 90)
    dev = str(resolve_device(device))

    start = time.perf_counter()
    feats, labels = extract_features(model, train_set, batch_size, dev, progress)
    skipped = len(train_set) - len(feats)
    if val is None:
        train_idx, val_idx = split_per_class(labels, split[0], split[1], seed)
        train_feats, train_labels = feats[train_idx], labels[train_idx]
        val_feats, val_labels = feats[val_idx], labels[val_idx]
    else:
        val_set = open_image_dataset(val, transform, max_pixels)
        train_feats, train_labels = feats, labels
        val_feats, val_labels = extract_features(model, val_set, batch_size, dev, progress)
        skipped += len(val_set) - len(val_feats)
        val_labels = _align_val_labels(classes, list(val_set.classes), val_labels)
    extract_s = time.perf_counter() - start

    start = time.perf_counter()
    result = train_probe(
        train_feats,
        train_labels,
        val_feats,
        val_labels,
        len(classes),
        epochs=epochs,
        batch_size=batch_size,
        base_lr=base_lr,
        warmup_epochs=warmup_epochs,
        seed=seed,
        device=dev,
    )
    train_s = time.perf_counter() - start
    return {
        "top1": result["top1"],
        "top5": result["top5"],
        "checkpoint": str(weights_path.parent),
        "weights": weights_path.name,
        "family": model.config.family,
        "num_latent_tokens": model.config.num_latent_tokens,
        "image_size": model.config.image_size,
        "feature_dim": int(feats.shape[1]),
        "train": str(train),
        "val": None if val is None else str(val),
        "split": None if val is not None else list(split),
        "num_train": len(train_feats),
        "num_val": len(val_feats),
        "num_classes": len(classes),
        "classes": classes,
        "skipped_images": skipped,
        "device": dev,
        "settings": result["settings"],
        "seconds": {"features": round(extract_s, 3), "training": round(train_s, 3)},
        "curve": result["curve"],
    }
