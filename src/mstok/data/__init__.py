"""Datasets, samplers and transforms."""

from mstok.data.images import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    EpochSampler,
    ImageFolder,
    InMemoryImages,
    collate_skip_broken,
    find_images,
    load_rgb,
)
from mstok.data.transforms import RandomResizedCropFlip, center_crop_resize, to_tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "EpochSampler",
    "ImageFolder",
    "InMemoryImages",
    "RandomResizedCropFlip",
    "center_crop_resize",
    "collate_skip_broken",
    "find_images",
    "load_rgb",
    "to_tensor",
]
