"""Fréchet Inception Distance and Inception Score, computed the way published numbers are.

* Features are the 2048-d pool_3 activations of :class:`~mstok.evaluation.inception.FIDInceptionV3`;
  their mean and unbiased covariance (``np.cov(rowvar=False)``) are accumulated in float64.
* The Fréchet distance uses ``scipy.linalg.sqrtm`` of ``sigma1 @ sigma2``, adding ``eps * I`` to
  both covariances when that square root is not finite, and drops a negligible imaginary part,
  as pytorch-fid, TTUR and the ADM evaluator do.
* The Inception Score uses the bias-free 1008-way logits, in float64, over ``splits`` contiguous
  chunks, returning the mean and the population std over chunks (improved-gan / torch-fidelity).

Statistics files are ``.npz`` with ``mu`` (D,) and ``sigma`` (D, D); the ADM evaluator's
reference batches (which add ``mu_s``, ``sigma_s`` and the images ``arr_0``) read as well.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy import linalg

from mstok.evaluation.inception import FEATURE_DIM, FIDInceptionV3, load_fid_inception


def _as_float64(array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


class FeatureStats:
    """Streaming mean and covariance of feature rows, in float64.

    Sums are taken of ``x - shift`` with ``shift`` the first batch's mean: the covariance
    ``(S - N m m^T) / (N - 1)`` then subtracts numbers of the size of the spread, not of the
    mean, which keeps it accurate when features have a large common offset.
    """

    def __init__(self, dim: int = FEATURE_DIM) -> None:
        self.dim = dim
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(dim, dtype=np.float64)
        self._outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add feature rows (N, D)."""
        x = _as_float64(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {x.shape}")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
        x = x - self._shift  # (N, D)
        self.n += x.shape[0]
        self._sum += x.sum(axis=0)
        self._outer += x.T @ x

    @property
    def mu(self) -> np.ndarray:
        """Mean (D,), float64."""
        if self.n == 0 or self._shift is None:
            raise ValueError("no features were added")
        return self._shift + self._sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (D, D), float64, as ``np.cov(features, rowvar=False)``."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.n}")
        centred_mean = self._sum / self.n  # (D,)
        sigma = (self._outer - self.n * np.outer(centred_mean, centred_mean)) / (self.n - 1)
        # Round-off makes the two triangles differ in the last bit; sqrtm prefers an exactly symmetric matrix.
        return (sigma + sigma.T) / 2

    def save_npz(self, path: str | Path) -> Path:
        """Write ``mu``, ``sigma`` (and the count ``n``) to an ``.npz`` file; returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:  # an open handle keeps numpy from appending ".npz" to other names
            np.savez(handle, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))
        return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu (D,), sigma (D, D))`` as float64 from an ``.npz`` file; other keys are ignored.

    Reads :meth:`FeatureStats.save_npz` output, pytorch-fid's stats files and the ADM
    evaluator's reference batches (only ``mu`` and ``sigma`` are loaded, not the images).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not an ``.npz``, lacks ``mu`` or ``sigma``, or their shapes disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read FID statistics from {path}: not a numpy .npz file ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"FID statistics file {path} is a single array, expected an .npz with 'mu' and 'sigma'")
    with archive:
        missing = [key for key in ("mu", "sigma") if key not in archive.files]
        if missing:
            raise ValueError(f"FID statistics file {path} lacks {missing}; it has keys {sorted(archive.files)}")
        mu = np.asarray(archive["mu"], dtype=np.float64)
        sigma = np.asarray(archive["sigma"], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"FID statistics file {path}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}"
        )
    return mu, sigma


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """``tr sqrtm(sigma1 @ sigma2)`` via scipy's Schur-based square root, the reference method."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A rank-deficient product (fewer samples than dimensions) can give inf/nan; regularise like pytorch-fid.
        warnings.warn(
            f"sqrtm(sigma1 @ sigma2) is not finite (singular product); adding {eps} to the covariance diagonals",
            RuntimeWarning,
            stacklevel=3,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary component of {np.abs(covmean.imag).max():.3g}: "
                "the covariances are not valid (not symmetric positive semi-definite?)"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrtm(sigma1 @ sigma2)`` as ``tr sqrt(A sigma2 A)`` with ``A = sigma1^(1/2)``: two symmetric eigensolves.

    ``sigma1 @ sigma2`` and ``A sigma2 A`` are similar when ``sigma1`` is positive definite (and share
    their nonzero eigenvalues in general), so the traces of their square roots coincide; negative
    round-off eigenvalues are clipped to 0. Runs in torch float64, whose LAPACK (MKL) solves a
    2048x2048 symmetric problem in seconds.
    """
    s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
    values, vectors = torch.linalg.eigh(s1)
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T  # (D, D)
    inner = root @ s2 @ root
    return float(torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum())


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
    eps: float = 1e-6,
    method: Literal["sqrtm", "eigh"] = "sqrtm",
) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` of two Gaussians.

    Args:
        mu1, mu2: means (D,).
        sigma1, sigma2: covariances (D, D).
        eps: added to both diagonals when the square root of the product is not finite.
        method: ``"sqrtm"`` (scipy's Schur-based square root: the reference, but up to a minute for
            D=2048 on a small CPU) or ``"eigh"`` (symmetric eigensolves, about 10x faster; agrees to
            ~1e-9 relative on well-conditioned covariances; convenient for monitoring).

    Raises:
        ValueError: shapes disagree, or the square root has a large imaginary part.
    """
    m1, m2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    s1, s2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(f"means must be vectors of the same length, got {m1.shape} and {m2.shape}")
    if s1.shape != (m1.shape[0], m1.shape[0]) or s2.shape != s1.shape:
        raise ValueError(f"covariances must both be {(m1.shape[0], m1.shape[0])}, got {s1.shape} and {s2.shape}")
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# The published Inception Score splits 50k images into 10 chunks of 5000. Each chunk's marginal
# p(y) must come from many images: a chunk of one image is its own marginal, and IS = 1 exactly
# whatever the images (what `splits=min(10, n)` silently reported for n <= 10).
IS_SPLITS = 10
IS_MIN_IMAGES_PER_SPLIT = 50


def inception_score_splits(n: int) -> int:
    """Chunks for the Inception Score of ``n`` images: 10, or fewer so that each holds at least 50."""
    return max(1, min(IS_SPLITS, n // IS_MIN_IMAGES_PER_SPLIT))


def inception_score(
    logits: torch.Tensor | np.ndarray, splits: int = 10, shuffle_seed: int | None = None
) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``: mean and std over ``splits`` chunks.

    Args:
        logits: (N, C) class logits, C = 1008 for the FID Inception (bias-free, as the original)
            or 1000 for other classifiers; every column is used.
        splits: number of contiguous chunks ``[i N // splits, (i + 1) N // splits)``.
        shuffle_seed: permute rows with ``np.random.RandomState(seed)`` first; ``None`` keeps
            the order (original code); torch-fidelity shuffles with seed 2020.

    Returns:
        ``(mean, std)`` of the per-chunk scores (population std, ``np.std``), in [1, C].
    """
    x = torch.from_numpy(_as_float64(logits))  # (N, C) float64
    if x.dim() != 2:
        raise ValueError(f"expected logits of shape (N, C), got {tuple(x.shape)}")
    n = x.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need 1 <= splits <= N, got splits={splits} for N={n}")
    if shuffle_seed is not None:
        x = x[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    log_p = torch.log_softmax(x, dim=1)  # (N, C)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]  # (n_i, C)
        log_marginal = torch.logsumexp(chunk, dim=0) - np.log(chunk.shape[0])  # (C,) log of mean p(y|x)
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


class FIDEvaluator:
    """Feeds image batches through the FID Inception and keeps feature statistics and IS logits.

    Args:
        model: a loaded network; ``None`` loads it with :func:`load_fid_inception`.
        device: where the network runs (default: CUDA if available, else CPU).
        batch_size: images per forward pass.
        keep_logits: keep the (N, 1008) logits for :meth:`inception_score` (4 KiB per image).
        path, cache, download: passed to :func:`load_fid_inception` when ``model`` is ``None``.
    """

    def __init__(
        self,
        model: FIDInceptionV3 | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 50,
        keep_logits: bool = True,
        path: str | Path | None = None,
        cache: str | Path | None = None,
        download: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if model is None:
            model = load_fid_inception(path=path, cache=cache, download=download)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.keep_logits = keep_logits
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self.feature_stats = FeatureStats(FEATURE_DIM)
        self._logits: list[torch.Tensor] = []

    @property
    def num_images(self) -> int:
        """Images added since the last :meth:`reset`."""
        return self.feature_stats.n

    @torch.no_grad()
    def update(self, images: torch.Tensor) -> torch.Tensor:
        """Add images (B, 3, H, W), uint8 or float in [0, 1]; returns their features (B, 2048) on the CPU."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        features = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(self.device, non_blocking=True)
            with torch.autocast(device_type=self.device.type, enabled=False):
                out = self.model(batch)
            feats = out.features.cpu()  # (b, 2048)
            self.feature_stats.update(feats)
            if self.keep_logits:
                self._logits.append(out.logits.cpu())
            features.append(feats)
        return torch.cat(features) if features else torch.empty(0, FEATURE_DIM)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu (2048,), sigma (2048, 2048))`` of the images added, float64."""
        return self.feature_stats.mu, self.feature_stats.sigma

    def fid(
        self,
        reference: str | Path | FeatureStats | tuple[np.ndarray, np.ndarray],
        method: Literal["sqrtm", "eigh"] = "sqrtm",
    ) -> float:
        """FID between the images added and ``reference`` (an ``.npz`` path, stats, or ``(mu, sigma)``)."""
        if isinstance(reference, (str, Path)):
            ref_mu, ref_sigma = load_stats(reference)
        elif isinstance(reference, FeatureStats):
            ref_mu, ref_sigma = reference.mu, reference.sigma
        else:
            ref_mu, ref_sigma = reference
        mu, sigma = self.stats()
        return frechet_distance(mu, sigma, ref_mu, ref_sigma, method=method)

    def inception_score(self, splits: int = 10, shuffle_seed: int | None = None) -> tuple[float, float]:
        """``(mean, std)`` Inception Score of the images added; see :func:`inception_score`."""
        if not self.keep_logits:
            raise ValueError("this evaluator was built with keep_logits=False")
        if not self._logits:
            raise ValueError("no images were added")
        return inception_score(torch.cat(self._logits), splits=splits, shuffle_seed=shuffle_seed)
