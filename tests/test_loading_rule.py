"""One loading rule for the API and every CLI command (``mstok.storage.locate.locate_model``): a run
folder means its newest checkpoint, a weights file its own folder, and a checkpoint folder its
EMA weights when present. The EMA and raw weights of the checkpoints below differ, so a command
that read the wrong file would give other numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mstok
from mstok import cli
from mstok.io import atomic_save_safetensors, read_safetensors
from mstok.storage.locate import locate_model


def _two_weight_checkpoint(folder: Path, make) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A checkpoint folder whose model.safetensors and ema.safetensors hold two different inits."""
    torch.manual_seed(0)
    raw = make()
    torch.manual_seed(1)
    ema = make()
    raw.save_pretrained(folder)
    atomic_save_safetensors(ema.state_dict(), folder / "ema.safetensors")
    return raw.eval(), ema.eval()


def _same(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    theirs = reference.state_dict()
    return all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """A run folder: an older checkpoint (an untrained model) and the newest with raw != EMA weights."""
    checkpoints = tmp_path / "run" / "checkpoints"
    mstok.create_tokenizer("titok_tiny").save_pretrained(checkpoints / "step_0000001")
    raw, ema = _two_weight_checkpoint(checkpoints / "step_0000002", lambda: mstok.create_tokenizer("titok_tiny"))
    return tmp_path / "run", raw, ema


def _images(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


# ------------------------------------------------------------------ the API
def test_load_tokenizer_follows_the_rule(run) -> None:
    folder, raw, ema = run
    newest = folder / "checkpoints" / "step_0000002"
    for path in (folder, folder / "checkpoints", newest, str(newest)):
        assert _same(mstok.load_tokenizer(path), ema), path
    assert _same(mstok.load_tokenizer(newest / "model.safetensors"), raw)
    assert _same(mstok.load_tokenizer(newest, weights="model"), raw)
    assert _same(mstok.load_tokenizer(folder, weights="model.safetensors"), raw)
    assert _same(mstok.load_tokenizer(newest / "ema.safetensors", weights="ema"), ema)


def test_a_saved_model_without_ema_loads_its_model_weights(tmp_path: Path) -> None:
    model = mstok.create_tokenizer("titok_tiny")
    model.save_pretrained(tmp_path / "saved")
    assert locate_model(tmp_path / "saved") == (tmp_path / "saved", "model.safetensors")
    assert locate_model(tmp_path / "saved", "") == (tmp_path / "saved", "model.safetensors")  # an unset config key
    assert _same(mstok.load_tokenizer(tmp_path / "saved"), model)
    with pytest.raises(FileNotFoundError, match=r"weights 'ema' asked for, but .*saved has no ema\.safetensors"):
        mstok.load_tokenizer(tmp_path / "saved", weights="ema")


def test_rule_errors_name_the_path(run, tmp_path: Path) -> None:
    folder, _, _ = run
    weights = folder / "checkpoints" / "step_0000002" / "model.safetensors"
    with pytest.raises(ValueError, match=r"model\.safetensors is a weights file, which contradicts weights='ema'"):
        locate_model(weights, "ema")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*empty-run: .*no step_\* checkpoint"):
        mstok.load_tokenizer(tmp_path / "empty-run")
    with pytest.raises(FileNotFoundError, match=r"--checkpoint: .*nowhere does not exist"):
        locate_model(tmp_path / "nowhere", None, "--checkpoint")


def test_load_generator_follows_the_same_rule(tmp_path: Path) -> None:
    step = tmp_path / "gen" / "checkpoints" / "step_0000005"
    raw, ema = _two_weight_checkpoint(step, lambda: mstok.create_generator("maskgit_tiny", num_classes=3))
    assert _same(mstok.load_generator(tmp_path / "gen"), ema)
    assert _same(mstok.load_generator(step, weights="model"), raw)


# ------------------------------------------------------------------ every command reads the EMA weights
@pytest.mark.slow
def test_eval_measures_the_ema_weights(run, tmp_path: Path, monkeypatch) -> None:
    from mstok.evaluation import evaluate as ev

    folder, raw, ema = run
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "empty-cache"))
    data, out = _images(tmp_path / "imgs"), tmp_path / "eval" / "results.json"
    args = ["eval", "--checkpoint", str(folder), "--data", str(data), "--out", str(out), "--num-workers", "0"]
    assert cli.main([*args, "--no-download", "--no-progress", "--batch-size", "4"]) == 0
    results = json.loads(out.read_text())
    assert results["weights"] == "ema.safetensors" and results["checkpoint"].endswith("step_0000002")

    def psnr_of(model: torch.nn.Module) -> float:
        dataset = ev.eval_dataset(data, 64)
        return ev.evaluate_reconstruction(model, dataset, batch_size=4, progress=False)["psnr"]

    assert results["psnr"] == pytest.approx(psnr_of(ema), abs=1e-6)
    assert abs(results["psnr"] - psnr_of(raw)) > 1e-3


@pytest.mark.slow
def test_pretokenize_encodes_with_the_ema_weights(run, tmp_path: Path) -> None:
    from mstok.data import center_crop_transform, open_image_dataset

    folder, raw, ema = run
    data, out = _images(tmp_path / "imgs"), tmp_path / "tokens"
    args = ["pretokenize", "--checkpoint", str(folder), "--data", str(data), "--out", str(out), "--workers", "0"]
    assert cli.main([*args, "--device", "cpu", "--no-progress", "--batch-size", "4"]) == 0
    tokens = read_safetensors(out / "shard-000000.safetensors")["tokens"][:, 0].long()
    dataset = open_image_dataset(data, center_crop_transform(64))
    images = torch.stack([dataset[(i, 0)][0] for i in range(len(dataset))])
    with torch.no_grad():
        assert torch.equal(tokens, ema.encode(images))
        assert not torch.equal(tokens, raw.encode(images))


@pytest.mark.slow
def test_sample_uses_the_ema_generator_and_tokenizer_and_labels_its_grid(run, tmp_path: Path) -> None:
    from mstok.generators import SamplingConfig, generate_images

    folder, _, ema_tokenizer = run
    step = tmp_path / "gen" / "checkpoints" / "step_0000003"
    _, ema = _two_weight_checkpoint(step, lambda: mstok.create_generator("maskgit_tiny", num_classes=3))
    out = tmp_path / "samples"
    args = ["sample", "--generator", str(tmp_path / "gen"), "--tokenizer", str(folder), "--classes", "0,2"]
    assert cli.main([*args, "--n", "2", "--out-dir", str(out), "--device", "cpu", "--no-progress"]) == 0
    saved = np.load(out / "samples.npz")
    labels = torch.tensor([0, 0, 2, 2])
    images, ids = generate_images(ema, ema_tokenizer, labels, SamplingConfig(), seed=0)
    assert np.array_equal(saved["tokens"], ids.numpy())
    assert np.array_equal(saved["arr_0"], (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
    # without --out the grid goes under the generator's run folder, one labelled row per class
    assert cli.main([*args, "--n", "2", "--device", "cpu", "--no-progress"]) == 0
    with Image.open(tmp_path / "gen" / "sample" / "step_0000003" / "grid.png") as grid:
        assert grid.size[0] > 2 * 66 + 2 and grid.size[1] == 2 * 66 + 2


@pytest.mark.slow
def test_probe_reads_the_ema_weights(run, tmp_path: Path) -> None:
    from mstok.evaluation.probe import run_probe

    folder, _, _ = run
    data, out = _images(tmp_path / "imgs", n=6), tmp_path / "probe.json"
    args = ["probe", "--checkpoint", str(folder), "--train", str(data), "--split", "2,1", "--epochs", "2"]
    assert cli.main([*args, "--batch-size", "4", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["weights"] == "ema.safetensors" and result["checkpoint"].endswith("step_0000002")
    settings = {"split": (2, 1), "epochs": 2, "batch_size": 4, "device": "cpu", "progress": False}
    newest = folder / "checkpoints" / "step_0000002"
    assert result["curve"] == run_probe(newest, data, weights="ema", **settings)["curve"]
    assert result["curve"] != run_probe(newest, data, weights="model", **settings)["curve"]
