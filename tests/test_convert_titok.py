"""Official TiTok checkpoints -> mstok: equivalence with the official code, and precise errors.

The fixtures in tests/fixtures/titok/ were made with the official bytedance/1d-tokenizer code
(random weights in its key layout, 32 px, tiny ViTs, stored as float16): each folder holds the
official ``config.json`` + weights and ``reference.safetensors`` with the input images and the
official model's outputs for them. ``official_layouts.json`` records the key/shape layout of
every full-size release as the official code builds it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import mstok
from mstok.cli import main
from mstok.io import read_safetensors
from mstok.persistence.convert.titok import (
    RELEASES,
    ConversionError,
    convert_titok,
    convert_titok_state_dict,
    load_official_titok,
    official_layout,
    release_config,
    release_key,
    titok_config_from_official,
)
from mstok.quantizers import DiagonalGaussianQuantizer
from mstok.storage.weights import MissingWeightsError, load_torch_state_dict
from mstok.tokenizers import TiTokConfig, preset_config

FIXTURES = Path(__file__).parent / "fixtures" / "titok"
VQ_FIXTURES = ("legacy_s", "legacy_b", "single_vq_sl")
TOLERANCE = 1e-4  # max abs difference of decoded float32 images


def _reference(name: str) -> dict[str, torch.Tensor]:
    return read_safetensors(FIXTURES / name / "reference.safetensors")


def _official_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def _weights(name: str) -> Path:
    folder = FIXTURES / name
    return next(folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file())


def _raw_decode(model: mstok.TiTok, tokens: torch.Tensor) -> torch.Tensor:
    """Unclamped pixels for token ids (or VAE latents), through the pixel decoder when there is one."""
    with torch.no_grad():
        out = model.decode_codes(model.tokens_to_codes(model.check_tokens(tokens)))
        return model.pixel_decoder(out) if model.pixel_decoder is not None else out


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", VQ_FIXTURES)
def test_vq_release_matches_official(name: str) -> None:
    ref = _reference(name)
    model = load_official_titok(FIXTURES / name)
    tokens = model.encode(ref["images"])
    assert torch.equal(tokens, ref["tokens"])
    with torch.no_grad():
        recon = model(ref["images"]).reconstruction
    assert (recon - ref["recon"]).abs().max() < TOLERANCE
    assert (_raw_decode(model, ref["tokens"]) - ref["decoded"]).abs().max() < TOLERANCE
    assert (model.decode(ref["tokens"]) - ref["decoded"].clamp(0, 1)).abs().max() < TOLERANCE


def test_two_stage_layout_is_proxy_head_plus_pixel_decoder() -> None:
    model = load_official_titok(FIXTURES / "legacy_s")
    cfg = model.config
    assert (cfg.token_projection, cfg.head, cfg.proxy_codebook_size) == ("legacy", "proxy_codes", 1024)
    assert model.pixel_decoder is not None and cfg.use_l2_norm
    logits = model.decode_logits(_reference("legacy_s")["tokens"])
    assert logits.shape == (2, cfg.num_patches, 1024)


def test_legacy_projection_is_needed() -> None:
    """The same weights with a per-token projection give other tokens: the fixture tests the mixing."""
    official = _official_config("legacy_s")
    config = titok_config_from_official(official).replace(token_projection="per_token")
    state = convert_titok_state_dict(load_torch_state_dict(_weights("legacy_s")), config)
    model = mstok.TiTok(config)
    model.load_state_dict(state)
    ref = _reference("legacy_s")
    assert not torch.equal(model.eval().encode(ref["images"]), ref["tokens"])


def test_single_stage_has_separate_decoder_size() -> None:
    cfg = load_official_titok(FIXTURES / "single_vq_sl").config
    assert (cfg.width, cfg.decoder_dims) == (32, (48, 2, 6))
    assert (cfg.token_projection, cfg.head, cfg.pixel_decoder, cfg.use_l2_norm) == ("per_token", "pixels", {}, False)


def test_vae_release_matches_official() -> None:
    ref = _reference("vae_ll")
    model = load_official_titok(FIXTURES / "vae_ll")
    assert model.is_vae and model.config.quantizer == "vae"
    mean = model.encode(ref["images"])  # the posterior mean by default
    assert mean.shape == ref["mean"].shape and mean.dtype == torch.float32
    assert (mean - ref["mean"]).abs().max() < TOLERANCE
    with torch.no_grad():
        post = model.quantizer.gaussian(
            model.encoder(ref["images"]), sample=False
        )  # the Gaussian inside the KL bottleneck
    assert (post.logvar - ref["logvar"]).abs().max() < TOLERANCE
    assert math.isclose(post.kl.item(), ref["kl"].item(), rel_tol=1e-5)
    assert (_raw_decode(model, ref["mean"]) - ref["decoded"]).abs().max() < TOLERANCE
    assert (model.decode(mean) - ref["decoded"].clamp(0, 1)).abs().max() < TOLERANCE

    torch.manual_seed(0)
    sample = model.encode(ref["images"], sample=True)
    noise = (sample - mean) / post.logvar.mul(0.5).exp()
    assert not torch.equal(sample, mean) and abs(noise.std().item() - 1.0) < 0.2
    model.train()
    out = model(ref["images"])  # a training forward samples and carries the weighted KL
    assert out.indices is None and out.reconstruction.shape == ref["images"].shape
    assert math.isclose(out.quantizer_loss.item(), model.config.kl_weight * ref["kl"].item(), rel_tol=1e-5)


def test_vae_api_errors() -> None:
    model = load_official_titok(FIXTURES / "vae_ll")
    with pytest.raises(ValueError, match=r"continuous \(VAE\) latents: decode\(\) takes a float tensor \(B, 8, 4\)"):
        model.decode(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 8, 4\), got \(1, 8, 5\)"):
        model.decode(torch.zeros(1, 8, 5))
    vq = load_official_titok(FIXTURES / "single_vq_sl")
    with pytest.raises(ValueError, match="sample=True is for VAE tokenizers"):
        vq.encode(_reference("single_vq_sl")["images"], sample=True)


def test_gaussian_quantizer_kl_and_gradients() -> None:
    quantizer = DiagonalGaussianQuantizer(3)
    z = torch.randn(2, 5, 6, requires_grad=True)
    out = quantizer(z)
    mean, logvar = z.detach().chunk(2, dim=-1)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / 2
    assert torch.allclose(out.kl, expected)
    out.latents.sum().backward()  # reparameterised: the sample reaches the encoder
    assert z.grad is not None and z.grad[..., :3].abs().min() > 0
    with pytest.raises(ValueError, match=r"expected \(B, K, 6\) mean and log-variance, got \(2, 5, 4\)"):
        quantizer(torch.zeros(2, 5, 4))


# ----------------------------------------------------------------------------- release table
def test_release_layouts_match_official_code() -> None:
    """Every full-size release maps onto exactly the keys and shapes the official code builds."""
    layouts = json.loads((FIXTURES / "official_layouts.json").read_text())
    assert set(layouts) == set(RELEASES)
    for name, expected in layouts.items():
        layout = official_layout(titok_config_from_official(release_config(name)))
        items = sorted((official, shape) for official, shape, _ in layout.values() if official is not None)
        lines = "".join(f"{key} {shape}\n" for key, shape in items)
        assert len(items) == expected["keys"], name
        assert sum(math.prod(shape) for _, shape in items) == expected["parameters"], name
        assert hashlib.sha256(lines.encode()).hexdigest() == expected["sha256"], name


def test_release_configs() -> None:
    l32 = titok_config_from_official(release_config("yucornetto/tokenizer_titok_l32_imagenet"))
    assert (l32.width, l32.depth, l32.num_latent_tokens, l32.codebook_size, l32.code_dim) == (1024, 24, 32, 4096, 12)
    assert l32.pixel_decoder["channel_mult"] == (1, 1, 2, 2, 4) and l32.token_projection == "legacy"
    bl64 = titok_config_from_official(release_config("tokenizer_titok_bl64_vq8k.bin"))
    assert (bl64.width, bl64.decoder_dims, bl64.codebook_size, bl64.code_dim) == (768, (1024, 24, 16), 8192, 64)
    vae = titok_config_from_official(release_config("titok_ll32_vae_c16"))
    assert (vae.quantizer, vae.code_dim, vae.head, vae.decoder_width) == ("vae", 16, "pixels", None)
    assert release_key("fun-research/TiTok/tokenizer_titok_s128.bin") == "titok_s128"
    with pytest.raises(ConversionError, match=r"unknown TiTok release 'titok_xl8'; known releases: titok_l32, "):
        release_config("titok_xl8")


# ----------------------------------------------------------------------------- files, CLI, load_tokenizer
def test_cli_convert_and_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b"
    assert main(["convert", "titok", str(FIXTURES / "legacy_b"), str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "conversion.json"}
    ref = _reference("legacy_b")
    loaded = mstok.load_tokenizer(out)
    assert torch.equal(loaded.encode(ref["images"]), ref["tokens"])
    assert (loaded.decode(ref["tokens"]) - ref["decoded"].clamp(0, 1)).abs().max() < TOLERANCE
    assert main(["convert", "titok", str(FIXTURES / "legacy_b"), str(out)]) == 2  # refuses to overwrite
    assert "already holds a checkpoint" in capsys.readouterr().err
    # an official folder also loads directly, converted on the fly
    vae_ref = _reference("vae_ll")
    latents = mstok.load_tokenizer(str(FIXTURES / "vae_ll")).encode(vae_ref["images"])
    assert (latents - vae_ref["mean"]).abs().max() < TOLERANCE


def test_saved_vae_round_trip(tmp_path: Path) -> None:
    convert_titok(FIXTURES / "vae_ll", tmp_path / "vae")
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["config"]["quantizer"] == "vae" and "decoder_width" not in saved["config"]  # defaults are left out
    ref = _reference("vae_ll")
    assert (mstok.load_tokenizer(tmp_path / "vae").encode(ref["images"]) - ref["mean"]).abs().max() < TOLERANCE


def test_weights_file_needs_release(tmp_path: Path) -> None:
    weights = tmp_path / "weights.safetensors"
    shutil.copy(_weights("legacy_s"), weights)
    with pytest.raises(ConversionError, match=r"no config\.json beside .*weights\.safetensors.*pass the release"):
        load_official_titok(weights)
    with pytest.raises(ConversionError, match=r"missing keys \(\d+\):\n    encoder\.transformer\.2\.ln_1\.weight"):
        load_official_titok(weights, release="titok_s128")  # the file's name is no release: a wrong one named


# ----------------------------------------------------------------------------- precise errors
def _state_and_config(name: str = "legacy_s") -> tuple[dict[str, torch.Tensor], TiTokConfig]:
    return load_torch_state_dict(_weights(name)), titok_config_from_official(_official_config(name))


def test_wrong_shape_error() -> None:
    state, config = _state_and_config()
    state["encoder.conv_out.weight"] = torch.zeros(12, 16, 1, 1)
    with pytest.raises(ConversionError) as err:
        convert_titok_state_dict(state, config, "test.safetensors")
    message = str(err.value)
    assert message.startswith("test.safetensors does not match the official TiTok layout for 32px, encoder 32x2")
    assert "wrong shapes (1):\n    encoder.conv_out.weight: expected (12, 32, 1, 1), found (12, 16, 1, 1)" in message
    assert "missing keys" not in message and "unexpected keys" not in message


def test_missing_and_unexpected_key_errors(tmp_path: Path) -> None:
    state, _ = _state_and_config()
    del state["decoder.ffn.2.bias"]
    state["encoder.extra.weight"] = torch.zeros(3)
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(FIXTURES / "legacy_s" / "config.json", folder / "config.json")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ConversionError) as err:
        mstok.load_tokenizer(folder)
    message = str(err.value)
    assert f"{folder / 'pytorch_model.bin'} does not match" in message
    assert "missing keys (1):\n    decoder.ffn.2.bias (expected shape (1024,))" in message
    assert "unexpected keys (1):\n    encoder.extra.weight (shape (3,))" in message


def test_config_errors(tmp_path: Path) -> None:
    official = _official_config("single_vq_sl")
    del official["mstok_extensions"]
    with pytest.raises(ConversionError, match=r"vit_enc_model_size is 'tiny_s', not a known ViT size \(small, base"):
        titok_config_from_official(official)
    with pytest.raises(ConversionError, match=r"no model\.vq_model section"):
        titok_config_from_official({"model": {}})
    two_stage_vae = release_config("titok_ll32_vae_c16")
    two_stage_vae["model"]["vq_model"]["finetune_decoder"] = True
    with pytest.raises(ConversionError, match=r"finetune_decoder .* needs quantize_mode vq and is_legacy true"):
        titok_config_from_official(two_stage_vae)
    mstok.create_tokenizer("titok_tiny").save_pretrained(tmp_path / "ours")
    with pytest.raises(ConversionError, match="already an mstok checkpoint"):
        convert_titok(tmp_path / "ours", tmp_path / "out")


def test_hub_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MissingWeightsError) as err:
        mstok.load_tokenizer("yucornetto/tokenizer_titok_l32_imagenet")
    message = str(err.value)
    assert "getting it from the Hugging Face hub failed: LocalEntryNotFoundError" in message
    assert "hf download yucornetto/tokenizer_titok_l32_imagenet --local-dir tokenizer_titok_l32_imagenet" in message
    assert "mstok convert titok tokenizer_titok_l32_imagenet OUT" in message


def test_hub_download_converts_on_the_fly(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = []

    def cached(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(FIXTURES / "legacy_b")  # holds pytorch_model.bin only: a second call asks for it

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    model = mstok.load_tokenizer("yucornetto/tokenizer_titok_b64_imagenet")
    assert calls == [
        ("yucornetto/tokenizer_titok_b64_imagenet", ("config.json", "model.safetensors")),
        ("yucornetto/tokenizer_titok_b64_imagenet", ("pytorch_model.bin",)),
    ]
    ref = _reference("legacy_b")
    assert torch.equal(model.encode(ref["images"]), ref["tokens"])


# ----------------------------------------------------------------------------- config defaults
def test_new_options_default_to_todays_titok() -> None:
    config = preset_config("titok_b64")
    assert set(config.to_dict()) == {f for f in TiTokConfig.field_names()} - {
        "decoder_width",
        "decoder_depth",
        "decoder_num_heads",
        "token_projection",
        "quantizer",
        "kl_weight",
        "position_embedding",
        "latent_init",
        "attention_init",
        "qk_norm",
        "pixel_head",
        "nested",
    }
    assert config.decoder_dims == (768, 12, 12) and config.replace(decoder_depth=2).decoder_dims == (768, 2, 12)
    with pytest.raises(ValueError, match="token_projection must be one of"):
        config.replace(token_projection="transposed")
    with pytest.raises(ValueError, match="quantizer must be one of"):
        config.replace(quantizer="rvq")
    with pytest.raises(ValueError, match="decoder width 1000 is not a multiple of decoder num_heads 12"):
        config.replace(decoder_width=1000)
