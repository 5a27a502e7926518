"""Stages as data: what each stage trains and freezes, the composed objective, two-stage plumbing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mstok.data import InMemoryImages, RandomResizedCropFlip
from mstok.demo import TRAIN_PHOTOS, skimage_photos
from mstok.losses import TokenizerLoss
from mstok.losses.perceptual import VGG16Features
from mstok.persistence import load_tokenizer
from mstok.storage.weights import MissingWeightsError
from mstok.tokenizers import create_tokenizer
from mstok.tokenizers.contract import TokenizerOutput
from mstok.tokenizers.vqgan import VQGANConfig
from mstok.training import Trainer, load_train_config
from mstok.training.stages import apply_stage, load_initial_weights


@pytest.fixture(scope="module")
def photos():
    return skimage_photos(TRAIN_PHOTOS[:2])


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny MaskGIT-VQGAN saved as a proxy tokenizer."""
    path = tmp_path_factory.mktemp("proxy")
    create_tokenizer("vqgan_tiny").save_pretrained(path)
    return path


def _dataset(photos):
    return InMemoryImages(photos, RandomResizedCropFlip(64, scale=(0.05, 0.3)))


def _config(out, *extra):
    return load_train_config(
        None,
        [
            "steps=2",
            "batch_size=4",
            f"out_dir='{out}'",
            "data.num_workers=0",
            "optim.lr=1e-3",
            "optim.warmup_steps=1",
            "log_every=1",
            "ckpt_every=2",
            "tensorboard=false",
            *extra,
        ],
    )


# ------------------------------------------------------------------ objective by hand
def _output(recon=None, logits=None, q=0.5):
    return TokenizerOutput(
        reconstruction=recon,
        logits=logits,
        indices=torch.zeros(1, 2, dtype=torch.long),
        latents=torch.zeros(1, 2, 3),
        quantizer_loss=torch.tensor(q),
        commitment_loss=torch.tensor(q / 5),
        codebook_loss=torch.tensor(4 * q / 5),
    )


def test_objective_terms_match_hand_computation():
    target = torch.tensor([0.0, 0.5, 1.0, 0.25]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    recon = target + torch.tensor([0.1, -0.2, 0.0, 0.3]).reshape(1, 1, 2, 2)
    # |d| mean = (0.1 + 0.2 + 0 + 0.3) / 4 = 0.15; d^2 mean = (0.01 + 0.04 + 0 + 0.09) / 4 = 0.035
    loss = TokenizerLoss(l1_weight=2.0, mse_weight=3.0, quantizer_weight=0.5)
    total, terms = loss(_output(recon), target)
    assert terms["l1"].item() == pytest.approx(0.15) and terms["mse"].item() == pytest.approx(0.035)
    assert total.item() == pytest.approx(2 * 0.15 + 3 * 0.035 + 0.5 * 0.5)
    assert terms["loss"].item() == pytest.approx(total.item()) and not terms["loss"].requires_grad

    class Perceptual(torch.nn.Module):  # a stand-in returning a known per-image distance
        def forward(self, x, y):
            return (x - y).abs().flatten(1).sum(1)

    loss = TokenizerLoss(l1_weight=0, mse_weight=0, perceptual_weight=0.5, quantizer_weight=0, perceptual=Perceptual())
    total, terms = loss(_output(recon), target)
    assert terms["perceptual"].item() == pytest.approx(0.6 * 3) and total.item() == pytest.approx(0.9)


def test_proxy_cross_entropy_with_label_smoothing_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])  # (B=1, P=2, V=3)
    codes = torch.tensor([[0, 2]])
    loss = TokenizerLoss(l1_weight=0, mse_weight=0, quantizer_weight=0, proxy_ce_weight=1.0, label_smoothing=0.3)
    total, _terms = loss(_output(logits=logits), torch.zeros(1, 3, 2, 2), proxy_codes=codes)
    expected = 0.0
    for row, target in ((logits[0, 0], 0), (logits[0, 1], 2)):
        logp = row.log_softmax(-1)
        # smoothing spreads 0.3 uniformly over the 3 classes: (1 - 0.3) on the target + 0.1 each
        expected += -(0.7 * logp[target] + 0.1 * logp.sum()).item() / 2
    assert total.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="grid must match"):
        loss(_output(logits=logits), torch.zeros(1, 3, 2, 2), proxy_codes=torch.zeros(1, 3, dtype=torch.long))


def test_gan_term_is_the_generator_hinge_only_when_active():
    from mstok.losses import AdversarialLoss

    adversarial = AdversarialLoss(base_channels=8, num_layers=2)
    loss = TokenizerLoss(l1_weight=0, mse_weight=0, quantizer_weight=0, gan_weight=0.25, adversarial=adversarial)
    recon = torch.rand(2, 3, 32, 32, requires_grad=True)
    total, terms = loss(_output(recon), torch.rand(2, 3, 32, 32), gan_active=True)
    assert total.item() == pytest.approx(0.25 * -adversarial.discriminator(recon).mean().item(), rel=1e-5)
    total, terms = loss(_output(recon), torch.rand(2, 3, 32, 32), gan_active=False)
    assert "gan_g" not in terms and total.item() == 0.0
    with pytest.raises(ValueError, match="adversarial"):
        TokenizerLoss(gan_weight=0.1)
    with pytest.raises(ValueError, match="no reconstruction"):
        TokenizerLoss()(_output(logits=torch.zeros(1, 2, 3)), torch.zeros(1, 3, 2, 2))


# ------------------------------------------------------------------ stages
def test_apply_stage_prefixes_and_typos():
    model = create_tokenizer("mstok_tiny")
    trainable, frozen = apply_stage(model, ["decoder", "encoder.query_tokens"])
    assert trainable and frozen and "encoder.query_tokens" in trainable
    assert all(n.startswith("decoder.") or n == "encoder.query_tokens" for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    trainable, frozen = apply_stage(model, [])
    assert not frozen and len(trainable) == len(list(model.parameters()))
    with pytest.raises(ValueError, match=r"'decoders' matches no parameter.*top-level groups: decoder, encoder"):
        apply_stage(model, ["decoders"])


STAGES = {
    "single": ("mstok_tiny", []),
    "proxy": ("vqgan_tiny", []),
    "titok_stage1": (
        "titok_tiny",
        ["model.overrides.head='proxy_codes'", "loss.l1_weight=0", "loss.mse_weight=0", "loss.proxy_ce_weight=1"],
    ),
    "titok_stage2": (
        "titok_tiny",
        [
            "model.overrides.head='proxy_codes'",
            "stage.train=['decoder', 'pixel_decoder']",
            "stage.pixel_decoder_from_proxy=true",
            "loss.l1_weight=0",
            "loss.quantizer_weight=0",
            "loss.gan_weight=0.1",
            "discriminator.base_channels=8",
        ],
    ),
    "mstok_stage2": (
        "mstok_tiny",
        [
            "model.overrides.head='proxy_codes'",
            "stage.train=['decoder', 'pixel_decoder', 'encoder.query_tokens']",
            "stage.pixel_decoder_from_proxy=true",
            "loss.l1_weight=0",
            "loss.quantizer_weight=0",
        ],
    ),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.slow
def test_frozen_parameters_stay_and_trainable_ones_move(stage, tmp_path, photos, proxy_dir):
    preset, extra = STAGES[stage]
    trainer = Trainer(
        _config(tmp_path, f"model.preset='{preset}'", f"proxy.checkpoint='{proxy_dir}'", *extra),
        _dataset(photos),
        progress=False,
    )
    if stage == "titok_stage2":
        proxy = load_tokenizer(proxy_dir)
        assert torch.equal(trainer.model.pixel_decoder.codebook, proxy.quantizer.embedding.weight)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ema_before = {n: p.detach().clone() for n, p in trainer.ema.module.named_parameters()}
    trainer.fit()
    frozen, trainable = set(trainer.frozen), set(trainer.trainable)
    assert frozen | trainable == set(before) and not frozen & trainable
    for name, param in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
            assert torch.equal(dict(trainer.ema.module.named_parameters())[name], ema_before[name])
        else:
            assert not torch.equal(param, before[name]), f"trainable {name} did not change"
    if stage.endswith("stage2"):
        assert {n.split(".")[0] for n in frozen} == {"encoder", "quantizer"}
    if stage == "mstok_stage2":
        assert "encoder.query_tokens" in trainable
    assert ("gan_g" in trainer.history[-1]) == (stage == "titok_stage2")


def test_configs_that_cannot_work_are_refused(tmp_path, photos, proxy_dir):
    head = "model.overrides.head='proxy_codes'"
    with pytest.raises(ValueError, match="pixel losses"):
        Trainer(_config(tmp_path, "model.preset='titok_tiny'", head), _dataset(photos), progress=False)
    with pytest.raises(ValueError, match=r"proxy\.checkpoint"):
        Trainer(
            _config(tmp_path, "model.preset='titok_tiny'", head, "loss.l1_weight=0", "loss.mse_weight=0",
                    "loss.proxy_ce_weight=1"),
            _dataset(photos),
            progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="head"):
        Trainer(
            _config(tmp_path, "model.preset='titok_tiny'", "loss.proxy_ce_weight=1", f"proxy.checkpoint='{proxy_dir}'"),
            _dataset(photos),
            progress=False,
        )
    with pytest.raises(FileNotFoundError, match="train-proxy"):
        Trainer(_config(tmp_path, f"proxy.checkpoint='{tmp_path / 'nope'}'"), _dataset(photos), progress=False)
    with pytest.raises(ValueError, match="not a MaskGIT-VQGAN"):
        other = tmp_path / "titok"
        create_tokenizer("titok_tiny").save_pretrained(other)
        Trainer(_config(tmp_path, f"proxy.checkpoint='{other}'"), _dataset(photos), progress=False)


def _lpips_files(folder: Path) -> tuple[Path, Path]:
    """Random LPIPS weight files in the torchvision / lpips layouts."""
    torch.manual_seed(3)
    vgg, lin = folder / "vgg16.pth", folder / "lin.pth"
    torch.save(VGG16Features().state_dict(), vgg)
    channels = (64, 128, 256, 512, 512)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(channels)}, lin)
    return vgg, lin


@pytest.mark.slow
def test_perceptual_loss_needs_weight_files_and_uses_them(tmp_path, photos, monkeypatch):
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(MissingWeightsError, match=r"perceptual\.vgg_weights"):
        Trainer(_config(tmp_path, "loss.perceptual_weight=0.1", "perceptual.download=false"), _dataset(photos), False)
    vgg, lin = _lpips_files(tmp_path)
    trainer = Trainer(
        _config(
            tmp_path / "run",
            "steps=1",
            "loss.perceptual_weight=0.1",
            f"perceptual.vgg_weights='{vgg}'",
            f"perceptual.lpips_weights='{lin}'",
        ),
        _dataset(photos),
        progress=False,
    )
    trainer.fit()
    assert trainer.history[-1]["perceptual"] > 0
    assert all(not p.requires_grad for p in trainer.loss_fn.perceptual.parameters())


def test_init_from_checks_every_key(tmp_path):
    source = create_tokenizer("titok_tiny")
    source.save_pretrained(tmp_path / "a")
    target = create_tokenizer("titok_tiny")
    load_initial_weights(target, tmp_path / "a", "model.safetensors")
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=False)
    )
    with pytest.raises(ValueError, match="does not fit the model"):
        load_initial_weights(create_tokenizer("titok_tiny", num_latent_tokens=16), tmp_path / "a", "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"ema\.safetensors"):
        load_initial_weights(target, tmp_path / "a", "ema")  # asked for explicitly: not there
    # by default, the loading rule: EMA when the folder has it, else (a saved model) model.safetensors
    assert load_initial_weights(target, tmp_path / "a").name == "model.safetensors"


@pytest.mark.slow
def test_gan_run_resumes_bit_identically(tmp_path, photos):
    extra = ("steps=4", "loss.gan_weight=0.1", "loss.gan_start_step=1", "discriminator.base_channels=8")
    straight = Trainer(_config(tmp_path / "a", *extra), _dataset(photos), progress=False)
    straight.fit()
    first = Trainer(_config(tmp_path / "b", *extra), _dataset(photos), progress=False)
    first.config.steps = 2
    first.fit()
    resumed = Trainer(_config(tmp_path / "b", *extra), _dataset(photos), progress=False)
    resumed.resume("auto")
    resumed.fit()
    for a, b in ((straight.model, resumed.model), (straight.adversarial, resumed.adversarial)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_logs_tensorboard_and_reconstruction_grids(tmp_path, tiny_imagenet):
    cfg = _config(
        tmp_path,
        "model.preset='titok_tiny'",
        f"data.path='{tiny_imagenet}'",
        "tensorboard=true",
        "sample_every=1",
        "num_samples=4",
    )
    Trainer(cfg, progress=False).fit()
    grids = sorted((tmp_path / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000001.png", "step_0000002.png"]
    from PIL import Image

    width, height = Image.open(grids[0]).size  # 4 columns, originals over reconstructions, a label column
    assert height == 2 * 66 + 2 and width > 4 * 66 + 2
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "epoch" not in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)


@pytest.mark.slow
def test_tiny_two_stage_run_through_the_cli(tmp_path, tiny_imagenet, capsys):
    """train-proxy, stage 1 and stage 2 with the shipped tiny configs, on real photos."""
    from mstok.cli import main

    configs = Path(__file__).resolve().parents[1] / "configs"
    common = ["steps=3", "batch_size=8", "data.num_workers=0", "log_every=1", "tensorboard=false"]
    common += [f"data.path='{tiny_imagenet}'"]
    proxy = f"proxy.checkpoint='{tmp_path / 'proxy'}'"

    def run(command, config, out, *extra):
        return main([command, "--config", str(configs / config), "--no-progress", "--set", *common,
                     f"out_dir='{tmp_path / out}'", *extra])  # fmt: skip

    assert run("train", "proxy_tiny.toml", "proxy") == 2  # a proxy config belongs to train-proxy
    assert "train-proxy" in capsys.readouterr().err
    assert run("train-proxy", "proxy_tiny.toml", "proxy") == 0
    assert run("train", "titok_tiny_stage1.toml", "stage1", proxy) == 0
    assert run("train", "titok_tiny_stage2.toml", "stage2", proxy, f"model.init_from='{tmp_path / 'stage1'}'",
               "loss.gan_start_step=1") == 0  # fmt: skip

    stage1 = load_tokenizer(tmp_path / "stage1" / "checkpoints" / "step_0000003", weights="ema.safetensors")
    stage2 = load_tokenizer(tmp_path / "stage2" / "checkpoints" / "step_0000003")
    proxy = load_tokenizer(tmp_path / "proxy" / "checkpoints" / "step_0000003")
    assert stage2.pixel_decoder is not None and VQGANConfig.from_dict(stage2.config.pixel_decoder) == proxy.config
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if k.startswith(("encoder.", "quantizer.embedding")))
    assert not torch.equal(s1["decoder.head.fc2.weight"], s2["decoder.head.fc2.weight"])
    images = torch.rand(2, 3, 64, 64)
    pixels = stage2.decode(stage2.encode(images))
    assert pixels.shape == (2, 3, 64, 64) and pixels.min() >= 0 and pixels.max() <= 1
    log = [json.loads(x) for x in (tmp_path / "stage2" / "log.jsonl").read_text().splitlines()]
    assert "d_loss" in [r for r in log if "loss" in r][-1]
