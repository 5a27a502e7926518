"""Image transforms on PIL images, driven by an explicit numpy Generator.

Written here rather than taken from torchvision because torchvision's compiled ops do not
load beside the CPU PyTorch build this project targets. Every random choice comes from the
``rng`` argument, so a sample's augmentation is a pure function of its seed: a resumed or
multi-worker run sees exactly the crops an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` and take the central ``size`` x ``size`` square."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), RESAMPLE)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def center_crop_transform(size: int) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    """The deterministic evaluation transform as a dataset ``Transform``: :func:`center_crop_resize`
    to ``size`` (the random generator it is given is not used)."""

    def transform(image: Image.Image, _rng: np.random.Generator) -> Image.Image:
        return center_crop_resize(image, size)

    return transform


class RandomResizedCropFlip:
    """Random crop of a random area fraction and aspect ratio, resized to ``size``, then a
    horizontal flip with probability 0.5 (the papers' training augmentation).

    Args:
        size: output side length.
        scale: range of the crop's area as a fraction of the image area.
        ratio: range of the crop's aspect ratio (w / h), sampled log-uniformly.
        flip: whether to flip horizontally half of the time.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.8, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Pick (left, top, right, bottom); falls back to the largest central crop."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, left + w, top + h
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        box = self.crop_box(*image.size, rng)
        image = image.resize((self.size, self.size), RESAMPLE, box=box)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image
