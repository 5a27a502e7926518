"""The reference network: a small ResNet-style Tiny ImageNet classifier that exists on this machine.

SigLIP and Inception weights cannot be downloaded here, so mstok trains its own reference
network (``mstok reference train``, :mod:`mstok.training.reference`). This module is the network
alone; it is used as SemTok's semantic teacher (:class:`mstok.losses.teachers.ReferenceTeacher`)
and as the feature network of FD-ref (:class:`mstok.evaluation.reference.ReferenceMeter`, which
says what FD-ref is and is not).

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

import torch
import torch.nn.functional as F
from torch import nn

from mstok.config_schema import MAX_CODEBOOK, MAX_DEPTH, MAX_IMAGE_SIZE, MAX_WIDTH, ConfigDict, Rule, positive
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
