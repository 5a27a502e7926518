"""The tiny recipe learns: a short run on real photos beats painting each held-out image in
its mean colour; and benchmarks/convergence.py runs end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from mstok.training import Trainer, load_train_config

ROOT = Path(__file__).resolve().parents[1]


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


def test_convergence_benchmark_end_to_end(tmp_path, tiny_imagenet):
    spec = importlib.util.spec_from_file_location("convergence", ROOT / "benchmarks" / "convergence.py")
    convergence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convergence)
    rows = "titok VQ (recipe),mstok continuous (recipe),conv AE VQ 8x8 V=32 (320 bits)"
    argv = ["--data", str(tiny_imagenet), "--steps", "4", "--val-every", "2", "--val-images", "8", "--jobs", "1"]
    argv += ["--threads", "1", "--wall", "1000", "--work-dir", str(tmp_path / "work")]
    out = tmp_path / "RESULTS.md"
    results = convergence.main([*argv, "--rows", rows, "--out", str(out), "--plot", str(tmp_path / "c.png")])
    assert list(results) == rows.split(",")
    for result in results.values():
        assert [r["step"] for r in result["val"]] == [2, 4]
        assert all(r["val_psnr"] > 0 and r["train_seconds"] > 0 for r in result["val"])
    text = out.read_text()
    assert "| titok VQ (recipe) |" in text and "| each image in its mean colour |" in text
    assert (tmp_path / "c.png").stat().st_size > 1000
    # finished rows are reused, not retrained
    saved_file = next((tmp_path / "work").glob("titok_VQ*/result.json"))
    saved = json.loads(saved_file.read_text())
    saved["val"][-1]["val_psnr"] = -1.0
    saved_file.write_text(json.dumps(saved))
    again = convergence.main([*argv, "--rows", "titok VQ (recipe)", "--no-append"])
    assert again["titok VQ (recipe)"]["val"][-1]["val_psnr"] == -1.0
