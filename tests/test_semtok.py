"""SemTok: shapes in both decoder modes, BSQ ids at 2^18 and 2^32, the flow loss and an Euler
decode step against hand computations, gradients in both stages, save/load, the first stage kept
out of the weights, short runs of both tiny stage configs, and clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import mstok
from mstok.data import InMemoryImages, RandomResizedCropFlip
from mstok.demo import TRAIN_PHOTOS, skimage_photos
from mstok.losses import TokenizerLoss
from mstok.losses.teachers import TinyTeacher
from mstok.persistence import load_tokenizer
from mstok.storage.weights import MissingWeightsError
from mstok.tokenizers import SemTok, SemTokConfig, create_tokenizer, preset_config
from mstok.tokenizers.latent_space import LatentSpace
from mstok.training import Trainer, load_train_config
from mstok.training.components import check_model_fits_loss
from mstok.training.stages import apply_stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
B, K = 2, 32
STAGE1 = ["encoder", "decoder", "flow_input", "semantic"]
STAGE2 = ["decoder", "mask_tokens"]
# the shipped configs align to the reference network (runs/reference, trained by the user first):
# these tests swap in the random tiny teacher and its width
TINY_TEACHER = ["teacher.spec='tiny'", "model.overrides.teacher_dim=32"]


_BUILT: dict[tuple, SemTok] = {}


def _model(**overrides) -> SemTok:
    """A fresh copy of the tiny preset with every weight nudged off its start: adaLN-Zero gates
    and the final layer start at zero, which would make the velocity zero and block gradients
    to the blocks. Built once per setting (building dominates these tests' time)."""
    key = tuple(sorted(overrides.items()))
    if key not in _BUILT:
        model = create_tokenizer("semtok_tiny", **overrides)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        _BUILT[key] = model
    return copy.deepcopy(_BUILT[key])


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (after conftest's two): these tiny models gain nothing from a second,
    and on a loaded machine its spin-waits make them tens of times slower."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(B, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _flow_loss(**weights) -> TokenizerLoss:
    return TokenizerLoss(l1_weight=0.0, mse_weight=0.0, quantizer_weight=1.0, flow_weight=1.0, **weights)


# ------------------------------------------------------------------ shapes and ids
def test_shapes_through_both_decoder_modes(images) -> None:
    flow = _model()
    out = flow(images)
    assert out.reconstruction is None and out.flow_prediction.shape == out.flow_target.shape == (B, 3, 64, 64)
    assert out.indices.shape == (B, K) and out.latents.shape == (B, K, 12)
    ids = flow.encode(images)
    assert ids.dtype == torch.int64 and ids.shape == (B, K)
    assert flow.encode_features(images).shape == (B, K, 128)
    decoded = flow.decode(ids, steps=2, seed=0)
    assert decoded.shape == (B, 3, 64, 64) and decoded.min() >= 0 and decoded.max() <= 1
    refine = _model(decoder_mode="refine")
    out = refine(images)
    assert out.flow_prediction is None and out.reconstruction.shape == (B, 3, 64, 64)
    assert refine.decode(refine.encode(images)).shape == (B, 3, 64, 64)


@pytest.mark.parametrize("bits", [18, 32])
def test_bsq_ids_are_int64_and_valid(images, bits) -> None:
    model = _model(code_dim=bits)
    assert model.vocab_size == 2**bits
    ids = model.encode(images)
    assert ids.dtype == torch.int64 and ids.min() >= 0 and ids.max() < 2**bits
    if bits == 32:
        assert ids.max() >= 2**31  # 64 random ids: the top bit is set somewhere (beyond int32)
    codes = model.quantizer(model.encoder(model.to_latents(images))[1]).codes
    assert_close(model.quantizer.indices_to_codes(ids), codes)  # the ids carry exactly the codes
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        model.decode(torch.full((B, K), 2**bits), steps=1)


# ------------------------------------------------------------------ flow: hand computations
def test_flow_loss_matches_a_hand_computation(images) -> None:
    """The paper's objective: the velocity MSE at uniform t (the tiny preset measures x0, shifted)."""
    model = _model(flow_loss="velocity", time_shift=1.0)
    torch.manual_seed(7)
    out = model(images)
    _, terms = _flow_loss()(out, images)
    torch.manual_seed(7)  # the forward draws t first, then the noise
    t = torch.rand(B)
    x0 = images * 2 - 1  # the pixel space
    noise = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    codes = model.quantizer(model.encoder(x0)[1]).codes
    velocity = model.decode_velocity(codes, x_t, t)
    assert_close(out.flow_target, noise - x0)
    assert_close(out.flow_prediction, velocity)
    assert_close(terms["flow"], ((velocity - (noise - x0)) ** 2).mean())
    assert terms["flow"] > 0


def test_x0_prediction_turns_the_clean_estimate_into_a_velocity(images) -> None:
    """flow_prediction = "x0": the network's output is x0_hat, the velocity (x_t - x0_hat) / t with
    t held at X0_MIN_TIME below it; "velocity" returns the output itself. Same weights, by hand."""
    from mstok.tokenizers.semtok import X0_MIN_TIME

    x0_model = _model(flow_prediction="x0")
    velocity_model = _model(flow_prediction="velocity")
    velocity_model.load_state_dict(x0_model.state_dict())
    codes = torch.randn(B, K, 12, generator=torch.Generator().manual_seed(2))
    x_t = torch.randn(B, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.5, 0.01])
    with torch.no_grad():
        raw = velocity_model.decode_velocity(codes, x_t, t)  # the network's output, as it is
        derived = x0_model.decode_velocity(codes, x_t, t)
    assert_close(derived[0], (x_t[0] - raw[0]) / 0.5)
    assert_close(derived[1], (x_t[1] - raw[1]) / X0_MIN_TIME)
    assert create_tokenizer("semtok_tiny").config.flow_prediction == "x0"
    assert create_tokenizer("semtok_tiny", flow_prediction="velocity").config.flow_prediction == "velocity"
    with pytest.raises(ValueError, match="flow_prediction"):
        preset_config("semtok_tiny", flow_prediction="eps")


@pytest.mark.parametrize("prediction", ["x0", "velocity"])
def test_x0_loss_compares_clean_latents(images, prediction) -> None:
    """flow_loss = "x0": the training output is the clean estimate against x0 (the network's output
    for x0 prediction, x_t - t v_hat for velocity prediction), its MSE the velocity MSE times t^2."""
    model = _model(flow_prediction=prediction, flow_loss="x0", time_shift=1.0)
    torch.manual_seed(7)
    out = model(images)
    _, terms = _flow_loss()(out, images)
    torch.manual_seed(7)
    t = torch.rand(B)
    x0 = images * 2 - 1
    noise = torch.randn_like(x0)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    codes = model.quantizer(model.encoder(x0)[1]).codes
    velocity = model.decode_velocity(codes, x_t, t)
    clean = x_t - torch.maximum(tt, torch.tensor(0.05)) * velocity if prediction == "x0" else x_t - tt * velocity
    assert_close(out.flow_target, x0)
    assert_close(out.flow_prediction, clean, atol=1e-4, rtol=1e-4)
    assert_close(terms["flow"], ((clean - x0) ** 2).mean(), atol=1e-5, rtol=1e-4)
    if prediction == "velocity":  # the velocity MSE weighted by t^2, per example
        per_example = ((velocity - (noise - x0)) ** 2).mean(dim=(1, 2, 3)) * t**2
        assert_close(terms["flow"], per_example.mean(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="flow_loss"):
        preset_config("semtok_tiny", flow_loss="eps")


def test_one_euler_step_decode_matches_the_velocity(images) -> None:
    model = _model().eval()
    ids = model.encode(images)
    noise = torch.randn(B, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    codes = model.quantizer.indices_to_codes(ids)
    with torch.no_grad():
        expected = noise + (0.0 - 1.0) * model.decode_velocity(codes, noise, 1.0)  # t: 1 -> 0 in one step
    assert_close(model.decode_latents(ids, steps=1, seed=3), expected)
    assert_close(model.decode(ids, steps=1, seed=3), ((expected + 1) / 2).clamp(0, 1))
    assert not torch.equal(model.decode_latents(ids, steps=1, seed=4), expected)  # the seed is the noise


def test_refiner_decode_is_deterministic(images) -> None:
    model = _model(decoder_mode="refine").eval()
    ids = model.encode(images)
    first, second = model.decode(ids), model.decode(ids)
    assert torch.equal(first, second)
    with torch.no_grad():
        latent = model.decode_refine(model.quantizer.indices_to_codes(ids))
    assert_close(first, ((latent + 1) / 2).clamp(0, 1))


def test_one_step_refiner_starts_at_stage_one_decode_of_the_zero_latent(images) -> None:
    """refine_input = "one_step": with stage I's weights (mask tokens untouched, so zero) the
    refiner decodes exactly what the flow decoder predicts at t = 1 from the noise's mean."""
    assert not create_tokenizer("semtok_tiny").mask_tokens.any()  # the preset's start: zero
    flow = _model().eval()
    refine = create_tokenizer("semtok_tiny", decoder_mode="refine").eval()
    state = flow.state_dict()
    state["mask_tokens"] = torch.zeros_like(state["mask_tokens"])  # stage I leaves them at their start
    refine.load_state_dict(state)
    codes = flow.quantizer.indices_to_codes(flow.encode(images))
    with torch.no_grad():
        expected = flow.decode_clean(codes, torch.zeros(B, 3, 64, 64), 1.0)
        assert_close(refine.decode_refine(codes), expected)
        # "mask" (the paper's, older files'): the mask tokens alone, without the flow input's bias
        paper = create_tokenizer("semtok_tiny", decoder_mode="refine", refine_input="mask").eval()
        paper.load_state_dict(state)
        assert not torch.allclose(paper.decode_refine(codes), expected)
    assert "refine_input" not in preset_config("semtok_tiny", refine_input="mask").to_dict()
    older = preset_config("semtok_tiny").to_dict()
    del older["refine_input"]  # a config.json saved before the field existed
    assert SemTokConfig.from_dict(older).refine_input == "mask"
    with pytest.raises(ValueError, match="refine_input"):
        preset_config("semtok_tiny", refine_input="noise")


# ------------------------------------------------------------------ gradients per stage
def _missing_grads(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]


def test_stage_one_reaches_every_trainable_parameter(images) -> None:
    model = _model()
    trainable, frozen = apply_stage(model, STAGE1)
    assert frozen == ["mask_tokens"]
    teacher = TinyTeacher(dim=32)
    loss_fn = _flow_loss(distill_weight=0.05, contrastive_weight=0.05, teacher=teacher)
    out = model(images, **loss_fn.model_inputs(images))
    loss, terms = loss_fn(out, images)
    assert {"flow", "distill", "contrastive", "entropy"} <= set(terms)
    loss.backward()
    assert not _missing_grads(model)
    assert any(n.startswith("semantic.distill") for n in trainable)
    assert any(n.startswith("semantic.contrastive") for n in trainable)
    assert model.mask_tokens.grad is None


def test_stage_two_trains_the_decoder_only(images) -> None:
    model = _model(decoder_mode="refine")
    _, frozen = apply_stage(model, STAGE2)
    out = model(images)
    F.mse_loss(out.reconstruction, images).backward()
    assert not _missing_grads(model)
    assert {n.split(".")[0] for n in frozen} == {"encoder", "flow_input", "semantic"}
    assert all(p.grad is None for p in model.encoder.parameters())


# ------------------------------------------------------------------ save / load, the first stage
@pytest.mark.parametrize("mode", ["flow", "refine"])
def test_save_load_round_trip(tmp_path, images, mode) -> None:
    model = _model(decoder_mode=mode).eval()
    model.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, SemTok) and loaded.config == model.config
    ids = model.encode(images)
    assert torch.equal(loaded.encode(images), ids)
    assert torch.equal(loaded.decode(ids, steps=2 if mode == "flow" else None, seed=5),
                       model.decode(ids, steps=2 if mode == "flow" else None, seed=5))  # fmt: skip


class _ToyVAE(LatentSpace):
    """A frozen first stage with weights (a 2x2 stride-2 conv and its transpose), standing in for a VAE."""

    def __init__(self) -> None:
        super().__init__(channels=4, downsample=2)
        self.down = nn.Conv2d(3, 4, 2, stride=2)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.freeze()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.down(images)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.up(latents)


def test_a_vae_latent_space_stays_out_of_the_weights(tmp_path, images) -> None:
    spec = {"latent_space": {"type": "vae", "path": str(tmp_path / "none")}, "latent_channels": 4}
    model = create_tokenizer("semtok_tiny", **spec, latent_downsample=2, patch_size=4, decoder_mode="refine")
    with pytest.raises(MissingWeightsError, match="VAE folder"):  # built on first use, from the spec
        model.encode(images)
    vae = _ToyVAE()
    model.attach_latent_space(vae)
    keys = set(model.state_dict())
    assert not any("down" in k or "up." in k for k in keys) and len(keys) == len(
        create_tokenizer("semtok_tiny", **spec, latent_downsample=2, patch_size=4).state_dict()
    )
    assert all(p.requires_grad is False for p in vae.parameters())
    assert sum(p.numel() for p in model.parameters()) == model.parameter_counts()["total"]
    assert copy.deepcopy(model).latent_space is vae  # the EMA copy shares the frozen first stage
    model.double()
    assert vae.down.weight.dtype == torch.float64  # .to() moves it along
    model.float()
    out = model(images)
    out.reconstruction.sum().backward()  # the differentiable decode reaches the decoder through the VAE
    assert model.decoder.final.proj.weight.grad is not None and vae.up.weight.grad is None
    with pytest.raises(ValueError, match="latent space has 3 channels"):
        model.attach_latent_space(mstok.tokenizers.latent_space.PixelSpace())


# ------------------------------------------------------------------ presets
def test_paper_presets() -> None:
    with torch.device("meta"):
        small, large = create_tokenizer("semtok_l_bsq18"), create_tokenizer("semtok_l_bsq32")
    assert small.vocab_size == 2**18 and large.vocab_size == 2**32
    counts = small.parameter_counts()
    assert counts["encoder"] == pytest.approx(113e6, rel=0.02)  # Table 8: 113M
    assert counts["decoder"] == pytest.approx(2236e6, rel=0.15)  # Table 8: 2236M (SD3.5's MMDiT-X has more)
    cfg = small.config
    assert (cfg.grid_size, cfg.num_latent_tokens, cfg.latent_channels) == (16, 256, 16)
    assert cfg.quantizer == {"type": "bsq", "entropy_weight": 0.0025}
    assert cfg.flow_prediction == "velocity"  # the paper's; x0 is the tiny preset's


# ------------------------------------------------------------------ training
def _photos() -> InMemoryImages:
    return InMemoryImages(skimage_photos(TRAIN_PHOTOS[:2]), RandomResizedCropFlip(64, scale=(0.05, 0.3)))


@pytest.mark.slow
def test_both_tiny_stages_train_through_the_shared_trainer(tmp_path) -> None:
    """4 steps of stage I, then 3 of stage II from its checkpoint (with the paper's GAN, from step 1;
    the shipped tiny stage II leaves it off)."""
    common = ["batch_size=4", "data.num_workers=0", "log_every=1", "tensorboard=false", "sample_every=0", "threads=1"]
    common += TINY_TEACHER
    one = load_train_config(
        CONFIGS / "semtok_tiny_stage1.toml", [*common, "steps=4", "ckpt_every=4", f"out_dir='{tmp_path / 's1'}'"]
    )
    history = Trainer(one, dataset=_photos(), progress=False).fit()
    # the shipped stage I trains distillation alone (its config: the contrastive term cost PSNR here)
    assert len(history) == 4 and all(h["flow"] > 0 and "distill" in h and "contrastive" not in h for h in history)
    assert (tmp_path / "s1" / "checkpoints").exists()
    settings = [*common, "steps=3", "ckpt_every=3", "val_every=0", "loss.gan_weight=0.1", "loss.gan_start_step=1"]
    settings += [f"out_dir='{tmp_path / 's2'}'", f"model.init_from='{tmp_path / 's1' / 'checkpoints'}'"]
    trainer = Trainer(
        load_train_config(CONFIGS / "semtok_tiny_stage2.toml", settings), dataset=_photos(), progress=False
    )
    stage_one = load_tokenizer(tmp_path / "s1")  # EMA weights, as init_from reads them
    assert torch.equal(trainer.model.encoder.latent_tokens, stage_one.encoder.latent_tokens)  # init_from
    assert not trainer.model.mask_tokens.any()  # untouched by stage I: the refiner starts at its one-step decode
    history = trainer.fit()
    assert len(history) == 3 and "gan_g" in history[-1] and "flow" not in history[-1]
    assert torch.equal(trainer.model.encoder.latent_tokens, stage_one.encoder.latent_tokens)  # frozen
    assert load_tokenizer(tmp_path / "s2").config.decoder_mode == "refine"


# ------------------------------------------------------------------ errors
def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown latent space 'latents'"):
        SemTokConfig(latent_space="latents")
    with pytest.raises(ValueError, match="needs latent_channels and latent_downsample"):
        preset_config("semtok_tiny", latent_space={"type": "vae"})
    with pytest.raises(ValueError, match="latent_channels = 4 contradicts the pixel space"):
        preset_config("semtok_tiny", latent_channels=4)
    with pytest.raises(ValueError, match="decoder_mode must be one of"):
        preset_config("semtok_tiny", decoder_mode="diffusion")


def test_decode_errors(images) -> None:
    model = _model().eval()
    ids = model.encode(images)
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"flow decoder .* steps must be an integer in \[1, "):
            model.decode(ids, steps=steps)
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        model.decode(ids, steps=1, sampler="ddim")
    refine = _model(decoder_mode="refine").eval()
    with pytest.raises(ValueError, match="decodes in one pass: steps must be None"):
        refine.decode(ids, steps=5)
    with pytest.raises(NotImplementedError, match="decode"):
        model.decode_codes(model.quantizer.indices_to_codes(ids))


def test_loss_and_stage_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="need a semantic teacher"):
        TokenizerLoss(distill_weight=0.05)
    model = _model()
    apply_stage(model, STAGE1)
    with pytest.raises(ValueError, match="predicts velocities, not pixels"):
        check_model_fits_loss(model, TokenizerLoss(flow_weight=1.0), None)
    with pytest.raises(ValueError, match=r"stage trains the model's distill projection but loss\.distill_weight = 0"):
        check_model_fits_loss(model, _flow_loss(contrastive_weight=1.0, teacher=TinyTeacher(dim=32)), None)
    with pytest.raises(
        ValueError, match=r"teacher \(teacher\.spec\) has width 16 but the model's projections expect teacher_dim = 32"
    ):
        loss = _flow_loss(distill_weight=1.0, contrastive_weight=1.0, teacher=TinyTeacher(dim=16))
        check_model_fits_loss(model, loss, None)
    with pytest.raises(ValueError, match=r"flow_weight = 1\.0 needs a flow-matching decoder"):
        check_model_fits_loss(create_tokenizer("titok_tiny"), TokenizerLoss(flow_weight=1.0), None)
    with pytest.raises(ValueError, match="model computed no 'distill' term"):
        loss = _flow_loss(distill_weight=1.0, teacher=TinyTeacher(dim=32))
        loss(model(torch.rand(1, 3, 64, 64)), torch.rand(1, 3, 64, 64))  # no teacher features given
    settings = [f"out_dir='{tmp_path}'", f"teacher.spec={{type='siglip', path='{tmp_path / 'siglip'}'}}"]
    with pytest.raises(MissingWeightsError, match=r"teacher\.spec"):
        Trainer(load_train_config(CONFIGS / "semtok_tiny_stage1.toml", settings), dataset=_photos(), progress=False)
    # the shipped reference teacher before `mstok reference train` made it: says how to make it
    settings = [f"out_dir='{tmp_path}'", f"teacher.spec={{type='reference', path='{tmp_path / 'reference'}'}}"]
    with pytest.raises(FileNotFoundError, match=r"does not exist.*train the teacher first: mstok reference train"):
        Trainer(load_train_config(CONFIGS / "semtok_tiny_stage1.toml", settings), dataset=_photos(), progress=False)


def _stage_one(out_dir: Path, steps: int, *extra: str) -> Trainer:
    """The shipped stage-I config on two skimage photos, with a narrow model so the test is quick."""
    settings = [f"steps={steps}", "batch_size=4", "data.num_workers=0", "log_every=1", "tensorboard=false"]
    settings += ["sample_every=0", "threads=1", "ckpt_every=2", f"out_dir='{out_dir}'", "teacher.spec='tiny'", *extra]
    settings += [
        "model.overrides={width=32, depth=1, num_heads=2, decoder_width=32, decoder_depth=1, sample_steps=2, "
        "semantic_terms=['distill']}"  # the shipped config's terms (the table replaces its overrides)
    ]
    return Trainer(load_train_config(CONFIGS / "semtok_tiny_stage1.toml", settings), dataset=_photos(), progress=False)


@pytest.mark.slow
def test_stage_one_resume_is_bit_identical(tmp_path) -> None:
    """Stage I draws noise and flow times each step: a run killed after step 2 and resumed to
    step 4 ends with the weights, EMA and losses of a straight run."""
    straight = _stage_one(tmp_path / "a", 4)
    straight.fit()
    first = _stage_one(tmp_path / "b", 4)
    first.config.steps = 2  # "killed" after step 2: only the step-2 checkpoint survives
    first.fit()
    resumed = _stage_one(tmp_path / "b", 4)
    assert resumed.resume("auto").name == "step_0000002"
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.module.parameters(), resumed.ema.module.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [h["flow"] for h in straight.history[2:]] == [h["flow"] for h in resumed.history]


@pytest.mark.slow
def test_cli_chain_train_pretokenize_bitmar_sample(tmp_path, capsys) -> None:
    """A SemTok stage-I run, its 12-bit ids as shards, a BitMAR generator on them, and images
    sampled through the flow decoder: the same seed gives the same images."""
    import numpy as np
    from PIL import Image

    from mstok.cli import main

    rng = np.random.default_rng(0)
    for i in range(4):
        folder = tmp_path / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    tok = tmp_path / "semtok"
    _stage_one(tok, 2, f"data.path='{tmp_path / 'images'}'").fit()
    tokens = tmp_path / "tokens"
    argv = ["pretokenize", "--checkpoint", str(tok), "--data", str(tmp_path / "images"), "--out", str(tokens)]
    assert main([*argv, "--workers", "0", "--no-progress", "--device", "cpu"]) == 0

    run = tmp_path / "bitmar"
    settings = [f"data.path='{tokens}'", f"out_dir='{run}'", f"tokenizer='{tok}'", "steps=2", "batch_size=4"]
    settings += ["model.overrides={width=32, depth=1, num_heads=2}", "sample_every=0", "device='cpu'"]
    settings += ["tensorboard=false", "log_every=1", "threads=1"]
    configs = str(CONFIGS / "bitmar_tiny.toml")
    assert main(["train-generator", "--config", configs, "--no-progress", "--set", *settings]) == 0
    assert mstok.load_generator(run).config.num_bits == 12

    batches = []
    for out in ("first", "second"):
        argv = ["sample", "--generator", str(run), "--tokenizer", str(tok), "--classes", "0,1", "--n", "1"]
        argv += ["--out-dir", str(tmp_path / out), "--no-progress", "--device", "cpu", "--steps", "2"]
        assert main(argv) == 0
        batches.append(np.load(tmp_path / out / "samples.npz"))
    assert batches[0]["arr_0"].shape == (2, 64, 64, 3) and batches[0]["tokens"].dtype == np.int64
    assert batches[0]["tokens"].min() >= 0 and batches[0]["tokens"].max() < 2**12
    assert np.array_equal(batches[0]["arr_0"], batches[1]["arr_0"])  # the flow decoder's noise is seeded

    # --decode-steps: the same tokens through a one-step ODE, with the noise of the same seed
    argv += ["--decode-steps", "1"]
    argv[argv.index("--out-dir") + 1] = str(tmp_path / "one_step")
    assert main(argv) == 0
    one_step = np.load(tmp_path / "one_step" / "samples.npz")
    assert np.array_equal(one_step["tokens"], batches[0]["tokens"])
    tokenizer = load_tokenizer(tok)
    assert tokenizer.config.sample_steps != 1
    with torch.random.fork_rng():
        torch.manual_seed(0)
        expected = tokenizer.decode(torch.from_numpy(one_step["tokens"]), steps=1)
    expected = (expected.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(one_step["arr_0"], expected)
    assert not np.array_equal(one_step["arr_0"], batches[0]["arr_0"])
    capsys.readouterr()


def test_decode_steps_only_for_a_sampling_decoder() -> None:
    """``--decode-steps`` / ``decode_steps``: accepted for a flow decoder, a clear error for a
    one-pass decoder (a refiner, TiTok, the MaskGIT-VQGAN) or a bad count."""
    from mstok.generators.sampling import check_decode_steps

    assert check_decode_steps(create_tokenizer("semtok_tiny"), 3) == 3
    refiner = create_tokenizer("semtok_tiny", decoder_mode="refine")
    for tokenizer in (refiner, create_tokenizer("titok_tiny"), create_tokenizer("vqgan_tiny")):
        with pytest.raises(ValueError, match="decodes tokens in one pass"):
            check_decode_steps(tokenizer, 3)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            check_decode_steps(create_tokenizer("semtok_tiny"), bad)
