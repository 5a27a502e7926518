"""Datasets, samplers and transforms."""

from mstok.data.decode import DEFAULT_MAX_PIXELS, CorruptImageError, OversizedImageError, load_rgb
from mstok.data.images import (
    IMAGE_EXTENSIONS,
    EpochSampler,
    ImageFolder,
    IndexSubset,
    InMemoryImages,
    NoReadableImageError,
    SkipBroken,
    collate_skip_broken,
    find_images,
)
from mstok.data.shards import ShardDataset, open_image_dataset, write_shards
from mstok.data.tokens import TokenDataset, pretokenize, tokenizer_identity
from mstok.data.transforms import RandomResizedCropFlip, center_crop_resize, center_crop_transform, to_tensor

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "CorruptImageError",
    "EpochSampler",
    "ImageFolder",
    "InMemoryImages",
    "IndexSubset",
    "NoReadableImageError",
    "OversizedImageError",
    "RandomResizedCropFlip",
    "ShardDataset",
    "SkipBroken",
    "TokenDataset",
    "center_crop_resize",
    "center_crop_transform",
    "collate_skip_broken",
    "find_images",
    "load_rgb",
    "open_image_dataset",
    "pretokenize",
    "to_tensor",
    "tokenizer_identity",
    "write_shards",
]
