"""The ``mstok`` command line and the demo, end to end with a handful of steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mstok.cli import main
from mstok.demo import run_demo
from mstok.persistence import load_tokenizer
from mstok.tokenizers import list_presets
from mstok.training import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_presets_lists_every_preset_with_counts(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in list_presets():
        assert name in out
    row = next(line for line in out.splitlines() if line.startswith("mstok_b64"))
    assert "95.37M" in row  # encoder parameters, matching the paper's ~95M


def _image_folder(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_train_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    data = _image_folder(tmp_path / "imgs")
    args = [
        "train",
        "--config",
        str(REPO / "configs" / "titok_tiny.toml"),
        "--no-progress",
        "--set",
        "steps=2",
        "--set",
        "batch_size=2",
        "--set",
        f"data.path='{data}'",
        "--set",
        f"out_dir='{tmp_path / 'run'}'",
        "--set",
        "data.num_workers=0",
        "--set",
        "val_images=2",  # the shipped config holds 64 out; this folder has 6 images
        "--set",
        "data.val_path=''",  # hold them out of this folder, not of the shipped validation set
    ]
    assert main(args) == 0
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step_0000002"
    assert load_tokenizer(checkpoint).config.family == "titok"
    assert main([*args, "--resume", "auto", "--set", "steps=3"]) == 2  # a longer run is another schedule
    assert "steps: 2 -> 3" in capsys.readouterr().err
    assert main([*args, "--resume", "auto", "--set", "steps=3", "--allow-changes"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000003"

    # no --config: the config saved with the checkpoint (or the run), even after the run moved
    moved = tmp_path / "moved_run"
    (tmp_path / "run").rename(moved)
    step3 = moved / "checkpoints" / "step_0000003"
    assert main(["train", "--no-progress", "--resume", str(step3), "--set", "steps=4", "--allow-changes"]) == 0
    assert f"resumed from {step3}" in capsys.readouterr().out
    assert latest_checkpoint(moved / "checkpoints").name == "step_0000004"  # written where the run is now
    assert main(["train", "--no-progress", "--resume", str(moved)]) == 0  # a run folder: its newest checkpoint
    assert "resumed from" in capsys.readouterr().out and not (tmp_path / "run").exists()
    assert main(["train", "--no-progress", "--resume", "auto"]) == 2
    assert "--config is required, unless --resume names a checkpoint or run folder" in capsys.readouterr().err
    assert main(["train", "--no-progress", "--resume", str(tmp_path / "imgs")]) == 2
    assert "has no train_config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "model.preset='mstok_b6'"], "unknown preset 'mstok_b6'"),
        (["--set", "optim.lr_typo=1"], "unknown key"),
        (["--set", "data.path='/does/not/exist'"], "image folder not found"),
    ],
)
def test_train_command_reports_bad_input(tmp_path, capsys, extra, message):
    args = [
        "train",
        "--config",
        str(REPO / "configs" / "mstok_tiny.toml"),
        "--no-progress",
        "--set",
        f"out_dir='{tmp_path}'",
        *extra,
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_a_report(tmp_path):
    """Both models side by side (two processes) and one after the other give the same numbers."""
    report = run_demo(out_dir=tmp_path, steps=3, batch_size=4, progress=False, jobs=2)
    text = report.read_text()
    assert "| titok_tiny |" in text and "| mstok_tiny |" in text and "both models at once" in text
    for picture in ("grid.png", "loss_curves.png"):
        assert f"({picture})" in text
        with Image.open(tmp_path / picture) as image:
            assert image.size[0] > 200
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("titok_tiny", "mstok_tiny"):
        assert metrics[name]["tokens_per_image"] == 32
        assert metrics[name]["bits_per_pixel"] == pytest.approx(32 * 10 / 64**2)
        assert np.isfinite(metrics[name]["psnr"]) and 0 < metrics[name]["ssim"] <= 1
    one_by_one = json.loads((run_demo(out_dir=tmp_path / "seq", steps=3, batch_size=4, progress=False, jobs=1)
                             .parent / "metrics.json").read_text())  # fmt: skip
    for name in ("titok_tiny", "mstok_tiny"):  # thread counts may differ: equal up to float rounding
        assert one_by_one[name]["processes"] == 1 and metrics[name]["processes"] == 2
        assert one_by_one[name]["psnr"] == pytest.approx(metrics[name]["psnr"], abs=1e-3)
        assert one_by_one[name]["final_loss"] == pytest.approx(metrics[name]["final_loss"], rel=1e-3)
    with pytest.raises(ValueError, match="jobs must be 1 or 2"):
        run_demo(out_dir=tmp_path / "bad", steps=1, jobs=3)


@pytest.mark.slow
def test_demo_command_on_a_folder(tmp_path, capsys):
    data = _image_folder(tmp_path / "imgs", n=12)
    assert (
        main(
            [
                "demo",
                "--data",
                str(data),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "report written to" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").is_file()
