"""``mstok eval``: the whole pipeline on small random metric weights, and what happens without them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mstok.cli import main
from mstok.evaluation.fid import load_stats
from mstok.evaluation.inception import FID_WEIGHTS_FILENAME, FIDInceptionV3
from mstok.losses.perceptual import LPIPS_FILENAME, VGG16_FILENAME, VGG16Features
from mstok.tokenizers import create_tokenizer


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A weights cache holding random FID-Inception and LPIPS files under their official names."""
    folder = tmp_path_factory.mktemp("cache")
    torch.manual_seed(1)
    inception = FIDInceptionV3()
    for module in inception.modules():
        if isinstance(module, torch.nn.Conv2d):  # He init keeps 94 layers' activations O(1)
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(inception.state_dict(), folder / FID_WEIGHTS_FILENAME)
    torch.save(VGG16Features().state_dict(), folder / VGG16_FILENAME)
    channels = (64, 128, 256, 512, 512)
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(channels)}, folder / LPIPS_FILENAME
    )
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (folder / cls).mkdir()
        for i in range(3):
            gradient = np.linspace(0, 255, 80, dtype=np.float64)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))
            noise = rng.normal(0, 20, (72, 80, 3))
            Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8)).save(folder / cls / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    create_tokenizer("titok_tiny").save_pretrained(path)
    return path


@pytest.mark.slow
def test_eval_reports_every_metric_with_weights(cache, images, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSTOK_CACHE", str(cache))
    out = tmp_path / "results.json"
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(images), "--out", str(out), "--fid-method", "eigh"]
    argv.append("--no-download")
    assert main([*argv, "--batch-size", "4", "--num-workers", "0", "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert results["images"] == 6 and results["weights"] == "model.safetensors"
    assert results["tokens_per_image"] == 32 and results["bits_per_pixel"] == pytest.approx(32 * 10 / 64**2)
    for key in ("psnr", "ssim", "lpips", "rfid", "inception_score", "codebook_usage", "perplexity"):
        assert isinstance(results[key], float), key
    assert results["rfid"] > 0 and results["unavailable"] == {}
    # 6 images make one split (each needs 50 images; chunks of one image would give IS = 1 exactly
    # whatever the images); tests/test_eval_reference.py checks the value against numpy.
    assert results["inception_score_splits"] == 1 and results["inception_score"] > 1.0
    assert 0 < results["codebook_usage"] <= 6 * 32 / 1024
    for name in ("grid.png", "codebook_usage.png", "reference_stats.npz"):
        assert (tmp_path / name).is_file(), name
    assert "rfid" in capsys.readouterr().out

    # the saved reference statistics give the same rFID when reused
    reuse = tmp_path / "reuse" / "r.json"
    stats = str(tmp_path / "reference_stats.npz")
    argv = [*argv[:5], "--out", str(reuse), "--reference", stats, "--fid-method", "eigh", "--no-download"]
    assert main([*argv, "--num-workers", "0", "--no-progress"]) == 0
    assert json.loads(reuse.read_text())["rfid"] == pytest.approx(results["rfid"], rel=1e-6)

    # gFID of a folder of "generated" images against those statistics: the same images give ~0
    mu, sigma = load_stats(tmp_path / "reference_stats.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)


def test_eval_without_weights_reports_them_unavailable(images, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "empty"))
    out = tmp_path / "r.json"
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(images), "--out", str(out), "--no-download"]
    assert main([*argv, "--num-workers", "0", "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert results["rfid"] is None and results["lpips"] is None and results["inception_score"] is None
    assert set(results["unavailable"]) == {"lpips", "rfid", "inception_score"}
    assert FID_WEIGHTS_FILENAME in results["unavailable"]["rfid"]
    assert isinstance(results["psnr"], float) and isinstance(results["ssim"], float)


def test_generated_mode_and_errors(cache, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSTOK_CACHE", str(cache))
    stats = tmp_path / "stats.npz"
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=batch)
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    out = tmp_path / "g.json"
    argv = ["eval", "--generated", str(tmp_path / "samples.npz"), "--reference", str(stats), "--out", str(out)]
    assert main([*argv, "--no-download", "--fid-method", "eigh"]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 4 and result["gfid"] > 0
    assert result["inception_score_splits"] == 1 and result["inception_score"] > 1.0  # not 4 chunks of one
    # a folder of generated images works too, and they must share one size
    folder = tmp_path / "generated"
    folder.mkdir()
    for i, image in enumerate(batch[:3]):
        Image.fromarray(image).save(folder / f"{i}.png")
    argv = ["eval", "--generated", str(folder), "--reference", str(stats), "--out", str(out), "--no-download"]
    assert main([*argv, "--fid-method", "eigh"]) == 0 and json.loads(out.read_text())["images"] == 3
    Image.fromarray(batch[0][:16]).save(folder / "odd.png")
    assert main([*argv, "--fid-method", "eigh"]) == 2
    assert "must share one size" in capsys.readouterr().err
    assert main(["eval", "--generated", str(images), "--no-download"]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["eval", "--data", str(images)]) == 2
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(images)]) == 2
