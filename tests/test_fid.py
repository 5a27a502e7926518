"""FID / Inception Score: Fréchet distance, streaming statistics, TF1 resize and the Inception pipeline.

The pipeline tests use random Inception weights saved under the official file name in a
temporary cache: the real file cannot be downloaded here, and the point is the plumbing
(strict loading, shapes, preprocessing, statistics), not the published numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

from mstok.evaluation.fid import FeatureStats, FIDEvaluator, frechet_distance, inception_score, load_stats
from mstok.evaluation.inception import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    images_to_uint8,
    load_fid_inception,
    tf1_resize_bilinear,
)
from mstok.storage.weights import MissingWeightsError

# (name, shape) of tensors in pytorch-fid's pt_inception-2015-12-05-6726825d.pth, read off its
# fid_inception_v3(): torchvision Inception3(num_classes=1008, aux_logits=False) with FID blocks.
OFFICIAL_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch3x3dbl_3.bn.bias": (96,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_4.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def _random_gaussian_samples(rng: np.random.Generator, n: int, dim: int, offset: float) -> np.ndarray:
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mixing + offset + rng.standard_normal(dim)


def _reference_fd(x: np.ndarray, y: np.ndarray) -> float:
    """FD from samples through eigenvalues of the covariance product (an independent route)."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_reference_and_is_symmetric(method: str) -> None:
    rng = np.random.default_rng(0)
    x = _random_gaussian_samples(rng, 200, 16, 0.0)
    y = _random_gaussian_samples(rng, 150, 16, 0.5)
    stats_x = (x.mean(0), np.cov(x, rowvar=False))
    stats_y = (y.mean(0), np.cov(y, rowvar=False))
    fd = frechet_distance(*stats_x, *stats_y, method=method)
    assert fd == pytest.approx(_reference_fd(x, y), rel=1e-9)
    assert fd > 0.5
    assert frechet_distance(*stats_y, *stats_x, method=method) == pytest.approx(fd, rel=1e-9)
    assert abs(frechet_distance(*stats_x, *stats_x, method=method)) < 1e-9 * np.trace(stats_x[1])


def test_frechet_distance_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    d1, d2 = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    # Torch tensors are accepted and computed in float64.
    as_torch = [torch.from_numpy(a).float() for a in (mu1, np.diag(d1), mu2, np.diag(d2))]
    assert frechet_distance(*as_torch) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_rank_deficient_and_invalid_inputs() -> None:
    rng = np.random.default_rng(2)
    # Fewer samples than dimensions: both covariances are singular, the distance must stay finite.
    x, y = rng.standard_normal((5, 16)), rng.standard_normal((6, 16)) + 1.0
    fd = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fd) and fd > 0
    eye = np.eye(4)
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(4), -eye, np.zeros(4), eye)
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(4), eye, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(4), eye, np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(4), eye, np.zeros(4), eye, method="svd")  # type: ignore[arg-type]


def test_frechet_distance_regularises_a_non_finite_square_root(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((40, 5)), rng.standard_normal((30, 5)) + 0.3
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    exact = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    calls: list[np.ndarray] = []
    real_sqrtm = linalg.sqrtm  # the patch below replaces scipy.linalg.sqrtm itself

    def flaky_sqrtm(matrix: np.ndarray) -> np.ndarray:
        calls.append(matrix)
        return np.full_like(matrix, np.inf) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr("mstok.evaluation.fid.linalg.sqrtm", flaky_sqrtm)
    with pytest.warns(RuntimeWarning, match="adding 0.001"):
        retried = frechet_distance(x.mean(0), s1, y.mean(0), s2, eps=1e-3)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(5)) @ (s2 + 1e-3 * np.eye(5)))
    # Only the square-root term sees eps; the traces stay those of the given covariances.
    regularised = np.trace(real_sqrtm(calls[1])).real
    diff = x.mean(0) - y.mean(0)
    assert retried == pytest.approx(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * regularised, rel=1e-12)
    assert retried == pytest.approx(exact, abs=0.05) and retried != exact


def test_feature_stats_match_numpy_over_uneven_batches() -> None:
    rng = np.random.default_rng(3)
    # A large common offset: a naive sum-of-outer-products covariance would lose digits here.
    data = rng.standard_normal((37, 8)) * rng.uniform(0.1, 2.0, 8) + 1e4
    stats = FeatureStats(dim=8)
    for start, stop in [(0, 1), (1, 11), (11, 11), (11, 30), (30, 37)]:
        batch = data[start:stop]
        stats.update(torch.from_numpy(batch) if start % 2 else batch)
    assert stats.n == 37
    np.testing.assert_allclose(stats.mu, data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(data, rowvar=False), rtol=1e-9, atol=1e-12)
    assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        stats.update(np.zeros((2, 9)))
    one = FeatureStats(dim=8)
    one.update(data[:1])
    with pytest.raises(ValueError, match="at least 2"):
        _ = one.sigma


def test_stats_npz_round_trip_and_adm_reference_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    stats = FeatureStats(dim=6)
    stats.update(rng.standard_normal((20, 6)))
    path = stats.save_npz(tmp_path / "sub" / "stats.npz")
    mu, sigma = load_stats(path)
    np.testing.assert_array_equal(mu, stats.mu)
    np.testing.assert_array_equal(sigma, stats.sigma)

    # ADM evaluator reference batch: images plus pool and spatial statistics, float32.
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(
        adm,
        arr_0=rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
        mu=mu.astype(np.float32),
        sigma=sigma.astype(np.float32),
        mu_s=np.zeros(7, dtype=np.float32),
        sigma_s=np.eye(7, dtype=np.float32),
    )
    adm_mu, adm_sigma = load_stats(adm)
    assert adm_mu.dtype == np.float64 and adm_sigma.shape == (6, 6)
    np.testing.assert_allclose(adm_sigma, sigma, rtol=1e-6)

    np.savez(tmp_path / "no_sigma.npz", mu=mu, arr_0=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks \['sigma'\]"):
        load_stats(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "bad_shape.npz", mu=mu, sigma=np.eye(5))
    with pytest.raises(ValueError, match=r"mu \(D,\) and sigma \(D, D\)"):
        load_stats(tmp_path / "bad_shape.npz")
    np.save(tmp_path / "plain.npy", mu)
    with pytest.raises(ValueError, match="single array"):
        load_stats(tmp_path / "plain.npy")
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "absent.npz")


def _tf1_resize_python(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False) of a 2-D image, written as TF's loop in float32."""
    in_h, in_w = image.shape

    def axis(in_size: int, out_size: int) -> list[tuple[int, int, np.float32]]:
        scale = np.float32(in_size) / np.float32(out_size)
        rows = []
        for i in range(out_size):
            coord = np.float32(i) * scale
            lower = int(np.floor(coord))
            rows.append((lower, min(int(np.ceil(coord)), in_size - 1), np.float32(coord - np.floor(coord))))
        return rows

    img = image.astype(np.float32)
    out = np.zeros((out_h, out_w), dtype=np.float32)
    for i, (y0, y1, wy) in enumerate(axis(in_h, out_h)):
        for j, (x0, x1, wx) in enumerate(axis(in_w, out_w)):
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * wx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * wx
            out[i, j] = top + (bottom - top) * wy
    return out


def test_tf1_resize_hand_computed_cases() -> None:
    # A linear ramp stays linear; TF1 samples source coordinate i * in / out with the end clamped.
    ramp2 = torch.tensor([[0.0, 3.0], [6.0, 9.0]]).view(1, 1, 2, 2)
    expected2 = torch.tensor([[0.0, 2.0, 3.0], [4.0, 6.0, 7.0], [6.0, 8.0, 9.0]])
    torch.testing.assert_close(tf1_resize_bilinear(ramp2, (3, 3))[0, 0], expected2)
    # PyTorch's half-pixel convention gives other values, so it is not a substitute.
    assert not torch.allclose(F.interpolate(ramp2, size=(3, 3), mode="bilinear", align_corners=False)[0, 0], expected2)

    ramp4 = torch.arange(16.0).view(1, 1, 4, 4)  # value 4y + x
    coords = torch.tensor([0.0, 4 / 3, 8 / 3])
    expected4 = 4 * coords.view(3, 1) + coords.view(1, 3)
    torch.testing.assert_close(tf1_resize_bilinear(ramp4, (3, 3))[0, 0], expected4)


@pytest.mark.parametrize(("in_hw", "out_hw"), [((4, 4), (3, 3)), ((5, 7), (8, 3)), ((3, 2), (11, 9))])
def test_tf1_resize_matches_plain_python_reference(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    image = torch.rand(2, 3, *in_hw) * 255
    out = tf1_resize_bilinear(image, out_hw)
    assert out.shape == (2, 3, *out_hw)
    expected = _tf1_resize_python(image[1, 2].numpy(), *out_hw)
    np.testing.assert_allclose(out[1, 2].numpy(), expected, rtol=0, atol=1e-4)


def test_tf1_resize_identity_and_errors() -> None:
    image = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    assert torch.equal(tf1_resize_bilinear(image, (6, 5)), image)
    with pytest.raises(ValueError, match="float"):
        tf1_resize_bilinear(image.to(torch.uint8), (3, 3))


def test_images_to_uint8_rounds_half_up_and_clamps() -> None:
    values = torch.tensor([0.0, 0.5 / 255, 0.49 / 255, 1.0, 1.2, -0.1]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert images_to_uint8(values)[0, 0, 0].tolist() == [0, 1, 0, 255, 255, 0]
    raw = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert images_to_uint8(raw) is raw
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        images_to_uint8(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="dtype"):
        images_to_uint8(raw.long())


def test_inception_score_reference_values() -> None:
    # One-hot-like predictions spread evenly over k classes give IS = k; constant predictions give 1.
    confident = torch.full((40, 1008), -50.0, dtype=torch.float64)
    confident[torch.arange(40), torch.arange(40) % 8] = 50.0
    mean, std = inception_score(confident, splits=5)  # each chunk of 8 holds every class once
    assert mean == pytest.approx(8.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    assert inception_score(np.zeros((10, 1000)), splits=2) == pytest.approx((1.0, 0.0))
    # Against a direct numpy transcription of the improved-gan formula, with torch-fidelity's shuffle.
    logits = np.random.default_rng(5).standard_normal((30, 1008)) * 3
    order = np.random.RandomState(2020).permutation(30)
    probs = np.exp(logits[order] - logits.max()) / np.exp(logits[order] - logits.max()).sum(1, keepdims=True)
    scores = []
    for part in np.array_split(probs, 3):
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    result = inception_score(torch.from_numpy(logits).float(), splits=3, shuffle_seed=2020)
    assert result == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-5)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits[:2], splits=3)


def test_model_has_official_key_layout() -> None:
    state = FIDInceptionV3().state_dict()
    for key, shape in OFFICIAL_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)
    # 94 conv+BN blocks: conv weight, 4 BN tensors, num_batches_tracked each; plus fc weight and bias.
    assert len(state) == 94 * 6 + 2


def _random_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = FIDInceptionV3()
    for module in model.modules():
        # He init keeps activations O(1) through the 94 layers, so the features carry signal.
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.8, 1.2)
    torch.nn.init.normal_(model.fc.bias)
    return model.state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache") / FID_WEIGHTS_FILENAME
    torch.save(_random_weights(), path)
    return path


def test_load_from_cache_and_pipeline(weights_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One thread: on a busy 2-core machine two OpenMP threads make the forward and eigh many times slower.
    torch.set_num_threads(1)
    monkeypatch.setenv("MSTOK_CACHE", str(weights_file.parent))
    model = load_fid_inception(download=False)
    saved = torch.load(weights_file, weights_only=True)
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, saved["Mixed_7c.branch_pool.conv.weight"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training

    images = torch.randint(0, 200, (6, 3, 24, 20), dtype=torch.uint8)
    evaluator = FIDEvaluator(model, device="cpu", batch_size=4)
    features = evaluator.update(images)
    assert features.shape == (6, 2048) and evaluator.num_images == 6
    with torch.no_grad():
        out = model(images[:2].float() / 255)  # float [0, 1] input is rounded to the same uint8
    torch.testing.assert_close(out.features, features[:2])
    assert out.logits.shape == (2, 1008)
    # Logits are bias-free (the original IS reads softmax/logits/MatMul).
    torch.testing.assert_close(out.logits, out.features @ model.fc.weight.T)

    mu, sigma = evaluator.stats()
    np.testing.assert_allclose(mu, features.double().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False), rtol=1e-5, atol=1e-9)
    # The 2048-d scipy sqrtm takes about a minute on two cores; "eigh" is the same quantity, faster.
    scale = float(np.trace(sigma))
    assert abs(evaluator.fid((mu, sigma), method="eigh")) < 1e-3 * scale

    shifted = FIDEvaluator(model, device="cpu", batch_size=6)
    shifted.update((images.int() + 55).clamp(max=255).to(torch.uint8))
    assert shifted.fid(evaluator.feature_stats, method="eigh") > 1e-2 * scale
    # IS of the kept logits against numpy: chunks of 3 contiguous images, bias-free logits.
    logits = features.double().numpy() @ model.fc.weight.double().numpy().T  # (6, 1008)
    scores = []
    for part in (logits[:3], logits[3:]):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        scores.append(np.exp((p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()))
    assert evaluator.inception_score(splits=2) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-4)


def test_loading_accepts_torch_fidelity_layout_and_rejects_others(weights_file: Path, tmp_path: Path) -> None:
    state = torch.load(weights_file, weights_only=True)
    # torch-fidelity's file: the same names without BatchNorm num_batches_tracked.
    fidelity = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(fidelity, path)
    model = load_fid_inception(path=path)
    assert torch.equal(model.fc.weight, state["fc.weight"])

    broken = dict(state)
    del broken["Mixed_6b.branch7x7_2.conv.weight"]
    broken["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight.*fc\.weight"):
        load_fid_inception(path=tmp_path / "broken.pth")


def test_missing_weights_name_file_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError) as info:
        load_fid_inception(download=False)
    message = str(info.value)
    assert FID_WEIGHTS_FILENAME in message and FID_WEIGHTS_URL in message
    assert str(tmp_path / "empty" / FID_WEIGHTS_FILENAME) in message
