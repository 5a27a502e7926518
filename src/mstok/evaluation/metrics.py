"""Per-image reconstruction metrics, codebook usage and compression figures.

PSNR is :func:`mstok.images.image_psnr` (``10 log10(1 / MSE)``; torchmetrics' is the same
formula, and its import took 2-5 s in every process, for this one line). SSIM is Wang et al.'s
with the 11x11 Gaussian window (sigma 1.5) over the valid region, scikit-image's definition (``gaussian_weights=True``,
``use_sample_covariance=False``): torchmetrics' SSIM reflect-pads the border and differs from
that definition by 4e-4 at 64x64 (1e-4 at 256x256), which matters for the 64 px datasets mstok
is tested on. It is written here as batched float64 convolutions, because scikit-image's runs
one image at a time in Python (8,000 images took minutes; tested equal to it). Both are computed
per image on float images in [0, 1] with ``data_range=1`` and averaged over images, as the
papers report them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mstok.images import image_psnr

SSIM_RADIUS = 5  # scikit-image's window for sigma 1.5: int(3.5 * sigma + 0.5) on each side, 11 taps
SSIM_SIGMA = 1.5
SSIM_CHUNK = 256  # images per batched SSIM pass: float64 maps of 256 x 3 x 256 x 256 stay near 400 MB


def _check_pair(reference: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if reference.dim() != 4 or reference.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(reference.shape)}")
    if reference.shape != reconstruction.shape:
        raise ValueError(f"image shapes differ: {tuple(reference.shape)} vs {tuple(reconstruction.shape)}")
    return reference.detach().double().clamp(0, 1), reconstruction.detach().double().clamp(0, 1)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> list[float]:
    """PSNR in dB of each image pair, images (B, 3, H, W) in [0, 1]."""
    ref, rec = _check_pair(reference, reconstruction)
    return image_psnr(ref, rec).tolist()


def _gaussian_valid(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float64 -> the separable Gaussian mean (B, C, H - 10, W - 10) over the valid region:
    the pixels whose whole 11x11 window lies inside the image, where any padding would be cropped."""
    taps = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=images.dtype, device=images.device)
    taps = torch.exp(-0.5 * (taps / SSIM_SIGMA) ** 2)
    taps = taps / taps.sum()
    channels = images.shape[1]
    rows = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    cols = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(images, rows, groups=channels), cols, groups=channels)


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor) -> list[float]:
    """SSIM of each image pair (Gaussian 11x11 window, channels averaged), images (B, 3, H, W) in
    [0, 1] and at least 11 pixels a side (module docstring)."""
    ref, rec = _check_pair(reference, reconstruction)
    if min(ref.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels (its window), got {tuple(ref.shape[-2:])}")
    c1, c2 = 0.01**2, 0.03**2  # (k * data_range)^2 with data_range 1
    values = []
    for a, b in zip(ref.split(SSIM_CHUNK), rec.split(SSIM_CHUNK), strict=True):
        mu_a, mu_b = _gaussian_valid(a), _gaussian_valid(b)
        var_a = _gaussian_valid(a * a) - mu_a * mu_a
        var_b = _gaussian_valid(b * b) - mu_b * mu_b
        cov = _gaussian_valid(a * b) - mu_a * mu_b
        maps = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        values.append(maps.mean(dim=(2, 3)).mean(dim=1))  # per channel over the valid region, then channels
    return torch.cat(values).tolist()


def mean_colour(images: torch.Tensor) -> torch.Tensor:
    """Each image (B, 3, H, W) painted in its own mean colour: the calibration floor that a
    reconstruction must beat to carry more than colour."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)


def bits_per_pixel(num_tokens: int, codebook_size: int, height: int, width: int) -> float:
    """Bits per pixel of a K-token code: ``K * log2(V) / (H * W)``."""
    return num_tokens * math.log2(codebook_size) / (height * width)


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """Usage of a codebook from per-code counts (V,): fraction of codes used and perplexity.

    Perplexity is ``exp(entropy)`` of the empirical code distribution: V when every code is
    used equally often, 1 when one code serves every token.
    """
    counts = counts.double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -torch.special.xlogy(probs, probs).sum()
    return {
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "codes_used": int((counts > 0).sum()),
    }


def save_usage_histogram(counts: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Plot per-code counts sorted by frequency (log scale) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = np.sort(counts.cpu().numpy())[::-1]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.bar(np.arange(len(ordered)), np.maximum(ordered, 0.8), width=1.0, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xlabel("codes, most used first")
    ax.set_ylabel("tokens")
    stats = codebook_usage(counts)
    ax.set_title(
        title or f"{stats['codes_used']}/{len(ordered)} codes used, perplexity {stats['perplexity']:.1f}", fontsize=9
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows of ``logits`` (B, classes) have their label among their ``k`` largest entries
    (``k`` capped at the class count)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (B, k)
    return int((top == labels[:, None]).any(dim=1).sum())
