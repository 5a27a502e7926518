"""Reconstruction metrics against plain formulas, codebook usage, bits per pixel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d

from mstok.evaluation.metrics import bits_per_pixel, codebook_usage, psnr, save_usage_histogram, ssim


def test_psnr_matches_the_formula_per_image():
    ref = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    noise = torch.tensor([0.01, 0.05, 0.1], dtype=torch.float64).view(3, 1, 1, 1)
    rec = (ref + noise * torch.randn_like(ref)).clamp(0, 1)
    expected = [10 * math.log10(1.0 / ((ref[i] - rec[i]) ** 2).mean().item()) for i in range(3)]
    assert psnr(ref, rec) == pytest.approx(expected, rel=1e-6)
    assert psnr(ref, rec)[0] > psnr(ref, rec)[2]


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. SSIM with an 11x11 Gaussian window (sigma 1.5), valid region, channels averaged."""
    taps = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    taps /= taps.sum()

    def blur(a):
        return correlate1d(correlate1d(a, taps, axis=0, mode="constant"), taps, axis=1, mode="constant")[5:-5, 5:-5]

    c1, c2, values = 0.01**2, 0.03**2, []
    for ch in range(3):
        a, b = x[ch], y[ch]
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        values.append(m.mean())
    return float(np.mean(values))


def test_ssim_matches_a_plain_gaussian_window_reference():
    torch.manual_seed(1)
    ref = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    rec = (ref + 0.1 * torch.randn_like(ref)).clamp(0, 1)
    expected = [_ssim_reference(ref[i].numpy(), rec[i].numpy()) for i in range(2)]
    assert ssim(ref, rec) == pytest.approx(expected, abs=1e-6)
    assert ssim(ref, ref) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(ref, rec[:, :, :20])
    with pytest.raises(ValueError, match=r"at least 11x11 pixels .*got \(8, 8\)"):
        ssim(ref[..., :8, :8], rec[..., :8, :8])


def test_ssim_equals_scikit_image_in_batches():
    """The batched SSIM against scikit-image's per-image one (the definition the papers' code uses), across
    the chunk boundary, at 64 px and on a non-square image."""
    from skimage.metrics import structural_similarity

    from mstok.evaluation import metrics

    torch.manual_seed(2)
    for shape in ((metrics.SSIM_CHUNK + 3, 3, 16, 16), (2, 3, 64, 64), (1, 3, 20, 33)):
        ref = torch.rand(shape, dtype=torch.float64)
        rec = (ref + 0.2 * torch.randn_like(ref)).clamp(0, 1)
        settings = {"data_range": 1.0, "channel_axis": 0, "gaussian_weights": True, "sigma": 1.5}
        pairs = zip(ref.numpy(), rec.numpy(), strict=True)
        expected = [structural_similarity(a, b, use_sample_covariance=False, **settings) for a, b in pairs]
        assert ssim(ref, rec) == pytest.approx(expected, abs=1e-10)
    assert ssim(ref.float(), rec.float()) == pytest.approx(expected, abs=1e-6)  # float32 input: compared in float64


def test_codebook_usage_and_histogram(tmp_path):
    counts = torch.tensor([6, 2, 0, 0])
    stats = codebook_usage(counts)
    probs = np.array([0.75, 0.25])
    assert stats["codebook_usage"] == 0.5 and stats["codes_used"] == 2
    assert stats["perplexity"] == pytest.approx(math.exp(-(probs * np.log(probs)).sum()))
    assert codebook_usage(torch.ones(8))["perplexity"] == pytest.approx(8)
    path = save_usage_histogram(counts, tmp_path / "h.png")
    assert path.stat().st_size > 1000


def test_bits_per_pixel():
    assert bits_per_pixel(32, 4096, 256, 256) == pytest.approx(32 * 12 / 65536)
    assert bits_per_pixel(256, 1024, 256, 256) == pytest.approx(2560 / 65536)
