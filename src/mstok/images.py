"""Image helpers that know nothing of models: grids for reports and sample sheets (rows of images
on a white canvas, optionally named), and the per-image PSNR.

The grids serve the run logger (reconstruction grids), ``mstok eval`` (a grid of reconstructions)
and ``mstok sample`` (one row per class). :func:`image_psnr` is the one PSNR of the project: the
evaluation (:func:`mstok.evaluation.metrics.psnr`) and the length chosen per image
(:func:`mstok.tokenizers.nested.encode_adaptive`) both read it, so it lives in this bottom layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import rearrange
from PIL import Image


def image_psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, (B,) float64, of images (B, ...) in [0, 1] (data range 1; both clamped to
    it): ``10 log10(1 / MSE)``, infinite for an exact copy. Shapes are the caller's to check."""
    mse = (reference.detach().double().clamp(0, 1) - reconstruction.detach().double().clamp(0, 1)).square()
    return 10 * torch.log10(1.0 / mse.flatten(1).mean(1))


def make_grid(rows: torch.Tensor, pad: int = 2, labels: Sequence[str] | None = None) -> np.ndarray:
    """(R, N, 3, H, W) images in [0, 1] -> one uint8 (R*(H+pad)+pad, N*(W+pad)+pad, 3) array;
    with ``labels`` (one per row) a white column on the left names each row."""
    r, n, _, h, w = rows.shape
    canvas = np.full((r * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    pixels = rearrange((rows.detach().float().clamp(0, 1) * 255).round().to(torch.uint8), "r n c h w -> r n h w c")
    pixels = pixels.cpu().numpy()
    for i in range(r):
        for j in range(n):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top : top + h, left : left + w] = pixels[i, j]
    return canvas if labels is None else label_rows(canvas, labels, h, pad)


def label_rows(grid: np.ndarray, labels: Sequence[str], height: int, pad: int = 2) -> np.ndarray:
    """``grid`` (rows of ``height`` px images, ``pad`` apart) with a column of row names on its left,
    drawn in PIL's default font."""
    from PIL import ImageDraw, ImageFont

    if len(labels) != (grid.shape[0] - pad) // (height + pad):
        raise ValueError(f"{len(labels)} labels for a grid of {(grid.shape[0] - pad) // (height + pad)} rows")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), str(text), font=font) for text in labels]
    width = max(box[2] - box[0] for box in boxes) + 3 * pad
    canvas = Image.new("RGB", (width + grid.shape[1], grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (text, box) in enumerate(zip(labels, boxes, strict=True)):
        top = pad + i * (height + pad) + max(0, (height - (box[3] - box[1])) // 2) - box[1]
        draw.text((pad, top), str(text), fill="black", font=font)
    return np.asarray(canvas)
