"""The tiny recipe learns: a short run on real photos beats painting each held-out image in
its mean colour (benchmarks/convergence.py itself is tested in test_benchmarks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mstok.training import Trainer, load_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_recipe_beats_mean_colour_on_held_out_images(tmp_path, tiny_imagenet):
    """The shipped titok_tiny.toml (VQ, K=32, V=1024) for 300 steps: before the recipe, the
    tiny models were still below mean colour at 600 steps (benchmarks/RESULTS.md)."""
    config = load_train_config(
        ROOT / "configs" / "titok_tiny.toml",
        [
            f"data.path='{tiny_imagenet}'",
            f"out_dir='{tmp_path}'",
            "steps=300",
            "batch_size=32",
            "val_every=300",
            "val_images=64",
            "sample_every=0",
            "ckpt_every=300",
            "log_every=50",
            "tensorboard=false",
            "data.num_workers=0",
            "threads=2",
        ],
    )
    trainer = Trainer(config, progress=False)
    trainer.fit()
    (val,) = trainer.val_history
    assert val["step"] == 300
    # 64 images held out of the folder, never trained on
    assert len(trainer.val_images) == 64 and len(trainer.dataset) == 8000 - 64
    assert val["val_psnr"] > val["val_mean_colour_psnr"] + 1.0, val
