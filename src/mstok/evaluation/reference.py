"""Measuring with the reference network: its top-1 on labelled images, and FD-ref.

The network itself (:class:`~mstok.networks.reference.ReferenceNet`, a small Tiny ImageNet
classifier trained by ``mstok reference train``, :mod:`mstok.training.reference`) lives in
:mod:`mstok.networks.reference` and is re-exported here. It is used in two places:

* as SemTok's semantic teacher (``teacher.spec = {type = "reference", path = DIR}``,
  :class:`mstok.losses.teachers.ReferenceTeacher`): its last feature grid, whose mean over the
  grid is the penultimate (pooled) feature vector;
* as the feature network of **FD-ref** (``mstok eval --feature-net DIR``, :class:`ReferenceMeter`):
  the Fréchet distance between the penultimate features of the real and the reconstructed images,
  with the classifier's top-1 on both. FD-ref is *not* FID: it lives in a 200-class Tiny ImageNet
  classifier's feature space, so it is comparable only between runs that use the same reference
  model file, never with published (Inception) FID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.data import center_crop_transform, collate_skip_broken, open_image_dataset
from mstok.data.images import no_readable_image
from mstok.evaluation.fid import FeatureStats, frechet_distance
from mstok.evaluation.metrics import topk_correct
from mstok.networks.reference import (  # the network, re-exported here where it used to live
    IMAGENET_MEAN as IMAGENET_MEAN,
)
from mstok.networks.reference import (
    IMAGENET_STD as IMAGENET_STD,
)
from mstok.networks.reference import (
    NAME as NAME,
)
from mstok.networks.reference import (
    BasicBlock as BasicBlock,
)
from mstok.networks.reference import (
    ReferenceConfig as ReferenceConfig,
)
from mstok.networks.reference import (
    ReferenceNet,
)
from mstok.persistence.loading import load_reference_net as load_reference_net  # re-exported (it lived here)


def reference_dataset(path: str | Path, model: ReferenceNet, max_pixels: int | None = None) -> Dataset:
    """Images under ``path`` (a folder or shards) center-cropped to the model's ``input_size``."""
    return open_image_dataset(path, center_crop_transform(model.config.input_size), max_pixels)


@torch.no_grad()
def evaluate_reference(
    model: ReferenceNet,
    data: str | Path | Dataset,
    batch_size: int = 256,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Top-1 and top-5 accuracy of ``model`` on labelled images (center crops, in order).

    Args:
        data: a folder of class sub-folders or shards (classes numbered as the sorted folder names,
            like the shards' ``cls``), or a dataset indexed by ``(index, seed)``.
        limit: only the first ``limit`` images (evenly spaced ones would need the whole index).

    Returns:
        ``{"top1": ..., "top5": ..., "images": N, "skipped": unreadable files}``.
    """
    dataset = data if isinstance(data, Dataset) else reference_dataset(data, model, max_pixels)
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) > model.config.num_classes:
        raise ValueError(
            f"the images hold {len(classes)} classes but the reference network knows {model.config.num_classes}: "
            "its top-1 needs data with its classes (numbered as the sorted class folders)"
        )
    count = len(dataset) if limit is None else min(limit, len(dataset))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=[(i, 0) for i in range(count)],  # in order; the center crop draws nothing from the seed
        num_workers=num_workers,
        collate_fn=collate_skip_broken,
    )
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = skipped = 0
    device = model.head.weight.device
    try:
        for images, labels, broken in tqdm(loader, disable=not progress, desc="reference eval", unit="batch"):
            skipped += broken
            if not len(images):
                continue
            logits = model(images.to(device)).float()
            labels = labels.to(device)
            correct1 += topk_correct(logits, labels, 1)
            correct5 += topk_correct(logits, labels, 5)
            seen += len(labels)
    finally:
        model.train(was_training)
    if seen == 0:
        raise no_readable_image(dataset, skipped)
    return {"top1": correct1 / seen, "top5": correct5 / seen, "images": seen, "skipped": skipped}


class ReferenceMeter:
    """FD-ref and the reference network's top-1 on real images and their reconstructions.

    ``update(real, recon, labels)`` per batch, then :meth:`results`: ``fd_ref``, the Fréchet
    distance (:func:`mstok.evaluation.fid.frechet_distance`, the code rFID uses) between the
    penultimate features of the real and the reconstructed images, and ``ref_top1_real`` /
    ``ref_top1_recon``, the classifier's top-1 on each (``None`` when the data's classes are not
    the network's). Statistics of the real images can be given (``real_stats``, e.g. a file
    written by :meth:`save_real_stats`) instead of computed; they must come from a network with
    the same feature width.

    Args:
        net: the reference network (eval mode is set here).
        real_stats: ``(mu (F,), sigma (F, F))`` of the real images' features, or None.
        labelled: whether the data's labels are the network's classes (top-1 is measured only then).
        source: how the statistics were given, for the dimension error (e.g. ``--feature-net-stats FILE``).
    """

    def __init__(
        self,
        net: ReferenceNet,
        real_stats: tuple[np.ndarray, np.ndarray] | None = None,
        labelled: bool = True,
        source: str = "the saved statistics",
    ) -> None:
        self.net = net.eval()
        if real_stats is not None and np.shape(real_stats[0]) != (net.feature_dim,):
            raise ValueError(
                f"{source} holds {np.shape(real_stats[0])[0]}-d feature statistics but the feature net gives "
                f"{net.feature_dim}-d features: they come from another network; compute them again with this one "
                "(leave the statistics out)"
            )
        self.real_stats, self.labelled = real_stats, labelled
        self.real, self.recon = FeatureStats(net.feature_dim), FeatureStats(net.feature_dim)
        self.correct = {"real": 0, "recon": 0}
        self.count = 0

    @torch.no_grad()
    def update(self, real: torch.Tensor, recon: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: real images, their reconstructions (B, 3, H, W) in [0, 1], labels (B,)."""
        real_features, real_logits = self.net.classify(real)
        recon_features, recon_logits = self.net.classify(recon)
        self.add(real_features, recon_features, real_logits, recon_logits, labels)

    def add(
        self,
        real_features: torch.Tensor,
        recon_features: torch.Tensor,
        real_logits: torch.Tensor | None = None,
        recon_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Add features (N, F) (and logits with labels, for top-1) computed elsewhere."""
        if self.real_stats is None:
            self.real.update(real_features)
        self.recon.update(recon_features)
        if labels is not None and real_logits is not None and recon_logits is not None:
            labels = labels.to(real_logits.device)
            self.correct["real"] += topk_correct(real_logits.float(), labels, 1)
            self.correct["recon"] += topk_correct(recon_logits.float(), labels, 1)
            self.count += len(labels)

    def real_mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """The real images' feature statistics (given, or accumulated)."""
        return self.real_stats if self.real_stats is not None else (self.real.mu, self.real.sigma)

    def results(self, method: str = "sqrtm") -> dict[str, Any]:
        """``{"fd_ref", "ref_top1_real", "ref_top1_recon"}`` (the top-1 values None without labels)."""
        mu, sigma = self.real_mu_sigma()
        fd = frechet_distance(mu, sigma, self.recon.mu, self.recon.sigma, method=method)
        measured = self.labelled and self.count > 0
        return {
            "fd_ref": fd,
            "ref_top1_real": self.correct["real"] / self.count if measured else None,
            "ref_top1_recon": self.correct["recon"] / self.count if measured else None,
        }

    def save_real_stats(self, path: str | Path) -> Path | None:
        """Write the accumulated real-image statistics (``mu``, ``sigma``, ``n``) to ``path``; None when
        they were given rather than computed."""
        return None if self.real_stats is not None else self.real.save_npz(path)
