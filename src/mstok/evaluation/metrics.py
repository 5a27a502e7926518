"""Per-image reconstruction metrics and compression figures.

PSNR and SSIM come from scikit-image (already a core dependency), computed per image on
float images in [0, 1] with ``data_range=1`` and SSIM's default 7x7 Gaussian-free window,
then averaged over the batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _as_hwc(images: torch.Tensor) -> np.ndarray:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> list[float]:
    """PSNR in dB of each image pair, images (B, 3, H, W) in [0, 1]."""
    ref, rec = _as_hwc(reference), _as_hwc(reconstruction)
    return [float(peak_signal_noise_ratio(a, b, data_range=1.0)) for a, b in zip(ref, rec, strict=True)]


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> list[float]:
    """SSIM of each image pair (channels averaged), images (B, 3, H, W) in [0, 1]."""
    ref, rec = _as_hwc(reference), _as_hwc(reconstruction)
    return [float(structural_similarity(a, b, data_range=1.0, channel_axis=2)) for a, b in zip(ref, rec, strict=True)]


def bits_per_pixel(num_tokens: int, codebook_size: int, height: int, width: int) -> float:
    """Bits per pixel of a K-token code: ``K * log2(V) / (H * W)``."""
    return num_tokens * math.log2(codebook_size) / (height * width)
