"""Training faults: checkpoint writes that die or fill the disk, broken checkpoints, non-finite
states, resumes from older steps or with changed settings, Ctrl-C, file modes; and the
learning-rate schedule and gradient clipping as the trainer applies them."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import stat
from pathlib import Path

import pytest
import torch

from mstok.data import InMemoryImages, RandomResizedCropFlip
from mstok.demo import TRAIN_PHOTOS, skimage_photos
from mstok.io import apply_umask
from mstok.storage.layout import STATE_FILE
from mstok.tokenizers import create_tokenizer
from mstok.training import Trainer, latest_checkpoint, load_train_config
from mstok.training.checkpoint import (
    CheckpointWriteError,
    CorruptCheckpointError,
    read_checkpoint,
    recover_checkpoints,
    save_checkpoint,
)
from mstok.training.engine import TrainingInterrupted

RUN = ("steps=4", "ckpt_every=2", "log_every=1", "keep_last=10")
# a smaller MsTok-tiny, so that every run here takes a fraction of a second
SMALL = ("width=64", "depth=2", "num_heads=2", "memory_layers=[1, 2]", "codebook_size=256")


def _config(out, *extra, small=True):
    return load_train_config(
        None,
        [
            "model.preset='mstok_tiny'",
            *(f"model.overrides.{x}" for x in (SMALL if small else ())),
            "batch_size=4",
            f"out_dir='{out}'",
            "data.num_workers=0",
            "optim.lr=1e-3",
            "optim.warmup_steps=2",
            "tensorboard=false",
            # pinned: the module-scoped reference run is set up before conftest pins the count per test
            "threads=1",
            *extra,
        ],
    )


def _small_model():
    return create_tokenizer("mstok_tiny", width=64, depth=2, num_heads=2, memory_layers=(1, 2), codebook_size=256)


@pytest.fixture(scope="module")
def photos():
    return skimage_photos(TRAIN_PHOTOS[:2])


def _trainer(out, photos, *extra, small=True) -> Trainer:
    dataset = InMemoryImages(photos, RandomResizedCropFlip(64, scale=(0.05, 0.3)))
    return Trainer(_config(out, *extra, small=small), dataset, False)


def _weights(trainer):
    return {**trainer.model.state_dict(), **{"ema." + k: v for k, v in trainer.ema.module.state_dict().items()}}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, photos):
    """The weights after an uninterrupted 4-step run (the reference for every resume)."""
    trainer = _trainer(tmp_path_factory.mktemp("straight"), photos, *RUN)
    trainer.fit()
    return _weights(trainer)


def _failing_torch_save(monkeypatch, error: BaseException, on_call: int):
    """Make the ``on_call``-th torch.save write half its bytes, then raise ``error``."""
    real, calls = torch.save, []

    def fake(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) != on_call:
            return real(obj, f, *args, **kwargs)
        real(obj, f, *args, **kwargs)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise error

    monkeypatch.setattr(torch, "save", fake)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing of the writer's cleanup runs."""


def test_killed_checkpoint_write_keeps_the_last_one_and_resume_is_exact(tmp_path, photos, straight, monkeypatch):
    trainer = _trainer(tmp_path, photos, *RUN)
    _failing_torch_save(monkeypatch, Killed(), on_call=2)  # inside the step-4 save, models already written
    with pytest.raises(Killed):
        trainer.fit()
    monkeypatch.undo()
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / ".tmp-step_0000004").is_dir()  # what a kill leaves: ignored by everything
    assert latest_checkpoint(ckpts).name == "step_0000002"
    read_checkpoint(ckpts / "step_0000002")
    resumed = _trainer(tmp_path, photos, *RUN)
    assert resumed.resume("auto").name == "step_0000002"
    resumed.fit()
    _assert_same(straight, _weights(resumed))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000004"]  # the leftover is gone


def test_disk_full_is_a_clear_error_and_resume_is_exact(tmp_path, photos, straight, monkeypatch):
    trainer = _trainer(tmp_path, photos, *RUN)
    _failing_torch_save(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), on_call=2)
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(CheckpointWriteError, match=rf"step 4 into {ckpts}.*disk is full.*step_0000002") as err:
        trainer.fit()
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]  # no temporary folder left
    resumed = _trainer(tmp_path, photos, *RUN)
    assert resumed.resume("auto").name == "step_0000002"
    resumed.fit()
    _assert_same(straight, _weights(resumed))


def test_resaving_a_step_keeps_the_old_one_until_the_new_one_is_complete(tmp_path, monkeypatch):
    model = _small_model()
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"step": 5}
    path = save_checkpoint(tmp_path, 5, model, ema, state, "{}", keep_last=3)
    before = (path / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    _failing_torch_save(monkeypatch, OSError(errno.EIO, "I/O error"), on_call=1)
    with pytest.raises(CheckpointWriteError, match=str(tmp_path)):
        save_checkpoint(tmp_path, 5, model, ema, state, "{}", keep_last=3)
    monkeypatch.undo()
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000005"]
    # a crash between moving the old folder aside and renaming the new one in: the old one comes back
    (tmp_path / "step_0000005").rename(tmp_path / ".old-step_0000005")
    recover_checkpoints(tmp_path)
    assert (path / "model.safetensors").read_bytes() == before
    save_checkpoint(tmp_path, 5, model, ema, state, "{}", keep_last=3)
    assert (path / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000005"]


def test_disk_full_inside_safetensors_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import mstok.io

    def full(*args, **kwargs):  # what safetensors raises on a full disk: not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mstok.io, "save_file", full)
    model = _small_model()
    with pytest.raises(CheckpointWriteError, match=rf"step 3 into {tmp_path}.*disk is full.*newest complete.*none"):
        save_checkpoint(tmp_path, 3, model, model.state_dict(), {"step": 3}, "{}", keep_last=1)
    assert list(tmp_path.iterdir()) == []


def test_broken_train_state_falls_back_to_the_previous_checkpoint(tmp_path, photos, caplog):
    _trainer(tmp_path, photos, "steps=2", "ckpt_every=1").fit()
    ckpts = tmp_path / "checkpoints"
    broken = ckpts / "step_0000002" / STATE_FILE
    broken.write_bytes(broken.read_bytes()[:1000])  # truncated
    trainer = _trainer(tmp_path, photos, "steps=2", "ckpt_every=1")
    with pytest.raises(
        CorruptCheckpointError, match=rf"{broken} is broken.*the checkpoint before it is .*step_0000001"
    ):
        trainer.resume(ckpts / "step_0000002")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} is not a training checkpoint"):
        trainer.resume(tmp_path)  # the run folder itself
    ema = ckpts / "step_0000001" / "ema.safetensors"
    good = ema.read_bytes()
    ema.write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match=rf"no intact checkpoint .*{broken}.*{ema}"):
        trainer.resume("auto")
    ema.write_bytes(good)
    with caplog.at_level(logging.WARNING):
        assert trainer.resume("auto").name == "step_0000001"
    assert str(broken) in caplog.text and "falling back" in caplog.text
    assert trainer.step == 1
    assert [p.name for p in ckpts.iterdir()] == ["step_0000001"]  # the broken one is archived
    assert list(tmp_path.glob("abandoned-*/checkpoints/step_0000002"))


def test_non_finite_gradients_or_weights_are_never_saved(tmp_path, photos):
    trainer = _trainer(tmp_path, photos, "steps=2", "ckpt_every=1")
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    original = trainer.train_step

    def nan_gradient_at_step_2(batches):
        if trainer.step == 1:
            param.register_hook(lambda g: g * float("nan"))  # the loss stays finite
        return original(batches)

    trainer.train_step = nan_gradient_at_step_2
    with pytest.raises(FloatingPointError, match=r"non-finite grad_norm nan at step 2.*last good.*step_0000001"):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000001"

    trainer = _trainer(tmp_path / "w", photos, "steps=2", "ckpt_every=2")
    original = trainer.train_step

    def inf_weight_after_step_2(batches):
        terms = original(batches)
        if trainer.step == 1:
            with torch.no_grad():
                trainer.model.decoder.mask_token.fill_(float("inf"))
        return terms

    trainer.train_step = inf_weight_after_step_2
    with pytest.raises(FloatingPointError, match=r"non-finite model weights at step 2 \(decoder\.mask_token.*none yet"):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "w" / "checkpoints") is None


def test_resume_from_an_older_step_archives_the_future(tmp_path, photos, monkeypatch):
    first = _trainer(tmp_path, photos, *RUN)
    first.fit()
    ckpts = tmp_path / "checkpoints"
    abandoned = read_checkpoint(ckpts / "step_0000004")[0]
    purge = []

    class Writer:  # records what the logger asks TensorBoard for
        def __init__(self, log_dir, purge_step=None):
            purge.append(purge_step)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr("torch.utils.tensorboard.SummaryWriter", Writer)
    resumed = _trainer(tmp_path, photos, *RUN, "tensorboard=true")  # only bookkeeping differs: allowed
    assert resumed.resume(ckpts / "step_0000002").name == "step_0000002"
    assert [p.name for p in ckpts.iterdir()] == ["step_0000002"]
    (archive,) = tmp_path.glob("abandoned-*")
    assert [p.name for p in (archive / "checkpoints").iterdir()] == ["step_0000004"]
    log_steps = [json.loads(x).get("step") for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert max(s for s in log_steps if s is not None) == 2
    assert 4 in [json.loads(x).get("step") for x in (archive / "log.jsonl").read_text().splitlines()]
    resumed.fit()
    assert purge == [3]
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r and "epoch" not in r]
    assert steps == [1, 2, 3, 4]  # each step once: the kept timeline
    assert [r["event"] for r in records if "event" in r] == ["start", "resume", "start"]
    again = read_checkpoint(ckpts / "step_0000004")[0]
    _assert_same(abandoned, again)  # the same steps again, bit for bit


def test_changed_settings_are_refused_unless_allowed(tmp_path, photos, caplog):
    _trainer(tmp_path, photos, "steps=2", "ckpt_every=2").fit()
    changed = _trainer(tmp_path, photos, "steps=4", "ckpt_every=2", "batch_size=8", "optim.lr=2e-3")
    with pytest.raises(
        ValueError, match=r"batch_size: 4 -> 8; optim.lr: 0.001 -> 0.002; steps: 2 -> 4.*--allow-changes"
    ):
        changed.resume("auto")
    with caplog.at_level(logging.WARNING):
        changed.resume("auto", allow_changes=True)
    assert "changed settings" in caplog.text and "steps: 2 -> 4" in caplog.text
    # the new schedule applies from step 2 on: warmup 2, cosine from 2e-3 over steps 2..4
    assert changed.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)
    assert changed.optimizer.param_groups[0]["initial_lr"] == 2e-3
    changed.fit()
    assert changed.step == 4
    events = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    (resume,) = [e for e in events if e.get("event") == "resume"]
    assert resume["changes"]["batch_size"] == [4, 8] and resume["changes"]["steps"] == [2, 4]
    other = _trainer(tmp_path / "titok", photos, "steps=4", "model.preset='titok_tiny'", small=False)
    with pytest.raises(ValueError, match=r"model.preset: \"mstok_tiny\" -> \"titok_tiny\""):
        other.resume(tmp_path / "checkpoints" / "step_0000004")
    with pytest.raises(ValueError, match=r"does not fit this run.*do not match the model"):
        other.resume(tmp_path / "checkpoints" / "step_0000004", allow_changes=True)


def test_allowed_changes_reach_the_discriminator_optimizer(tmp_path, photos):
    """With --allow-changes the GAN's own optimizer takes the new lr too (not the checkpoint's)."""
    gan = ("loss.gan_weight=0.1", "discriminator.base_channels=8", "discriminator.num_layers=1")
    _trainer(tmp_path, photos, "steps=2", "ckpt_every=2", *gan).fit()
    changed = _trainer(tmp_path, photos, "steps=3", *gan, "discriminator.lr=3e-4")
    changed.resume("auto", allow_changes=True)
    assert [g["lr"] for g in changed.d_optimizer.param_groups] == pytest.approx([3e-4] * 2)
    assert changed.d_scheduler.get_last_lr() == pytest.approx([3e-4] * 2)
    assert changed.d_optimizer.state  # the moments still come from the checkpoint


@pytest.fixture
def sigint_handled():
    """Python's own SIGINT handler for the test: a job started in the background (``cmd &`` in a
    script, as CI may run) inherits SIGINT ignored, and the trainer rightly leaves that alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_the_step_and_resume_is_exact(tmp_path, photos, straight, sigint_handled):
    trainer = _trainer(tmp_path, photos, *RUN)
    original = trainer.train_step

    def ctrl_c_during_step_3(batches):
        if trainer.step == 2:
            signal.raise_signal(signal.SIGINT)  # arrives mid-step: the step still completes
        return original(batches)

    trainer.train_step = ctrl_c_during_step_3
    with pytest.raises(TrainingInterrupted, match=r"stopped at step 3; saved .*step_0000003"):
        trainer.fit()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = _trainer(tmp_path, photos, *RUN)
    assert resumed.resume("auto").name == "step_0000003"
    resumed.fit()
    _assert_same(straight, _weights(resumed))


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    model = _small_model()
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path, 1, model, model.state_dict(), {"step": 1}, "{}", keep_last=1)
        model.save_pretrained(tmp_path / "saved")
        loose = tmp_path / "loose.bin"
        fd = os.open(loose, os.O_CREAT | os.O_WRONLY, 0o600)  # as tempfile.mkstemp creates files
        os.close(fd)
        apply_umask(loose)
    finally:
        os.umask(old)
    files = [*path.iterdir(), *(tmp_path / "saved").iterdir(), loose]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(mode) for f in files}


def test_warmup_longer_than_the_run_warns(tmp_path, photos, caplog):
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, photos, "steps=1", "optim.warmup_steps=5").fit()
    assert "optim.warmup_steps = 5 is not shorter than steps = 1" in caplog.text


def _record_steps(trainer):
    """(lr, grad norm) of every optimizer step, read when the optimizer applies them."""
    seen, original = [], trainer.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append((trainer.optimizer.param_groups[0]["lr"], float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])))))  # fmt: skip
        return original(*args, **kwargs)

    trainer.optimizer.step = step
    return seen


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_trainer_applies_warmup_and_cosine(tmp_path, photos):
    peak, end, warmup, total = 1e-3, 1e-4, 2, 6
    trainer = _trainer(tmp_path, photos, f"steps={total}", "optim.end_lr=1e-4", "ckpt_every=100")
    seen = _record_steps(trainer)
    trainer.fit()

    def reference(t):  # written out independently of optim.warmup_cosine
        if t < warmup:
            return peak * (t + 1) / warmup
        return end + (peak - end) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2

    assert [lr for lr, _ in seen] == pytest.approx([reference(t) for t in range(total)], rel=1e-9)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_trainer_clips_gradients_so_a_huge_loss_moves_weights_little(tmp_path, photos):
    clip, eps, lr = 0.01, 0.5, 1e-3
    trainer = _trainer(
        tmp_path,
        photos,
        "steps=1",
        "optim.warmup_steps=0",
        f"optim.grad_clip={clip}",
        f"optim.eps={eps}",
        "optim.weight_decay=0.0",
        "dead_code_threshold=0.0",
    )
    loss_fn = trainer.loss_fn.forward
    trainer.loss_fn.forward = lambda *a, **k: (lambda t: (t[0] * 1e6, t[1]))(loss_fn(*a, **k))
    seen = _record_steps(trainer)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    (applied_lr, applied_norm), logged = seen[0], trainer.history[0]["grad_norm"]
    assert applied_lr == pytest.approx(lr) and logged > 1e3  # the raw gradient is huge
    assert applied_norm <= clip * 1.001  # ... the optimizer sees it clipped
    # Adam's first step moves each weight by lr * g / (|g| + eps): at most lr * ||g|| / eps in all
    moved = torch.linalg.vector_norm(
        torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before, strict=True)])
    )
    assert 0 < moved <= lr * clip / eps * 1.001


@pytest.mark.slow  # about 2 s: the shipped titok_tiny config
def test_ctrl_c_in_the_cli_saves_and_exits_130(tmp_path, capsys, monkeypatch, sigint_handled):
    import numpy as np
    from PIL import Image

    from mstok.cli import main

    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{i % 2}/{i}.png")
    original = Trainer.train_step

    def ctrl_c(self, batches):
        signal.raise_signal(signal.SIGINT)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c)
    config = Path(__file__).resolve().parents[1] / "configs" / "titok_tiny.toml"
    settings = ["steps=5", "batch_size=2", f"data.path='{tmp_path / 'imgs'}'", f"out_dir='{tmp_path / 'run'}'"]
    settings += ["data.num_workers=0", "val_every=0", "tensorboard=false", "sample_every=0"]
    assert main(["train", "--config", str(config), "--no-progress", "--set", *settings]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "mstok train: interrupted (stopped at step 1; saved" in err and "step_0000001" in err
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000001"
