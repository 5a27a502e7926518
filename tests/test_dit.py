"""The DiT denoiser and its adaLN-Zero layers: shapes, the zero start, the modulation math
against a hand-written block, timestep and label embeddings, positions, save/load, sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mstok.generators import GeneratorConfig, MaskGITGenerator
from mstok.generators.dit import DiT, DiTConfig, create_dit, dit_config, multiscale_positions
from mstok.layers import AdaLNZeroBlock, FinalLayer, LabelEmbedding, TimestepEmbedding, init_weights
from mstok.layers.adaln import zero_init
from mstok.layers.embeddings import sincos_2d, sincos_at

SMALL = {"num_tokens": 8, "token_dim": 3, "num_classes": 3, "width": 32, "depth": 2, "num_heads": 2}


def small(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(DiTConfig(**{**SMALL, **kw}))


def inputs(model: DiT, b: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = model.config
    x = torch.randn(b, cfg.num_tokens, cfg.token_dim)
    t = torch.rand(b) * 1000
    y = torch.arange(b) % (cfg.num_classes + 1)  # every label, the null label included
    return x, t, y


@torch.no_grad()
def perturb_zero_starts(model: nn.Module, std: float = 0.1) -> None:
    """Give every zero-started layer random weights, so each path carries signal."""
    for module in model.modules():
        if getattr(module, "zero_init", False):
            for param in module.parameters():
                param.normal_(std=std)


# ----------------------------------------------------------------- shapes and the zero start
@pytest.mark.parametrize(
    ("k", "c", "extra"),
    [
        (8, 3, {}),
        (1, 16, {"position_embedding": "sincos"}),
        (21, 4, {"position_embedding": "multiscale", "scales": (1, 2, 4)}),
        (5, 1, {"qk_norm": True}),
    ],
)
def test_forward_shapes(k: int, c: int, extra: dict) -> None:
    model = small(num_tokens=k, token_dim=c, **extra)
    perturb_zero_starts(model)
    x, t, y = inputs(model, b=3)
    out = model(x, t, y)
    assert out.shape == (3, k, c) and out.dtype == torch.float32
    assert out.abs().sum() > 0


def test_init_starts_every_block_as_the_identity_and_the_output_at_zero() -> None:
    model = small(position_embedding="multiscale", num_tokens=5, scales=(1, 2))
    x, t, y = inputs(model)
    c = torch.randn(4, 32)
    h = torch.randn(4, 5, 32)
    for block in model.blocks:
        assert isinstance(block, AdaLNZeroBlock)
        assert torch.equal(block(h, c), h)
    out = model(x, t, y)
    assert torch.equal(out, torch.zeros_like(out))


def test_zero_init_rule_zeroes_only_flagged_modules_and_wins_over_other_rules() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), zero_init(nn.Linear(8, 8)), zero_init(nn.Sequential(nn.Linear(8, 4))))
    for param in net.parameters():
        nn.init.ones_(param)
    init_weights(net)
    assert torch.count_nonzero(net[0].weight) == 64  # the LeCun rule
    for layer in (net[1], net[2][0]):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


def test_every_trainable_parameter_gets_a_gradient() -> None:
    model = small(num_tokens=5, position_embedding="multiscale", scales=(1, 2), qk_norm=True)
    perturb_zero_starts(model)
    x, t, y = inputs(model)
    (model(x, t, y) * torch.randn(4, 5, 3)).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, _ in trainable} >= {"x_embed", "t_embed", "y_embed", "scale_embed", "blocks"}
    missing = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# ----------------------------------------------------------------- the adaLN-Zero math
def attention_reference(attn: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    d = x.shape[-1] // heads
    outs = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        outs.append(torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), -1) @ v[..., s])
    return attn.proj(torch.cat(outs, -1))


def test_block_modulation_matches_a_plain_reference() -> None:
    torch.manual_seed(0)
    block = AdaLNZeroBlock(16, 2).double()
    init_weights(block)
    perturb_zero_starts(block, std=0.3)
    x, c = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    lin = block.modulation[1]
    mod = (c * torch.sigmoid(c)) @ lin.weight.T + lin.bias  # SiLU then Linear, (B, 6D)
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, None, i * 16 : (i + 1) * 16] for i in range(6))

    def norm(z: torch.Tensor) -> torch.Tensor:  # LayerNorm without affine parameters
        mean, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + 1e-6)

    h = x + gate1 * attention_reference(block.attn, norm(x) * (1 + scale1) + shift1, heads=2)
    mlp_in = norm(h) * (1 + scale2) + shift2
    expected = h + gate2 * block.mlp.fc2(F.gelu(block.mlp.fc1(mlp_in)))
    torch.testing.assert_close(block(x, c), expected, rtol=1e-12, atol=1e-12)


def test_final_layer_matches_a_plain_reference() -> None:
    torch.manual_seed(0)
    final = FinalLayer(16, 3).double()
    init_weights(final)
    x, c = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    assert torch.equal(final(x, c), torch.zeros(2, 5, 3, dtype=torch.float64))
    perturb_zero_starts(final, std=0.3)
    shift, scale = F.linear(F.silu(c), final.modulation[1].weight, final.modulation[1].bias)[:, None].chunk(2, -1)
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    expected = (normed * (1 + scale) + shift) @ final.proj.weight.T + final.proj.bias
    torch.testing.assert_close(final(x, c), expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- time and label embeddings
def test_timestep_frequencies_match_a_hand_computation() -> None:
    torch.manual_seed(0)
    embed = TimestepEmbedding(32, frequency_dim=8)
    init_weights(embed)
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    expected = torch.tensor(
        [
            [math.cos(v * 10000 ** (-i / 4)) for i in range(4)] + [math.sin(v * 10000 ** (-i / 4)) for i in range(4)]
            for v in t.tolist()
        ]
    )
    freqs = embed.frequencies(t)
    torch.testing.assert_close(freqs, expected, rtol=0, atol=2e-4)  # float32 angles up to 999 rad
    torch.testing.assert_close(embed(t), embed.mlp(freqs))
    assert embed(t).shape == (4, 32)
    with pytest.raises(ValueError, match="even"):
        TimestepEmbedding(32, frequency_dim=7)


def test_label_dropout_rate_determinism_and_eval_identity() -> None:
    embed = LabelEmbedding(num_classes=10, dim=8, dropout=0.3)
    labels = torch.arange(20_000) % 10
    dropped = embed.drop(labels, generator=torch.Generator().manual_seed(1))
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.3) < 0.02  # binomial std ~0.003
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])  # kept labels unchanged
    again = embed.drop(labels, generator=torch.Generator().manual_seed(1))
    other = embed.drop(labels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(dropped, again) and not torch.equal(dropped, other)
    embed.eval()
    assert torch.equal(embed.drop(labels), labels)
    mask = torch.zeros(20_000, dtype=torch.bool)
    mask[::3] = True  # an explicit mask applies in eval mode too, exactly
    assert torch.equal(embed.drop(labels, mask), torch.where(mask, 10, labels))
    init_weights(embed)
    torch.testing.assert_close(embed(torch.tensor([2, 10])), embed.table[[2, 10]])
    with pytest.raises(ValueError, match="drop_mask must be a bool tensor"):
        embed.drop(labels, mask[:5])


def test_label_gain_scales_the_rows_and_their_updates() -> None:
    """gain g: the output is g times the table's rows, and under Adam a step moves it g times as far as
    without the gain (the point of the gain: class rows that learn as fast as the shared layers)."""
    moved = {}
    for gain in (1.0, 8.0):
        torch.manual_seed(0)
        embed = LabelEmbedding(num_classes=10, dim=8, gain=gain)
        init_weights(embed)
        labels = torch.tensor([1, 1, 4])
        torch.testing.assert_close(embed(labels), gain * embed.table[labels])
        before = embed(labels).detach()
        optimizer = torch.optim.Adam(embed.parameters(), lr=1e-2)
        (embed(labels) * torch.arange(8.0)).sum().backward()
        optimizer.step()
        moved[gain] = (embed(labels).detach() - before).abs().sum().item()
    assert moved[8.0] == pytest.approx(8 * moved[1.0], rel=1e-4)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="gain must be > 0"):
            LabelEmbedding(10, 8, gain=bad)
    assert small(label_gain=4.0).y_embed.gain == 4.0


def test_dit_label_dropout_uses_the_null_label() -> None:
    model = small(class_dropout=0.5)
    perturb_zero_starts(model)
    x, t, y = inputs(model)
    null = torch.full_like(y, model.config.null_class)
    everything = torch.ones(4, dtype=torch.bool)
    model.eval()
    torch.testing.assert_close(model(x, t, y, drop_mask=everything), model(x, t, null), rtol=0, atol=0)
    assert not torch.equal(model(x, t, y), model(x, t, null))
    model.train()
    first = model(x, t, y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x, t, y, generator=torch.Generator().manual_seed(3)), first, rtol=0, atol=0)


# ----------------------------------------------------------------- positions
def test_sincos_positions_are_the_1d_table() -> None:
    model = small(num_tokens=6, position_embedding="sincos")
    expected = torch.tensor(
        [
            [math.cos(k * 10000 ** (-i / 16)) for i in range(16)]
            + [math.sin(k * 10000 ** (-i / 16)) for i in range(16)]
            for k in range(6)
        ]
    )
    torch.testing.assert_close(model.positions(), expected, rtol=0, atol=1e-6)
    assert "pos_embed" not in dict(model.named_parameters())


def test_multiscale_positions_are_sincos_of_the_cell_centres() -> None:
    scales, dim = (1, 2, 4), 16
    table = multiscale_positions(scales, dim)
    assert table.shape == (21, dim)
    start = 0
    for s in scales:
        # cell (i, j) of an s x s grid: centre ((i + 0.5) / s, (j + 0.5) / s) of the unit frame,
        # in units of the finest (4 x 4) grid's cells with its first cell centred at 0
        centres = [((i + 0.5) / s * 4 - 0.5, (j + 0.5) / s * 4 - 0.5) for i in range(s) for j in range(s)]
        expected = sincos_at(torch.tensor(centres, dtype=torch.float64), dim)
        torch.testing.assert_close(table[start : start + s * s], expected, rtol=0, atol=1e-6)
        start += s * s
    torch.testing.assert_close(table[5:], sincos_2d(4, dim))  # the finest grid: the usual 2-D table
    assert torch.allclose(table[0], sincos_at(torch.tensor([[1.5, 1.5]]), dim)[0])  # the image centre

    model = small(num_tokens=21, width=16, position_embedding="multiscale", scales=scales)
    ids = torch.tensor([0] + [1] * 4 + [2] * 16)
    torch.testing.assert_close(model.positions(), table + model.scale_embed[ids], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"hold 21 tokens .* num_tokens is 20"):
        DiTConfig(**{**SMALL, "num_tokens": 20, "position_embedding": "multiscale", "scales": (1, 2, 4)})
    with pytest.raises(ValueError, match="needs scales"):
        DiTConfig(**{**SMALL, "position_embedding": "multiscale"})
    with pytest.raises(ValueError, match="only apply to position_embedding 'multiscale'"):
        DiTConfig(**{**SMALL, "num_tokens": 5, "scales": (1, 2)})
    with pytest.raises(ValueError, match="divisible by 4"):
        DiTConfig(
            **{
                **SMALL,
                "width": 30,
                "num_heads": 3,
                "num_tokens": 5,
                "position_embedding": "multiscale",
                "scales": (1, 2),
            }
        )


def test_caller_position_table() -> None:
    table = torch.randn(8, 32)
    model = DiT(DiTConfig(**SMALL, position_embedding="table"), positions=table)
    assert torch.equal(model.positions(), table)
    with pytest.raises(ValueError, match="exactly when position_embedding is 'table'"):
        DiT(DiTConfig(**SMALL, position_embedding="table"))
    with pytest.raises(ValueError, match="exactly when position_embedding is 'table'"):
        DiT(DiTConfig(**SMALL), positions=table)
    with pytest.raises(ValueError, match=r"shape \(num_tokens, width\) = \(8, 32\), got \(7, 32\)"):
        DiT(DiTConfig(**SMALL, position_embedding="table"), positions=table[:7])


# ----------------------------------------------------------------- save/load, sizes, errors
@pytest.mark.parametrize("kind", ["learned", "multiscale", "table"])
def test_save_load_round_trip(tmp_path, kind: str) -> None:
    extra = {"num_tokens": 5, "scales": (1, 2)} if kind == "multiscale" else {}
    positions = torch.randn(8, 32) if kind == "table" else None
    torch.manual_seed(0)
    model = DiT(DiTConfig(**{**SMALL, **extra, "position_embedding": kind}), positions=positions)
    perturb_zero_starts(model)
    model.save_pretrained(tmp_path / "dit")
    loaded = DiT.from_pretrained(tmp_path / "dit")
    assert loaded.config == model.config and not loaded.training
    x, t, y = inputs(model)
    torch.testing.assert_close(loaded(x, t, y), model.eval()(x, t, y), rtol=0, atol=0)
    MaskGITGenerator(GeneratorConfig(width=32, depth=1, num_heads=2, num_tokens=4, codebook_size=8)).save_pretrained(
        tmp_path / "maskgit"
    )
    with pytest.raises(ValueError, match="not a DiT"):
        DiT.from_pretrained(tmp_path / "maskgit")


def test_presets_match_the_papers_sizes() -> None:
    sizes = {"dit_b": 130, "dit_l": 458, "dit_xl": 675}  # DiT-B/2, L/2, XL/2 (Peebles & Xie, table 1)
    for name, millions in sizes.items():
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = create_dit(name, num_tokens=256, token_dim=4)
        total = model.parameter_counts()["total"]
        assert abs(total / 1e6 - millions) / millions < 0.01, (name, total)
    assert dit_config("dit_xl").width == 1152 and dit_config("dit_tiny", num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match="unknown DiT preset 'dit_xll' \\(did you mean dit_xl"):
        create_dit("dit_xll")
    with pytest.raises(TypeError, match="preset name"):
        dit_config(3)


def test_bad_configs_and_inputs_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="width 32 is not a multiple of num_heads 3"):
        DiTConfig(**{**SMALL, "num_heads": 3})
    with pytest.raises(ValueError, match="position_embedding must be a DiT position embedding, one of"):
        DiTConfig(**SMALL, position_embedding="rope")
    with pytest.raises(ValueError, match="class_dropout"):
        DiTConfig(**SMALL, class_dropout=1.5)
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        dit_config("dit_tiny", patch_size=2)
    model = small()
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match=r"x must be float tokens of shape \(B, 8, 3\)"):
        model(x[:, :7], t, y)
    with pytest.raises(ValueError, match=r"x must be float tokens"):
        model(x.long(), t, y)
    with pytest.raises(ValueError, match=r"t must be a real tensor of shape \(4,\)"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match="y must be integer class ids"):
        model(x, t, y.float())
    with pytest.raises(TypeError, match=r"t must be a torch\.Tensor, got float"):
        model(x, 500.0, y)
