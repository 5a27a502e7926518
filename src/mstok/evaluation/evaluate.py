"""``mstok eval``: reconstruct a dataset and measure everything the papers report.

One pass over the images (resize + center crop) gives, per image and averaged: PSNR, SSIM,
LPIPS; over the set: rFID and Inception Score of the reconstructions, codebook usage with a
histogram, bits per pixel and tokens per image, and a grid of the first reconstructions.
A metric whose weights are missing is reported as unavailable with the reason; the others
still run. ``evaluate_generated`` gives gFID / IS of a folder of samples.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.data import center_crop_transform, collate_skip_broken, open_image_dataset
from mstok.evaluation.metrics import bits_per_pixel, codebook_usage, psnr, save_usage_histogram, ssim
from mstok.training.logger import make_grid
from mstok.weights import MissingWeightsError

log = logging.getLogger(__name__)


def eval_dataset(path: str | Path, resolution: int) -> Dataset:
    """Images under ``path`` (folder or shards), resized and center-cropped to ``resolution``."""
    return open_image_dataset(path, center_crop_transform(resolution))


def _optional(name: str, build, level: int = logging.WARNING) -> tuple[Any, str | None]:
    """Build an optional metric's network, or return (and log at ``level``) why it is unavailable."""
    try:
        return build(), None
    except MissingWeightsError as err:
        log.log(level, "%s unavailable: %s", name, err)
        return None, str(err)


def load_lpips(
    device: torch.device,
    lpips_weights: tuple[str | None, str | None] = (None, None),
    cache: str | None = None,
    download: bool = True,
    level: int = logging.WARNING,
) -> tuple[Any, str | None]:
    """(LPIPS on ``device``, None) or (None, why it is unavailable, also logged at ``level``);
    ``lpips_weights`` are the explicit VGG16 and LPIPS files (None: the cache, downloading there
    when ``download``)."""
    from mstok.losses.perceptual import LPIPS

    def build():
        return LPIPS.from_pretrained(*lpips_weights, cache=cache, download=download).to(device)

    return _optional("LPIPS", build, level)


def load_metric_networks(
    device: torch.device,
    lpips_weights: tuple[str | None, str | None] = (None, None),
    inception_weights: str | None = None,
    download: bool = True,
) -> tuple[Any, Any, dict[str, str]]:
    """(LPIPS or None, FID-Inception or None, reasons for what is unavailable)."""
    from mstok.evaluation.inception import load_fid_inception

    unavailable = {}
    lpips, why = load_lpips(device, lpips_weights, download=download)
    if why:
        unavailable["lpips"] = why
    inception, why = _optional(
        "FID-Inception", lambda: load_fid_inception(inception_weights, download=download).to(device)
    )
    if why:
        unavailable["rfid"] = unavailable["inception_score"] = why
    return lpips, inception, unavailable


@torch.no_grad()
def evaluate_reconstruction(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    lpips: torch.nn.Module | None = None,
    inception: torch.nn.Module | None = None,
    reference_stats: Any = None,
    unavailable: dict[str, str] | None = None,
    out_dir: str | Path | None = None,
    grid_images: int = 8,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    fid_method: str = "sqrtm",
) -> dict[str, Any]:
    """Reconstruct every image of ``dataset`` and measure it.

    Args:
        model: a tokenizer (``encode`` / ``decode``), in eval mode.
        dataset: indexed by ``(index, seed)``; see :func:`eval_dataset`.
        lpips, inception: metric networks, or None when unavailable (see ``unavailable``).
        reference_stats: precomputed ``(mu, sigma)`` Inception statistics of the real images
            (skips computing them); else they are computed from ``dataset``.
        out_dir: where to write ``grid.png``, ``codebook_usage.png`` (and ``reference_stats.npz``).
        limit: evaluate only the first ``limit`` images.
        fid_method: ``sqrtm`` (scipy, the reference implementations' way) or ``eigh`` (an
            eigendecomposition, equal to 1e-13 and much faster on 2048-d covariances).

    Returns:
        a JSON-able dict of metrics and settings.
    """
    from mstok.evaluation.fid import FeatureStats, frechet_distance, inception_score

    device = torch.device(device)
    model = model.to(device).eval()
    cfg = model.config
    count = len(dataset) if limit is None else min(limit, len(dataset))
    keys = [(i, 0) for i in range(count)]  # in order; the evaluation transform draws nothing from the seed
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=keys, num_workers=num_workers, collate_fn=collate_skip_broken
    )
    per_image: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
    counts = torch.zeros(cfg.codebook_size, dtype=torch.long)
    real_stats, recon_stats, logits = FeatureStats(), FeatureStats(), []
    grid_real, grid_recon = [], []
    skipped, started = 0, time.perf_counter()
    for images, _labels, broken in tqdm(loader, disable=not progress, desc="eval", unit="batch"):
        skipped += broken
        if not len(images):
            continue
        images = images.to(device)
        tokens = model.encode(images)
        recon = model.decode(tokens)
        if not tokens.is_floating_point():  # a VAE's latents are continuous: no codes to count
            counts += torch.bincount(tokens.flatten().cpu(), minlength=cfg.codebook_size)
        per_image["psnr"] += psnr(images, recon)
        per_image["ssim"] += ssim(images, recon)
        if lpips is not None:
            per_image["lpips"] += lpips(recon, images).tolist()
        if inception is not None:
            if reference_stats is None:
                real_stats.update(inception(images)[0])
            features, batch_logits = inception(recon)
            recon_stats.update(features)
            logits.append(batch_logits.double().cpu())
        if sum(len(g) for g in grid_real) < grid_images:
            grid_real.append(images.cpu())
            grid_recon.append(recon.cpu())
    seconds = time.perf_counter() - started
    n = len(per_image["psnr"])
    if n == 0:
        raise ValueError("no readable image to evaluate")
    continuous = getattr(cfg, "quantizer", "vq") == "vae"  # TiTok VAE releases: no codebook
    results: dict[str, Any] = {
        "images": n,
        "skipped": skipped,
        "resolution": cfg.image_size,
        "tokens_per_image": cfg.num_latent_tokens,
        "codebook_size": None if continuous else cfg.codebook_size,
        "bits_per_pixel": None
        if continuous
        else bits_per_pixel(cfg.num_latent_tokens, cfg.codebook_size, cfg.image_size, cfg.image_size),
        "psnr": sum(per_image["psnr"]) / n,
        "ssim": sum(per_image["ssim"]) / n,
        "lpips": sum(per_image["lpips"]) / n if per_image["lpips"] else None,
        "rfid": None,
        "inception_score": None,
        **(dict.fromkeys(codebook_usage(counts)) if continuous else codebook_usage(counts)),
        "seconds": seconds,
    }
    if inception is not None:
        mu, sigma = reference_stats if reference_stats is not None else (real_stats.mu, real_stats.sigma)
        results["rfid"] = frechet_distance(mu, sigma, recon_stats.mu, recon_stats.sigma, method=fid_method)
        results["inception_score"] = inception_score(torch.cat(logits), splits=min(10, n))[0]
    results["unavailable"] = dict(unavailable or {})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        real = torch.cat(grid_real)[:grid_images]
        Image.fromarray(make_grid(torch.stack([real, torch.cat(grid_recon)[: len(real)]]))).save(out / "grid.png")
        if not continuous:
            save_usage_histogram(counts, out / "codebook_usage.png")
        if inception is not None and reference_stats is None:
            real_stats.save_npz(out / "reference_stats.npz")
    return results


def write_results(results: dict[str, Any], path: str | Path | None) -> str:
    """A readable table of ``results``; also written as JSON to ``path`` when given."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
    rows = []
    for key, value in results.items():
        if key == "unavailable":
            continue
        shown = "unavailable" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        rows.append(f"  {key:<18} {shown}")
    for key, why in results.get("unavailable", {}).items():
        rows.append(f"  ({key} unavailable: {why.splitlines()[0]})")
    return "\n".join(rows)


def load_reference(path: str | Path) -> tuple[Any, Any]:
    """``(mu, sigma)`` Inception statistics from an ``.npz`` (ours, or an ADM evaluator reference batch)."""
    from mstok.evaluation.fid import load_stats

    return load_stats(path)


def _generated_batches(path: Path, batch_size: int):
    """uint8 (B, 3, H, W) batches from a folder of images or an ``.npz`` (``arr_0``: N x H x W x 3)."""
    import numpy as np

    from mstok.data import find_images, load_rgb

    if path.suffix == ".npz":
        array = np.load(path)["arr_0"]
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {array.dtype} {array.shape}")
        for start in range(0, len(array), batch_size):
            yield torch.from_numpy(array[start : start + batch_size]).permute(0, 3, 1, 2)
        return
    files = [p for p, _ in find_images(path)[0]]
    for start in range(0, len(files), batch_size):
        arrays = [np.asarray(load_rgb(f)) for f in files[start : start + batch_size]]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"generated images in {path} must share one size")
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def evaluate_generated(
    path: str | Path,
    reference: str | Path,
    inception: torch.nn.Module | None,
    unavailable: dict[str, str] | None = None,
    batch_size: int = 50,
    fid_method: str = "sqrtm",
) -> dict[str, Any]:
    """gFID against reference statistics and Inception Score of generated images."""
    from mstok.evaluation.fid import FeatureStats, frechet_distance, inception_score

    if inception is None:
        why = (unavailable or {}).get("rfid", "no FID-Inception network")
        raise MissingWeightsError(f"gFID needs the FID-Inception weights: {why}")
    ref_mu, ref_sigma = load_reference(reference)
    stats, logits = FeatureStats(), []
    device = next(inception.parameters()).device
    for batch in _generated_batches(Path(path), batch_size):
        features, batch_logits = inception(batch.to(device))
        stats.update(features)
        logits.append(batch_logits.double().cpu())
    if stats.n < 2:
        raise ValueError(f"need at least 2 generated images in {path}")
    return {
        "generated": str(path),
        "reference": str(reference),
        "images": stats.n,
        "gfid": frechet_distance(ref_mu, ref_sigma, stats.mu, stats.sigma, method=fid_method),
        "inception_score": inception_score(torch.cat(logits), splits=min(10, stats.n))[0],
    }
