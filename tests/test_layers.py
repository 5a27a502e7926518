"""Transformer core: attention and blocks against plain float64 references, Transformer taps,
the pixel head's unpatchify layout, and the weight-initialisation rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import mstok
from mstok.layers import (
    CrossAttention,
    CrossAttentionBlock,
    PatchTokens,
    PixelHead,
    SelfAttention,
    SelfAttentionBlock,
    Transformer,
    init_weights,
)

TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _linear(x: torch.Tensor, layer: nn.Linear, rows: slice = slice(None)) -> torch.Tensor:
    """x @ W[rows].T + b[rows], written out so the reference does not reuse nn.Linear."""
    return x @ layer.weight[rows].t() + layer.bias[rows]


def _heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None) -> torch.Tensor:
    """Per-head softmax(q k^T / sqrt(d)) v on (B, N, D) / (B, M, D) tensors -> (B, N, D)."""
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(d)  # (B, N, M)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(scores.softmax(dim=-1) @ v[..., cols])
    return torch.cat(outs, dim=-1)


def _ref_self_attention(attn: SelfAttention, x: torch.Tensor, mask=None) -> torch.Tensor:
    dim = x.shape[-1]
    q = _linear(x, attn.qkv, slice(0, dim))
    k = _linear(x, attn.qkv, slice(dim, 2 * dim))
    v = _linear(x, attn.qkv, slice(2 * dim, 3 * dim))
    return _linear(_heads_attention(q, k, v, attn.num_heads, mask), attn.proj)


def _ref_cross_attention(attn: CrossAttention, x: torch.Tensor, ctx: torch.Tensor, mask=None) -> torch.Tensor:
    dim = x.shape[-1]
    q = _linear(x, attn.q)
    k = _linear(ctx, attn.kv, slice(0, dim))
    v = _linear(ctx, attn.kv, slice(dim, 2 * dim))
    return _linear(_heads_attention(q, k, v, attn.num_heads, mask), attn.proj)


def _ref_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _ref_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = _linear(x, mlp.fc1)
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
    return _linear(h, mlp.fc2)


def _randomise_norms(module: nn.Module) -> None:
    """Give every LayerNorm a non-trivial affine so a swapped or missing norm shows up."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(std=0.3)


# ------------------------------------------------------------------ attention
def test_self_attention_matches_reference() -> None:
    attn = SelfAttention(32, 4).double()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    assert_close(attn(x), _ref_self_attention(attn, x), **TIGHT)


def test_self_attention_boolean_mask() -> None:
    attn = SelfAttention(24, 3).double()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    out = attn(x, attn_mask=causal)
    assert_close(out, _ref_self_attention(attn, x, causal), **TIGHT)
    # Causal: the first token only sees itself, so changing later tokens leaves it alone.
    x2 = x.clone()
    x2[:, 1:] += 1.0
    assert_close(attn(x2, attn_mask=causal)[:, 0], out[:, 0], **TIGHT)
    assert not torch.allclose(attn(x), out)


def test_self_attention_per_batch_mask() -> None:
    attn = SelfAttention(16, 2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 5) > 0.4
    mask |= torch.eye(5, dtype=torch.bool)  # every query keeps at least one key
    assert_close(attn(x, attn_mask=mask), _ref_self_attention(attn, x, mask[:, 0]), **TIGHT)


def test_cross_attention_other_length_and_width() -> None:
    attn = CrossAttention(32, 4, context_dim=20).double()
    assert attn.kv.in_features == 20
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    ctx = torch.randn(2, 11, 20, dtype=torch.float64)
    out = attn(x, ctx)
    assert out.shape == (2, 5, 32)
    assert_close(out, _ref_cross_attention(attn, x, ctx), **TIGHT)


def test_cross_attention_boolean_mask() -> None:
    attn = CrossAttention(16, 4).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    ctx = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, :4] = True  # only the first 4 context tokens are visible
    out = attn(x, ctx, attn_mask=mask)
    assert_close(out, _ref_cross_attention(attn, x, ctx, mask), **TIGHT)
    assert_close(out, attn(x, ctx[:, :4]), **TIGHT)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SelfAttention(10, 4),
        lambda: CrossAttention(10, 3),
        lambda: SelfAttentionBlock(12, 5),
        lambda: CrossAttentionBlock(12, 5),
        lambda: Transformer(20, 2, 6),
        lambda: SelfAttention(8, 0),
    ],
)
def test_width_not_divisible_by_heads(make) -> None:
    with pytest.raises(ValueError, match="multiple of num_heads"):
        make()


# ------------------------------------------------------------------ blocks
def test_self_attention_block_matches_reference() -> None:
    block = SelfAttentionBlock(32, 4, mlp_ratio=2.0).double()
    _randomise_norms(block)
    assert block.mlp.fc1.out_features == 64
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    for m in (None, mask):
        h = x + _ref_self_attention(block.attn, _ref_layer_norm(x, block.norm1), m)
        ref = h + _ref_mlp(block.mlp, _ref_layer_norm(h, block.norm2))
        assert_close(block(x, attn_mask=m), ref, **TIGHT)


@pytest.mark.parametrize("self_attention", [False, True])
def test_cross_attention_block_matches_reference(self_attention: bool) -> None:
    block = CrossAttentionBlock(32, 4, self_attention=self_attention, context_dim=24).double()
    _randomise_norms(block)
    assert (block.self_attn is not None) == self_attention
    assert (block.norm_self is not None) == self_attention
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    ctx = torch.randn(2, 8, 24, dtype=torch.float64)
    h = x + _ref_cross_attention(
        block.cross_attn, _ref_layer_norm(x, block.norm_q), _ref_layer_norm(ctx, block.norm_context)
    )
    if self_attention:
        h = h + _ref_self_attention(block.self_attn, _ref_layer_norm(h, block.norm_self))
    ref = h + _ref_mlp(block.mlp, _ref_layer_norm(h, block.norm2))
    assert_close(block(x, ctx), ref, **TIGHT)


def test_cross_attention_block_without_self_attention_has_no_extra_params() -> None:
    plain = sum(p.numel() for p in CrossAttentionBlock(16, 2).parameters())
    with_sa = sum(p.numel() for p in CrossAttentionBlock(16, 2, self_attention=True).parameters())
    assert with_sa - plain == (16 * 48 + 48) + (16 * 16 + 16) + 2 * 16  # qkv + proj + LayerNorm


# ------------------------------------------------------------------ transformer
def test_transformer_returns_requested_layers_in_order() -> None:
    model = Transformer(16, 4, 2).double()
    _randomise_norms(model)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    expected, h = [], x
    for block in model.blocks:
        h = block(h, attn_mask=mask)
        expected.append(h)
    out, taps = model(x, attn_mask=mask, return_layers=(3, 1, 4))
    assert_close(out, expected[-1], **TIGHT)
    assert len(taps) == 3
    for tap, layer in zip(taps, (3, 1, 4), strict=True):
        assert_close(tap, expected[layer - 1], **TIGHT)
    out2, none = model(x, attn_mask=mask)
    assert none == []
    assert_close(out2, out, **TIGHT)


def test_transformer_repeated_layer_is_returned_twice() -> None:
    model = Transformer(16, 3, 2)
    x = torch.randn(1, 4, 16)
    _, taps = model(x, return_layers=(2, 2))
    assert all(isinstance(t, torch.Tensor) for t in taps)


@pytest.mark.parametrize("layer", [0, 4])
def test_transformer_out_of_range_layer_raises(layer: int) -> None:
    model = Transformer(16, 3, 2)
    with pytest.raises(ValueError):
        model(torch.randn(1, 4, 16), return_layers=(layer,))


# ------------------------------------------------------------------ embeddings and heads
def test_patch_tokens_class_token_first() -> None:
    tokens = PatchTokens(image_size=16, patch_size=4, dim=8)
    init_weights(tokens)
    images = torch.rand(2, 3, 16, 16)
    out = tokens(images)
    assert out.shape == (2, 1 + 16, 8)
    assert_close(out[:, 0], (tokens.class_token + tokens.pos_embed[0]).expand(2, -1))
    # Patch (row 1, col 2) is the conv applied to that 4x4 window.
    patch = images[:, :, 4:8, 8:12]
    conv = tokens.patch_embed.proj
    expected = (patch.flatten(1) @ conv.weight.flatten(1).t()) + conv.bias + tokens.pos_embed[1 + 1 * 4 + 2]
    assert_close(out[:, 1 + 1 * 4 + 2], expected, rtol=1e-5, atol=1e-6)


def _manual_unpatchify(patches: torch.Tensor, grid: int, p: int, channels: int) -> torch.Tensor:
    """(B, G*G, p*p*C) -> (B, C, G*p, G*p), MAE's layout: per patch, row-major pixels, channels last."""
    b = patches.shape[0]
    image = torch.zeros(b, channels, grid * p, grid * p, dtype=patches.dtype)
    for gh in range(grid):
        for gw in range(grid):
            for ph in range(p):
                for pw in range(p):
                    for c in range(channels):
                        image[:, c, gh * p + ph, gw * p + pw] = patches[:, gh * grid + gw, (ph * p + pw) * channels + c]
    return image


def test_pixel_head_unpatchify_layout() -> None:
    grid, p = 3, 2
    head = PixelHead(dim=p * p * 3, patch_size=p, grid_size=grid).double()
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(p * p * 3))
        head.proj.bias.zero_()
        head.conv.weight.zero_()
        head.conv.weight[[0, 1, 2], [0, 1, 2], 1, 1] = 1.0  # identity 3x3 conv
        head.conv.bias.zero_()
    x = torch.randn(2, grid * grid, p * p * 3, dtype=torch.float64)
    out = head(x)
    assert out.shape == (2, 3, grid * p, grid * p)
    assert_close(out, _manual_unpatchify(x, grid, p, 3), **TIGHT)
    # A single non-zero token only lights up its own p x p block (row 1, col 2).
    only = torch.zeros_like(x)
    only[:, 1 * grid + 2] = 1.0
    lit = head(only)[0].abs().sum(dim=0) > 0
    expected = torch.zeros(grid * p, grid * p, dtype=torch.bool)
    expected[1 * p : 2 * p, 2 * p : 3 * p] = True
    assert torch.equal(lit, expected)


def test_pixel_head_applies_proj_and_conv() -> None:
    grid, p = 4, 2
    head = PixelHead(dim=10, patch_size=p, grid_size=grid).double()
    x = torch.randn(2, grid * grid, 10, dtype=torch.float64)
    image = _manual_unpatchify(_linear(x, head.proj), grid, p, 3)
    expected = F.conv2d(image, head.conv.weight, head.conv.bias, padding=1)
    assert_close(head(x), expected, **TIGHT)


# ------------------------------------------------------------------ init
class _Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(256, 512)
        self.conv = nn.Conv2d(8, 64, kernel_size=3)
        self.norm = nn.LayerNorm(64)
        self.embedding = nn.Embedding(50, 400)
        self.tokens = nn.Parameter(torch.full((600, 256), 7.0))
        self.levels = nn.Parameter(torch.full((5,), 3.0))


def test_init_weights_rules() -> None:
    zoo = _Zoo()
    with torch.no_grad():
        for p in zoo.parameters():
            p.fill_(3.0)  # make sure every rule actually writes
    init_weights(zoo)
    for layer in (zoo.linear, zoo.conv):
        # LeCun: normal with std fan_in ** -0.5, truncated at two standard deviations
        std = layer.weight[0].numel() ** -0.5
        assert layer.weight.abs().max().item() <= 2 * std
        assert layer.weight.std().item() == pytest.approx(0.88 * std, rel=0.05)  # std of N(0,1) cut at +-2
        assert layer.weight.mean().abs().item() < 0.05 * std
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.equal(zoo.norm.weight, torch.ones(64))
    assert torch.equal(zoo.norm.bias, torch.zeros(64))
    bound = 1.0 / 50
    assert zoo.embedding.weight.abs().max().item() <= bound
    assert zoo.embedding.weight.abs().max().item() > 0.95 * bound  # spread over the range, not a constant
    assert zoo.tokens.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert torch.count_nonzero(zoo.levels) == 0


def test_init_weights_on_a_tokenizer() -> None:
    # the random rules (the tiny preset's recipe replaces some of them: test_convergence_switches.py)
    model = mstok.create_tokenizer(
        "mstok_tiny", aggregation="weighted_add", position_embedding="learned", latent_init="random"
    )
    d = model.config.width
    enc = model.encoder
    assert torch.count_nonzero(enc.memory.level_logits) == 0
    assert enc.query_tokens.std().item() == pytest.approx(d**-0.5, rel=0.15)
    assert enc.patch_tokens.pos_embed.std().item() == pytest.approx(d**-0.5, rel=0.15)
    conv = model.decoder.head.conv.weight  # (3, 3, 3, 3): fan_in 27
    assert 0 < conv.abs().max().item() <= 2 * 27**-0.5
    assert model.quantizer.embedding.weight.abs().max().item() <= 1.0 / model.config.codebook_size
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
        if isinstance(module, nn.Linear):
            assert torch.count_nonzero(module.bias) == 0, name
            assert module.weight.abs().max().item() <= 2 * module.in_features**-0.5, name


def test_truncated_normal_init_has_the_right_distribution():
    from mstok.layers.init import trunc_normal_

    torch.manual_seed(0)
    x = trunc_normal_(torch.empty(400_000), std=0.5)
    assert x.abs().max() <= 1.0 and x.abs().max() > 0.99
    # a N(0, 1) truncated at +-2 has variance 1 - 4 phi(2) / (2 Phi(2) - 1) = 0.7737
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    expected_std = 0.5 * math.sqrt(1 - 4 * phi2 / math.erf(2 / math.sqrt(2)))
    assert x.std().item() == pytest.approx(expected_std, rel=5e-3) and abs(x.mean().item()) < 3e-3
