"""Scoring generated images with the reference network (``mstok.evaluation.generated``): FD-ref,
class accuracy and precision/recall against known answers, the feature cache, labels read the
way ``mstok sample --out-dir`` writes them, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mstok.evaluation import generated as gen
from mstok.evaluation.fid import FeatureStats, frechet_distance
from mstok.networks.reference import ReferenceConfig, ReferenceNet

# a net of a few thousand parameters scoring 32 px images (16 px inside), 3 classes
TINY = {"widths": (4, 8), "blocks": (1, 1), "num_classes": 3, "image_size": 16, "input_size": 32}


@pytest.fixture(scope="module")
def net() -> ReferenceNet:
    torch.manual_seed(0)
    model = ReferenceNet(ReferenceConfig.from_dict(TINY))
    with torch.no_grad():  # blocks start as the identity (zero BatchNorm): move them so features vary
        for name, p in model.named_parameters():
            if name.endswith("norm2.weight"):
                p.fill_(0.5)
    return model.eval()


def _images(seed: int, count: int, shift: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(60 + 60 * (i % 3) + shift, 30, (32, 32, 3)).clip(0, 255).astype(np.uint8) for i in range(count)]


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """Three class folders of 32 px images (class c has mean colour 60 + 60 c)."""
    root = tmp_path_factory.mktemp("real")
    for i, pixels in enumerate(_images(0, 24)):
        folder = root / "abc"[i % 3]
        folder.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return root


def _write_generated(folder: Path, images: list[np.ndarray], labels: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(pixels).save(folder / f"class{label:04d}_{i:04d}.png")
    return folder


def _features(net: ReferenceNet, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        features, logits = net.classify(batch)
    return features.numpy(), logits.argmax(-1).numpy()


def test_scores_match_their_definitions(net, real, tmp_path):
    images = _images(1, 12, shift=20.0)
    labels = [i % 3 for i in range(12)]
    folder = _write_generated(tmp_path / "gen", images, labels)
    result = gen.evaluate_generated_reference(folder, real, net, batch_size=5, cache_dir=tmp_path / "cache")
    # the same numbers from the features computed here, by the formulas
    gen_features, predicted = _features(net, images)
    real_features = gen.real_features(net, real, cache_dir=tmp_path / "cache")
    a, b = FeatureStats(net.feature_dim), FeatureStats(net.feature_dim)
    a.update(real_features)
    b.update(gen_features)
    assert result["fd_ref"] == pytest.approx(frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-6, abs=1e-9)
    assert result["class_accuracy"] == pytest.approx(float(np.mean(predicted == np.array(labels))))
    assert (result["images"], result["real_images"], result["k"]) == (12, 24, 3)
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0


def test_the_real_images_themselves_score_perfectly(net, real, tmp_path):
    """Generated = the real images (their labels in the class folders' order): FD-ref 0, precision
    and recall 1, and class accuracy = the network's top-1 on them."""
    files = sorted(real.glob("*/*.png"))
    images = [np.asarray(Image.open(f)) for f in files]
    labels = ["abc".index(f.parent.name) for f in files]
    folder = _write_generated(tmp_path / "copy", images, labels)
    result = gen.evaluate_generated_reference(folder, real, net, cache_dir=tmp_path / "cache")
    assert result["fd_ref"] == pytest.approx(0.0, abs=1e-6)
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
    _, predicted = _features(net, images)
    assert result["class_accuracy"] == pytest.approx(float(np.mean(predicted == np.array(labels))))


def test_real_features_are_cached_per_network(net, real, tmp_path, monkeypatch):
    first = gen.real_features(net, real, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the cached features should have been used")

    monkeypatch.setattr(gen, "reference_dataset", no_reading)
    assert np.array_equal(gen.real_features(net, real, cache_dir=tmp_path), first)
    other = ReferenceNet(ReferenceConfig.from_dict(TINY)).eval()  # another network: its own cache entry
    monkeypatch.undo()
    gen.real_features(other, real, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_labels_from_samples_npz_and_file_names(tmp_path):
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=np.zeros((3, 32, 32, 3), np.uint8), labels=np.array([2, 0, 1]))
    assert gen.generated_labels(npz).tolist() == [2, 0, 1]
    folder = _write_generated(tmp_path / "f", _images(2, 3), [1, 1, 0])
    # in the order the images are read: sorted file names (class0000_0002, class0001_0000, class0001_0001)
    assert gen.generated_labels(folder).tolist() == [0, 1, 1]
    Image.fromarray(_images(3, 1)[0]).save(folder / "other.png")  # a name without a class: no labels
    assert gen.generated_labels(folder) is None


def test_bad_input_gets_a_clear_error(net, real, tmp_path):
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for i, pixels in enumerate(_images(4, 4)):
        Image.fromarray(pixels).save(unlabelled / f"{i}.png")
    with pytest.raises(ValueError, match="no class labels"):
        gen.evaluate_generated_reference(unlabelled, real, net, require_labels=True, cache_dir=tmp_path)
    # without asking for accuracy, it is left out
    result = gen.evaluate_generated_reference(unlabelled, real, net, k=2, cache_dir=tmp_path)
    assert result["class_accuracy"] is None
    big = [np.zeros((48, 48, 3), np.uint8)] * 4
    folder = _write_generated(tmp_path / "big", big, [0] * 4)
    with pytest.raises(ValueError, match=r"48x48.*32x32"):
        gen.evaluate_generated_reference(folder, real, net, cache_dir=tmp_path)


# ------------------------------------------------------------------ mstok eval --generated --feature-net
def test_cli_scores_a_sampled_folder(net, real, tmp_path, monkeypatch, capsys):
    from mstok.cli import main

    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "cache"))
    net.save_pretrained(tmp_path / "ref")
    folder = _write_generated(tmp_path / "gen", _images(5, 9), [i % 3 for i in range(9)])
    argv = ["eval", "--generated", str(folder), "--feature-net", str(tmp_path / "ref"), "--data", str(real)]
    assert main([*argv, "--class-accuracy", "--out", str(tmp_path / "r.json"), "--no-progress"]) == 0
    saved = __import__("json").loads((tmp_path / "r.json").read_text())
    direct = gen.evaluate_generated_reference(folder, real, net, cache_dir=tmp_path / "cache" / "reference_features")
    assert {k: saved[k] for k in ("fd_ref", "class_accuracy", "precision", "recall")} == pytest.approx(
        {k: direct[k] for k in ("fd_ref", "class_accuracy", "precision", "recall")}
    )
    assert len(list((tmp_path / "cache" / "reference_features").glob("*.npz"))) == 1  # computed once, cached
    capsys.readouterr()


def test_cli_bad_input_is_one_line(net, real, tmp_path, capsys):
    from mstok.cli import main
    from mstok.tokenizers import create_tokenizer

    net.save_pretrained(tmp_path / "ref")
    create_tokenizer("titok_tiny").save_pretrained(tmp_path / "tok")
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for i, pixels in enumerate(_images(6, 4)):
        Image.fromarray(pixels).save(unlabelled / f"{i}.png")
    ref, gen_dir = str(tmp_path / "ref"), str(unlabelled)
    cases = [
        (["--generated", gen_dir, "--feature-net", ref, "--data", str(real), "--class-accuracy"], "no class labels"),
        (["--generated", gen_dir, "--feature-net", str(tmp_path / "tok"), "--data", str(real)], "not a reference"),
        (["--generated", gen_dir, "--feature-net", ref], "needs --data"),
        (["--generated", str(tmp_path / "nope"), "--feature-net", ref, "--data", str(real)], "does not exist"),
    ]
    for argv, message in cases:
        assert main(["eval", *argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mstok eval: error:") and message in err, err


def test_score_images_rounds_to_8_bits_and_scores_as_the_saved_folder(net, real, tmp_path):
    """Image tensors score as their PNGs would (rounded to 8 bits first): the same numbers as the folder written
    from them; precision/recall only when each side has more than k images."""
    images = _images(3, 12, shift=10.0)
    labels = np.array([i % 3 for i in range(12)])
    folder = _write_generated(tmp_path / "gen", images, labels.tolist())
    from_folder = gen.evaluate_generated_reference(folder, real, net, cache_dir=tmp_path / "cache")
    reals = gen.real_features(net, real, cache_dir=tmp_path / "cache")
    # the tensors carry sub-8-bit noise that rounding removes
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    noisy = batch + (torch.rand_like(batch) - 0.5) / 300
    scored = gen.score_images(net, noisy.split(5), reals, labels)
    for key in ("fd_ref", "class_accuracy", "precision", "recall"):
        assert scored[key] == pytest.approx(from_folder[key], rel=1e-6, abs=1e-9), key
    few = gen.score_images(net, [batch[:3]], reals, labels[:3])
    assert few["images"] == 3 and few["precision"] is None and few["recall"] is None
