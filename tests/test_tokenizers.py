"""TiTok and MsTok end to end on the tiny presets: shapes, gradients, determinism,
save/load, parameter placement and the preset size table."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import mstok
from mstok.tokenizers import PRESETS, MsTok, TiTok, build_tokenizer, preset_config

B = 2
IMAGE = 64
P = (64 // 8) ** 2  # tiny presets: 64x64 images, patch 8
V = 1024

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("titok_tiny", {}),
    ("titok_tiny", {"head": "proxy_codes"}),
    ("mstok_tiny", {}),
    ("mstok_tiny", {"aggregation": "weighted_add"}),
    ("mstok_tiny", {"readout": "linear"}),
    ("mstok_tiny", {"aggregation": "weighted_add", "readout": "linear"}),
    ("mstok_tiny", {"scale_embedding": False}),
    ("mstok_tiny", {"memory_layers": (4,)}),
    ("mstok_tiny", {"memory_layers": (2, 4)}),
    ("mstok_tiny", {"qam_depth": 2}),
    ("mstok_tiny", {"qam_self_attention": False}),
    ("mstok_tiny", {"head": "proxy_codes"}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()).replace(" ", "") for name, kw in VARIANTS]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(B, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def models() -> dict[int, mstok.Tokenizer]:
    """Lazily built models shared by the tests of this module, keyed by variant number."""
    return {}


def _get(models: dict[int, mstok.Tokenizer], index: int) -> mstok.Tokenizer:
    if index not in models:
        name, kw = VARIANTS[index]
        models[index] = mstok.create_tokenizer(name, **kw)
    model = models[index]
    model.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=IDS)
def test_forward_shapes_and_gradients(models, images, index: int) -> None:
    model = _get(models, index).train()
    cfg = model.config
    out = model(images)
    assert out.indices.shape == (B, cfg.num_latent_tokens)
    assert out.indices.dtype == torch.long
    assert out.indices.min() >= 0 and out.indices.max() < V
    for loss in (out.quantizer_loss, out.commitment_loss, out.codebook_loss):
        assert loss.dim() == 0 and torch.isfinite(loss)
    assert_close(out.quantizer_loss, out.commitment_loss + out.codebook_loss)
    if cfg.head == "pixels":
        assert out.logits is None
        assert out.reconstruction.shape == (B, 3, IMAGE, IMAGE)
        task_loss = (out.reconstruction - images).abs().mean()
    else:
        assert out.reconstruction is None
        assert out.logits.shape == (B, P, cfg.proxy_codebook_size)
        targets = torch.randint(0, cfg.proxy_codebook_size, (B, P))
        task_loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
    assert torch.isfinite(task_loss)
    (task_loss + out.quantizer_loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert no_grad == [], f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=IDS)
def test_inference_api(models, images, index: int) -> None:
    model = _get(models, index).eval()
    cfg = model.config
    tokens = model.encode(images)
    assert tokens.shape == (B, cfg.num_latent_tokens)
    assert tokens.dtype == torch.int64
    assert tokens.min() >= 0 and tokens.max() < V
    assert torch.equal(model.encode(images), tokens)  # deterministic in eval mode
    assert torch.equal(model(images).indices, tokens)  # encode agrees with the training forward
    features = model.encode_features(images)
    assert features.shape == (B, cfg.num_latent_tokens, cfg.width)
    assert not features.requires_grad
    if cfg.head == "pixels":
        recon = model.decode(tokens)
        assert recon.shape == (B, 3, IMAGE, IMAGE)
        assert recon.min() >= 0.0 and recon.max() <= 1.0
        assert torch.equal(model.decode(tokens), recon)
        assert_close(recon, model(images).reconstruction.clamp(0, 1), rtol=1e-4, atol=1e-5)
    else:
        logits = model.decode_logits(tokens)
        assert logits.shape == (B, P, cfg.proxy_codebook_size)
        assert torch.equal(model.decode_logits(tokens), logits)
        assert_close(logits, model(images).logits, rtol=1e-4, atol=1e-5)


def test_forward_in_float64() -> None:
    model = mstok.create_tokenizer("titok_tiny").double()
    out = model(torch.rand(1, 3, IMAGE, IMAGE, dtype=torch.float64))
    assert out.reconstruction.dtype == torch.float64


@pytest.mark.parametrize("name", ["mstok_tiny", "titok_tiny"])
def test_num_latent_tokens_override(name: str, images) -> None:
    model = mstok.create_tokenizer(name, num_latent_tokens=16).eval()
    assert model.config.num_latent_tokens == 16
    d = model.config.width
    queries = model.encoder.query_tokens if name == "mstok_tiny" else model.encoder.latent_tokens
    assert queries.shape == (16, d)
    assert model.decoder.latent_pos_embed.shape == (16, d)
    tokens = model.encode(images)
    assert tokens.shape == (B, 16)
    assert model.encode_features(images).shape == (B, 16, d)
    assert model.decode(tokens).shape == (B, 3, IMAGE, IMAGE)
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        model.decode(torch.zeros(B, 32, dtype=torch.long))


def test_mstok_backbone_does_not_depend_on_k() -> None:
    small = mstok.create_tokenizer("mstok_tiny", num_latent_tokens=8).parameter_counts()
    large = mstok.create_tokenizer("mstok_tiny", num_latent_tokens=40).parameter_counts()
    d = 128
    assert large["encoder"] - small["encoder"] == 32 * d  # query tokens only
    assert large["decoder"] - small["decoder"] == 32 * d  # latent positional embedding only


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("mstok_tiny", {"memory_layers": (2, 4), "aggregation": "weighted_add", "qam_depth": 2}), ("titok_tiny", {})],
)
def test_save_load_round_trip(tmp_path, images, name: str, overrides: dict[str, Any]) -> None:
    model = mstok.create_tokenizer(name, **overrides).eval()
    with torch.no_grad():  # weights that differ from any fresh initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    assert model.save_pretrained(tmp_path / "tok") == tmp_path / "tok"
    assert sorted(f.name for f in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = mstok.load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(model)
    assert not loaded.training
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    tokens = model.encode(images)
    assert torch.equal(loaded.encode(images), tokens)
    assert torch.equal(loaded.decode(tokens), model.decode(tokens))


def test_save_pretrained_with_explicit_state_dict(tmp_path) -> None:
    model = mstok.create_tokenizer("titok_tiny")
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path, state_dict=ema)
    loaded = mstok.load_tokenizer(tmp_path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ema[key]), key
    (tmp_path / "model.safetensors").rename(tmp_path / "ema.safetensors")
    again = mstok.load_tokenizer(tmp_path, weights="ema.safetensors")
    assert torch.equal(again.decoder.mask_token, ema["decoder.mask_token"])


def test_mstok_parameter_placement() -> None:
    model = mstok.create_tokenizer("mstok_tiny")
    assert isinstance(model, MsTok)
    enc = dict(model.encoder.named_parameters())
    dec = dict(model.decoder.named_parameters())
    assert "query_tokens" in enc
    assert any(n.startswith("memory.") for n in enc)
    assert any(n.startswith("qam.blocks.0.cross_attn") for n in enc)  # QAM_e
    assert any(n.startswith("qam.blocks.0.cross_attn") for n in dec)  # QAM_d
    assert "query_tokens" not in dec and not any(n.startswith("memory.") for n in dec)
    assert model.encoder.qam is not model.decoder.qam
    counts = model.parameter_counts()
    assert counts["encoder"] + counts["decoder"] + counts["quantizer"] == counts["total"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["quantizer"] == V * model.config.code_dim


def test_titok_parameter_counts_add_up() -> None:
    model = mstok.create_tokenizer("titok_tiny")
    assert isinstance(model, TiTok)
    counts = model.parameter_counts()
    assert counts["encoder"] + counts["decoder"] + counts["quantizer"] == counts["total"]
    assert "latent_tokens" in dict(model.encoder.named_parameters())


# Official TiTok encoder sizes, and the MsTok paper's ~95M (B) / ~320M (L) encoders.
@pytest.mark.parametrize(
    ("name", "expected", "tolerance"),
    [
        ("titok_s128", 25.8e6, 0.01),
        ("titok_b64", 85.9e6, 0.01),
        ("titok_l32", 303.4e6, 0.01),
        ("mstok_b64", 95e6, 0.03),
        ("mstok_l32", 320e6, 0.03),
    ],
)
def test_preset_encoder_sizes(name: str, expected: float, tolerance: float) -> None:
    with torch.device("meta"):  # no memory is allocated for the B/L weights
        model = mstok.create_tokenizer(name)
    assert model.quantizer.embedding.weight.is_meta
    assert model.parameter_counts()["encoder"] == pytest.approx(expected, rel=tolerance)


@pytest.mark.parametrize(("name", "family"), [("titok_tiny", TiTok), ("mstok_tiny", MsTok)])
def test_build_tokenizer_builds_an_edited_config(images, name: str, family: type) -> None:
    config = dataclasses.replace(preset_config(name), num_latent_tokens=16)  # a config no preset holds
    model = build_tokenizer(config).eval()
    assert type(model) is family and model.config == config
    with torch.no_grad():
        assert model.encode(images).shape == (B, 16)


def test_list_presets() -> None:
    names = mstok.list_presets()
    expected = "titok_s128 titok_b64 titok_l32 mstok_l32 mstok_b64 mstok_b128 mstok_b256 titok_tiny mstok_tiny"
    assert set(expected.split()) <= set(names)
    assert names == list(PRESETS)
    assert preset_config("mstok_b128").num_latent_tokens == 128
    assert preset_config("mstok_l32").memory_layers == (6, 12, 18, 24)


@pytest.mark.parametrize(
    ("overrides", "levels"),
    [({}, 4), ({"memory_layers": (2, 4)}, 2), ({"aggregation": "weighted_add"}, 1)],
)
def test_memory_shape_and_content(images, overrides: dict[str, Any], levels: int) -> None:
    model = mstok.create_tokenizer("mstok_tiny", **overrides).eval()
    enc, cfg = model.encoder, model.config
    with torch.no_grad():
        if enc.memory.level_logits is not None:
            enc.memory.level_logits.normal_()  # non-uniform level weights
        memory = enc.build_memory(images)
        assert memory.shape == (B, levels * P, cfg.width)
        assert memory.shape[1] == cfg.memory_length
        # Rebuild it by hand: run the blocks, tap the memory layers, drop the class token,
        # normalise each level, add its scale embedding, then concat or weighted-sum.
        x = enc.ln_pre(enc.patch_tokens(images))
        taps = []
        for depth, block in enumerate(enc.transformer.blocks, start=1):
            x = block(x)
            if depth in cfg.memory_layers:
                taps.append(x[:, 1:])
        feats = [
            norm(t) + enc.memory.scale_embed[i] for i, (norm, t) in enumerate(zip(enc.memory.norms, taps, strict=True))
        ]
        if cfg.aggregation == "concat":
            expected = torch.cat(feats, dim=1)
        else:
            weights = enc.memory.level_logits.softmax(dim=0)
            expected = sum(w * f for w, f in zip(weights, feats, strict=True))
    assert_close(memory, expected, rtol=1e-5, atol=1e-5)
