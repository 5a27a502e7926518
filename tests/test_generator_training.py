"""Training MaskGIT generators: the objective learns a toy distribution, resume is exact, and
the whole pipeline (pretokenize -> train-generator -> sample -> gFID) runs from the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from mstok.cli import main
from mstok.data.tokens import TokenDataset
from mstok.persistence import load_generator
from mstok.tokenizers import create_tokenizer
from mstok.training import GeneratorTrainConfig, load_train_config
from mstok.training.generator_trainer import GeneratorTrainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ToyTokens(Dataset):
    """Class c draws each of its K tokens independently and uniformly from {4c, ..., 4c+3}:
    the entropy of a masked token given the rest is exactly ln 4."""

    num_tokens, codebook_size, num_classes = 8, 16, 4

    def __init__(self, size: int = 4096) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, 4, (size,), generator=g)
        self.tokens = 4 * self.labels[:, None] + torch.randint(0, 4, (size, 8), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.tokens[key[0]], int(self.labels[key[0]])


def toy_config(tmp_path: Path, steps: int, **extra) -> GeneratorTrainConfig:
    settings = [
        f"steps={steps}", "batch_size=32", f"out_dir='{tmp_path / 'run'}'", "device='cpu'", "log_every=5",
        "tensorboard=false", "model.overrides.width=32", "model.overrides.depth=2", "model.overrides.num_heads=2",
        "optim.lr=5e-3", "optim.end_lr=3e-4", "optim.warmup_steps=10", "loss.label_smoothing=0.0",
        "loss.unmasked_weight=0.0", "loss.class_dropout=0.0", "ema_decay=0.9",
        *[f"{k}={v}" for k, v in extra.items()],
    ]  # fmt: skip
    return load_train_config(None, settings, GeneratorTrainConfig)


@pytest.mark.slow
def test_masked_loss_falls_to_the_entropy_of_a_toy_distribution(tmp_path):
    trainer = GeneratorTrainer(toy_config(tmp_path, 120), dataset=ToyTokens(), progress=False)
    history = trainer.fit()
    first, last = history[0]["masked_ce"], history[-1]["masked_ce"]
    assert first > math.log(16) - 0.3  # starts near uniform over V = 16
    assert last < math.log(4) + 0.05, (first, last)  # ends at the entropy ln 4 = 1.386
    assert history[-1]["accuracy"] > 0.2  # better than chance within the class (0.25 max)


def test_resume_is_bit_identical(tmp_path):
    straight = GeneratorTrainer(toy_config(tmp_path / "a", 6, ckpt_every=3), dataset=ToyTokens(256), progress=False)
    straight.fit()
    first = GeneratorTrainer(toy_config(tmp_path / "b", 6, ckpt_every=3), dataset=ToyTokens(256), progress=False)
    first.config.steps = 3  # "killed" after step 3 (the run's settings stay those it was built with)
    first.fit()
    resumed = GeneratorTrainer(toy_config(tmp_path / "b", 6, ckpt_every=3), dataset=ToyTokens(256), progress=False)
    assert resumed.resume("auto") is not None and resumed.step == 3
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.module.parameters(), resumed.ema.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_generator_size_must_fit_the_tokens(tmp_path):
    with pytest.raises(ValueError, match="num_tokens = 16, but the token data has num_tokens = 8"):
        GeneratorTrainer(toy_config(tmp_path, 1, **{"model.overrides.num_tokens": 16}), dataset=ToyTokens(64))
    with pytest.raises(ValueError, match="labels up to 3"):
        GeneratorTrainer(toy_config(tmp_path, 1, **{"model.overrides.num_classes": 2}), dataset=ToyTokens(64))
    with pytest.raises(ValueError, match=r"data\.path is empty"):
        GeneratorTrainer(toy_config(tmp_path, 1))


def test_every_shipped_config_parses():
    for path in sorted(CONFIGS.glob("*.toml")):
        kind = GeneratorTrainConfig if path.name.startswith(("maskgit_", "dit_", "bitmar_")) else None
        config = load_train_config(path, [], kind) if kind else load_train_config(path)
        assert config.steps >= 1, path


@pytest.fixture
def photos(tmp_path, tiny_imagenet) -> Path:
    """24 real 64x64 photos of 3 classes, linked into a small image folder."""
    folder = tmp_path / "photos"
    for cls in sorted(p for p in tiny_imagenet.iterdir() if p.is_dir())[:3]:
        (folder / cls.name).mkdir(parents=True)
        for image in sorted(cls.glob("*.JPEG"))[:8]:
            (folder / cls.name / image.name).symlink_to(image)
    return folder


@pytest.mark.slow
def test_pipeline_from_the_cli(tmp_path, photos, capsys):
    tokenizer = tmp_path / "tok"
    create_tokenizer("titok_tiny").save_pretrained(tokenizer)
    tokens = tmp_path / "tokens"
    argv = ["pretokenize", "--checkpoint", str(tokenizer), "--data", str(photos), "--out", str(tokens), "--flip"]
    assert main([*argv, "--workers", "0", "--shard-size", "10", "--no-progress", "--device", "cpu"]) == 0
    assert len(TokenDataset(tokens)) == 24

    run = tmp_path / "gen"
    settings = [f"data.path='{tokens}'", f"out_dir='{run}'", f"tokenizer='{tokenizer}'", "steps=4", "batch_size=8"]
    settings += ["sample_every=4", "num_samples=3", "device='cpu'", "tensorboard=false", "log_every=2"]
    config = str(CONFIGS / "maskgit_tiny.toml")
    assert main(["train-generator", "--config", config, "--no-progress", "--set", *settings]) == 0
    generator = load_generator(run / "checkpoints" / "step_0000004", "ema.safetensors")
    assert generator.config.num_classes == 3 and generator.config.num_tokens == 32
    with Image.open(run / "generated" / "step_0000004.png") as grid:  # one row per sample, named by class
        assert grid.size[1] == 3 * 66 + 2 and grid.size[0] > 66 + 2
    assert TokenDataset(tokens).index["classes"] == sorted(p.name for p in photos.iterdir())
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("accuracy" in line for line in lines)

    out = tmp_path / "samples"
    argv = ["sample", "--generator", str(run), "--tokenizer", str(tokenizer), "--classes", "0,2", "--n", "3"]
    argv += ["--out", str(tmp_path / "grid.png"), "--out-dir", str(out), "--no-progress", "--device", "cpu"]
    assert main([*argv, "--guidance-scale", "1.5"]) == 0
    grid = Image.open(tmp_path / "grid.png")
    # 2 classes x 3 images of 64px, 2px padding, right of a column naming each row's class
    assert grid.size[1] == 2 * 66 + 2 and grid.size[0] > 3 * 66 + 2
    batch = np.load(out / "samples.npz")
    assert batch["arr_0"].shape == (6, 64, 64, 3) and batch["arr_0"].dtype == np.uint8
    assert batch["labels"].tolist() == [0, 0, 0, 2, 2, 2]
    first = batch["tokens"].copy()
    assert main([*argv, "--guidance-scale", "1.5"]) == 0  # same seed, same images
    assert np.array_equal(np.load(out / "samples.npz")["tokens"], first)
    assert len(list(out.glob("class*.png"))) == 6

    assert main([*argv[:6], "9", "--n", "1", "--out", str(tmp_path / "x.png")]) == 2  # class 9 of 3
    wrong = tmp_path / "tok64"
    create_tokenizer("titok_tiny", num_latent_tokens=64).save_pretrained(wrong)
    assert main(["sample", "--generator", str(run), "--tokenizer", str(wrong), "--out", str(tmp_path / "y.png")]) == 2
    torch.manual_seed(123)
    other = tmp_path / "other"
    create_tokenizer("titok_tiny").save_pretrained(other)  # same K and V, other weights
    assert main(["sample", "--generator", str(run), "--tokenizer", str(other), "--out", str(tmp_path / "z.png")]) == 2
    assert "trained on tokens of" in capsys.readouterr().err
