"""Held-out validation while training a tokenizer, and the intra-op thread count."""

from __future__ import annotations

import json
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from mstok.data import (
    EpochSampler,
    ImageFolder,
    IndexSubset,
    InMemoryImages,
    RandomResizedCropFlip,
    center_crop_transform,
)
from mstok.training import Trainer, load_train_config
from mstok.training import engine as engine_module
from mstok.training import threads as threads_module
from mstok.training.components import fixed_batch
from mstok.training.distributed import DistContext
from mstok.training.logger import RunLogger
from mstok.training.threads import choose_threads


def _images(folder, count, seed=0):
    """``count`` random 72x80 PNGs in two class folders (sorted names: a/0..., then b/...)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = folder / ("a" if i < count // 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(sub / f"{i:02d}.png")
    return folder


def _config(tmp_path, *extra):
    return load_train_config(
        None,
        [
            "model.preset='titok_tiny'",
            "model.overrides={width=32, depth=1, num_heads=2}",
            "steps=5",
            "batch_size=2",
            f"out_dir='{tmp_path / 'run'}'",
            "data.num_workers=0",
            "optim.warmup_steps=1",
            "log_every=2",
            "ckpt_every=5",
            "tensorboard=false",
            f"perceptual.cache='{tmp_path / 'no-weights'}'",  # LPIPS stays unavailable whatever ~/.cache holds
            *extra,
        ],
    )


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


class _Bar:
    """Stands in for tqdm: keeps the label and every postfix."""

    made: ClassVar[list[_Bar]] = []

    def __init__(self, *args, **kwargs):
        self.desc, self.postfixes = kwargs.get("desc"), []
        _Bar.made.append(self)

    def update(self, n):
        pass

    def set_postfix(self, postfix):
        self.postfixes.append(dict(postfix))

    def close(self):
        pass


@pytest.mark.slow
def test_validation_holds_out_images_and_logs_val_events(tmp_path, monkeypatch):
    folder = _images(tmp_path / "imgs", 10)
    monkeypatch.setattr(engine_module, "tqdm", _Bar)
    trainer = Trainer(
        _config(tmp_path, f"data.path='{folder}'", "val_every=2", "val_images=3"),
        progress=True,
        desc="titok_tiny (1/2, mstok_tiny next)",
    )
    # images 0, 3 and 6 of the 10 are held out: the sampler only ever indexes the other seven
    assert isinstance(trainer.dataset, IndexSubset) and len(trainer.dataset.dataset) == 10
    assert trainer.dataset.indices.tolist() == [1, 2, 4, 5, 7, 8, 9]
    seen = {trainer.dataset.indices[i] for i, _ in _first(EpochSampler(len(trainer.dataset), 0), 70)}
    assert seen == {1, 2, 4, 5, 7, 8, 9}
    whole = ImageFolder(folder, center_crop_transform(64))
    held = torch.stack([whole[(i, 0)][0] for i in (0, 3, 6)])
    assert torch.equal(trainer.val_images, held)

    trainer.fit()
    records = _records(tmp_path / "run")
    start = records[0]
    assert start["event"] == "start" and start["train_images"] == 7 and start["val_images"] == 3
    assert "val_lpips_unavailable" in start and start["threads"] == torch.get_num_threads()
    vals = [r for r in records if r.get("event") == "val"]
    assert [r["step"] for r in vals] == [2, 4, 5]  # every 2 steps and the last
    for r in vals:
        assert math.isfinite(r["val_psnr"]) and 0 < r["val_psnr"] < 60 and -1 <= r["val_ssim"] <= 1
        assert "val_lpips" not in r and r["val_mean_colour_psnr"] == vals[0]["val_mean_colour_psnr"]
    assert trainer.val_history == vals
    assert all("loss" in h and h["images_per_s"] > 0 for h in trainer.history)  # windows stay windows
    (bar,) = _Bar.made[-1:]
    assert bar.desc == "titok_tiny (1/2, mstok_tiny next)"
    assert {"loss", "usage", "img/s", "val_psnr"} <= bar.postfixes[-1].keys()
    assert bar.postfixes[-1]["val_psnr"] == f"{vals[-1]['val_psnr']:.1f}"


def _first(sampler, count):
    it = iter(sampler)
    return [next(it) for _ in range(count)]


def _memory_dataset(count=4):
    rng = np.random.default_rng(1)
    photos = [Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)) for _ in range(count)]
    return InMemoryImages(photos, RandomResizedCropFlip(64, scale=(0.3, 1.0)))


def test_validation_of_a_given_batch_with_lpips(tmp_path, monkeypatch):
    calls = []

    def fake_lpips(device, weights, cache, download, level):
        calls.append(download)
        return (lambda x, y: (x - y).abs().mean(dim=(1, 2, 3))), None

    monkeypatch.setattr("mstok.training.trainer.load_lpips", fake_lpips)  # the name the trainer reads
    dataset = _memory_dataset()
    val = torch.rand(3, 3, 64, 64)
    trainer = Trainer(_config(tmp_path, "steps=2", "val_every=1"), dataset, False, val_images=val)
    assert trainer.dataset is dataset and calls == [False]  # never split, never downloads
    trainer.fit()
    vals = [r for r in _records(tmp_path / "run") if r.get("event") == "val"]
    assert [r["step"] for r in vals] == [1, 2]
    assert all(0 < r["val_lpips"] < 1 and math.isfinite(r["val_psnr"]) for r in vals)
    # a constant grey guess of uniform noise: PSNR = 10 log10(1 / Var U(0, 1)) = 10.8 dB
    assert vals[0]["val_mean_colour_psnr"] == pytest.approx(10 * math.log10(12), abs=0.1)


def test_validation_sources_and_errors(tmp_path):
    dataset = _memory_dataset()
    with pytest.raises(ValueError, match=r"val_every > 0 needs held-out images.*data\.val_path.*val_images="):
        Trainer(_config(tmp_path, "val_every=2"), dataset, False)
    with pytest.raises(ValueError, match=r"val_images must be \(N, 3, 64, 64\)"):
        Trainer(_config(tmp_path, "val_every=2"), dataset, False, val_images=torch.rand(2, 3, 32, 32))
    folder = _images(tmp_path / "imgs", 4)
    with pytest.raises(ValueError, match="hold out all 4 training images"):
        Trainer(_config(tmp_path, f"data.path='{folder}'", "val_every=2", "val_images=4"), progress=False)
    # data.val_path: the training folder is used whole, the batch comes from the other folder
    val_folder = _images(tmp_path / "val", 5, seed=7)
    trainer = Trainer(
        _config(tmp_path, f"data.path='{folder}'", f"data.val_path='{val_folder}'", "val_every=2", "val_images=2"),
        progress=False,
    )
    assert isinstance(trainer.dataset, ImageFolder) and len(trainer.dataset) == 4
    assert torch.equal(trainer.val_images, fixed_batch(ImageFolder(val_folder, RandomResizedCropFlip(64)), 2, 64))
    # also with a dataset passed in
    trainer = Trainer(_config(tmp_path, f"data.val_path='{val_folder}'", "val_every=2"), dataset, False)
    assert trainer.dataset is dataset and len(trainer.val_images) == 5


@pytest.mark.parametrize(
    ("override", "field"),
    [("val_every=-1", "val_every"), ("val_images=0", "val_images"), ("threads=-2", "threads")],
)
def test_bad_settings_name_the_field(tmp_path, override, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        _config(tmp_path, override)


def _weights(trainer):
    return {**trainer.model.state_dict(), **{"ema." + k: v for k, v in trainer.ema.module.state_dict().items()}}


def test_resume_with_validation_is_bit_identical(tmp_path):
    folder = _images(tmp_path / "imgs", 8)
    settings = (f"data.path='{folder}'", "steps=6", "log_every=1", "ckpt_every=3", "val_every=2", "val_images=2")
    straight = Trainer(_config(tmp_path / "a", *settings), progress=False)
    straight.fit()
    first = Trainer(_config(tmp_path / "b", *settings), progress=False)
    first.config.steps = 3  # "killed" after step 3
    first.fit()
    resumed = Trainer(_config(tmp_path / "b", *settings), progress=False)
    assert resumed.resume("auto").name == "step_0000003"
    resumed.fit()
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in straight.history[3:]] == [h["loss"] for h in resumed.history]
    drop = ("val_seconds", "train_seconds")  # timings differ between runs
    after = [{k: v for k, v in r.items() if k not in drop} for r in straight.val_history if r["step"] > 3]
    assert after == [{k: v for k, v in r.items() if k not in drop} for r in resumed.val_history]
    assert [r["step"] for r in resumed.val_history] == [4, 6]


def test_val_events_go_to_tensorboard_and_leave_images_per_s_alone(tmp_path):
    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def close(self):
            pass

    logger = RunLogger(tmp_path, DistContext(), tensorboard=False)
    logger.writer = Writer()
    metrics = {"val_psnr": 17.5, "val_ssim": 0.5, "val_lpips": 0.3}
    record = logger.validation(4, metrics, 1.25)
    assert record == {"event": "val", "step": 4, **metrics, "val_seconds": 1.25}
    assert logger.writer.scalars == [("val/psnr", 17.5, 4), ("val/ssim", 0.5, 4), ("val/lpips", 0.3, 4)]
    before = logger.started
    logger.exclude_time(2.0)
    assert logger.started == before + 2.0
    logger.close()
    assert json.loads((tmp_path / "log.jsonl").read_text()) == record


@pytest.mark.parametrize(
    ("cores", "workers", "load", "processes", "expected"),
    [
        (2, 0, 1.1, 1, 1),  # another process hogs one of two cores
        (2, 0, 0.1, 1, 2),  # a quiet machine
        (8, 2, 0.0, 1, 6),  # two loader workers take two cores
        (8, 0, 3.9, 1, 5),  # a core not quite busy counts as free
        (4, 0, 37.0, 1, 1),  # heavy load: still one thread
        (2, 4, 0.0, 1, 1),  # more workers than cores
        (16, 2, 1.0, 2, 5),  # two local DDP ranks split what is left: (16 - 4 - 1) // 2
    ],
)
def test_choose_threads(cores, workers, load, processes, expected):
    assert choose_threads(cores, workers, load, processes) == expected


def test_engine_sets_and_logs_the_thread_count(tmp_path, monkeypatch):
    dataset = _memory_dataset()
    torch.set_num_threads(2)
    trainer = Trainer(_config(tmp_path / "set", "steps=1", "threads=1"), dataset, False)
    assert torch.get_num_threads() == 1 and trainer.threads == 1
    trainer.fit()
    start = _records(tmp_path / "set" / "run")[0]
    assert start["threads"] == 1 and start["threads_reason"] == "threads = 1 in the config"
    # auto on a CPU: the real rule (conftest pins the count for other tests), on a known machine
    monkeypatch.setattr(engine_module, "resolve_threads", threads_module.resolve_threads)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice: the engine leaves torch alone
    torch.set_num_threads(2)
    trainer = Trainer(_config(tmp_path / "env", "steps=1", "device='cpu'"), dataset, False)
    assert trainer.threads == 2 and trainer.threads_reason == "OMP_NUM_THREADS=3 in the environment"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads_module, "busy_cores", lambda: (1.2, "1-min load 1.20"))
    trainer = Trainer(_config(tmp_path / "auto", "steps=1", "device='cpu'"), dataset, False)
    assert trainer.threads == torch.get_num_threads() == 1
    assert trainer.threads_reason.startswith("auto: 2 usable cores - 0 loader workers - 1 busy")
    monkeypatch.setattr(threads_module, "busy_cores", lambda: (0.3, "1-min load 0.30"))
    assert Trainer(_config(tmp_path / "quiet", "steps=1", "device='cpu'"), dataset, False).threads == 2
