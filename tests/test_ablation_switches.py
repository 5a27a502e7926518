"""MsTok's ablation switches change the computation, and the presets tap the papers' layers.

``scale_embedding = false`` and ``qam_self_attention = false`` must remove exactly their
parameters and change the outputs for otherwise identical weights; the multi-scale memory must
be built from the outputs of exactly the ``memory_layers`` blocks (checked by hooking every
encoder block), and the B / L presets must use the MsTok paper's layers (appendix B:
{3, 6, 9, 12} for B, {6, 12, 18, 24} for L).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mstok.tokenizers import create_tokenizer, preset_config
from mstok.tokenizers.registry import MEMORY_LAYERS, SIZES


def _pair(**ablation) -> tuple[torch.nn.Module, torch.nn.Module, set[str]]:
    """(default mstok_tiny, ablated mstok_tiny holding the same weights, keys only the default has)."""
    torch.manual_seed(0)
    full = create_tokenizer("mstok_tiny").eval()
    ablated = create_tokenizer("mstok_tiny", **ablation).eval()
    state = full.state_dict()
    result = ablated.load_state_dict(state, strict=False)
    assert result.missing_keys == []  # the ablated model has no parameter of its own
    return full, ablated, set(result.unexpected_keys)


def _images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_scale_embedding_off_removes_the_embedding_and_changes_the_latents() -> None:
    full, ablated, extra = _pair(scale_embedding=False)
    assert extra == {"encoder.memory.scale_embed"}
    assert ablated.encoder.memory.scale_embed is None
    with torch.no_grad():
        full.encoder.memory.scale_embed.normal_(0, 0.5)  # distinct per level
        images = _images()
        assert not torch.allclose(full.encoder(images), ablated.encoder(images), atol=1e-4)
        # ... and that embedding is the only difference: zeroed, the two encoders agree.
        full.encoder.memory.scale_embed.zero_()
        torch.testing.assert_close(full.encoder(images), ablated.encoder(images), rtol=0, atol=1e-6)


def _qam_keys(model: torch.nn.Module) -> set[str]:
    return {k for k in model.state_dict() if ".qam." in k and (".self_attn." in k or ".norm_self." in k)}


def test_qam_self_attention_off_removes_it_in_both_qams_and_changes_the_output() -> None:
    full, ablated, extra = _pair(qam_self_attention=False)
    assert extra == _qam_keys(full) and extra
    assert {k.split(".")[0] for k in extra} == {"encoder", "decoder"}
    assert not _qam_keys(ablated)
    images = _images()
    with torch.no_grad():
        assert not torch.allclose(full.encoder(images), ablated.encoder(images), atol=1e-4)
        codes = torch.randn(2, 32, full.config.code_dim, generator=torch.Generator().manual_seed(2))
        assert not torch.allclose(full.decoder(codes), ablated.decoder(codes), atol=1e-4)
        # With the self-attention's output projection zeroed, the default computes the ablation.
        for name, param in full.named_parameters():
            if ".qam." in name and ".self_attn.proj." in name:
                param.zero_()
        torch.testing.assert_close(full.encoder(images), ablated.encoder(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(full.decoder(codes), ablated.decoder(codes), rtol=0, atol=1e-6)


@pytest.mark.parametrize("self_attention", [True, False])
def test_queries_only_interact_through_qam_self_attention(self_attention: bool) -> None:
    """Without self-attention each latent depends on its own query only; with it, on the others too."""
    torch.manual_seed(0)
    model = create_tokenizer("mstok_tiny", qam_self_attention=self_attention).eval()
    images = _images(1)
    with torch.no_grad():
        before = model.encoder(images)
        # a random change (a constant shift would vanish in the LayerNorms)
        model.encoder.query_tokens[0] += torch.randn(128, generator=torch.Generator().manual_seed(3))
        after = model.encoder(images)
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-2
    others = (before[:, 1:] - after[:, 1:]).abs().max()
    assert others > 1e-3 if self_attention else others < 1e-6


def _block_outputs(encoder: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(memory the encoder builds, outputs of every transformer block, 1-based order, class token dropped)."""
    outputs: list[torch.Tensor] = []
    hooks = [
        block.register_forward_hook(lambda _m, _i, out: outputs.append(out[:, 1:].clone()))
        for block in encoder.transformer.blocks
    ]
    try:
        with torch.no_grad():
            memory = encoder.build_memory(images)
    finally:
        for hook in hooks:
            hook.remove()
    return memory, outputs


def _expected_memory(encoder: torch.nn.Module, outputs: list[torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
    mem = encoder.memory
    levels = []
    for j, layer in enumerate(layers):
        norm = mem.norms[j]
        level = F.layer_norm(outputs[layer - 1], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        levels.append(level + (mem.scale_embed[j] if mem.scale_embed is not None else 0))
    return torch.cat(levels, dim=1)  # (B, m*P, D): level-major, as the paper concatenates


@pytest.mark.parametrize(("preset", "size"), [("mstok_b64", "B"), ("mstok_l32", "L")])
def test_presets_tap_the_papers_layers(preset: str, size: str) -> None:
    paper = {"B": (3, 6, 9, 12), "L": (6, 12, 18, 24)}[size]  # MsTok appendix B / Table 4
    config = preset_config(preset)
    assert config.memory_layers == paper and config.depth == len(paper) * paper[0]
    assert (config.width, config.depth, config.num_heads) == tuple(SIZES[size].values())
    assert config.scale_embedding and config.qam_self_attention and config.aggregation == "concat"
    # The same depth and taps at a toy width: hook all blocks and rebuild the memory by hand.
    torch.manual_seed(0)
    model = create_tokenizer(preset, width=32, num_heads=2, image_size=32, patch_size=16, num_latent_tokens=4)
    assert model.config.memory_layers == paper and model.config.depth == config.depth
    with torch.no_grad():
        model.encoder.memory.scale_embed.normal_()
    memory, outputs = _block_outputs(model.encoder.eval(), _images(1)[:, :, :32, :32])
    assert len(outputs) == config.depth and memory.shape == (1, len(paper) * 4, 32)
    torch.testing.assert_close(memory, _expected_memory(model.encoder, outputs, paper), rtol=0, atol=1e-6)
    # Any other choice of layers gives another memory (so a preset ignoring its taps would fail).
    shifted = (*(layer - 1 for layer in paper[:-1]), paper[-1])
    assert not torch.allclose(memory, _expected_memory(model.encoder, outputs, shifted), atol=1e-3)


def test_memory_layer_table_is_quarter_depth() -> None:
    # B and L are the paper's; S (not in the paper, no MsTok-S preset) follows the same quarter-depth rule.
    for size, layers in MEMORY_LAYERS.items():
        depth = SIZES[size]["depth"]
        assert layers == tuple(depth * q // 4 for q in (1, 2, 3, 4)), size
    assert MEMORY_LAYERS["B"] == (3, 6, 9, 12) and MEMORY_LAYERS["L"] == (6, 12, 18, 24)


@pytest.mark.parametrize("layers", [(1, 2, 3, 4), (2, 4), (4,)])
def test_tiny_memory_follows_its_layers(layers: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = create_tokenizer("mstok_tiny", memory_layers=layers).eval()
    with torch.no_grad():
        model.encoder.memory.scale_embed.normal_()
    memory, outputs = _block_outputs(model.encoder, _images(1))
    assert memory.shape == (1, len(layers) * 64, 128)
    torch.testing.assert_close(memory, _expected_memory(model.encoder, outputs, layers), rtol=0, atol=1e-6)
