"""``mstok eval``: reconstruct a dataset and measure everything the papers report.

One pass over the images (resize + center crop) gives, per image and averaged: PSNR, SSIM,
LPIPS; over the set: rFID and Inception Score of the reconstructions, codebook usage with a
histogram, bits per pixel and tokens per image, and a grid of reconstructions sampled across
classes. Unreadable and oversized files are skipped and counted (``skipped``); images smaller
than the model's resolution are upscaled, counted (``upscaled``) and warned about.
A metric whose weights are missing is reported as unavailable with the reason; the others
still run. ``evaluate_generated`` gives gFID / IS of a folder of samples.

With a reference network (``mstok eval --feature-net DIR``, :class:`~mstok.evaluation.reference.ReferenceMeter`)
the results add **FD-ref** (``fd_ref``), the Fréchet distance between that network's penultimate
features of the real and the reconstructed images, and its top-1 on both (``ref_top1_real``,
``ref_top1_recon``). It exists because the FID-Inception weights cannot be downloaded on every
machine (not on this project's): FD-ref is computed in a small Tiny ImageNet classifier's feature
space, so it is comparable only between runs that use the same reference model file, never with
published FID.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.data import center_crop_transform, find_images, load_rgb, open_image_dataset, to_tensor
from mstok.data.images import data_source, no_readable_image
from mstok.evaluation.fid import FeatureStats, frechet_distance, inception_score, inception_score_splits, load_stats
from mstok.evaluation.inception import load_fid_inception
from mstok.evaluation.metrics import bits_per_pixel, codebook_usage, psnr, save_usage_histogram, ssim
from mstok.images import make_grid
from mstok.losses.perceptual import LPIPS
from mstok.quantizers.base import DENSE_USAGE_MAX
from mstok.storage.weights import MissingWeightsError

log = logging.getLogger(__name__)
FD_REF_STATS_FILE = "fd_ref_stats.npz"  # the real images' reference-network feature statistics


def eval_dataset(path: str | Path, resolution: int, max_pixels: int | None = None) -> Dataset:
    """Images under ``path`` (folder or shards), resized and center-cropped to ``resolution``;
    images over ``max_pixels`` pixels are skipped as unreadable (None: the decoder's default)."""
    return open_image_dataset(path, center_crop_transform(resolution), max_pixels)


class _EvalItems(Dataset):
    """``(image, label, index, upscaled)`` per ``(index, seed)`` key, or None for an unreadable file.

    ``upscaled`` says whether the image's short side was below ``resolution`` (the center crop
    then enlarges it); it is known only for datasets that expose ``load_image`` (image folders
    and shards), and False otherwise. ``index`` lets the grid pick its images by position.
    """

    def __init__(self, dataset: Dataset, resolution: int) -> None:
        self.dataset, self.resolution = dataset, resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int, bool] | None:
        index, seed = key
        load = getattr(self.dataset, "load_image", None)
        if load is None:
            item = self.dataset[key]
            return None if item is None else (item[0], item[1], index, False)
        loaded = load(index)
        if loaded is None:
            return None
        image, label = loaded
        tensor = to_tensor(self.dataset.transform(image, np.random.default_rng(seed)))
        return tensor, label, index, min(image.size) < self.resolution


def _collate_eval(
    batch: list[tuple[torch.Tensor, int, int, bool] | None],
) -> tuple[torch.Tensor, torch.Tensor, list[int], int, int]:
    """(images, labels, dataset indices, upscaled count, unreadable count) of one batch."""
    good = [item for item in batch if item is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), [], 0, len(batch)
    images = torch.stack([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    return images, labels, [item[2] for item in good], sum(item[3] for item in good), len(batch) - len(good)


def grid_indices(labels: Sequence[int] | None, count: int, n: int) -> list[int]:
    """``n`` indices among the first ``count`` items, spread across classes: the first image of
    each class, then the second of each, ... (with more classes than ``n``, evenly spaced classes).

    A folder sorted by class would otherwise fill the grid with its first class. Without labels,
    the first ``n`` indices."""
    if labels is None:
        return list(range(min(count, n)))
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(list(labels)[:count]):
        by_class.setdefault(int(label), []).append(index)
    classes = sorted(by_class)
    if len(classes) > n:
        classes = [classes[i * len(classes) // n] for i in range(n)]
    picked: list[int] = []
    for rank in range(max((len(v) for v in by_class.values()), default=0)):
        for cls in classes:
            if rank < len(by_class[cls]) and len(picked) < n:
                picked.append(by_class[cls][rank])
    return picked


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
    reference_meter: Any = None,
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
        reference_meter: a :class:`~mstok.evaluation.reference.ReferenceMeter` for FD-ref and the
            reference network's top-1 (real-image statistics go to ``fd_ref_stats.npz`` in ``out_dir``).

    Returns:
        a JSON-able dict of metrics and settings.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    cfg = model.config
    count = len(dataset) if limit is None else min(limit, len(dataset))
    keys = [(i, 0) for i in range(count)]  # in order; the evaluation transform draws nothing from the seed
    loader = DataLoader(
        _EvalItems(dataset, cfg.image_size),
        batch_size=batch_size,
        sampler=keys,
        num_workers=num_workers,
        collate_fn=_collate_eval,
    )
    per_image: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
    vocab = model.vocab_size  # None: continuous latents, no codes to count
    # per-code counts while V is small; above that the ids themselves (N-sized, never V-sized)
    dense = vocab is not None and vocab <= DENSE_USAGE_MAX
    counts = torch.zeros(vocab if dense else 0, dtype=torch.long)
    all_ids: list[torch.Tensor] = []
    real_stats, recon_stats, logits = FeatureStats(), FeatureStats(), []
    slot_of = {
        index: slot for slot, index in enumerate(grid_indices(getattr(dataset, "labels", None), count, grid_images))
    }
    grid: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (image, reconstruction)
    fallback: list[tuple[torch.Tensor, torch.Tensor]] = []  # first readable images, for unreadable picks
    skipped, upscaled, started = 0, 0, time.perf_counter()
    for images, labels, indices, enlarged, broken in tqdm(loader, disable=not progress, desc="eval", unit="batch"):
        skipped += broken
        upscaled += enlarged
        if not len(images):
            continue
        images = images.to(device)
        tokens = model.encode(images)
        recon = model.decode(tokens)
        if dense:
            counts += torch.bincount(tokens.flatten().cpu(), minlength=vocab)
        elif vocab is not None:
            all_ids.append(tokens.flatten().cpu())
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
        if reference_meter is not None:
            reference_meter.update(images, recon, labels)
        for row, index in enumerate(indices):
            if index in slot_of:
                grid[slot_of[index]] = (images[row].cpu(), recon[row].cpu())
            elif len(fallback) < grid_images:
                fallback.append((images[row].cpu(), recon[row].cpu()))
    seconds = time.perf_counter() - started
    n = len(per_image["psnr"])
    if n == 0:
        raise no_readable_image(dataset, skipped)
    if upscaled:
        log.warning(
            "%d of %d images in %s are smaller than %dx%d and were upscaled to it: their metrics measure "
            "upscaled images and are not comparable with results at their own resolution",
            upscaled,
            n,
            data_source(dataset),
            cfg.image_size,
            cfg.image_size,
        )
    continuous = vocab is None
    if continuous:
        usage: dict[str, Any] = dict.fromkeys(("codebook_usage", "perplexity", "codes_used"))
    elif dense:
        usage = codebook_usage(counts)
    else:  # a 2^C codebook: the ids seen, and bit statistics (quantizers.base.usage_statistics)
        stats = model.quantizer.usage(torch.cat(all_ids))
        usage = {
            "codebook_usage": stats["usage"],
            "perplexity": stats["batch_perplexity"],
            "codes_used": int(stats["distinct_ids"]),
            **{k: v for k, v in stats.items() if k in ("bit_usage", "perplexity_bits", "perplexity_hashed")},
        }
    results: dict[str, Any] = {
        "images": n,
        "skipped": skipped,
        "upscaled": upscaled,
        "resolution": cfg.image_size,
        "tokens_per_image": cfg.num_latent_tokens,
        "codebook_size": vocab,
        "bits_per_pixel": None
        if continuous
        else bits_per_pixel(cfg.num_latent_tokens, vocab, cfg.image_size, cfg.image_size),
        "psnr": sum(per_image["psnr"]) / n,
        "ssim": sum(per_image["ssim"]) / n,
        "lpips": sum(per_image["lpips"]) / n if per_image["lpips"] else None,
        "rfid": None,
        "inception_score": None,
        **usage,
        "seconds": seconds,
    }
    if inception is not None:
        mu, sigma = reference_stats if reference_stats is not None else (real_stats.mu, real_stats.sigma)
        results["rfid"] = frechet_distance(mu, sigma, recon_stats.mu, recon_stats.sigma, method=fid_method)
        results["inception_score"] = inception_score(torch.cat(logits), splits=inception_score_splits(n))[0]
        results["inception_score_splits"] = inception_score_splits(n)
    if reference_meter is not None:
        results.update(reference_meter.results(fid_method))
    results["unavailable"] = dict(unavailable or {})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shown = [grid[slot] for slot in sorted(grid)] + fallback[: max(0, grid_images - len(grid))]
        real, recon = torch.stack([p[0] for p in shown]), torch.stack([p[1] for p in shown])
        picture = make_grid(torch.stack([real, recon]), labels=("original", "reconstruction"))
        Image.fromarray(picture).save(out / "grid.png")
        if dense:
            save_usage_histogram(counts, out / "codebook_usage.png")
        if inception is not None and reference_stats is None:
            real_stats.save_npz(out / "reference_stats.npz")
        if reference_meter is not None:
            reference_meter.save_real_stats(out / FD_REF_STATS_FILE)
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
        # the whole reason: its later lines say how to fix it (which flag, where to put the file)
        lines = why.splitlines() or [""]
        rows.append(f"  ({key} unavailable: {lines[0]}")
        rows.extend(f"    {line.strip()}" for line in lines[1:])
        rows[-1] += ")"
    return "\n".join(rows)


def load_reference(path: str | Path) -> tuple[Any, Any]:
    """``(mu, sigma)`` Inception statistics from an ``.npz`` (ours, or an ADM evaluator reference batch)."""
    return load_stats(path)


def generated_batches(path: Path, batch_size: int):
    """uint8 (B, 3, H, W) batches from a folder of images or an ``.npz`` (``arr_0``: N x H x W x 3)."""
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
    if inception is None:
        why = (unavailable or {}).get("rfid", "no FID-Inception network")
        raise MissingWeightsError(f"gFID needs the FID-Inception weights: {why}")
    ref_mu, ref_sigma = load_reference(reference)
    stats, logits = FeatureStats(), []
    device = next(inception.parameters()).device
    for batch in generated_batches(Path(path), batch_size):
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
        "inception_score": inception_score(torch.cat(logits), splits=inception_score_splits(stats.n))[0],
        "inception_score_splits": inception_score_splits(stats.n),
    }
