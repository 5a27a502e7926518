"""HieraTok: scale masks, the token pyramid, the multi-scale RGB loss, progressive decoding,
gradients in every variant, save/load, config errors, the paper's sizes and a short training run."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import mstok
from mstok.data import InMemoryImages, RandomResizedCropFlip
from mstok.demo import TRAIN_PHOTOS, skimage_photos
from mstok.layers.multiscale import ConvDownsample, ScalePyramid, scale_attention_mask
from mstok.losses import TokenizerLoss
from mstok.tokenizers import HieraTok, HieraTokConfig, preset_config
from mstok.tokenizers.contract import TokenizerOutput
from mstok.tokenizers.registry import TINY_RECIPE
from mstok.training import Trainer, load_train_config

B = 2
SCALES = (1, 2, 4, 8)  # the tiny preset: 64 px, patch 8
K = 85
ATTENTIONS = ("scale_causal", "scale_independent", "full")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(B, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _block_mean(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, side, side): the mean of each (H/side x W/side) block, by reshape."""
    b, c, h, w = x.shape
    return x.reshape(b, c, side, h // side, side, w // side).mean(dim=(3, 5))


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("scales", [SCALES, (1, 2, 4, 8, 12, 16)])
@pytest.mark.parametrize("kind", ATTENTIONS)
def test_masks_match_a_loop_over_scales(scales: tuple[int, ...], kind: str) -> None:
    owner = []  # the scale of every token, in pyramid order
    for number, side in enumerate(scales):
        owner += [number] * side * side
    rule = {"scale_causal": lambda q, k: k <= q, "scale_independent": lambda q, k: k == q, "full": lambda q, k: True}
    expected = torch.tensor([[rule[kind](q, k) for k in owner] for q in owner])
    assert torch.equal(scale_attention_mask(scales, kind), expected)


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_the_decoder_keeps_the_mask_as_a_buffer_or_none(kind: str) -> None:
    decoder = mstok.create_tokenizer("hieratok_tiny", attention=kind).decoder
    assert "attn_mask" not in decoder.state_dict()  # non-persistent: rebuilt from the config
    if kind == "full":
        assert decoder.attn_mask is None  # SDPA's unmasked path
    else:
        assert torch.equal(decoder.attn_mask, scale_attention_mask(SCALES, kind))
    assert mstok.create_tokenizer("hieratok_single_tiny", attention=kind).decoder.attn_mask is None


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_each_scale_sees_what_its_mask_allows(kind: str) -> None:
    model = mstok.create_tokenizer("hieratok_tiny", attention=kind).eval()
    codes = torch.randn(1, K, model.config.code_dim)
    moved = codes.clone()
    moved[:, 5:21] += 1.0  # the tokens of scale 2 (4x4)
    with torch.no_grad():
        before, after = model.decoder.forward_scales(codes), model.decoder.forward_scales(moved)
    changed = [not torch.allclose(a, b, atol=1e-6) for a, b in zip(before, after, strict=True)]
    expected = {
        "scale_causal": [False, False, True, True],
        "scale_independent": [False, False, True, False],
        "full": [True, True, True, True],
    }
    assert changed == expected[kind]


# ------------------------------------------------------------------ the pyramid
def test_area_pyramid_is_block_means_low_to_high() -> None:
    tokens = torch.randn(B, 64, 16)  # an 8x8 map of width 16, raster order
    pyramid = ScalePyramid(16, 8, SCALES, "area")(tokens)
    assert pyramid.shape == (B, K, 16)
    fmap = tokens.transpose(1, 2).reshape(B, 16, 8, 8)
    assert_close(pyramid[:, 0], tokens.mean(dim=1))  # scale 1: the global mean
    offset = 0
    for side in SCALES:
        expected = _block_mean(fmap, side).flatten(2).transpose(1, 2)  # (B, s*s, D)
        assert_close(pyramid[:, offset : offset + side * side], expected)
        offset += side * side
    assert torch.equal(pyramid[:, -64:], tokens)  # the finest scale is the map itself
    assert torch.equal(ScalePyramid(16, 8, SCALES, "area")(tokens, num_scales=2), pyramid[:, :5])


def test_area_mode_equals_interpolate_at_any_ratio() -> None:
    scales = (1, 2, 4, 8, 12, 16)
    tokens = torch.randn(B, 256, 8)
    pyramid = ScalePyramid(8, 16, scales, "area")(tokens)
    fmap = tokens.transpose(1, 2).reshape(B, 8, 16, 16)
    parts = [F.interpolate(fmap, size=(s, s), mode="area").flatten(2).transpose(1, 2) for s in scales]
    assert torch.equal(pyramid, torch.cat(parts, dim=1))


def test_conv_pyramid_shapes_and_learnable_pooling() -> None:
    scales = (1, 2, 4, 8, 12, 16)
    pyramid = ScalePyramid(8, 16, scales, "conv")
    mstok.layers.init_weights(pyramid)
    tokens = torch.randn(B, 256, 8)
    out = pyramid(tokens)
    assert out.shape == (B, sum(s * s for s in scales), 8)
    assert torch.equal(out[:, -256:], tokens)
    assert [level.stride for level in pyramid.levels] == [16, 8, 4, 2, 1]  # 16 -> 12: pool 1, then area
    fmap = tokens.transpose(1, 2).reshape(B, 8, 16, 16)
    level = pyramid.levels[2]  # 16 -> 4
    pooled = F.conv2d(fmap, level.pool, stride=level.stride, groups=8)
    assert_close(pooled, _block_mean(fmap, 4))  # the depthwise kernel starts as area pooling
    assert_close(out[:, 5:21], level.context(level.act(level.mix(pooled))).flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="side must lie in"):
        ConvDownsample(8, 16, 16)


# ------------------------------------------------------------------ the multi-scale loss
def test_multiscale_loss_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(B, 3, 32, 32, generator=gen)
    scale_images = [torch.rand(B, 3, s, s, generator=gen) for s in (4, 8, 16, 32)]
    zero = torch.zeros(())
    output = TokenizerOutput(scale_images[-1], None, None, torch.zeros(B, 4, 2), zero, zero, zero, {}, scale_images)
    loss = TokenizerLoss(l1_weight=1.0, mse_weight=0.4, quantizer_weight=0.0, multiscale_weight=0.5)
    total, terms = loss(output, images)
    by_hand = 0.0
    for recon in scale_images[:-1]:  # every scale but the full resolution
        target = _block_mean(images, recon.shape[-1])
        by_hand += (recon - target).abs().mean() + 0.4 * ((recon - target) ** 2).mean()
    full = (scale_images[-1] - images).abs().mean() + 0.4 * ((scale_images[-1] - images) ** 2).mean()
    assert_close(terms["multiscale"], by_hand)
    assert_close(total, full + 0.5 * by_hand)
    assert "multiscale" not in TokenizerLoss(quantizer_weight=0.0)(output, images)[1]


def test_multiscale_loss_refuses_what_it_cannot_compute(tmp_path) -> None:
    zero = torch.zeros(())
    single = TokenizerOutput(torch.rand(B, 3, 8, 8), None, None, torch.zeros(B, 4, 2), zero, zero, zero)
    with pytest.raises(ValueError, match="needs a multi-scale tokenizer"):
        TokenizerLoss(multiscale_weight=1.0)(single, torch.rand(B, 3, 8, 8))
    with pytest.raises(ValueError, match="set l1_weight or mse_weight > 0"):
        TokenizerLoss(l1_weight=0.0, mse_weight=0.0, multiscale_weight=1.0)
    config = load_train_config(
        None, ["model.preset='titok_tiny'", "loss.multiscale_weight=1.0", f"out_dir='{tmp_path}'"]
    )
    with pytest.raises(ValueError, match=r"loss\.multiscale_weight = 1\.0 needs a multi-scale tokenizer"):
        Trainer(config, progress=False)
    settings = [
        "model.preset='hieratok_tiny'",
        "model.overrides.attention='scale_independent'",
        f"out_dir='{tmp_path}'",
    ]
    with pytest.raises(ValueError, match=r"without loss\.multiscale_weight > 0 they reach no loss"):
        Trainer(load_train_config(None, settings), progress=False)


# ------------------------------------------------------------------ progressive decoding
@pytest.mark.parametrize("pyramid", ["encoder", "decoder"])
@pytest.mark.parametrize(("attention", "quantizer"), [("scale_causal", "vae"), ("scale_independent", "vq")])
def test_progressive_decode_equals_the_full_decode(images, pyramid: str, attention: str, quantizer: str) -> None:
    model = mstok.create_tokenizer("hieratok_tiny", pyramid=pyramid, attention=attention, quantizer=quantizer)
    model.eval()
    tokens = model.encode(images)
    assert tokens.shape[1] == (K if pyramid == "encoder" else 64)
    full = model.decode_scales(tokens)
    assert [tuple(x.shape) for x in full] == [(B, 3, 8 * s, 8 * s) for s in SCALES]
    assert torch.equal(full[-1], model.decode(tokens))
    for n, offset in enumerate(model.config.scale_offsets[1:], start=1):
        assert_close(model.decode(tokens, scales=n), full[n - 1], atol=1e-5, rtol=1e-5)
        if pyramid == "encoder":  # the first n scales' tokens alone
            assert_close(model.decode(tokens[:, :offset], scales=n), full[n - 1], atol=1e-5, rtol=1e-5)
            assert len(model.decode_scales(tokens[:, :offset], scales=n)) == n


def test_full_attention_decodes_only_everything(images) -> None:
    model = mstok.create_tokenizer("hieratok_tiny", attention="full").eval()
    tokens = model.encode(images)
    with pytest.raises(ValueError, match="needs attention 'scale_causal' or 'scale_independent'"):
        model.decode(tokens, scales=3)
    assert torch.equal(model.decode(tokens, scales=4), model.decode(tokens))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, t: m.decode(t, scales=0), r"scales must be a number of scales in \[1, 4\], got 0"),
        (lambda m, t: m.decode(t, scales=5), r"in \[1, 4\], got 5"),
        (lambda m, t: m.decode(t, scales=True), "got True"),
        (lambda m, t: m.decode(t[:, :20], scales=3), r"first 21 tokens or all 85, got shape \(2, 20, 6\)"),
        (lambda m, t: m.decode(t[:, :21]), r"first 85 tokens or all 85"),
        (lambda m, t: m.decode(t.long()), "float tensor"),
    ],
)
def test_decode_rejects_bad_scales_and_tokens(images, call, match: str) -> None:
    model = mstok.create_tokenizer("hieratok_tiny").eval()
    with pytest.raises(ValueError, match=match):
        call(model, model.encode(images))


# ------------------------------------------------------------------ every variant trains
VARIANTS = list(itertools.product(("conv", "area"), ATTENTIONS, ("vae", "vq"), ("encoder", "decoder")))


@pytest.mark.parametrize(("downsample", "attention", "quantizer", "pyramid"), VARIANTS)
def test_gradients_reach_every_parameter(images, downsample: str, attention: str, quantizer: str, pyramid: str) -> None:
    torch.manual_seed(0)
    model = mstok.create_tokenizer(
        "hieratok_tiny", downsample=downsample, attention=attention, quantizer=quantizer, pyramid=pyramid
    ).train()
    out = model(images)
    k = K if pyramid == "encoder" else 64
    assert out.latents.shape[:2] == (B, k) and out.reconstruction.shape == images.shape
    assert out.scale_reconstructions[-1] is out.reconstruction
    assert model.encode_features(images).shape == (B, k, model.config.width)
    loss, terms = TokenizerLoss(multiscale_weight=1.0)(out, images)
    assert torch.isfinite(terms["multiscale"]) and terms["multiscale"] > 0
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), f"no gradient for {name}"
        if not name.startswith("quantizer"):
            assert param.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_single_scale_families_have_no_scale_images(images) -> None:
    assert mstok.create_tokenizer("titok_tiny")(images).scale_reconstructions is None
    single = mstok.create_tokenizer("hieratok_single_tiny")(images)
    assert len(single.scale_reconstructions) == 1 and single.scale_reconstructions[0] is single.reconstruction


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize(
    "overrides", [{}, {"pyramid": "decoder", "downsample": "area", "quantizer": "vq", "scales": (2, 8)}]
)
def test_save_load_round_trip(tmp_path, images, overrides: dict[str, Any]) -> None:
    model = mstok.create_tokenizer("hieratok_tiny", **overrides).eval()
    with torch.no_grad():  # weights that differ from any fresh initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "tok")
    loaded = mstok.load_tokenizer(tmp_path / "tok")
    assert type(loaded) is HieraTok and loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    tokens = model.encode(images)
    assert torch.equal(loaded.encode(images), tokens)
    assert torch.equal(loaded.decode(tokens, scales=1), model.decode(tokens, scales=1))


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"scales": (1, 2, 4)}, r"scales must end at the patch grid's side image_size // patch_size = 8"),
        ({"scales": (1, 4, 2, 8)}, r"strictly increasing \(coarse to fine\), got \[1, 4, 2, 8\]"),
        ({"scales": (2, 2, 8)}, "strictly increasing"),
        ({"scales": ()}, "scales must be"),
        ({"scales": (0, 8)}, "scales must be"),
        ({"num_latent_tokens": 84}, r"num_latent_tokens must be 85 for pyramid='encoder' \(sum\(s\^2\)"),
        ({"pyramid": "decoder", "num_latent_tokens": 85}, r"must be 64 for pyramid='decoder' \(the patch grid 8x8\)"),
        ({"downsample": "max"}, "'conv', 'area'"),
        ({"attention": "causal"}, "'scale_causal', 'scale_independent', 'full'"),
        ({"pyramid": "middle"}, "'encoder', 'decoder'"),
        ({"head": "proxy_codes"}, "head must be 'pixels'"),
        ({"pixel_head": "conv"}, "pixel_head must be 'linear'"),
        ({"latent_init": "grid"}, "latent_init must be 'random'"),
        ({"decoder_width": 130}, "decoder width 130 is not a multiple of decoder num_heads 4"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preset_config("hieratok_tiny", **overrides)


def test_k_is_derived_from_the_scales() -> None:
    assert preset_config("hieratok_tiny", scales=(1, 2, 8)).num_latent_tokens == 69
    assert preset_config("hieratok_tiny", scales=(1, 2, 8), pyramid="decoder").num_latent_tokens == 64
    config = HieraTokConfig()  # the defaults: 256 px, scales (1, 2, 4, 8, 16), the pyramid in the encoder
    assert config.num_latent_tokens == 341
    assert HieraTokConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="must be 277"):  # a written-out K is checked, not re-derived
        config.replace(scales=(1, 2, 4, 16))
    assert config.replace(scales=(1, 2, 4, 16), num_latent_tokens=None).num_latent_tokens == 277


def test_paper_presets_sizes() -> None:
    with torch.device("meta"):  # no memory for the 350M weights
        single = mstok.create_tokenizer("hieratok_single_f16d16")
        multi = mstok.create_tokenizer("hieratok_f16d16")
    counts, multi_counts = single.parameter_counts(), multi.parameter_counts()
    assert counts["total"] == pytest.approx(346.25e6, rel=0.01)  # paper Table 7
    assert multi_counts["encoder"] == counts["encoder"]  # identical encoders (appendix C.2)
    assert multi.config.num_latent_tokens == single.config.num_latent_tokens == 256  # the same latent
    assert multi.decoder.attn_mask.shape == (341, 341)  # 341 decoder tokens
    d32 = preset_config("hieratok_f16d32")
    assert (d32.code_dim, d32.kl_weight, d32.quantizer_input_dim) == (32, 1e-5, 64)


def test_tiny_presets_carry_the_recipe_that_applies() -> None:
    applies = {"position_embedding", "qk_norm"}  # no query tokens to place, mimetic init measured no gain
    for name in ("hieratok_tiny", "hieratok_single_tiny"):
        cfg = preset_config(name)
        for field, value in TINY_RECIPE.items():
            assert getattr(cfg, field) == (value if field in applies else "random"), field
    assert preset_config("hieratok_single_tiny").num_latent_tokens == 64


def test_the_tiny_config_uses_the_tiny_recipe() -> None:
    from pathlib import Path

    from mstok.training.recipes import TINY_ADAMW_OPTIM, TINY_EMA_DECAY, tiny_optim

    config = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "hieratok_tiny.toml")
    assert config.model.preset == "hieratok_tiny" and config.loss.multiscale_weight > 0
    # the AdamW recipe its benchmark was measured with (Muon is measured for TiTok and MsTok only)
    assert config.optim == tiny_optim(TINY_ADAMW_OPTIM) and config.ema_decay == TINY_EMA_DECAY


# ------------------------------------------------------------------ training
@pytest.mark.slow
def test_a_short_training_run_lowers_the_loss(tmp_path) -> None:
    """12 steps of the tiny preset through the shared Trainer, the multi-scale term on (about 2 s)."""
    photos = InMemoryImages(skimage_photos(TRAIN_PHOTOS[:2]), RandomResizedCropFlip(64, scale=(0.05, 0.3)))
    settings = ["model.preset='hieratok_tiny'", "steps=12", "batch_size=4", f"out_dir='{tmp_path}'"]
    settings += ["data.num_workers=0", "optim.lr=2e-3", "optim.warmup_steps=3", "log_every=1", "ckpt_every=12"]
    settings += ["loss.multiscale_weight=1.0", "tensorboard=false"]
    history = Trainer(load_train_config(None, settings), dataset=photos, progress=False).fit()
    assert len(history) == 12
    for term in ("loss", "multiscale", "l1"):
        first = sum(h[term] for h in history[:3]) / 3
        last = sum(h[term] for h in history[-3:]) / 3
        assert last < 0.7 * first, (term, first, last)


def test_flops_count_on_the_meta_device() -> None:
    """The benchmarks count FLOPs on a model built on the meta device: the scale mask (kept on the
    CPU) must follow the activations there, and the pyramid's extra tokens must cost decoder FLOPs."""
    from mstok.evaluation.flops import tokenizer_flops

    with torch.device("meta"):
        single = mstok.create_tokenizer("hieratok_single_tiny")
        multi = mstok.create_tokenizer("hieratok_tiny", pyramid="decoder")
    single_flops, multi_flops = tokenizer_flops(single), tokenizer_flops(multi)
    assert multi_flops["decoder"] > single_flops["decoder"] > 0
    real = tokenizer_flops(mstok.create_tokenizer("hieratok_tiny", pyramid="decoder"))
    assert real == multi_flops
