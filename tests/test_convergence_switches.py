"""The convergence switches (position_embedding, qk_norm, pixel_head), the continuous
bottleneck (quantizer="none") and the conv-autoencoder calibration: shapes, gradients to
every parameter, exact math against plain references, save/load, and that the defaults
leave every released layout untouched."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import mstok
from mstok.layers import SelfAttention, init_weights
from mstok.layers.attention import CrossAttention
from mstok.layers.embeddings import ConvPixelHead, PatchTokens, latent_grid, sincos_2d, sincos_at
from mstok.tokenizers import PRESETS, preset_config
from mstok.tokenizers.registry import TINY_RECIPE

B, IMAGE = 2, 64
SWITCHED = {
    "position_embedding": "sincos",
    "latent_init": "grid",
    "attention_init": "mimetic",
    "qk_norm": True,
    "pixel_head": "conv",
}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("titok_tiny", SWITCHED),
    ("mstok_tiny", SWITCHED),
    ("titok_tiny", {"position_embedding": "fixed_sincos"}),
    ("mstok_tiny", {"position_embedding": "fixed_sincos", "qk_norm": True}),
    ("titok_tiny", {"quantizer": "none"}),
    ("titok_tiny", {"quantizer": "none", "use_l2_norm": False}),
    ("mstok_tiny", {**SWITCHED, "quantizer": "none"}),
    ("convae_tiny", {}),
    ("convae_tiny", {"quantizer": "none"}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in VARIANTS]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(B, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=IDS)
def test_forward_gradients_and_inference(images, name: str, overrides: dict[str, Any]) -> None:
    model = mstok.create_tokenizer(name, **overrides).train()
    cfg = model.config
    out = model(images)
    assert out.reconstruction.shape == (B, 3, IMAGE, IMAGE)
    if cfg.quantizer == "none":
        assert out.indices is None
        assert out.quantizer_loss.item() == 0.0
    else:
        assert out.indices.shape == (B, cfg.num_latent_tokens)
    ((out.reconstruction - images).abs().mean() + out.quantizer_loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert no_grad == [], f"parameters without gradient: {no_grad}"

    model.eval()
    tokens = model.encode(images)
    if cfg.quantizer == "none":
        assert tokens.shape == (B, cfg.num_latent_tokens, cfg.code_dim) and tokens.dtype == torch.float32
    else:
        assert tokens.shape == (B, cfg.num_latent_tokens) and tokens.dtype == torch.int64
    recon = model.decode(tokens)
    assert_close(recon, model(images).reconstruction.clamp(0, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=IDS)
def test_save_load_round_trip(tmp_path, images, name: str, overrides: dict[str, Any]) -> None:
    model = mstok.create_tokenizer(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "tok")
    loaded = mstok.load_tokenizer(tmp_path / "tok")
    assert loaded.config == model.config
    assert torch.equal(loaded.decode(model.encode(images)), model.decode(model.encode(images)))


@pytest.mark.parametrize("use_l2_norm", [True, False])
def test_continuous_latents_follow_use_l2_norm(images, use_l2_norm: bool) -> None:
    """Unquantized latents are unit vectors exactly when use_l2_norm (as VQ's codes are), and
    the decoder reads what encode() returns."""
    model = mstok.create_tokenizer("titok_tiny", quantizer="none", use_l2_norm=use_l2_norm).eval()
    raw = model.encoder(images)  # (B, K, C) before the bottleneck
    tokens = model.encode(images)
    expected = raw / raw.norm(dim=-1, keepdim=True) if use_l2_norm else raw
    assert_close(tokens, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(()), atol=1e-5) == use_l2_norm
    assert_close(model.decode(tokens), model(images).reconstruction.clamp(0, 1), rtol=1e-4, atol=1e-5)


def test_continuous_decode_rejects_ids_and_bad_latents() -> None:
    model = mstok.create_tokenizer("mstok_tiny", quantizer="none").eval()
    with pytest.raises(ValueError, match=r"continuous \(unquantized\) latents"):
        model.decode(torch.zeros(B, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 32, 12\)"):
        model.decode(torch.zeros(B, 32, 8))
    with pytest.raises(ValueError, match="NaN"):
        model.decode(torch.full((B, 32, 12), float("nan")))


def test_sincos_table_matches_a_plain_loop() -> None:
    grid, dim = 4, 16
    table = sincos_2d(grid, dim, leading=1)
    assert table.shape == (1 + grid * grid, dim)
    assert torch.equal(table[0], torch.zeros(dim))
    quarter = dim // 4
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        expected = []
        for pos in (row, col):
            freqs = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
            expected += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
        assert_close(table[1 + index], torch.tensor(expected, dtype=torch.float32))


def test_position_embedding_kinds_keep_the_layout() -> None:
    learned = PatchTokens(64, 8, 32, position_embedding="learned")
    sincos = PatchTokens(64, 8, 32, position_embedding="sincos")
    fixed = PatchTokens(64, 8, 32, position_embedding="fixed_sincos")
    for module in (learned, sincos, fixed):
        init_weights(module)
        assert module.state_dict()["pos_embed"].shape == (65, 32)
    table = sincos_2d(8, 32, leading=1)
    assert torch.equal(sincos.pos_embed.data, table)  # learned, started from the table
    assert isinstance(sincos.pos_embed, torch.nn.Parameter)
    assert not torch.equal(learned.pos_embed.data, table)
    assert "pos_embed" not in dict(fixed.named_parameters())  # frozen: a buffer under the same key
    assert torch.equal(fixed.pos_embed, table)
    assert learned.state_dict().keys() == fixed.state_dict().keys()


def test_tokenizer_decoder_grid_embedding_is_sincos() -> None:
    titok = mstok.create_tokenizer("titok_tiny", position_embedding="sincos")
    assert torch.equal(titok.decoder.pos_embed.data, sincos_2d(8, 128, leading=1))
    assert torch.equal(titok.encoder.patch_tokens.pos_embed.data, sincos_2d(8, 128, leading=1))
    ms = mstok.create_tokenizer("mstok_tiny", position_embedding="sincos")
    assert torch.equal(ms.decoder.pos_embed.data, sincos_2d(8, 128))


def test_latent_grid_positions() -> None:
    assert torch.equal(
        latent_grid(4, 8), torch.tensor([[1.5, 1.5], [1.5, 5.5], [5.5, 1.5], [5.5, 5.5]], dtype=torch.float64)
    )
    grid = latent_grid(32, 8)  # 4 x 8 cells of 2 x 1 patches
    assert grid.shape == (32, 2)
    assert sorted(set(grid[:, 0].tolist())) == [0.5, 2.5, 4.5, 6.5]
    assert sorted(set(grid[:, 1].tolist())) == [float(c) for c in range(8)]
    assert latent_grid(7, 8).shape == (7, 2)  # a prime K: one row
    # at a patch centre the latent's embedding equals that patch's positional embedding
    assert_close(sincos_at(torch.tensor([[2.0, 3.0]]), 16)[0], sincos_2d(8, 16)[2 * 8 + 3])


@pytest.mark.parametrize("name", ["titok_tiny", "mstok_tiny"])
def test_latent_grid_init(name: str) -> None:
    model = mstok.create_tokenizer(name, position_embedding="sincos", latent_init="grid")
    table = sincos_at(latent_grid(32, 8), 128)
    if name == "titok_tiny":
        assert torch.equal(model.encoder.latent_tokens.data, torch.zeros(32, 128))
        assert torch.equal(model.encoder.latent_pos_embed.data, table)
    else:
        assert torch.equal(model.encoder.query_tokens.data, table)
    assert torch.equal(model.decoder.latent_pos_embed.data, table)
    plain = mstok.create_tokenizer(name, position_embedding="sincos")
    assert plain.state_dict().keys() == model.state_dict().keys()  # initialisation only


@pytest.mark.parametrize("name", ["titok_tiny", "mstok_tiny"])
def test_mimetic_attention_init_ties_query_and_key(name: str) -> None:
    model = mstok.create_tokenizer(name, attention_init="mimetic")
    attentions = [m for m in model.modules() if isinstance(m, (SelfAttention, CrossAttention))]
    assert attentions
    for attn in attentions:
        if isinstance(attn, SelfAttention):
            q, k, v = attn.qkv.weight.chunk(3)
            assert torch.equal(q, k) and not torch.equal(q, v)
        else:
            assert torch.equal(attn.kv.weight[: attn.q.weight.shape[0]], attn.q.weight)
    # the start is a similarity: every token's logit with itself is the largest of its row
    attn = next(m for m in attentions if isinstance(m, SelfAttention))
    x = torch.randn(1, 6, attn.qkv.weight.shape[1])
    q, k, _ = attn.qkv(x).chunk(3, dim=-1)
    logits = q @ k.transpose(-1, -2)
    assert torch.equal(logits.argmax(-1), torch.arange(6)[None])
    plain = mstok.create_tokenizer(name)
    assert plain.state_dict().keys() == model.state_dict().keys()


def test_fixed_sincos_loads_a_learned_checkpoint(tmp_path) -> None:
    """fixed_sincos keeps the key, so a checkpoint of either kind loads into the other."""
    learned = mstok.create_tokenizer("titok_tiny", position_embedding="learned", latent_init="random")
    learned.save_pretrained(tmp_path)
    fixed = mstok.create_tokenizer("titok_tiny", position_embedding="fixed_sincos")
    fixed.load_weights(tmp_path / "model.safetensors")
    assert torch.equal(fixed.decoder.pos_embed, learned.decoder.pos_embed)


def _reference_attention(q, k, v, heads, q_norm=None, k_norm=None):
    """Plain multi-head attention in float64 with optional per-head LayerNorms of q and k."""
    b, n, d = q.shape
    m = k.shape[1]
    q = q.view(b, n, heads, d // heads).transpose(1, 2)
    k = k.view(b, m, heads, d // heads).transpose(1, 2)
    v = v.view(b, m, heads, d // heads).transpose(1, 2)
    if q_norm is not None:
        q = F.layer_norm(q, (d // heads,), q_norm.weight, q_norm.bias, q_norm.eps)
        k = F.layer_norm(k, (d // heads,), k_norm.weight, k_norm.bias, k_norm.eps)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, d)


def test_qk_norm_self_attention_matches_reference() -> None:
    attn = SelfAttention(16, 4, qk_norm=True).double()
    with torch.no_grad():  # non-trivial norm parameters
        for norm in (attn.qk_norm.q_norm, attn.qk_norm.k_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    expected = attn.proj(_reference_attention(q, k, v, 4, attn.qk_norm.q_norm, attn.qk_norm.k_norm))
    assert_close(attn(x), expected)
    # large inputs: the normalised logits stay bounded, so attention does not collapse to one-hot
    big = attn(x * 1e4)
    assert torch.isfinite(big).all()


def test_qk_norm_cross_attention_matches_reference() -> None:
    attn = CrossAttention(16, 2, context_dim=8, qk_norm=True).double()
    x, ctx = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 7, 8, dtype=torch.float64)
    k, v = attn.kv(ctx).chunk(2, dim=-1)
    expected = attn.proj(_reference_attention(attn.q(x), k, v, 2, attn.qk_norm.q_norm, attn.qk_norm.k_norm))
    assert_close(attn(x, ctx), expected)


def test_qk_norm_off_adds_no_parameters() -> None:
    plain, normed = SelfAttention(16, 4), SelfAttention(16, 4, qk_norm=True)
    assert set(dict(normed.named_parameters())) - set(dict(plain.named_parameters())) == {
        "qk_norm.q_norm.weight", "qk_norm.q_norm.bias", "qk_norm.k_norm.weight", "qk_norm.k_norm.bias",
    }  # fmt: skip
    assert plain.state_dict().keys() == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


def test_conv_pixel_head_layout_and_residuals() -> None:
    head = ConvPixelHead(dim=8, patch_size=2, grid_size=2, channels=4, num_blocks=1)
    x = torch.randn(1, 4, 8)
    features = head.proj(x).view(1, 2, 2, 2, 2, 4)  # (B, gh, gw, ph, pw, c)
    grid = features.permute(0, 5, 1, 3, 2, 4).reshape(1, 4, 4, 4)  # (B, c, H, W)
    expected = head.out(grid + head.blocks[0](grid))
    assert_close(head(x), expected)


FULL_SIZE = [n for n, (family, _) in PRESETS.items() if family in ("titok", "mstok") and not n.endswith("_tiny")]


@pytest.mark.parametrize("name", FULL_SIZE)
def test_defaults_change_no_full_size_preset(name: str) -> None:
    """Every full-size preset saves the same config.json keys as before the switches existed."""
    saved = preset_config(name).to_dict()
    for field in ("position_embedding", "latent_init", "attention_init", "qk_norm", "pixel_head", "quantizer"):
        assert field not in saved, field


@pytest.mark.parametrize("name", ["titok_tiny", "mstok_tiny"])
def test_tiny_presets_carry_the_recipe(name: str) -> None:
    cfg = preset_config(name)
    for field, value in TINY_RECIPE.items():
        assert getattr(cfg, field) == value and cfg.to_dict()[field] == value, field


def test_convae_bottleneck_sizes() -> None:
    vq = mstok.create_tokenizer("convae_tiny")
    cont = mstok.create_tokenizer("convae_tiny", quantizer="none")
    titok = preset_config("titok_tiny")
    bits = vq.config.num_latent_tokens * math.log2(vq.config.codebook_size)
    assert bits == titok.num_latent_tokens * math.log2(titok.codebook_size) == 320
    assert cont.config.num_latent_tokens * cont.config.code_dim == titok.num_latent_tokens * titok.code_dim == 384
    assert 0.5e6 < vq.parameter_counts()["total"] < 0.8e6


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_latent_tokens": 32}, "grid's cell count 64"),
        ({"patch_size": 6, "image_size": 60, "num_latent_tokens": 100}, "power of two"),
        ({"qk_norm": True}, "no transformer"),
        ({"attention_init": "mimetic"}, "no transformer"),
        ({"head": "proxy_codes"}, "pixels only"),
    ],
)
def test_convae_rejects_bad_settings(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preset_config("convae_tiny", **overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"position_embedding": "rope"}, "position_embedding must be one of"),
        ({"pixel_head": "deconv"}, "pixel_head must be one of"),
        ({"qk_norm": "yes"}, "qk_norm must be true or false"),
        ({"quantizer": "fsq"}, "quantizer.levels is required for an 'fsq' quantizer"),
        ({"quantizer": "rvq"}, "quantizer must be one of"),
        ({"position_embedding": "learned"}, "needs position_embedding 'sincos' or 'fixed_sincos'"),
        ({"latent_init": "zeros"}, "latent_init must be one of"),
        ({"attention_init": "xavier"}, "attention_init must be one of"),
    ],
)
def test_switch_validation(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preset_config("mstok_tiny", **overrides)


@pytest.mark.parametrize("name", ["titok_tiny", "mstok_tiny"])
def test_shipped_tiny_configs_use_the_recipe(name: str) -> None:
    from pathlib import Path

    from mstok.training import load_train_config
    from mstok.training.recipes import TINY_EMA_DECAY, tiny_optim, tiny_settings

    config = load_train_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
    assert config.model.preset == name
    assert config.optim == tiny_optim()
    assert config.ema_decay == TINY_EMA_DECAY
    assert config.val_every > 0 and config.sample_every > 0  # validation and grids on by default
    assert load_train_config(None, tiny_settings()).optim == tiny_optim()
