"""Rotary position embeddings and the dual-stream (MMDiT) layers: RoPE against a hand
rotation, its relative-position and norm properties, joint attention and joint blocks against
plain float64 references, the adaLN-Zero identity start, gradients, and input errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mstok.layers import (
    Grid2D,
    JointAttention,
    JointBlock,
    JointTransformer,
    Line1D,
    NoRotation,
    RotaryTables,
    SelfAttention,
    apply_rope,
    init_weights,
)
from mstok.layers.rope import rope_1d, rope_2d

TIGHT = {"rtol": 1e-10, "atol": 1e-10}
F64 = torch.float64


# ------------------------------------------------------------------------ hand references
def _rotate_by_hand(v: list[float], angles: list[float]) -> list[float]:
    """Rotate pair i = (v[2i], v[2i+1]) of one vector by angles[i], one pair at a time."""
    out = []
    for i, a in enumerate(angles):
        x0, x1 = v[2 * i], v[2 * i + 1]
        out += [x0 * math.cos(a) - x1 * math.sin(a), x0 * math.sin(a) + x1 * math.cos(a)]
    return out


def _angles_1d(pos: int, d: int, theta: float) -> list[float]:
    return [pos * theta ** (-2 * i / d) for i in range(d // 2)]


def _angles_2d(row: int, col: int, d: int, theta: float) -> list[float]:
    """First d/4 pairs: a 1-D RoPE of width d/2 over the row; last d/4: over the column."""
    return _angles_1d(row, d // 2, theta) + _angles_1d(col, d // 2, theta)


def _rotate_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as complex multiplication: pair (x[2i], x[2i+1]) is x[2i] + i x[2i+1]."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)


def _linear(x: torch.Tensor, layer: nn.Linear, rows: slice = slice(None)) -> torch.Tensor:
    out = x @ layer.weight[rows].t()
    return out if layer.bias is None else out + layer.bias[rows]


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return y if norm.weight is None else y * norm.weight + norm.bias


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = _linear(x, mlp.fc1)
    return _linear(0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0))), mlp.fc2)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, dim = t.shape
    return t.reshape(b, n, heads, dim // heads).transpose(1, 2)  # (B, H, N, d)


def _stream_qkv(attn: SelfAttention, x: torch.Tensor) -> list[torch.Tensor]:
    dim = x.shape[-1]
    q, k, v = (_split_heads(_linear(x, attn.qkv, slice(i * dim, (i + 1) * dim)), attn.num_heads) for i in range(3))
    if isinstance(attn.qk_norm.q_norm, nn.LayerNorm):
        q, k = _layer_norm(q, attn.qk_norm.q_norm), _layer_norm(k, attn.qk_norm.k_norm)
    return [q, k, v]


def _softmax_attention(q, k, v, mask=None) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1) @ v


def _ref_joint(attn: JointAttention, x, z, rope=None, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate both streams' q, k, v, attend by hand, split, project per stream."""
    qx, kx, vx = _stream_qkv(attn.x_attn, x)
    qz, kz, vz = _stream_qkv(attn.z_attn, z)
    q, k, v = torch.cat([qx, qz], 2), torch.cat([kx, kz], 2), torch.cat([vx, vz], 2)
    if rope is not None:
        q, k = _rotate_complex(q, *rope), _rotate_complex(k, *rope)
    out = _softmax_attention(q, k, v, mask).transpose(1, 2).flatten(2)  # (B, L, D)
    n = x.shape[1]
    return _linear(out[:, :n], attn.x_attn.proj), _linear(out[:, n:], attn.z_attn.proj)


def _perturb_zero_starts(model: nn.Module, std: float = 0.1) -> None:
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "zero_init", False):
                for param in module.parameters():
                    param.normal_(0.0, std)


def _randomise_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


# ------------------------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("theta", [10000.0, 100.0])
def test_rope_1d_matches_a_hand_rotation(theta: float) -> None:
    d, n, start = 8, 6, 3
    x = torch.randn(1, 1, n, d, dtype=torch.float64)
    for cos, sin, first in (
        (*rope_1d(n, d, theta, dtype=F64), 0),
        (*rope_1d(n, d, theta, start=start, dtype=F64), start),
        (*RotaryTables(d, [Line1D(n, start=start)], theta, dtype=F64)(n), start),
    ):
        out = apply_rope(x, cos, sin)
        for p in range(n):
            expected = _rotate_by_hand(x[0, 0, p].tolist(), _angles_1d(first + p, d, theta))
            assert_close(out[0, 0, p], torch.tensor(expected, dtype=torch.float64), **TIGHT)


def test_rope_2d_matches_a_hand_rotation_at_every_grid_position() -> None:
    d, h, w, theta = 8, 3, 4, 10000.0
    x = torch.randn(2, 3, h * w, d, dtype=torch.float64)
    out = apply_rope(x, *rope_2d(h, w, d, theta, dtype=F64))
    for r in range(h):
        for c in range(w):
            expected = _rotate_by_hand(x[1, 2, r * w + c].tolist(), _angles_2d(r, c, d, theta))
            assert_close(out[1, 2, r * w + c], torch.tensor(expected, dtype=torch.float64), **TIGHT)


def test_rope_logits_depend_only_on_the_offset() -> None:
    d = 8
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    # 1-D: the same q and k at every position; logit (m, n) must be a function of m - n
    n = 7
    cos, sin = rope_1d(n, d, dtype=F64)
    qs, ks = apply_rope(q.expand(n, d), cos, sin), apply_rope(k.expand(n, d), cos, sin)
    logits = qs @ ks.T  # (N, N)
    assert_close(logits[1:, 1:], logits[:-1, :-1], **TIGHT)
    assert not torch.allclose(logits[0, 1], logits[0, 2])  # offsets are told apart
    # 2-D: logit ((r, c), (r', c')) must be a function of (r - r', c - c')
    h, w = 3, 4
    cos, sin = rope_2d(h, w, d, dtype=F64)
    qs, ks = apply_rope(q.expand(h * w, d), cos, sin), apply_rope(k.expand(h * w, d), cos, sin)
    grid = (qs @ ks.T).reshape(h, w, h, w)
    assert_close(grid[1:, 1:, 1:, 1:], grid[:-1, :-1, :-1, :-1], **TIGHT)
    assert_close(grid[1:, :, 1:, :], grid[:-1, :, :-1, :], **TIGHT)  # a shift of rows alone
    assert not torch.allclose(grid[0, 0, 1, 0], grid[0, 0, 0, 1])  # rows and columns differ


def test_rope_preserves_norms_and_no_rotation_is_the_identity() -> None:
    d = 16
    tables = RotaryTables(d, [Grid2D(3, 5), Line1D(4), NoRotation(2)], dtype=F64)
    x = torch.randn(2, 4, 21, d, dtype=torch.float64)
    out = apply_rope(x, *tables(15, 4, 2))
    assert_close(out.norm(dim=-1), x.norm(dim=-1), **TIGHT)
    assert not torch.allclose(out[:, :, :19], x[:, :, :19])
    assert torch.equal(out[:, :, 19:], x[:, :, 19:])  # cos 1, sin 0 exactly


def test_rotary_tables_concatenate_segments_and_stay_out_of_state_dicts() -> None:
    d = 8
    tables = RotaryTables(d, [Grid2D(2, 3), Line1D(4)], theta=500.0)
    cos2, sin2 = rope_2d(2, 3, d, 500.0)
    cos1, sin1 = rope_1d(4, d, 500.0)
    cos, sin = tables(6, 4)
    assert cos.shape == (10, d // 2) and cos.dtype == torch.float32
    assert torch.equal(cos, torch.cat([cos2, cos1])) and torch.equal(sin, torch.cat([sin2, sin1]))
    assert tables.lengths == (6, 4)
    assert dict(tables.state_dict()) == {}
    assert tables.double()(6, 4)[0].dtype == torch.float64  # buffers follow the module


def test_apply_rope_in_half_precision_rounds_once() -> None:
    x = torch.randn(2, 2, 6, 8)
    cos, sin = rope_1d(6, 8)
    out = apply_rope(x.bfloat16(), cos, sin)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), apply_rope(x.bfloat16().float(), cos, sin), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------- SelfAttention
def test_self_attention_with_rope_matches_a_hand_reference_and_none_is_unchanged() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, qk_norm=True).double()
    init_weights(attn)
    _randomise_norms(attn)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert torch.equal(attn(x, rope=None), attn(x))
    d = 8
    angles = torch.tensor([_angles_1d(p, d, 10000.0) for p in range(5)], dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    q, k, v = _stream_qkv(attn, x)
    out = _softmax_attention(_rotate_complex(q, cos, sin), _rotate_complex(k, cos, sin), v)
    expected = _linear(out.transpose(1, 2).flatten(2), attn.proj)
    assert_close(attn(x, rope=(cos, sin)), expected, **TIGHT)
    assert not torch.allclose(attn(x, rope=(cos, sin)), attn(x))


# -------------------------------------------------------------------------- joint attention
@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_joint_attention_matches_a_concatenated_reference(use_rope: bool, mask: str | None, qk_norm: bool) -> None:
    torch.manual_seed(0)
    h, w, k_tokens, dim, heads = 2, 3, 4, 16, 2
    attn = JointAttention(dim, heads, qk_norm=qk_norm).double()
    init_weights(attn)
    _randomise_norms(attn)
    x = torch.randn(2, h * w, dim, dtype=torch.float64)
    z = torch.randn(2, k_tokens, dim, dtype=torch.float64)
    tables = RotaryTables(dim // heads, [Grid2D(h, w), Line1D(k_tokens)], dtype=F64)
    rope = tables(h * w, k_tokens) if use_rope else None
    length = h * w + k_tokens
    attn_mask = None
    if mask == "bool":
        attn_mask = (torch.rand(2, 1, length, length) < 0.6) | torch.eye(length, dtype=torch.bool)
    elif mask == "float":
        attn_mask = torch.randn(length, length, dtype=torch.float64)
    out_x, out_z = attn(x, z, rope=rope, attn_mask=attn_mask)
    ref_x, ref_z = _ref_joint(attn, x, z, rope, attn_mask)
    assert out_x.shape == x.shape and out_z.shape == z.shape
    assert_close(out_x, ref_x, **TIGHT)
    assert_close(out_z, ref_z, **TIGHT)


def test_joint_attention_mixes_the_streams() -> None:
    attn = JointAttention(16, 2)
    init_weights(attn)
    x, z = torch.randn(1, 6, 16), torch.randn(1, 3, 16)
    assert not torch.allclose(attn(x, z)[0], attn(x, z + 1.0)[0])  # x reads z
    # with z unable to see x, z's output is self-attention over z alone
    block_z = torch.ones(9, 9, dtype=torch.bool)
    block_z[6:, :6] = False
    assert_close(attn(x, z, attn_mask=block_z)[1], attn.z_attn(z), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ joint blocks
def test_joint_block_matches_a_plain_reference() -> None:
    torch.manual_seed(0)
    dim, heads = 16, 2
    block = JointBlock(dim, heads, mlp_ratio=2.0, modulate_x=True).double()
    init_weights(block)
    _perturb_zero_starts(block, std=0.3)
    _randomise_norms(block)
    x, z = torch.randn(2, 6, dim, dtype=torch.float64), torch.randn(2, 3, dim, dtype=torch.float64)
    c = torch.randn(2, dim, dtype=torch.float64)
    rope = RotaryTables(dim // heads, [Grid2D(2, 3), Line1D(3)], dtype=F64)(6, 3)
    lin = block.x_stream.modulation[1]
    mod = (c * torch.sigmoid(c)) @ lin.weight.T + lin.bias  # SiLU then Linear, (B, 6D)
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, None, i * dim : (i + 1) * dim] for i in range(6))
    xs, zs = block.x_stream, block.z_stream
    attn_x, attn_z = _ref_joint(
        block.attn, _layer_norm(x, xs.norm1) * (1 + scale1) + shift1, _layer_norm(z, zs.norm1), rope
    )
    x1 = x + gate1 * attn_x
    x2 = x1 + gate2 * _mlp(xs.mlp, _layer_norm(x1, xs.norm2) * (1 + scale2) + shift2)
    z1 = z + attn_z
    z2 = z1 + _mlp(zs.mlp, _layer_norm(z1, zs.norm2))
    out_x, out_z = block(x, z, c, rope=rope)
    assert_close(out_x, x2, **TIGHT)
    assert_close(out_z, z2, **TIGHT)


@pytest.mark.parametrize(("modulate_x", "modulate_z"), [(True, False), (False, True), (True, True)])
def test_modulated_streams_start_as_the_identity(modulate_x: bool, modulate_z: bool) -> None:
    model = JointTransformer(16, 2, 2, modulate_x=modulate_x, modulate_z=modulate_z)
    init_weights(model)
    x, z, c = torch.randn(2, 6, 16), torch.randn(2, 3, 16), torch.randn(2, 16)
    rope = RotaryTables(model.head_dim, [Grid2D(2, 3), Line1D(3)])(6, 3)
    out_x, out_z = model(x, z, c, rope=rope)
    assert torch.equal(out_x, x) == modulate_x  # exactly the identity, and only where modulated
    assert torch.equal(out_z, z) == modulate_z
    for block in model.blocks:
        for stream, modulated in ((block.x_stream, modulate_x), (block.z_stream, modulate_z)):
            assert (stream.modulation is not None) == modulated
            assert stream.norm1.weight is None if modulated else stream.norm1.weight is not None


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = JointTransformer(16, 2, 2, qk_norm=True, modulate_x=True)
    init_weights(model)
    _perturb_zero_starts(model)
    x, z, c = torch.randn(2, 6, 16), torch.randn(2, 3, 16), torch.randn(2, 16)
    rope = RotaryTables(model.head_dim, [Grid2D(2, 3), Line1D(3)])(6, 3)
    out_x, out_z = model(x, z, c, rope=rope)
    ((out_x * torch.randn_like(out_x)).sum() + (out_z * torch.randn_like(out_z)).sum()).backward()
    params = dict(model.named_parameters())
    assert any("modulation" in n for n in params) and any("q_norm" in n for n in params)
    missing = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize(("n", "k"), [(16, 4), (6, 1), (1, 8)])
def test_joint_transformer_shapes(n: int, k: int) -> None:
    model = JointTransformer(32, 3, 4, mlp_ratio=2.0, modulate_x=True)
    init_weights(model)
    assert model.head_dim == 8 and len(model.blocks) == 3
    out_x, out_z = model(torch.randn(3, n, 32), torch.randn(3, k, 32), torch.randn(3, 32))
    assert out_x.shape == (3, n, 32) and out_z.shape == (3, k, 32)


def test_init_rules_reach_the_stream_attentions() -> None:
    model = JointBlock(16, 2, modulate_x=True)
    model.attn.x_attn.mimetic_init = True
    init_weights(model)
    qkv = model.attn.x_attn.qkv.weight
    assert torch.equal(qkv[:16], qkv[16:32])  # the mimetic rule applies per stream
    assert not torch.equal(model.attn.z_attn.qkv.weight[:16], model.attn.z_attn.qkv.weight[16:32])
    assert torch.count_nonzero(model.x_stream.modulation[1].weight) == 0


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="width 30 must be a positive multiple of num_heads 4"):
        JointAttention(30, 4)
    with pytest.raises(ValueError, match="width 30 must be a positive multiple of num_heads 4"):
        JointTransformer(30, 2, 4)
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        JointTransformer(16, 0, 2)
    with pytest.raises(ValueError, match="RoPE needs a head dim that is a positive multiple of 2, got 7"):
        RotaryTables(7, [Line1D(3)])
    with pytest.raises(ValueError, match="2-D RoPE needs a head dim that is a positive multiple of 4, got 6"):
        RotaryTables(6, [Grid2D(2, 2)])
    with pytest.raises(ValueError, match="x needs an even last dim"):
        apply_rope(torch.randn(1, 1, 3, 7), torch.ones(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="Grid2D height must be an integer >= 1"):
        Grid2D(0, 3)
    with pytest.raises(TypeError, match="RoPE segments must be"):
        RotaryTables(8, [(2, 3)])
    with pytest.raises(ValueError, match="RoPE base theta must be > 1"):
        RotaryTables(8, [Line1D(3)], theta=1.0)

    tables = RotaryTables(8, [Grid2D(2, 3), Line1D(4)])
    with pytest.raises(ValueError, match=r"segment lengths \(6, 4\), but the sequence has streams of lengths \(5, 4\)"):
        tables(5, 4)
    with pytest.raises(ValueError, match=r"segment lengths \(6, 4\)"):
        tables(7, 3)  # right total, wrong split between the streams

    block = JointBlock(16, 2, modulate_x=True)
    x, z, c = torch.randn(2, 5, 16), torch.randn(2, 4, 16), torch.randn(2, 16)
    with pytest.raises(ValueError, match=r"RoPE tables of shape \(10, 4\) do not fit"):
        block(x, z, c, rope=tables(6, 4))  # a 2x3 grid's tables on a 5-token x stream
    with pytest.raises(ValueError, match="a modulated stream needs a condition c"):
        block(x, z)
    with pytest.raises(ValueError, match=r"condition c must have shape \(2, 16\)"):
        block(x, z, c[:, :8])
    with pytest.raises(ValueError, match="neither stream is modulated"):
        JointBlock(16, 2)(x, z, c)
    with pytest.raises(ValueError, match=r"stream z must have shape \(B, tokens, 16\)"):
        block(x, torch.randn(2, 4, 8), c)
    with pytest.raises(ValueError, match="one batch size"):
        block(x, z[:1], c)
    with pytest.raises(ValueError, match=r"attn_mask must be broadcastable to \(B, H, 9, 9\)"):
        block(x, z, c, attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_joint_attention_is_deterministic_and_batch_independent() -> None:
    attn = JointAttention(16, 2)
    init_weights(attn)
    x, z = torch.randn(3, 6, 16), torch.randn(3, 2, 16)
    full = attn(x, z)
    single = attn(x[1:2], z[1:2])
    assert torch.equal(full[0], attn(x, z)[0])
    assert_close(full[0][1:2], single[0], rtol=1e-5, atol=1e-6)
    assert_close(full[1][1:2], single[1], rtol=1e-5, atol=1e-6)
