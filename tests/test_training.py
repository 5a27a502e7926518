"""The trainer: schedule, parameter groups, config files, EMA, checkpoints, resume, failures."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mstok.data import InMemoryImages, RandomResizedCropFlip
from mstok.demo import TRAIN_PHOTOS, skimage_photos
from mstok.persistence import load_tokenizer
from mstok.storage.layout import EMA_FILE
from mstok.tokenizers import create_tokenizer
from mstok.training import Trainer, latest_checkpoint, load_train_config
from mstok.training.optim import (
    ModelEMA,
    Muon,
    MuonAdamW,
    build_optimizer,
    ema_decay_at,
    muon_parameter_names,
    no_decay_parameter_names,
    warmup_cosine,
)


def _config(tmp_path, *extra):
    return load_train_config(
        None,
        [
            "model.preset='mstok_tiny'",
            "steps=6",
            "batch_size=4",
            f"out_dir='{tmp_path}'",
            "data.num_workers=0",
            "optim.lr=1e-3",
            "optim.warmup_steps=2",
            "log_every=2",
            "ckpt_every=3",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def photos():
    return skimage_photos(TRAIN_PHOTOS[:2])


def _dataset(photos):
    return InMemoryImages(photos, RandomResizedCropFlip(64, scale=(0.05, 0.3)))


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)  # cosine midpoint


def test_weight_decay_only_on_matrices():
    model = create_tokenizer("mstok_tiny")
    exempt = no_decay_parameter_names(model)
    names = dict(model.named_parameters())
    for name in (
        "encoder.query_tokens",
        "encoder.patch_tokens.pos_embed",
        "encoder.memory.scale_embed",
        "decoder.mask_token",
        "quantizer.embedding.weight",
        "encoder.ln_post.weight",
        "encoder.proj.bias",
    ):
        assert name in names and name in exempt, name
    for name in (
        "encoder.proj.weight",
        "encoder.patch_tokens.patch_embed.proj.weight",
        "decoder.transformer.blocks.0.attn.qkv.weight",
    ):
        assert name in names and name not in exempt, name


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = create_tokenizer("titok_tiny")
    hidden = muon_parameter_names(model)
    # 4 encoder + 4 decoder blocks, each with qkv, attention out, fc1, fc2
    assert len(hidden) == 32
    assert all(".transformer.blocks." in n and n.endswith(".weight") for n in hidden)
    assert {"encoder.proj.weight", "decoder.embed.weight", "decoder.head.proj.weight"}.isdisjoint(hidden)
    opt = build_optimizer(model, 1e-3, 0.1, name="muon")
    assert isinstance(opt, MuonAdamW)
    in_muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in in_muon} == hidden
    assert in_muon.isdisjoint(in_adamw) and len(in_muon | in_adamw) == len(names)
    # the scheduler scales both: the outer groups are the inner optimizers' own dicts
    assert opt.param_groups[0] is opt.muon.param_groups[0] and opt.param_groups[-1] is opt.adamw.param_groups[-1]
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(model, 1e-3, 0.1, name="sgd")
    with pytest.raises(ValueError, match="not a Muon \\+ AdamW state"):
        opt.load_state_dict(build_optimizer(model, 1e-3, 0.1).state_dict())


def _muon_reference(param, grad, buf, lr, wd, momentum=0.95, steps=5):
    """Muon for one matrix, written out in float64 (Keller Jordan's update, AdamW-matched lr)."""
    a, b, c = 3.4445, -4.775, 2.0315
    buf = momentum * buf + (1 - momentum) * grad
    x = grad + momentum * (buf - grad)  # Nesterov: grad.lerp(buf, momentum)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    scale = 0.2 * math.sqrt(max(param.shape))
    return param * (1 - lr * wd) - lr * scale * x, buf


def test_muon_matches_a_plain_reference():
    torch.manual_seed(0)
    shapes = [(16, 8), (8, 16), (16, 8), (12, 12)]  # two of one shape share a batch
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    opt = Muon(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            ref[i], bufs[i] = _muon_reference(ref[i], g.double(), bufs[i], 0.02, 0.1)
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-5)
    # the state is torch.optim.Muon's: a momentum buffer per matrix
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}


def test_ema_update_matches_formula():
    assert ema_decay_at(0.9, 1, warmup=True) == pytest.approx(2 / 11)
    assert ema_decay_at(0.9, 100, warmup=True) == 0.9 and ema_decay_at(0.9, 0, warmup=False) == 0.9
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEMA(model, 0.9, warmup=True)
    torch.nn.init.ones_(model.weight)
    ema.update(model)  # n = 0: decay min(0.9, 1/10) = 0.1
    ema.update(model)  # n = 1: decay 2/11
    expected = 1 - 0.1 * (2 / 11)
    assert torch.allclose(ema.module.weight, torch.full((1, 3), expected)) and ema.num_updates == 2
    assert not ema.module.weight.requires_grad


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'steps = 7\n[model]\npreset = "titok_tiny"\n[model.overrides]\nnum_latent_tokens = 16\n'
        "[optim]\nbetas = [0.8, 0.9]\n"
    )
    cfg = load_train_config(path, ["optim.lr=2e-3", "data.path=/some/where"])
    assert cfg.steps == 7 and cfg.model.preset == "titok_tiny" and cfg.model.overrides == {"num_latent_tokens": 16}
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.lr == 2e-3 and cfg.data.path == "/some/where"
    with pytest.raises(ValueError, match="unknown key"):
        load_train_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_train_config(path, ["steps"])
    with pytest.raises(ValueError, match="precision"):
        load_train_config(path, ["precision='fp8'"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_train_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("steps = = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_train_config(tmp_path / "bad.toml")


def test_trainer_needs_data(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path"):
        Trainer(_config(tmp_path), progress=False)


def _weights(trainer):
    return {**trainer.model.state_dict(), **{"ema." + k: v for k, v in trainer.ema.module.state_dict().items()}}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_identical(tmp_path, photos, optimizer):
    """A run killed after step 10 and resumed to step 20 ends bit-identical to a straight run
    (for Muon + AdamW too: both inner states and their momenta survive the checkpoint)."""
    settings = ("steps=20", "log_every=1", "ckpt_every=10", f"optim.name='{optimizer}'")
    straight = Trainer(_config(tmp_path / "a", *settings), _dataset(photos), False)
    straight.fit()

    first = Trainer(_config(tmp_path / "b", *settings), _dataset(photos), False)
    first.config.steps = 10  # "killed" after step 10: only the step-10 checkpoint survives
    first.fit()
    resumed = Trainer(_config(tmp_path / "b", *settings), _dataset(photos), False)
    assert resumed.resume("auto").name == "step_0000010"
    resumed.fit()

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in straight.history[10:]] == [h["loss"] for h in resumed.history]
    assert [h["step"] for h in resumed.history] == list(range(11, 21))


@pytest.mark.slow
def test_workers_do_not_change_the_data(tmp_path, photos):
    runs = []
    for workers in (0, 2):
        trainer = Trainer(
            _config(tmp_path / str(workers), "steps=2", f"data.num_workers={workers}"),
            dataset=_dataset(photos),
            progress=False,
        )
        trainer.fit()
        runs.append(trainer.model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.slow
def test_checkpoints_are_complete_pruned_and_loadable(tmp_path, photos):
    trainer = Trainer(_config(tmp_path, "ckpt_every=2", "keep_last=2"), dataset=_dataset(photos), progress=False)
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step_0000099").mkdir()  # a crashed write
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000004", "step_0000006"]
    latest = latest_checkpoint(tmp_path / "checkpoints")
    ema_model = load_tokenizer(latest, weights=EMA_FILE)
    for k, v in ema_model.state_dict().items():
        assert torch.equal(v, trainer.ema.module.state_dict()[k])
    assert json.loads((latest / "train_config.json").read_text())["steps"] == 6
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["world_size"] == 1
    lines = [x for x in records if "loss" in x and "epoch" not in x]
    assert [x["step"] for x in lines] == [2, 4, 6]
    # 2 images, batch 4: two epochs end every step; each log window reports the last one completed
    assert [x["epoch"] for x in records if "epoch" in x] == [3, 7, 11]
    assert {
        "loss",
        "l1",
        "mse",
        "quantizer",
        "lr",
        "grad_norm",
        "usage",
        "perplexity",
        "skipped",
        "revived_codes",
    } <= lines[0].keys()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path, photos):
    trainer = Trainer(_config(tmp_path, "steps=3", "ckpt_every=1"), dataset=_dataset(photos), progress=False)
    trainer.config.steps = 1
    trainer.fit()
    saved = latest_checkpoint(tmp_path / "checkpoints")
    before = load_tokenizer(saved).state_dict()
    trainer.config.steps = 3
    original = trainer.loss_fn.forward

    def exploding(*args, **kwargs):
        total, terms = original(*args, **kwargs)
        return total * float("nan"), {**terms, "loss": terms["loss"] * float("nan")}

    trainer.loss_fn.forward = exploding
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 2.*step_0000001"):
        trainer.fit()
    after = load_tokenizer(saved).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_broken_files_are_counted_and_all_broken_is_an_error(tmp_path):
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (70, 70), (i * 60, 100, 50)).save(folder / f"ok{i}.png")
    (folder / "broken.jpg").write_bytes(b"garbage")
    trainer = Trainer(_config(tmp_path / "run", "steps=4", f"data.path='{tmp_path / 'imgs'}'"), progress=False)
    trainer.fit()
    assert trainer.step == 4 and trainer.skipped >= 1
    only_broken = tmp_path / "broken" / "a"
    only_broken.mkdir(parents=True)
    for i in range(3):
        (only_broken / f"b{i}.png").write_bytes(b"nope")
    trainer = Trainer(_config(tmp_path / "run2", f"data.path='{tmp_path / 'broken'}'"), progress=False)
    with pytest.raises(ValueError, match="no readable image"):
        trainer.fit()


@pytest.mark.slow
def test_loss_falls_on_real_images(tmp_path, tiny_imagenet):
    cfg = load_train_config(
        Path(__file__).resolve().parents[1] / "configs" / "mstok_tiny.toml",
        [
            "steps=30",
            "batch_size=32",
            f"out_dir='{tmp_path}'",
            f"data.path='{tiny_imagenet}'",
            "optim.lr=1e-3",
            "optim.warmup_steps=5",
            "data.num_workers=2",
            "log_every=1",
            "ckpt_every=30",
        ],
    )
    history = Trainer(cfg, progress=False).fit()
    first = sum(h["l1"] for h in history[:5]) / 5
    last = sum(h["l1"] for h in history[-5:]) / 5
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_mixed_precision_steps_train(tmp_path, photos, precision):
    trainer = Trainer(
        _config(
            tmp_path, "steps=2", f"precision='{precision}'", "loss.gan_weight=0.1", "discriminator.base_channels=8"
        ),
        dataset=_dataset(photos),
        progress=False,
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert all(math.isfinite(h["loss"]) for h in trainer.history)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast keeps fp32 master weights
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.scaler.is_enabled() == (precision == "fp16")


@pytest.mark.slow
def test_training_on_shards_equals_training_on_the_folder(tmp_path):
    from mstok.data import write_shards

    folder = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    write_shards(folder, tmp_path / "shards", shard_size=4, seed=None, progress=False)  # same order as the folder
    runs = []
    for name, path in (("folder", folder), ("shards", tmp_path / "shards")):
        trainer = Trainer(_config(tmp_path / name, "steps=2", f"data.path='{path}'"), progress=False)
        trainer.fit()
        runs.append(trainer.model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
