"""MaskGIT-VQGAN: shapes, gradients, the official key layout and loader, probability decoding,
save/load and input validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mstok
from mstok.persistence import load_official_vqgan, load_tokenizer
from mstok.tokenizers import MaskGITVQGAN, VQGANConfig, preset_config

B = 4
TINY = preset_config("vqgan_tiny")
N = TINY.num_tokens  # 8x8 grid
V = TINY.codebook_size


def _perturbed(model: MaskGITVQGAN) -> MaskGITVQGAN:
    """Give every parameter (GroupNorm gains and biases included) a non-default value, so a
    test can tell a loaded model from a fresh one."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.quantize.usage_ema.uniform_(0, 3)
    return model


@pytest.fixture
def model() -> MaskGITVQGAN:
    return _perturbed(mstok.create_tokenizer("vqgan_tiny")).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(B, 3, 64, 64)


def _official_state(model: MaskGITVQGAN) -> dict[str, torch.Tensor]:
    """The model's weights as the official file stores them: no usage buffer."""
    return {k: v.clone() for k, v in model.state_dict().items() if k != "quantize.usage_ema"}


# ------------------------------------------------------------------ shapes and gradients
def test_tiny_preset_matches_the_tiny_patch_grid() -> None:
    assert isinstance(TINY, VQGANConfig)
    assert (TINY.image_size, TINY.downsample_factor, TINY.grid_size, N, V) == (64, 8, 8, 64, 1024)
    assert TINY.grid_size == preset_config("titok_tiny").grid_size == preset_config("mstok_tiny").grid_size


def test_forward_shapes(model, images) -> None:
    out = model(images)
    assert out.reconstruction.shape == (B, 3, 64, 64)
    assert out.logits is None
    assert out.indices.shape == (B, N) and out.indices.dtype == torch.long
    assert out.latents.shape == (B, N, TINY.z_channels)
    for loss in (out.quantizer_loss, out.commitment_loss, out.codebook_loss):
        assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.allclose(out.quantizer_loss, out.commitment_loss + out.codebook_loss)
    # latents are the raw encoder outputs in raster order, and the ids their nearest codes
    grid = model.encoder(images)  # (B, C, h, w)
    assert torch.allclose(out.latents[:, 1], grid[:, :, 0, 1], atol=1e-6)
    distances = torch.cdist(out.latents.reshape(-1, TINY.z_channels), model.quantize.embedding.weight)
    assert torch.equal(out.indices.reshape(-1), distances.argmin(dim=1))
    assert torch.equal(model.encode(images), out.indices)


def test_gradients_reach_every_parameter(model, images) -> None:
    model.train()
    out = model(images)
    (F.mse_loss(out.reconstruction, images) + out.quantizer_loss).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # straight-through: the encoder's output layer gets reconstruction gradient too
    assert model.encoder.conv_out.weight.grad.abs().sum() > 0


def test_quantizer_api_used_by_the_trainer(model, images) -> None:
    assert model.quantizer is model.quantize
    out = model(images)
    with torch.no_grad():
        model.quantize.usage_ema.zero_()
    revived = model.quantizer.revive_dead_codes(out.latents.detach(), out.indices)
    assert revived >= V - B * N  # every code not picked in the batch was dead
    stats = model.quantizer.usage_statistics(out.indices)
    assert 0 < stats["usage"] <= B * N / V and stats["perplexity"] >= 1


# ------------------------------------------------------------------ official layout
# Shapes read from the official modeling/modules/maskgit_vqgan.py for the f16 256px config.
OFFICIAL_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),  # no bias
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "encoder.down.2.block.0.conv1.weight": (256, 128, 3, 3),
    "encoder.down.2.block.0.nin_shortcut.weight": (256, 256, 1, 1),
    "encoder.down.4.block.1.conv2.weight": (512, 512, 3, 3),
    "encoder.mid.1.norm2.bias": (512,),
    "encoder.conv_out.weight": (256, 512, 1, 1),
    "encoder.conv_out.bias": (256,),
    "quantize.embedding.weight": (1024, 256),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.up.4.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.block.0.nin_shortcut.weight": (256, 256, 1, 1),
    "decoder.up.1.upsample_conv.weight": (128, 128, 3, 3),
    "decoder.up.1.upsample_conv.bias": (128,),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "decoder.conv_out.bias": (3,),
}
ABSENT = (
    "encoder.conv_in.bias",
    "encoder.down.0.block.0.conv1.bias",
    "encoder.down.0.block.0.nin_shortcut.weight",  # 128 -> 128: no shortcut conv
    "decoder.up.0.upsample_conv.weight",  # level 0 does not upsample
)


def test_f16_config_has_the_official_layout() -> None:
    with torch.device("meta"):
        model = mstok.create_tokenizer("maskgit_vqgan_f16")
    assert model.config == VQGANConfig()
    assert (model.config.grid_size, model.config.num_tokens) == (16, 256)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in OFFICIAL_SHAPES.items():
        assert state.get(key) == shape, key
    for key in ABSENT:
        assert key not in state
    assert not any("attn" in key or "quant_conv" in key for key in state)  # no attention, no pre/post-quant conv
    assert len(state) == 168 + 1  # the official file's 168 tensors, plus mstok's usage buffer
    counts = model.parameter_counts()
    assert counts["total"] == 54_515_587
    assert counts["quantizer"] == 1024 * 256
    assert counts["encoder"] + counts["decoder"] + counts["quantizer"] == counts["total"]


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_official_file_loads_and_reproduces_the_source(model, images, tmp_path, suffix) -> None:
    path = tmp_path / f"vqgan{suffix}"
    if suffix == ".bin":
        torch.save(_official_state(model), path)
    else:
        save_file(_official_state(model), str(path))
    loaded = load_official_vqgan(path, TINY)
    assert not loaded.training
    # the usage buffer is absent from the file: it keeps the fresh model's initial value
    assert torch.equal(loaded.quantize.usage_ema, torch.zeros(V))
    ids = model.encode(images)
    assert torch.equal(loaded.encode(images), ids)
    assert torch.equal(loaded.decode(ids), model.decode(ids))
    assert torch.equal(loaded(images).reconstruction, model(images).reconstruction)


def test_official_loader_names_the_bad_key(model, tmp_path) -> None:
    state = _official_state(model)
    state["decoder.conv_out.weight"] = torch.zeros(3, 8, 3, 3)
    del state["encoder.mid.0.conv1.weight"]
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(ValueError) as info:
        load_official_vqgan(tmp_path / "bad.bin", TINY)
    message = str(info.value)
    assert "missing keys: encoder.mid.0.conv1.weight" in message
    assert "decoder.conv_out.weight: checkpoint (3, 8, 3, 3) vs model (3, 16, 3, 3)" in message
    state = _official_state(model)
    state["encoder.attn.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.bin")
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.attn\.weight"):
        load_official_vqgan(tmp_path / "extra.bin", TINY)


def test_official_loader_rejects_unreadable_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="VQGAN weights file not found"):
        load_official_vqgan(tmp_path / "nope.bin", TINY)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read .*junk\.bin"):
        load_official_vqgan(tmp_path / "junk.bin", TINY)
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="expected a dict of tensors"):
        load_official_vqgan(tmp_path / "list.bin", TINY)


# ------------------------------------------------------------------ decoding code distributions
def test_decode_probabilities_of_one_hot_is_decode(model) -> None:
    ids = torch.randint(0, V, (B, N))
    ids[0, :2] = torch.tensor([0, V - 1])  # both ends of the id range
    raw = model.decode_probabilities(F.one_hot(ids, V).float())
    expected = model.decode_codes(model.quantize.indices_to_codes(ids))
    assert raw.shape == (B, 3, 64, 64)
    torch.testing.assert_close(raw, expected, atol=1e-5, rtol=0)
    assert torch.equal(model.decode(ids), expected.clamp(0, 1))


def test_decode_probabilities_is_a_differentiable_mixture(model) -> None:
    logits = torch.randn(2, N, V, requires_grad=True)
    probs = logits.softmax(-1)
    out = model.decode_probabilities(probs)
    # the decoder input is the expected code under probs
    mixed = torch.einsum("bnv,vc->bnc", probs, model.quantize.embedding.weight)
    torch.testing.assert_close(out, model.decode_codes(mixed))
    out.square().mean().backward()
    assert logits.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.decoder.conv_in.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ save / load
def test_save_and_load_tokenizer_round_trip(model, images, tmp_path) -> None:
    model.save_pretrained(tmp_path / "vq")
    meta = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert meta["family"] == "maskgit_vqgan" and meta["config"]["channel_mult"] == list(TINY.channel_mult)
    loaded = load_tokenizer(tmp_path / "vq")
    assert isinstance(loaded, MaskGITVQGAN) and loaded.config == model.config
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert torch.equal(loaded.decode(loaded.encode(images)), model.decode(model.encode(images)))


def test_load_weights_is_strict(model, tmp_path) -> None:
    path = tmp_path / "official.safetensors"
    save_file(_official_state(model), str(path))
    with pytest.raises(ValueError, match=r"missing keys: quantize\.usage_ema"):
        model.load_weights(path)
    with pytest.raises(FileNotFoundError):
        model.load_weights(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.rand(2, 3, 32, 32), "takes 64x64 images, got 32x32"),
        (torch.rand(2, 1, 64, 64), "3 channels"),
        (torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), "divide by 255"),
        (torch.rand(2, 3, 64, 64) * 2, r"must be in \[0, 1\]"),
    ],
)
def test_encode_rejects_bad_images(model, bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        model.encode(bad)


def test_forward_rejects_wrong_image_size(model) -> None:
    with pytest.raises(ValueError, match="takes 64x64 images"):
        model(torch.rand(1, 3, 256, 256))


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.full((1, N), V), rf"ids must be in \[0, {V}\)"),
        (torch.full((1, N), -1), rf"ids must be in \[0, {V}\)"),
        (torch.zeros(1, N - 1, dtype=torch.long), rf"shape \(B, {N}\)"),
        (torch.zeros(1, N), "integer tensor"),
    ],
)
def test_decode_rejects_bad_ids(model, ids, match) -> None:
    with pytest.raises(ValueError, match=match):
        model.decode(ids)


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        (torch.rand(1, N, V - 1), rf"shape \(B, {N}, {V}\), got \(1, {N}, {V - 1}\)"),
        (torch.rand(N, V), "shape"),
        (torch.ones(1, N, V, dtype=torch.long), "float tensor"),
        ([[0.5]], "torch.Tensor"),
    ],
)
def test_decode_probabilities_rejects_bad_input(model, probs, match) -> None:
    with pytest.raises(ValueError, match=match):
        model.decode_probabilities(probs)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"image_size": 60}, "image_size 60 is not a multiple of the downsample factor 8"),
        ({"norm_groups": 12}, "multiple of norm_groups 12"),
        ({"channel_mult": ()}, "channel_mult must be a non-empty tuple"),
        ({"z_channels": 0}, "z_channels must be a positive integer"),
        ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\)"),
        ({"codebook_sise": 8}, r"unknown VQGANConfig field\(s\) \['codebook_sise'\]; valid fields: image_size"),
    ],
)
def test_config_validation(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        TINY.replace(**overrides)


def test_config_json_round_trip() -> None:
    config = TINY.replace(channel_mult=[1, 2, 2, 2])
    assert config.channel_mult == (1, 2, 2, 2)
    assert VQGANConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(TypeError, match="needs a VQGANConfig"):
        MaskGITVQGAN(preset_config("titok_tiny"))


def test_load_tokenizer_of_a_titok_folder_still_works(tmp_path: Path) -> None:
    mstok.create_tokenizer("titok_tiny").save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).config.family == "titok"
