"""How uniformly a tokenizer spreads images over its latent space (HieraTok Table 5, after VA-VAE).

HieraTok (§5.2) embeds the latents of 10k ImageNet test images in 2-D with t-SNE, estimates
the density at every embedded point with a Gaussian kernel density estimate (KDE), and
summarises how even those densities are. A generator trains faster on a latent space whose
images are spread evenly than on one with a few over-concentrated clusters. The paper gives
neither the t-SNE perplexity, nor the KDE bandwidth, nor how the entropy is normalised; the
choices here are:

* latents: ``tokenizer.encode`` of each image, its code vectors for a discrete tokenizer
  (``tokens_to_codes`` of the ids), flattened to one K*C vector per image, unscaled;
* t-SNE: scikit-learn's, 2-D, PCA initialisation, ``perplexity = min(30, (N - 1) / 3)``
  (scikit-learn's default of 30, lowered for small N so the 3 * perplexity nearest
  neighbours Barnes-Hut uses exist);
* KDE: ``scipy.stats.gaussian_kde`` with Scott's rule (bandwidth = N^(-1/6) times the points'
  covariance), evaluated at the points themselves (each point's own kernel included);
* statistics of the N densities d (``d`` > 0):

  - density CV = std(d) / mean(d), population std (ddof = 0); 0 for equal densities;
  - Gini coefficient = sum_ij |d_i - d_j| / (2 N^2 mean(d)); 0 for equal densities,
    (N - 1) / N when one point holds all of the density;
  - normalised entropy = H(p) / log N with p = d / sum(d); 1 for equal densities,
    0 when one point holds all of it.

More uniform means lower CV and Gini and higher normalised entropy (the paper's arrows).
All three are unchanged by scaling d, and Scott's bandwidth follows the points' spread,
so the statistics do not depend on the arbitrary scale of the t-SNE embedding. The same rule
has a blind spot: far outliers widen the bandwidth, and a cluster much tighter than it then
looks flat, so read the statistics together with the scatter plot (:func:`save_scatter`).

``mstok eval --latent-stats N`` reports them as ``latent_*`` results and writes that plot as
``latent_tsne.png``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mstok.tokenizers.base import Tokenizer

MIN_POINTS = 5  # fewer leave t-SNE's perplexity and the 2-D KDE's covariance meaningless
MAX_PERPLEXITY = 30.0  # scikit-learn's default
INSTALL_HINT = 'pip install "mstok[eval]"'


def _densities(d: Any) -> np.ndarray:
    """``d`` as a float64 (N,) array of finite non-negative densities, N >= 2, not all zero."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"expected a 1-D array of at least 2 densities, got shape {d.shape}")
    if not np.all(np.isfinite(d)) or np.any(d < 0):
        raise ValueError("densities must be finite and non-negative")
    if not d.sum() > 0:
        raise ValueError("densities are all zero")
    return d


def density_cv(d: Any) -> float:
    """Coefficient of variation std / mean of densities (N,) (population std); lower is more uniform."""
    d = _densities(d)
    return float(d.std() / d.mean())


def gini(d: Any) -> float:
    """Gini coefficient of densities (N,): 0 when equal, (N - 1) / N when one holds everything.

    The mean absolute difference over all pairs over twice the mean, computed from the
    sorted values in O(N log N): with d ascending and ranks i = 1..N,
    G = 2 * sum_i i * d_i / (N * sum d) - (N + 1) / N."""
    d = np.sort(_densities(d))
    n = d.size
    ranks = np.arange(1, n + 1)
    return float(2.0 * (ranks * d).sum() / (n * d.sum()) - (n + 1) / n)


def normalized_entropy(d: Any) -> float:
    """Entropy of densities (N,) normalised to sum 1, over log N: 1 when equal, higher is more uniform."""
    d = _densities(d)
    p = d / d.sum()
    p = p[p > 0]  # 0 log 0 = 0
    return float(-(p * np.log(p)).sum() / np.log(d.size))


def kde_density(points_2d: Any, bandwidth: str | float = "scott") -> np.ndarray:
    """Gaussian KDE of points (N, 2), evaluated at each of them: densities (N,).

    ``bandwidth`` is scipy's ``bw_method``: ``"scott"`` (the default, N^(-1/6) times the
    points' covariance), ``"silverman"``, or a factor that multiplies the covariance."""
    from scipy.stats import gaussian_kde

    points = np.asarray(points_2d, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"expected 2-D points of shape (N, 2), got {points.shape}")
    if points.shape[0] < MIN_POINTS or not np.all(np.isfinite(points)):
        raise ValueError(f"expected at least {MIN_POINTS} finite points, got {points.shape[0]}")
    try:
        kde = gaussian_kde(points.T, bw_method=bandwidth)  # scipy wants (dims, N)
    except np.linalg.LinAlgError:
        raise ValueError("the points lie on a line (singular covariance): no 2-D density to estimate") from None
    return kde(points.T)


def tsne_perplexity(n: int) -> float:
    """The t-SNE perplexity for ``n`` points: ``min(30, (n - 1) / 3)``."""
    return min(MAX_PERPLEXITY, (n - 1) / 3)


def require_sklearn() -> type:
    """scikit-learn's ``TSNE`` class; an ImportError naming the ``eval`` extra when it is missing."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise ImportError(f"the t-SNE of the latent-uniformity statistics needs scikit-learn: {INSTALL_HINT}") from err
    return TSNE


def embed_tsne(latents: Any, seed: int = 0) -> np.ndarray:
    """t-SNE of latents (N, F) into points (N, 2) (perplexity :func:`tsne_perplexity`, PCA init).

    ``seed`` is t-SNE's ``random_state`` (it seeds the randomized PCA of the initialisation).

    Raises:
        ValueError: fewer than 5 vectors, or all of them equal.
        ImportError: scikit-learn is not installed (``pip install "mstok[eval]"``).
    """
    TSNE = require_sklearn()
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected latents of shape (N, F), got {x.shape}")
    if x.shape[0] < MIN_POINTS or not np.all(np.isfinite(x)):
        raise ValueError(f"expected at least {MIN_POINTS} finite latent vectors, got {x.shape[0]}")
    if np.all(x == x[0]):  # scikit-learn would divide by a zero spread and crash in Barnes-Hut
        raise ValueError(f"all {len(x)} latent vectors are identical (a collapsed tokenizer?): nothing to embed")
    tsne = TSNE(n_components=2, perplexity=tsne_perplexity(x.shape[0]), init="pca", random_state=seed)
    return tsne.fit_transform(x)


def _readable(batch: list[tuple[torch.Tensor, int] | None]) -> torch.Tensor:
    """The images (B', 3, H, W) of one batch of dataset items, unreadable ones (None) left out."""
    good = [item[0] for item in batch if item is not None]
    return torch.stack(good) if good else torch.empty(0)


def dataset_batches(dataset: Dataset, count: int, batch_size: int = 32, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Batches (B, 3, H, W) of the readable ones among the first ``count`` images of a dataset
    indexed by ``(index, seed)`` (:func:`mstok.evaluation.evaluate.eval_dataset`)."""
    keys = [(i, 0) for i in range(min(count, len(dataset)))]  # the evaluation transform draws nothing from the seed
    loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=num_workers, collate_fn=_readable)
    yield from (images for images in loader if len(images))


@torch.no_grad()
def latent_vectors(
    tokenizer: Tokenizer, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 64
) -> np.ndarray:
    """One flattened latent vector per image: (N, K * C).

    ``images`` is a float tensor (N, 3, H, W) in [0, 1], encoded ``batch_size`` at a time, or an
    iterable of such batches (:func:`dataset_batches`). A discrete tokenizer's ids become their
    code vectors, so every tokenizer is measured on what its decoder reads."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        images = images.split(batch_size)
    device = next(tokenizer.parameters()).device
    vectors = []
    for batch in images:
        tokens = tokenizer.encode(batch.to(device))  # ids (B, K), or float latents (B, K, C)
        codes = tokens if tokenizer.vocab_size is None else tokenizer.tokens_to_codes(tokens)  # (B, K, C)
        vectors.append(codes.flatten(1).double().cpu())
    if not vectors:
        raise ValueError("no images to encode")
    return torch.cat(vectors).numpy()


def latent_uniformity(
    tokenizer: Tokenizer,
    images: torch.Tensor | Iterable[torch.Tensor],
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The uniformity of ``tokenizer``'s latents of ``images`` (see the module docstring).

    Args:
        tokenizer: any mstok tokenizer, continuous or discrete, in eval mode.
        images: float (N, 3, H, W) in [0, 1], or an iterable of such batches; N >= 5.
        seed: t-SNE's random state.
        batch_size: images per ``encode`` call when ``images`` is one tensor.

    Returns:
        ``density_cv``, ``gini``, ``normalized_entropy`` (floats), ``images`` (N),
        ``perplexity`` (of the t-SNE), ``points`` (N, 2) and ``densities`` (N,) arrays.

    Raises:
        ValueError: fewer than 5 images, or latents with no 2-D spread (all equal, or embedded
            on a line: a tokenizer that gives most images the same tokens).
    """
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        latents = latent_vectors(tokenizer, images, batch_size)  # (N, K * C)
    finally:
        tokenizer.train(was_training)
    points = embed_tsne(latents, seed)  # (N, 2)
    densities = kde_density(points)  # (N,)
    return {
        "density_cv": density_cv(densities),
        "gini": gini(densities),
        "normalized_entropy": normalized_entropy(densities),
        "images": len(points),
        "perplexity": tsne_perplexity(len(points)),
        "points": points,
        "densities": densities,
    }


def save_scatter(points: Any, densities: Any, path: str | Path, title: str | None = None) -> None:
    """The t-SNE points (N, 2) coloured by their KDE densities (N,), as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, densities = np.asarray(points), np.asarray(densities)
    if points.ndim != 2 or points.shape[1] != 2 or densities.shape != (len(points),):
        raise ValueError(f"expected points (N, 2) and densities (N,), got {points.shape} and {densities.shape}")
    fig, ax = plt.subplots(figsize=(5, 4.4))
    order = np.argsort(densities)  # dense points drawn last, on top
    shown = ax.scatter(points[order, 0], points[order, 1], c=densities[order], s=6, cmap="viridis")
    fig.colorbar(shown, ax=ax, label="KDE density")
    ax.set_title(title or f"t-SNE of {len(points)} latents")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
