"""Scoring generated images with the reference network: FD-ref, class accuracy, precision/recall.

Glossary: N real images, M generated images, F the reference network's feature width.

A generator is judged against held-out real images in the reference network's feature space
(:mod:`mstok.evaluation.reference`; *not* Inception FID, see there):

* **FD-ref**: the Fréchet distance between the features of the real and the generated images;
* **class accuracy**: the network's top-1 on the generated images against the class each was
  generated for (the labels ``mstok sample --out-dir`` writes: ``samples.npz``'s ``labels``, or
  the ``class{c}_{i}.png`` file names);
* **precision / recall** (:mod:`mstok.evaluation.precision_recall`) of the generated features
  against the real ones.

The real images' features are computed once per (folder, network) and cached as an ``.npz``
under ``cache_dir`` (default ``~/.cache/mstok/reference_features``, or ``$MSTOK_CACHE``): not
beside the folder itself, which is often a shared, read-only dataset.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mstok.data import collate_skip_broken, find_images
from mstok.evaluation.evaluate import generated_batches
from mstok.evaluation.fid import FeatureStats, frechet_distance
from mstok.evaluation.precision_recall import precision_recall
from mstok.evaluation.reference import reference_dataset
from mstok.networks.reference import ReferenceNet

# the file names mstok sample --out-dir writes: class{c:04d}_{i:04d}.png
CLASS_FILE = re.compile(r"^class(\d+)_\d+\.\w+$")


def default_cache_dir() -> Path:
    """Where real-image features are cached: ``$MSTOK_CACHE/reference_features`` or ~/.cache/mstok/..."""
    root = os.environ.get("MSTOK_CACHE") or Path.home() / ".cache" / "mstok"
    return Path(root) / "reference_features"


def generated_labels(path: str | Path) -> np.ndarray | None:
    """The class each generated image was made for, in the order :func:`generated_batches` reads them:
    ``labels`` of an ``.npz``; for a folder (whose images, not its ``samples.npz``, are scored) the
    ``class{c}_{i}`` file names; None when there are none."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return np.asarray(data["labels"], dtype=np.int64) if "labels" in data else None
    files = [p for p, _ in find_images(path)[0]]
    matches = [CLASS_FILE.match(p.name) for p in files]
    if files and all(matches):
        return np.array([int(m.group(1)) for m in matches], dtype=np.int64)
    return None


def network_key(net: ReferenceNet) -> str:
    """A short digest of the network's weights and input size: cached features are only reused by the same network."""
    digest = hashlib.sha256(str(net.config.input_size).encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def real_features(
    net: ReferenceNet,
    data: str | Path,
    batch_size: int = 100,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(N, F) float32 penultimate features of the images under ``data`` (a folder or shards), center-cropped
    to the network's input size; cached under ``cache_dir`` (``None``: :func:`default_cache_dir`)."""
    folder = Path(data).resolve()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    file = cache / f"{folder.name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}-{network_key(net)}.npz"
    if file.is_file():
        with np.load(file) as saved:
            return saved["features"]
    net = net.eval()
    device = next(net.parameters()).device
    dataset = reference_dataset(folder, net)
    # in order, indexed (i, seed) as the image datasets are; the center crop draws nothing from the seed
    order = [(i, 0) for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate_skip_broken)
    rows = []
    for batch in tqdm(loader, desc=f"features of {folder.name}", disable=not progress, leave=False):
        images = batch[0]
        if len(images):  # a batch of unreadable files only: skipped
            rows.append(net.features(images.to(device)).float().cpu().numpy())
    if not rows:
        raise ValueError(f"no readable images under {folder}")
    features = np.concatenate(rows)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, features=features, folder=str(folder))
    return features


@torch.no_grad()
def classify_batches(net: ReferenceNet, batches: Iterable[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The reference network's penultimate features (N, F) float32 and top-1 classes (N,) int64 of image
    batches (B, 3, S, S) in [0, 1], S its input size."""
    net = net.eval()
    device = next(net.parameters()).device
    features, predicted = [], []
    for batch in batches:
        rows, logits = net.classify(batch.to(device).float())
        features.append(rows.float().cpu().numpy())
        predicted.append(logits.argmax(-1).cpu().numpy())
    if not features:
        return np.zeros((0, net.feature_dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(features), np.concatenate(predicted).astype(np.int64)


def feature_scores(
    real: np.ndarray,
    features: np.ndarray,
    predicted: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    k: int | None = 3,
) -> dict[str, Any]:
    """FD-ref of generated ``features`` (M, F) against ``real`` features (N, F), class accuracy (the share
    of ``predicted`` classes equal to ``labels``, the classes asked for; None without them) and
    precision/recall with neighbourhood ``k`` (None: not measured, as for sets of ``k`` rows or fewer)."""
    if len(features) < 2 or len(real) < 2:
        raise ValueError(f"FD-ref needs 2 images or more on each side, got {len(features)} generated, {len(real)} real")
    stats, real_stats = FeatureStats(features.shape[1]), FeatureStats(real.shape[1])
    stats.update(features)
    real_stats.update(real)
    scores = {
        "fd_ref": frechet_distance(real_stats.mu, real_stats.sigma, stats.mu, stats.sigma),
        "class_accuracy": None,
        "precision": None,
        "recall": None,
    }
    if labels is not None and predicted is not None:
        if len(labels) != len(predicted):
            raise ValueError(f"{len(labels)} labels for {len(predicted)} images")
        scores["class_accuracy"] = float(np.mean(np.asarray(predicted) == np.asarray(labels)))
    if k is not None:
        scores.update(precision_recall(real, features, k=k))
    return scores


@torch.no_grad()
def evaluate_generated_reference(
    generated: str | Path,
    real: str | Path,
    net: ReferenceNet,
    batch_size: int = 100,
    k: int = 3,
    require_labels: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """FD-ref, precision/recall and (with labels) class accuracy of the images in ``generated`` (a folder
    or ``.npz``, as :func:`mstok.evaluation.evaluate.generated_batches` reads them) against the
    real images under ``real``.

    Generated images must be the network's input size (square, ``net.config.input_size``): they
    are scored as generated, not resized. ``require_labels`` makes missing labels an error
    (class accuracy was asked for); otherwise ``class_accuracy`` is None without them.
    """
    labels = generated_labels(generated)
    if labels is None and require_labels:
        raise ValueError(
            f"{generated} has no class labels (samples.npz 'labels', or class<c>_<i>.png file names as "
            "`mstok sample --out-dir` writes them): class accuracy needs them"
        )
    size = net.config.input_size

    def checked() -> Iterator[torch.Tensor]:
        for batch in generated_batches(Path(generated), batch_size):
            if tuple(batch.shape[-2:]) != (size, size):
                raise ValueError(
                    f"generated images in {generated} are {batch.shape[-1]}x{batch.shape[-2]}, the reference "
                    f"network scores {size}x{size} images: generate at that size"
                )
            yield batch.float() / 255

    features, predicted = classify_batches(net, checked())
    seen = len(features)
    if seen < 2:
        raise ValueError(f"need at least 2 generated images in {generated}, found {seen}")
    if labels is not None and len(labels) != seen:
        raise ValueError(f"{generated}: {len(labels)} labels for {seen} images")
    reals = real_features(net, real, batch_size, cache_dir, progress)
    return {
        "generated": str(generated),
        "real": str(real),
        "images": seen,
        "real_images": len(reals),
        **feature_scores(reals, features, predicted, labels, k),
    }


def score_images(
    net: ReferenceNet,
    batches: Iterable[torch.Tensor],
    real: np.ndarray,
    labels: np.ndarray | None = None,
    k: int = 3,
) -> dict[str, Any]:
    """:func:`feature_scores` of image batches (B, 3, S, S) in [0, 1] against ``real`` features (N, F): the
    images are rounded to 8 bits first, as the PNGs ``mstok sample --out-dir`` writes hold them, so both score
    alike; precision/recall is None unless each side has more than ``k`` images."""
    features, predicted = classify_batches(net, ((b.float().clamp(0, 1) * 255).round() / 255 for b in batches))
    k_used = k if min(len(features), len(real)) > k else None
    return {"images": len(features), **feature_scores(real, features, predicted, labels, k_used)}
