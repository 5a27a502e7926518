"""Linear probing: the LARS optimizer, the probe head, the split, and ``mstok probe`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mstok.cli import main
from mstok.evaluation.probe import (
    LARS,
    LinearProbe,
    extract_features,
    probe_lr,
    run_probe,
    split_per_class,
    train_probe,
)
from mstok.tokenizers import create_tokenizer


def test_lars_matches_a_hand_computed_step():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([weight, bias], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    weight.grad = torch.tensor([[0.7, 0.0], [0.0, 0.6]])
    bias.grad = torch.tensor([0.2, 0.4])
    opt.step()
    # matrix: d = g + 0.1 w = [[1.0, 0], [0, 1.0]], ||d|| = sqrt(2); ratio = 0.01 * 5 / sqrt(2)
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ratio = 0.01 * 5 / 2**0.5
    expected_w = torch.tensor([[3.0, 0.0], [0.0, 4.0]]) - 0.5 * ratio * d
    torch.testing.assert_close(weight.data, expected_w)
    # 1-D parameter: no weight decay, no trust ratio, plain momentum SGD
    torch.testing.assert_close(bias.data, torch.tensor([1.0 - 0.1, -1.0 - 0.2]))

    # second step: the momentum buffer carries 0.9 of the first direction
    weight.grad = torch.zeros(2, 2)
    bias.grad = torch.zeros(2)
    before = weight.data.clone()
    d2 = 0.1 * before
    ratio2 = 0.01 * before.norm() / d2.norm()
    opt.step()
    torch.testing.assert_close(weight.data, before - 0.5 * (0.9 * ratio * d + ratio2 * d2))
    torch.testing.assert_close(bias.data, torch.tensor([0.9 - 0.5 * 0.9 * 0.2, -1.2 - 0.5 * 0.9 * 0.4]))


def test_lars_keeps_a_zero_matrix_step_unscaled():
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([weight], lr=1.0, momentum=0.0)
    weight.grad = torch.ones(2, 2)
    opt.step()  # ||w|| = 0: the trust ratio falls back to 1 instead of freezing the weights
    torch.testing.assert_close(weight.data, -torch.ones(2, 2))


def test_linear_probe_init_and_schedule():
    probe = LinearProbe(32, 10, generator=torch.Generator().manual_seed(0))
    assert not list(probe.norm.parameters())  # BatchNorm without affine parameters
    assert probe.head.bias.abs().max() == 0
    assert 0.005 < probe.head.weight.std() < 0.012 and probe.head.weight.abs().max() <= 0.02
    peak = 0.4
    assert probe_lr(0, 100, 10, peak) == pytest.approx(0.04)
    assert probe_lr(9, 100, 10, peak) == pytest.approx(peak)
    assert probe_lr(55, 100, 10, peak) == pytest.approx(peak / 2)
    assert probe_lr(99, 100, 10, peak) < 1e-3


def _blobs(n: int, generator: torch.Generator, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % len(means)
    return means[labels] + torch.randn(n, means.shape[1], generator=generator), labels


@pytest.fixture
def blobs() -> tuple[torch.Tensor, ...]:
    """Four well separated Gaussian blobs in 16-d: 1024 train and 400 val points."""
    generator = torch.Generator().manual_seed(1)
    means = 2 * torch.randn(4, 16, generator=generator)
    return (*_blobs(1024, generator, means), *_blobs(400, generator, means))


# LARS moves a matrix by ~lr * 0.001 of its norm per step, so with only 360 steps the
# MAE base lr 0.1 hardly moves the probe; a larger base lr gives a comparable per-step size.
FAST = {"epochs": 90, "batch_size": 256, "base_lr": 2.0}


def test_probe_learns_separable_blobs(blobs):
    x, y, xv, yv = blobs
    result = train_probe(x, y, xv, yv, 4, **FAST)
    assert result["top1"] > 0.99 and result["top5"] == 1.0
    curve = result["curve"]
    assert len(curve) == 90 and curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    assert curve[-1]["lr"] < curve[9]["lr"]  # cosine decay after the warmup
    assert result["settings"]["lr"] == pytest.approx(2.0)


def test_probe_is_at_chance_on_random_labels(blobs):
    x, _, xv, _ = blobs
    generator = torch.Generator().manual_seed(2)
    y, yv = torch.randint(0, 4, (len(x),), generator=generator), torch.randint(0, 4, (len(xv),), generator=generator)
    result = train_probe(x, y, xv, yv, 4, **FAST)
    assert 0.15 < result["top1"] < 0.35


def test_probe_is_deterministic_under_the_seed(blobs):
    x, y, xv, yv = blobs
    settings = {**FAST, "epochs": 5, "warmup_epochs": 1}
    first = train_probe(x, y, xv, yv, 4, seed=3, **settings)
    assert first == train_probe(x, y, xv, yv, 4, seed=3, **settings)
    assert first["curve"] != train_probe(x, y, xv, yv, 4, seed=4, **settings)["curve"]


def test_split_per_class_counts_disjoint_and_deterministic():
    labels = torch.arange(3).repeat_interleave(torch.tensor([10, 12, 8]))
    train, val = split_per_class(labels, 5, 2, seed=0)
    assert torch.bincount(labels[train]).tolist() == [5, 5, 5]
    assert torch.bincount(labels[val]).tolist() == [2, 2, 2]
    assert not set(train.tolist()) & set(val.tolist())
    again = split_per_class(labels.tolist(), 5, 2, seed=0)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(train, split_per_class(labels, 5, 2, seed=1)[0])
    with pytest.raises(ValueError, match="class 2 has 8 image"):
        split_per_class(labels, 7, 2)


def _subset(root: Path, out: Path, classes: int, per_class: int) -> Path:
    """A folder of symlinks to the first images of the first classes (the images stay where they are)."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir())[:classes]:
        (out / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            (out / folder.name / image.name).symlink_to(image)
    return out


def _saved_titok(path: Path) -> Path:
    torch.manual_seed(0)
    return create_tokenizer("titok_tiny").save_pretrained(path)


def test_extract_features_are_pooled_latents(tiny_imagenet, tmp_path):
    from mstok.data import center_crop_transform, open_image_dataset

    model = create_tokenizer("titok_tiny").eval()
    dataset = open_image_dataset(_subset(tiny_imagenet, tmp_path / "d", 2, 3), center_crop_transform(64))
    feats, labels = extract_features(model, dataset, batch_size=4, device="cpu")
    assert feats.shape == (6, 128) and feats.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    image = dataset[(4, 0)][0]
    torch.testing.assert_close(feats[4], model.encode_features(image[None]).mean(1)[0], atol=1e-5, rtol=1e-4)


def test_probe_command_end_to_end(tiny_imagenet, tmp_path, capsys):
    data = _subset(tiny_imagenet, tmp_path / "data", 10, 10)
    checkpoint = _saved_titok(tmp_path / "model")
    out = tmp_path / "out" / "probe.json"
    args = ["probe", "--checkpoint", str(checkpoint), "--train", str(data), "--split", "8,2"]
    assert main([*args, "--epochs", "3", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert (result["num_train"], result["num_val"], result["num_classes"]) == (80, 20, 10)
    assert result["feature_dim"] == 128 and result["family"] == "titok"
    assert result["weights"] == "model.safetensors"  # no ema.safetensors in a save_pretrained folder
    assert result["split"] == [8, 2] and len(result["curve"]) == 3
    assert result["settings"]["batch_size"] == 80  # capped at the 80 training images
    assert "top-1" in capsys.readouterr().out


def test_probe_with_a_separate_val_folder(tiny_imagenet, tmp_path):
    train = _subset(tiny_imagenet, tmp_path / "train", 3, 4)
    val = tmp_path / "val"
    # val holds only the last two classes: labels must follow class names, not positions
    for folder in sorted(train.iterdir())[1:]:
        (val / folder.name).mkdir(parents=True)
        image = next(folder.iterdir())
        (val / folder.name / image.name).symlink_to(image.resolve())
    result = run_probe(_saved_titok(tmp_path / "m"), train, val=val, epochs=2, device="cpu", progress=False)
    assert (result["num_train"], result["num_val"], result["split"]) == (12, 2, None)


def test_probe_errors_are_clear(tiny_imagenet, tmp_path, capsys):
    checkpoint = _saved_titok(tmp_path / "model")
    data = _subset(tiny_imagenet, tmp_path / "data", 2, 4)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_probe(tmp_path / "missing", data, progress=False)
    with pytest.raises(ValueError, match="needs at least 2"):
        run_probe(checkpoint, _subset(tiny_imagenet, tmp_path / "one", 1, 4), progress=False)
    with pytest.raises(ValueError, match="fewer than the split 35\\+5"):
        run_probe(checkpoint, data, device="cpu", progress=False)
    assert main(["probe", "--checkpoint", str(tmp_path / "nope"), "--train", str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["probe", "--checkpoint", str(checkpoint), "--train", str(data), "--split", "35"])
