"""``mstok eval`` reports metrics of (original, reconstruction) of the weights it names.

Every expected value here is computed independently of :mod:`mstok.evaluation`: images read
with PIL, reconstructions from the weights file the report names (loaded by hand into a
fresh model), PSNR from its formula, SSIM from a Gaussian-window transcription with scipy,
the Inception Score and the Fréchet distance from numpy. A version that swaps the pair, reads
the other weights file, clamps wrongly or scores the wrong images fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file as save_safetensors
from scipy.ndimage import correlate1d

from mstok.cli import main
from mstok.evaluation.evaluate import eval_dataset, evaluate_reconstruction
from mstok.evaluation.fid import inception_score
from mstok.evaluation.metrics import psnr, ssim
from mstok.io import read_safetensors
from mstok.losses.perceptual import LPIPS, LPIPS_CHANNELS, VGG16Features
from mstok.tokenizers import create_tokenizer

SIZE = 64  # the tiny presets' resolution: the eval transform leaves 64x64 files untouched


def _write_images(folder: Path, count: int, seed: int) -> list[np.ndarray]:
    """``count`` 64x64 RGB PNGs in two class folders; returns them as float arrays (3, H, W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        cls = folder / ("a" if i % 2 == 0 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        ramp = np.linspace(0, 255, SIZE)[None, :, None] * rng.uniform(0.2, 1, (1, 1, 3))
        pixels = np.clip(ramp + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(cls / f"{i:02d}.png")
    # The dataset lists class folders in sorted order, then files in sorted order.
    for path in sorted(folder.glob("*/*.png")):
        arrays.append(np.asarray(Image.open(path), dtype=np.float64).transpose(2, 0, 1) / 255)
    return arrays


def _psnr_formula(x: np.ndarray, y: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.clip(x, 0, 1) - np.clip(y, 0, 1)) ** 2)))


def _ssim_formula(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. SSIM: 11-tap Gaussian window (sigma 1.5), valid region, channel mean."""
    taps = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
    taps /= taps.sum()

    def blur(a: np.ndarray) -> np.ndarray:
        return correlate1d(correlate1d(a, taps, axis=0, mode="constant"), taps, axis=1, mode="constant")[5:-5, 5:-5]

    x, y = np.clip(x, 0, 1), np.clip(y, 0, 1)
    values = []
    for a, b in zip(x, y, strict=True):
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        num = (2 * mu_a * mu_b + 1e-4) * (2 * cov + 9e-4)
        values.append((num / ((mu_a**2 + mu_b**2 + 1e-4) * (var_a + var_b + 9e-4))).mean())
    return float(np.mean(values))


def _numpy_inception_score(logits: np.ndarray, splits: int) -> float:
    scores = []
    for part in np.array_split(logits, splits):
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _numpy_fid(x: np.ndarray, y: np.ndarray) -> float:
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _reconstruct(weights: Path, images: list[np.ndarray]) -> np.ndarray:
    """Reconstructions of ``images`` by a fresh titok_tiny holding exactly the tensors of ``weights``."""
    model = create_tokenizer("titok_tiny")
    model.load_state_dict(read_safetensors(weights), strict=True)
    batch = torch.from_numpy(np.stack(images)).float()
    with torch.no_grad():
        return model.eval().decode(model.encode(batch)).double().numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny tokenizer folder with raw weights and different EMA weights, as a training checkpoint has."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(3)
    model = create_tokenizer("titok_tiny")
    model.save_pretrained(folder)
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_safetensors(ema, folder / "ema.safetensors")
    return folder


@pytest.mark.slow  # two CLI evaluations, ~4 s
def test_cli_psnr_ssim_are_of_the_reported_weights(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    torch.set_num_threads(1)
    images = _write_images(tmp_path / "data", 4, seed=0)
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "empty"))  # no metric networks: PSNR/SSIM only
    out = tmp_path / "out" / "results.json"
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--out", str(out)]
    assert main([*argv, "--no-download", "--num-workers", "0", "--no-progress", "--batch-size", "3"]) == 0
    results = json.loads(out.read_text())
    assert results["images"] == 4
    used = checkpoint / results["weights"]
    recon = _reconstruct(used, images)
    expected_psnr = np.mean([_psnr_formula(x, r) for x, r in zip(images, recon, strict=True)])
    expected_ssim = np.mean([_ssim_formula(x, r) for x, r in zip(images, recon, strict=True)])
    assert results["psnr"] == pytest.approx(expected_psnr, rel=1e-5)
    assert results["ssim"] == pytest.approx(expected_ssim, abs=1e-5)
    # The other weights file gives other numbers, so the check above tells the two apart.
    other = next(p for p in (checkpoint / "model.safetensors", checkpoint / "ema.safetensors") if p != used)
    other_recon = _reconstruct(other, images)
    other_psnr = np.mean([_psnr_formula(x, r) for x, r in zip(images, other_recon, strict=True)])
    assert abs(other_psnr - expected_psnr) > 1e-3
    # An explicit --weights is honoured and reported.
    argv = [*argv[:-1], str(tmp_path / "out2.json"), "--weights", other.name]
    assert main([*argv, "--no-download", "--num-workers", "0", "--no-progress"]) == 0
    again = json.loads((tmp_path / "out2.json").read_text())
    assert again["weights"] == other.name and again["psnr"] == pytest.approx(other_psnr, rel=1e-5)


class _StubInception(torch.nn.Module):
    """A cheap stand-in for the FID network: features from 4x4-pooled pixels, logits from the features.

    Only the first 12 feature dimensions vary, so the 2048-d Fréchet distance equals a 12-d one.
    """

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.proj = torch.randn(48, 12, generator=gen, dtype=torch.float64)
        self.head = torch.randn(12, 30, generator=gen, dtype=torch.float64) * 10

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.double(), 4).flatten(1)  # (B, 48)
        small = torch.tanh(pooled @ self.proj - 0.5)  # (B, 12)
        features = torch.cat([small, torch.zeros(len(images), 2048 - 12, dtype=small.dtype)], dim=1)
        return features, small @ self.head


def _lpips_random() -> LPIPS:
    """LPIPS with He-scaled random VGG16 convolutions and random positive linear weights."""
    gen = torch.Generator().manual_seed(11)
    lpips = LPIPS()
    with torch.no_grad():
        for module in lpips.net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)
        for lin, channels in zip(lpips.lins, LPIPS_CHANNELS, strict=True):
            lin.weight.copy_(torch.rand(1, channels, 1, 1, generator=gen))
    assert isinstance(lpips.net, VGG16Features)
    return lpips


def _tiny(weights: Path) -> torch.nn.Module:
    model = create_tokenizer("titok_tiny")
    model.load_state_dict(read_safetensors(weights))
    return model


def test_reconstruction_psnr_ssim_lpips_are_of_each_pair(checkpoint: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    images = _write_images(tmp_path / "data", 4, seed=1)
    lpips = _lpips_random()
    weights = checkpoint / "model.safetensors"
    results = evaluate_reconstruction(
        _tiny(weights), eval_dataset(tmp_path / "data", SIZE), batch_size=3, lpips=lpips, progress=False
    )
    recon = _reconstruct(weights, images)
    pairs = list(zip(images, recon, strict=True))
    assert results["images"] == 4
    assert results["psnr"] == pytest.approx(np.mean([_psnr_formula(*p) for p in pairs]), rel=1e-5)
    assert results["ssim"] == pytest.approx(np.mean([_ssim_formula(*p) for p in pairs]), abs=1e-5)
    # LPIPS (verified against a float64 transcription in test_perceptual) of each (original, reconstruction).
    with torch.no_grad():
        expected = lpips(torch.from_numpy(recon).float(), torch.from_numpy(np.stack(images)).float()).double()
    assert results["lpips"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert results["lpips"] > 1e-3 and results["rfid"] is None and results["inception_score"] is None


@pytest.mark.slow  # the 2048-d eigendecompositions of the FID take ~5 s on one core
def test_reconstruction_fid_and_is_score_the_reconstructions(checkpoint: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    images = _write_images(tmp_path / "data", 20, seed=1)
    weights = checkpoint / "model.safetensors"
    stub = _StubInception()
    results = evaluate_reconstruction(
        _tiny(weights), eval_dataset(tmp_path / "data", SIZE), batch_size=8, inception=stub,
        out_dir=tmp_path / "out", grid_images=4, progress=False, fid_method="eigh",
    )  # fmt: skip
    recon = _reconstruct(weights, images)
    assert results["images"] == 20
    real_feats, real_logits = stub(torch.from_numpy(np.stack(images)))
    fake_feats, fake_logits = stub(torch.from_numpy(recon))
    # IS of the reconstructions' logits in one chunk (20 images: fewer than 50 per chunk) ...
    assert results["inception_score_splits"] == 1
    assert results["inception_score"] == pytest.approx(_numpy_inception_score(fake_logits.numpy(), 1), rel=1e-6)
    # ... which is not that of the originals (so scoring the wrong images fails).
    real_is = _numpy_inception_score(real_logits.numpy(), 1)
    assert abs(real_is - results["inception_score"]) > 1e-2 * real_is
    expected_fid = _numpy_fid(real_feats[:, :12].numpy(), fake_feats[:, :12].numpy())
    assert results["rfid"] == pytest.approx(expected_fid, rel=1e-5, abs=1e-8)
    assert expected_fid > 1e-3


def test_metrics_clamp_both_images_to_the_unit_range() -> None:
    gen = torch.Generator().manual_seed(2)
    ref = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    rec = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    want_psnr = [_psnr_formula(ref[i].numpy(), rec[i].numpy()) for i in range(2)]
    assert psnr(ref, rec) == pytest.approx(want_psnr, rel=1e-6)
    assert ssim(ref, rec) == pytest.approx([_ssim_formula(ref[i].numpy(), rec[i].numpy()) for i in range(2)], abs=1e-7)
    assert ssim(rec, rec) == pytest.approx([1.0, 1.0])


# ----------------------------------------------------------------------------- Inception Score known answers
def test_inception_score_splits_keep_50_images_per_chunk() -> None:
    from mstok.evaluation.fid import inception_score_splits

    counts = (1, 10, 49, 50, 99, 100, 499, 500, 50_000)
    assert [inception_score_splits(n) for n in counts] == [1, 1, 1, 1, 1, 2, 9, 10, 10]


def test_inception_score_of_uniform_predictions_is_one() -> None:
    assert inception_score(torch.zeros(12, 1008), splits=3) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Identical confident predictions: the marginal equals each p(y|x), so KL = 0 again.
    same = torch.full((6, 5), -40.0, dtype=torch.float64)
    same[:, 2] = 40.0
    assert inception_score(same, splits=1)[0] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n", [2, 5, 17])
def test_inception_score_of_n_distinct_one_hot_images_is_n(n: int) -> None:
    logits = torch.full((n, 40), -60.0, dtype=torch.float64)
    logits[torch.arange(n), torch.arange(n) * 2] = 60.0  # image i is certainly class 2i
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(n, rel=1e-9) and std == 0.0


def test_inception_score_hand_computed_two_class_case() -> None:
    # p(y|x1) = (1, 0), p(y|x2) = (1/2, 1/2): marginal (3/4, 1/4);
    # KL1 = ln(4/3), KL2 = (ln(2/3) + ln 2) / 2, IS = exp((KL1 + KL2) / 2) = 1.240806...
    logits = torch.tensor([[80.0, -80.0], [0.0, 0.0]], dtype=torch.float64)
    kl1, kl2 = np.log(4 / 3), (np.log(2 / 3) + np.log(2)) / 2
    assert inception_score(logits, splits=1)[0] == pytest.approx(np.exp((kl1 + kl2) / 2), rel=1e-12)
    assert inception_score(logits, splits=1)[0] == pytest.approx(1.2408064788, rel=1e-9)
    # Two splits of one image each: each chunk is its own marginal, IS = 1 with std 0.
    assert inception_score(logits, splits=2) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_inception_score_splits_are_contiguous_chunks_with_population_std() -> None:
    # Chunk 1: two distinct certain classes (IS 2); chunk 2: the hand case above (1.2408...).
    logits = torch.tensor([[80.0, -80.0], [-80.0, 80.0], [80.0, -80.0], [0.0, 0.0]], dtype=torch.float64)
    mean, std = inception_score(logits, splits=2)
    scores = np.array([2.0, 1.2408064788])
    assert mean == pytest.approx(scores.mean(), rel=1e-9) and std == pytest.approx(scores.std(), rel=1e-8)
