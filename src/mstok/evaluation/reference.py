"""The reference network: a small ResNet-style Tiny ImageNet classifier that exists on this machine.

SigLIP and Inception weights cannot be downloaded here, so mstok trains its own reference
network (``mstok reference train``, :mod:`mstok.evaluation.reference_train`) and uses it in two
places:

* as SemTok's semantic teacher (``teacher.spec = {type = "reference", path = DIR}``,
  :class:`mstok.losses.teachers.ReferenceTeacher`): its last feature grid, whose mean over the
  grid is the penultimate (pooled) feature vector;
* as the feature network of **FD-ref** (``mstok eval --feature-net DIR``, :class:`ReferenceMeter`):
  the Fréchet distance between the penultimate features of the real and the reconstructed images,
  with the classifier's top-1 on both. FD-ref is *not* FID: it lives in a 200-class Tiny ImageNet
  classifier's feature space, so it is comparable only between runs that use the same reference
  model file, never with published (Inception) FID.

The network: a 3x3 stem conv, stages of basic residual blocks (two 3x3 convs with BatchNorm,
the first of each stage after the first striding by 2), global average pooling and a linear
head. Images (B, 3, H, W) in [0, 1] of any size are resized inside to ``image_size`` (antialiased
bilinear) and normalised with ``mean``/``std``, so the same model reads 64 px data crops, a
tokenizer's reconstructions or 256 px images. It saves and loads as an ordinary mstok saved model
(``config.json`` with ``family = "reference"`` + ``model.safetensors``) by the loading rule of
:func:`mstok.storage.locate.locate_model`.

Glossary: B batch, S image_size, F feature_dim (the last stage's width), h x w the last grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.config_schema import MAX_CODEBOOK, MAX_DEPTH, MAX_IMAGE_SIZE, MAX_WIDTH, ConfigDict, Rule, positive
from mstok.data import center_crop_transform, collate_skip_broken, open_image_dataset
from mstok.data.images import no_readable_image
from mstok.evaluation.metrics import topk_correct
from mstok.storage.saved import SavedModel
from mstok.tokenizers.contract import check_images

NAME = "reference network"
# ImageNet's channel statistics: Tiny ImageNet is a subset of it
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ReferenceConfig(ConfigDict):
    """The reference network's hyper-parameters (saved in its ``config.json``).

    Attributes:
        widths: channels of each stage (the first is also the stem's); the last is F.
        blocks: basic residual blocks per stage (as many entries as ``widths``).
        num_classes: classes of the linear head (Tiny ImageNet: 200, numbered as the sorted wnids).
        image_size: S, the resolution the network runs at; any input is resized to it first.
        input_size: the side images are prepared at before they reach the network (training
            crops, evaluation center crops): the data's native 64 px for Tiny ImageNet.
        mean, std: per-channel normalisation of the [0, 1] input.
    """

    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    num_classes: int = 200
    image_size: int = 32
    input_size: int = 64
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    family: ClassVar[str] = "reference"
    field_rules: ClassVar[dict[str, Rule]] = {
        "widths": Rule(min_len=1, item=positive(MAX_WIDTH)),
        "blocks": Rule(min_len=1, item=positive(MAX_DEPTH)),
        "num_classes": positive(MAX_CODEBOOK, "the head has a row per class"),
        "image_size": positive(MAX_IMAGE_SIZE),
        "input_size": positive(MAX_IMAGE_SIZE),
        "std": Rule(item=Rule(gt=0)),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.widths) != len(self.blocks):
            raise ValueError(
                f"widths {list(self.widths)} and blocks {list(self.blocks)} must have one entry per stage each"
            )
        if self.image_size < 2 ** (len(self.widths) - 1):
            raise ValueError(
                f"image_size {self.image_size} is too small for {len(self.widths)} stages: each stage after the "
                f"first halves the grid, so it must be at least {2 ** (len(self.widths) - 1)}"
            )


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers around a residual (a strided 1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout)
        # the residual branch starts at zero: every block begins as the identity (Goyal et al.
        # 2017), which lets a short run use a high learning rate from the first steps
        nn.init.zeros_(self.norm2.weight)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ReferenceNet(nn.Module, SavedModel):
    """The reference classifier (module docstring). ``forward`` gives logits, :meth:`features`
    the penultimate (pooled) features, :meth:`feature_map` the grid they are pooled from."""

    config_class = ReferenceConfig

    def __init__(self, config: ReferenceConfig) -> None:
        super().__init__()
        if not isinstance(config, ReferenceConfig):
            raise TypeError(f"ReferenceNet needs a ReferenceConfig, got {type(config).__name__}")
        self.config = config
        width = config.widths[0]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        for stage, (out, count) in enumerate(zip(config.widths, config.blocks, strict=True)):
            for i in range(count):
                blocks.append(BasicBlock(width, out, 2 if stage > 0 and i == 0 else 1))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, config.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        """F, the width of :meth:`features` (the last stage's)."""
        return self.config.widths[-1]

    @property
    def grid(self) -> int:
        """The side of :meth:`feature_map`'s grid (``image_size`` halved once per stage after the first)."""
        side = self.config.image_size
        for _ in self.config.widths[1:]:
            side = math.ceil(side / 2)
        return side

    def _prepare(self, images: Any) -> torch.Tensor:
        """Checked, resized, normalised images in the parameters' dtype and memory format."""
        # any size: the network resizes to its own; the NaN check runs on the CPU only (no device sync)
        images = check_images(images, None, check_values=False)
        param = self.head.weight
        images = images.to(param.device, param.dtype)
        size = self.config.image_size
        if tuple(images.shape[2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if self.stem[0].weight.is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)  # a channels_last model runs faster on it
        return images

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> the last stage's output (B, F, h, w), after its ReLU."""
        return self.blocks(self.stem(self._prepare(images)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> penultimate features (B, F): the feature map's mean."""
        return self.feature_map(images).mean(dim=(2, 3))

    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> ``(features (B, F), logits (B, num_classes))`` from one pass."""
        features = self.features(images)
        return features, self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> logits (B, num_classes)."""
        return self.head(self.features(images))

    @classmethod
    def from_pretrained(cls, path: str | Path, weights: str | None = None) -> ReferenceNet:
        """A reference network saved by ``save_pretrained`` (or a checkpoint or run folder of
        ``mstok reference train``, by the rule of :func:`mstok.storage.locate.locate_model`), in eval mode.

        Raises:
            FileNotFoundError: ``path`` does not exist or holds no model.
            ValueError: the folder holds another kind of model (a tokenizer...), a config that is
                not a reference network's, or weights that do not fit it.
        """
        return cls.load_saved(path, weights, ReferenceConfig, NAME)


def load_reference_net(path: str | Path, weights: str | None = None) -> ReferenceNet:
    """:meth:`ReferenceNet.from_pretrained`, the loader the CLI and the teacher use."""
    return ReferenceNet.from_pretrained(path, weights)


def reference_dataset(path: str | Path, model: ReferenceNet, max_pixels: int | None = None) -> Dataset:
    """Images under ``path`` (a folder or shards) center-cropped to the model's ``input_size``."""
    return open_image_dataset(path, center_crop_transform(model.config.input_size), max_pixels)


@torch.no_grad()
def evaluate_reference(
    model: ReferenceNet,
    data: str | Path | Dataset,
    batch_size: int = 256,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Top-1 and top-5 accuracy of ``model`` on labelled images (center crops, in order).

    Args:
        data: a folder of class sub-folders or shards (classes numbered as the sorted folder names,
            like the shards' ``cls``), or a dataset indexed by ``(index, seed)``.
        limit: only the first ``limit`` images (evenly spaced ones would need the whole index).

    Returns:
        ``{"top1": ..., "top5": ..., "images": N, "skipped": unreadable files}``.
    """
    dataset = data if isinstance(data, Dataset) else reference_dataset(data, model, max_pixels)
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) > model.config.num_classes:
        raise ValueError(
            f"the images hold {len(classes)} classes but the reference network knows {model.config.num_classes}: "
            "its top-1 needs data with its classes (numbered as the sorted class folders)"
        )
    count = len(dataset) if limit is None else min(limit, len(dataset))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=[(i, 0) for i in range(count)],  # in order; the center crop draws nothing from the seed
        num_workers=num_workers,
        collate_fn=collate_skip_broken,
    )
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = skipped = 0
    device = model.head.weight.device
    try:
        for images, labels, broken in tqdm(loader, disable=not progress, desc="reference eval", unit="batch"):
            skipped += broken
            if not len(images):
                continue
            logits = model(images.to(device)).float()
            labels = labels.to(device)
            correct1 += topk_correct(logits, labels, 1)
            correct5 += topk_correct(logits, labels, 5)
            seen += len(labels)
    finally:
        model.train(was_training)
    if seen == 0:
        raise no_readable_image(dataset, skipped)
    return {"top1": correct1 / seen, "top5": correct5 / seen, "images": seen, "skipped": skipped}


class ReferenceMeter:
    """FD-ref and the reference network's top-1 on real images and their reconstructions.

    ``update(real, recon, labels)`` per batch, then :meth:`results`: ``fd_ref``, the Fréchet
    distance (:func:`mstok.evaluation.fid.frechet_distance`, the code rFID uses) between the
    penultimate features of the real and the reconstructed images, and ``ref_top1_real`` /
    ``ref_top1_recon``, the classifier's top-1 on each (``None`` when the data's classes are not
    the network's). Statistics of the real images can be given (``real_stats``, e.g. a file
    written by :meth:`save_real_stats`) instead of computed; they must come from a network with
    the same feature width.

    Args:
        net: the reference network (eval mode is set here).
        real_stats: ``(mu (F,), sigma (F, F))`` of the real images' features, or None.
        labelled: whether the data's labels are the network's classes (top-1 is measured only then).
        source: how the statistics were given, for the dimension error (e.g. ``--feature-net-stats FILE``).
    """

    def __init__(
        self,
        net: ReferenceNet,
        real_stats: tuple[np.ndarray, np.ndarray] | None = None,
        labelled: bool = True,
        source: str = "the saved statistics",
    ) -> None:
        from mstok.evaluation.fid import FeatureStats

        self.net = net.eval()
        if real_stats is not None and np.shape(real_stats[0]) != (net.feature_dim,):
            raise ValueError(
                f"{source} holds {np.shape(real_stats[0])[0]}-d feature statistics but the feature net gives "
                f"{net.feature_dim}-d features: they come from another network; compute them again with this one "
                "(leave the statistics out)"
            )
        self.real_stats, self.labelled = real_stats, labelled
        self.real, self.recon = FeatureStats(net.feature_dim), FeatureStats(net.feature_dim)
        self.correct = {"real": 0, "recon": 0}
        self.count = 0

    @torch.no_grad()
    def update(self, real: torch.Tensor, recon: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: real images, their reconstructions (B, 3, H, W) in [0, 1], labels (B,)."""
        real_features, real_logits = self.net.classify(real)
        recon_features, recon_logits = self.net.classify(recon)
        self.add(real_features, recon_features, real_logits, recon_logits, labels)

    def add(
        self,
        real_features: torch.Tensor,
        recon_features: torch.Tensor,
        real_logits: torch.Tensor | None = None,
        recon_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Add features (N, F) (and logits with labels, for top-1) computed elsewhere."""
        if self.real_stats is None:
            self.real.update(real_features)
        self.recon.update(recon_features)
        if labels is not None and real_logits is not None and recon_logits is not None:
            labels = labels.to(real_logits.device)
            self.correct["real"] += topk_correct(real_logits.float(), labels, 1)
            self.correct["recon"] += topk_correct(recon_logits.float(), labels, 1)
            self.count += len(labels)

    def real_mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """The real images' feature statistics (given, or accumulated)."""
        return self.real_stats if self.real_stats is not None else (self.real.mu, self.real.sigma)

    def results(self, method: str = "sqrtm") -> dict[str, Any]:
        """``{"fd_ref", "ref_top1_real", "ref_top1_recon"}`` (the top-1 values None without labels)."""
        from mstok.evaluation.fid import frechet_distance

        mu, sigma = self.real_mu_sigma()
        fd = frechet_distance(mu, sigma, self.recon.mu, self.recon.sigma, method=method)
        measured = self.labelled and self.count > 0
        return {
            "fd_ref": fd,
            "ref_top1_real": self.correct["real"] / self.count if measured else None,
            "ref_top1_recon": self.correct["recon"] / self.count if measured else None,
        }

    def save_real_stats(self, path: str | Path) -> Path | None:
        """Write the accumulated real-image statistics (``mu``, ``sigma``, ``n``) to ``path``; None when
        they were given rather than computed."""
        return None if self.real_stats is not None else self.real.save_npz(path)
