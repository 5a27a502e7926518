"""Latent-space uniformity (HieraTok Table 5): the statistics against hand computations, the
KDE on point sets of known shape, the t-SNE pipeline on a tiny tokenizer, and ``mstok eval --latent-stats``."""

from __future__ import annotations

import json
import math
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mstok
from mstok.cli import main
from mstok.evaluation import uniformity as u
from mstok.evaluation.evaluate import eval_dataset


def _pairwise_gini(d: np.ndarray) -> float:
    """The definition: mean absolute difference over all ordered pairs, over twice the mean."""
    n = len(d)
    return sum(abs(a - b) for a, b in product(d, d)) / (2 * n * n * d.mean())


def test_gini_by_hand():
    assert u.gini(np.full(7, 3.2)) == pytest.approx(0.0, abs=1e-12)
    one_hot = np.zeros(5)
    one_hot[2] = 1.0
    # pairs (hot, cold) and (cold, hot): 2 * 4 differences of 1; mean 1/5 -> 8 / (2 * 25 / 5) = 4/5
    assert u.gini(one_hot) == pytest.approx(4 / 5)
    assert u.gini([1.0, 3.0]) == pytest.approx(2 * 2 / (2 * 4 * 2))  # |1-3| twice / (2 N^2 mean)
    d = np.random.default_rng(0).gamma(0.5, size=23)
    assert u.gini(d) == pytest.approx(_pairwise_gini(d), rel=1e-12)
    assert u.gini(d[::-1]) == pytest.approx(u.gini(d), rel=1e-12)  # order does not matter


def test_cv_and_entropy_by_hand():
    # mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert u.density_cv([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(1.25) / 2.5)
    assert u.density_cv(np.full(9, 0.4)) == pytest.approx(0.0, abs=1e-12)
    assert u.normalized_entropy(np.full(6, 0.01)) == pytest.approx(1.0)
    # p = (1, 1, 2) / 4: H = -(2 * 0.25 log 0.25 + 0.5 log 0.5)
    h = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert u.normalized_entropy([1.0, 1.0, 2.0]) == pytest.approx(h / math.log(3))
    assert u.normalized_entropy([0.0, 0.0, 5.0, 0.0]) == pytest.approx(0.0, abs=1e-12)
    concentrated = [10.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert u.normalized_entropy(concentrated) < u.normalized_entropy(np.ones(6))
    # all three are unchanged by scaling the densities
    d = np.random.default_rng(1).uniform(0.1, 2.0, 11)
    for stat in (u.density_cv, u.gini, u.normalized_entropy):
        assert stat(d * 37.0) == pytest.approx(stat(d), rel=1e-12)


@pytest.mark.parametrize(
    ("bad", "message"),
    [([1.0], "at least 2"), (np.ones((3, 2)), "1-D"), ([1.0, -1.0], "non-negative"), ([1.0, np.nan], "finite")],
)
def test_statistics_refuse_bad_densities(bad, message):
    for stat in (u.density_cv, u.gini, u.normalized_entropy):
        with pytest.raises(ValueError, match=message):
            stat(bad)
    with pytest.raises(ValueError, match="all zero"):
        u.gini([0.0, 0.0])


def test_kde_grid_is_more_uniform_than_a_cluster_with_outliers():
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)  # (100, 2)
    rng = np.random.default_rng(0)
    clustered = np.concatenate([rng.normal(4.5, 0.5, (90, 2)), rng.uniform(0, 9, (10, 2))])
    even, lumpy = u.kde_density(grid), u.kde_density(clustered)
    assert even.shape == lumpy.shape == (100,)
    assert u.density_cv(even) < u.density_cv(lumpy)
    assert u.gini(even) < u.gini(lumpy)
    assert u.normalized_entropy(even) > u.normalized_entropy(lumpy)
    # Scott's bandwidth follows the points' spread: scaling them by s scales every density by 1/s^2
    np.testing.assert_allclose(u.kde_density(clustered * 7.0), lumpy / 49.0, rtol=1e-10)


def test_kde_matches_a_hand_written_gaussian_sum():
    points = np.random.default_rng(2).normal(size=(12, 2))
    cov = np.cov(points.T) * len(points) ** (-2 / 6)  # Scott: factor n^(-1/(d+4)), squared, d = 2
    inv = np.linalg.inv(cov)
    diff = points[:, None] - points[None]  # (N, N, 2)
    quad = np.einsum("ijk,kl,ijl->ij", diff, inv, diff)
    expected = np.exp(-quad / 2).mean(1) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))
    np.testing.assert_allclose(u.kde_density(points), expected, rtol=1e-10)


def test_kde_and_tsne_refuse_bad_input():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        u.kde_density(np.zeros((10, 3)))
    with pytest.raises(ValueError, match="at least 5"):
        u.kde_density(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="on a line"):
        u.kde_density(np.stack([np.arange(8.0), 2 * np.arange(8.0)], 1))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        u.embed_tsne(np.zeros(10))
    with pytest.raises(ValueError, match="at least 5"):
        u.embed_tsne(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="all 6 latent vectors are identical"):
        u.embed_tsne(np.ones((6, 3)))


def test_tsne_perplexity_rule_and_missing_sklearn(monkeypatch):
    assert u.tsne_perplexity(10_000) == 30.0
    assert u.tsne_perplexity(40) == 13.0 and u.tsne_perplexity(5) == pytest.approx(4 / 3)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "mstok\[eval\]"'):
        u.embed_tsne(np.random.default_rng(0).normal(size=(10, 4)))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 64, 64) images in [0, 1]: a random colour each, plus noise (an untrained VQ gives
    pure noise images nearly all the same ids)."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(n, 3, 1, 1, generator=generator)
    return 0.8 * colours + 0.2 * torch.rand(n, 3, 64, 64, generator=generator)


@pytest.mark.parametrize("quantizer", ["vq", "none"])
def test_latent_vectors_are_the_codes_the_decoder_reads(quantizer):
    tokenizer = mstok.create_tokenizer("titok_tiny", quantizer=quantizer).eval()
    images = _images(5)
    cfg = tokenizer.config
    vectors = u.latent_vectors(tokenizer, images, batch_size=2)
    assert vectors.shape == (5, cfg.num_latent_tokens * cfg.code_dim)
    codes = tokenizer.encode(images)
    if quantizer == "vq":
        with torch.no_grad():
            codes = tokenizer.tokens_to_codes(codes)  # ids (B, K) -> (B, K, C)
    np.testing.assert_allclose(vectors, codes.flatten(1).double().numpy(), rtol=1e-5, atol=1e-6)
    # an iterable of batches gives the same vectors as one tensor
    np.testing.assert_allclose(u.latent_vectors(tokenizer, [images[:3], images[3:]]), vectors, rtol=1e-5, atol=1e-6)


def test_latent_uniformity_of_a_tiny_tokenizer_is_finite_and_deterministic(tmp_path):
    torch.manual_seed(0)
    tokenizer = mstok.create_tokenizer("titok_tiny")
    images = _images(40)
    first = u.latent_uniformity(tokenizer, images, seed=3)
    assert first["points"].shape == (40, 2) and first["densities"].shape == (40,)
    assert first["images"] == 40 and first["perplexity"] == 13.0
    for key in ("density_cv", "gini", "normalized_entropy"):
        assert math.isfinite(first[key]), key
    assert 0 <= first["gini"] < 1 and 0 < first["normalized_entropy"] <= 1
    assert first["density_cv"] == pytest.approx(u.density_cv(u.kde_density(first["points"])))
    assert tokenizer.training  # put back in the mode it came in
    second = u.latent_uniformity(tokenizer, images, seed=3)
    np.testing.assert_array_equal(first["points"], second["points"])
    assert first["gini"] == second["gini"]
    u.save_scatter(first["points"], first["densities"], tmp_path / "plot" / "tsne.png", title="tiny")
    assert Image.open(tmp_path / "plot" / "tsne.png").size[0] > 100
    with pytest.raises(ValueError, match=r"\(N, 2\) and densities \(N,\)"):
        u.save_scatter(first["points"], first["densities"][:5], tmp_path / "bad.png")


def _saved_model_and_images(root: Path, collapsed: bool = False, **overrides) -> tuple[Path, Path]:
    """A saved titok_tiny (with config ``overrides``; ``collapsed``: every code vector the same)
    and a folder of 7 random 80x72 images."""
    model = root / "tok"
    torch.manual_seed(0)
    tokenizer = mstok.create_tokenizer("titok_tiny", **overrides)
    if collapsed:
        with torch.no_grad():
            tokenizer.quantizer.embedding.weight[:] = 1.0  # whichever id a token gets, it decodes the same
    tokenizer.save_pretrained(model)
    rng = np.random.default_rng(0)
    for i in range(7):
        folder = root / "imgs" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return model, root / "imgs"


def _eval_argv(model: Path, data: Path, out: Path) -> list[str]:
    argv = ["eval", "--checkpoint", str(model), "--data", str(data), "--out", str(out), "--no-download"]
    return [*argv, "--num-workers", "0", "--no-progress", "--batch-size", "4"]


@pytest.mark.slow
def test_eval_latent_stats_writes_the_statistics_and_the_plot(tmp_path, monkeypatch, capsys):
    # a continuous bottleneck: random images keep distinct latents even untrained
    model, data = _saved_model_and_images(tmp_path, quantizer="none")
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "empty"))  # no metric networks: a fast eval
    out = tmp_path / "eval" / "results.json"
    argv = _eval_argv(model, data, out)
    assert main([*argv, "--latent-stats", "6"]) == 0
    results = json.loads(out.read_text())
    assert results["images"] == 7 and results["latent_images"] == 6  # the first 6 of the 7
    assert "latent_uniformity" not in results["unavailable"]
    assert (tmp_path / "eval" / "latent_tsne.png").is_file()
    printed = capsys.readouterr().out
    assert "latent_gini" in printed and "latent_tsne.png beside it" in printed
    # the same numbers as the library on the same images
    dataset = eval_dataset(data, 64)
    expected = u.latent_uniformity(mstok.load_tokenizer(model), u.dataset_batches(dataset, 6, batch_size=4))
    for key in ("density_cv", "gini", "normalized_entropy", "perplexity"):
        assert results[f"latent_{key}"] == pytest.approx(expected[key], rel=1e-6), key

    assert main([*argv, "--latent-stats", "3"]) == 2
    assert "--latent-stats needs at least 5 images" in capsys.readouterr().err
    generated = ["eval", "--generated", str(data), "--reference", "x.npz", "--latent-stats", "6"]
    assert main(generated) == 2
    assert "--latent-stats measures a tokenizer's latents" in capsys.readouterr().err


def test_eval_latent_stats_of_a_collapsed_tokenizer_are_unavailable(tmp_path, monkeypatch):
    model, data = _saved_model_and_images(tmp_path, collapsed=True, codebook_size=2)
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "empty"))
    out = tmp_path / "results.json"
    assert main([*_eval_argv(model, data, out), "--latent-stats", "6"]) == 0  # the other metrics survive
    results = json.loads(out.read_text())
    assert results["latent_gini"] is None and isinstance(results["psnr"], float)
    assert "identical" in results["unavailable"]["latent_uniformity"]
    assert not (tmp_path / "latent_tsne.png").exists()
