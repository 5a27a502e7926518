"""Named presets, the model size table, and the functions that create tokenizers (loading a saved
one is :func:`mstok.load_tokenizer`, :mod:`mstok.persistence.loading`)."""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any

from mstok.quantizers.registry import implied_code_dim
from mstok.tokenizers.base import Tokenizer, TokenizerConfig
from mstok.tokenizers.convae import ConvAE
from mstok.tokenizers.hieratok import HieraTok
from mstok.tokenizers.mstok import MsTok
from mstok.tokenizers.semtok import SemTok
from mstok.tokenizers.titok import TiTok
from mstok.tokenizers.vqgan import MaskGITVQGAN, VQGANConfig

# The proxy VQGAN is not a Tokenizer subclass (its keys follow the official file) but has the same API.
AnyTokenizer = Tokenizer | MaskGITVQGAN
FAMILIES: dict[str, type[AnyTokenizer]] = {
    "titok": TiTok,
    "mstok": MsTok,
    "convae": ConvAE,
    "hieratok": HieraTok,
    "semtok": SemTok,
    "maskgit_vqgan": MaskGITVQGAN,
}

# ViT sizes used by TiTok and MsTok (MLP ratio 4, pre-LN).
SIZES: dict[str, dict[str, int]] = {
    "S": {"width": 512, "depth": 8, "num_heads": 8},
    "B": {"width": 768, "depth": 12, "num_heads": 12},
    "L": {"width": 1024, "depth": 24, "num_heads": 16},
}
# Memory taps at each quarter of the encoder depth (MsTok paper, appendix B).
MEMORY_LAYERS = {"S": (2, 4, 6, 8), "B": (3, 6, 9, 12), "L": (6, 12, 18, 24)}

# Small models for tests and CPU demos: 64x64 images, patch 8 (P = 64), K = 32. They carry
# the convergence recipe of benchmarks/convergence.py (RESULTS.md, "Convergence of the tiny
# tokenizers"): without it they sit on the mean-image plateau for hundreds of steps. The
# full-size presets keep the papers' layout and initialisation.
TINY_RECIPE: dict[str, Any] = {
    "position_embedding": "sincos",
    "latent_init": "grid",
    "attention_init": "mimetic",
    "qk_norm": True,
}
_TINY = {
    "image_size": 64,
    "patch_size": 8,
    "width": 128,
    "depth": 4,
    "num_heads": 4,
    "num_latent_tokens": 32,
    "codebook_size": 1024,
    **TINY_RECIPE,
}
# The proxy VQGAN for CPU tests: 64x64 images, f8, so its 8x8 code grid matches the tiny
# presets' patch grid; widths 16..64 keep a batch-32 train step around 0.2 s on 2 cores.
_VQGAN_TINY = {
    "image_size": 64,
    "channels": 16,
    "channel_mult": (1, 1, 2, 4),
    "num_res_blocks": 1,
    "z_channels": 32,
    "codebook_size": 1024,
    "norm_groups": 8,
}
# The conv-autoencoder calibration (tokenizers/convae.py) at the tiny presets' bottleneck size.
_CONVAE_TINY = {
    "image_size": 64,
    "patch_size": 8,
    "width": 64,
    "depth": 1,
    "num_heads": 1,
    "num_latent_tokens": 64,
    "code_dim": 6,
    "codebook_size": 32,
}

# HieraTok (paper Table 10, appendix C): a 6-block width-768 encoder and a Large decoder
# (24 x 1024, 16 heads), patch 16, a KL bottleneck of C channels per token. The pyramid sits
# after the bottleneck as in the paper (K = the 16x16 latent, 341 decoder tokens); f16d16 is
# the ablation setting (KL 1e-6), f16d32 the paper's only d32 row (KL 1e-5).
_HIERATOK = {
    "width": 768,
    "depth": 6,
    "num_heads": 12,
    "decoder_width": 1024,
    "decoder_depth": 24,
    "decoder_num_heads": 16,
    "pyramid": "decoder",
}
# Tiny HieraTok: the tiny presets' size with sin-cos positions and qk-norm. No grid start (it
# places query tokens; HieraTok has none) and no mimetic init (250 steps on tiny-imagenet: the
# same L1 with and without, 0.121). The pyramid is the bottleneck (K = 1+4+16+64 = 85 codes,
# coarse to fine), C = 6 as in convae_tiny.
_HIERATOK_TINY = {
    **{k: v for k, v in _TINY.items() if k not in ("num_latent_tokens", "latent_init", "attention_init")},
    "code_dim": 6,
    "scales": (1, 2, 4, 8),
}


# SemTok (paper Table 8, appendix A.1): an 8 x 768 MMDiT encoder (12 heads) and a 24 x 1536 decoder
# (24 heads, SD3.5-medium's size) over SD3.5's VAE latents (f = 8, 16 channels) in 2 x 2 patches:
# 256 px -> a 16 x 16 latent grid, K = 256 tokens, BSQ with 18 or 32 bits (lambda_q = 0.0025). The
# teacher width 768 is SigLIP-base/16 at 256 px (the paper names SigLIP without a size); qk-norm as in SD3.5.
_SEMTOK = {
    "image_size": 256,
    "latent_space": {"type": "vae"},
    "latent_channels": 16,
    "latent_downsample": 8,
    "patch_size": 2,
    "width": 768,
    "depth": 8,
    "num_heads": 12,
    "decoder_width": 1536,
    "decoder_depth": 24,
    "decoder_num_heads": 24,
    "num_latent_tokens": 256,
    "teacher_dim": 768,
    "qk_norm": True,
}
# Tiny SemTok for CPU runs: RGB as the latent space, 8 x 8 patches (an 8 x 8 grid), K = 32 tokens of
# 12 bits, a 4-block encoder (TiTok-tiny's depth) and a 4-block decoder of width 128, qk-norm; the
# tiny teacher's width (the shipped configs use the reference network's, 256).
# Stage I's flow is set for a decoder that must reconstruct (benchmarks/history/semtok.md, "SemTok
# that reconstructs: what the flow decoder needs"): the network predicts the clean patch (192 pixel
# values per patch > width 128), the MSE is measured on it (the velocity MSE weights small t by
# 1/t^2, where the noisy input already shows the image and the tokens are not needed), and t is
# shifted toward noise (s = 30: half the draws above t = 0.97), where only the tokens tell the
# image. Stage II's refiner starts from stage I's one-step decode (refine_input;
# benchmarks/history/semtok.md, "SemTok's refiner: where stage II starts and what the GAN costs").
_SEMTOK_TINY = {
    "image_size": 64,
    "latent_space": "pixels",
    "patch_size": 8,
    "width": 128,
    "depth": 4,
    "num_heads": 4,
    "decoder_depth": 4,
    "num_latent_tokens": 32,
    "code_dim": 12,
    "teacher_dim": 32,
    "qk_norm": True,
    "flow_prediction": "x0",
    "flow_loss": "x0",
    "time_shift": 30.0,
    "refine_input": "one_step",
}


def _sized(size: str, k: int, family: str) -> dict[str, Any]:
    fields: dict[str, Any] = {**SIZES[size], "num_latent_tokens": k}
    if family == "mstok":
        fields["memory_layers"] = MEMORY_LAYERS[size]
    return fields


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "titok_s128": ("titok", _sized("S", 128, "titok")),
    "titok_b64": ("titok", _sized("B", 64, "titok")),
    "titok_l32": ("titok", _sized("L", 32, "titok")),
    "mstok_l32": ("mstok", _sized("L", 32, "mstok")),
    "mstok_b64": ("mstok", _sized("B", 64, "mstok")),
    "mstok_b128": ("mstok", _sized("B", 128, "mstok")),
    "mstok_b256": ("mstok", _sized("B", 256, "mstok")),
    "titok_tiny": ("titok", dict(_TINY)),
    "mstok_tiny": ("mstok", {**_TINY, "memory_layers": (1, 2, 3, 4)}),
    # the conv-autoencoder calibration at the tiny presets' bottleneck: an 8x8 grid of 6 floats
    # (quantizer="none": 384 floats = 32 x 12) or of 5-bit codes (VQ, V = 32: 320 bits = 32 x log2 1024)
    "convae_tiny": ("convae", _CONVAE_TINY),
    # HieraTok: the single-scale baseline (one 16x16 scale) and the multi-scale models
    "hieratok_single_f16d16": ("hieratok", {**_HIERATOK, "scales": (16,)}),
    "hieratok_f16d16": ("hieratok", dict(_HIERATOK)),
    "hieratok_f16d32": ("hieratok", {**_HIERATOK, "code_dim": 32, "kl_weight": 1e-5}),
    "hieratok_tiny": ("hieratok", dict(_HIERATOK_TINY)),
    "hieratok_single_tiny": ("hieratok", {**_HIERATOK_TINY, "scales": (8,)}),
    # SemTok: 2^18 and 2^32 BSQ codes (Table 1), and the tiny CPU model
    "semtok_l_bsq18": ("semtok", dict(_SEMTOK)),
    "semtok_l_bsq32": ("semtok", {**_SEMTOK, "code_dim": 32}),
    "semtok_tiny": ("semtok", dict(_SEMTOK_TINY)),
    # the official MaskGIT-VQGAN (256px, f16, 1024 codes), the two-stage proxy
    "maskgit_vqgan_f16": ("maskgit_vqgan", {}),
    # 64px, f8: its 8x8 code grid matches the tiny presets' 8x8 patch grid
    "vqgan_tiny": ("maskgit_vqgan", _VQGAN_TINY),
}


def list_presets() -> list[str]:
    """Names of every preset, in registry order."""
    return list(PRESETS)


def _check_preset_name(name: Any, function: str) -> None:
    """A TypeError naming ``function``'s ``name`` argument when it is not a string."""
    if not isinstance(name, str):
        raise TypeError(
            f"{function}(name=...): name must be a preset name (a string, e.g. 'mstok_tiny'; see "
            f"mstok.list_presets()), got {name!r} ({type(name).__name__})"
        )


def preset_config(name: str, **overrides: Any) -> TokenizerConfig | VQGANConfig:
    """The config of preset ``name`` with ``overrides`` applied (unknown names/fields raise).

    A ``quantizer`` override whose settings fix the code dim (FSQ's ``levels``: one channel per
    level) sets ``code_dim`` too, unless ``code_dim`` is overridden as well (then the two must agree).
    """
    _check_preset_name(name, "preset_config")
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint}; available: {', '.join(PRESETS)}")
    family, fields = PRESETS[name]
    fields = {**fields, **overrides}
    implied = implied_code_dim(overrides.get("quantizer"))
    if implied is not None and "code_dim" not in overrides:
        fields["code_dim"] = implied
    return FAMILIES[family].config_class.from_dict(fields)


def build_tokenizer(config: TokenizerConfig | VQGANConfig) -> AnyTokenizer:
    """A freshly initialised tokenizer of the family ``config`` belongs to (the one place a config becomes a model)."""
    return FAMILIES[config.family](config)


def create_tokenizer(name: str, **overrides: Any) -> AnyTokenizer:
    """A freshly initialised tokenizer from a preset, e.g. ``create_tokenizer("mstok_b64", num_latent_tokens=128)``."""
    _check_preset_name(name, "create_tokenizer")
    return build_tokenizer(preset_config(name, **overrides))


def tokenizer_from_config(family: str, fields: dict[str, Any], source: str | Path = "") -> AnyTokenizer:
    """Build an untrained tokenizer of ``family`` from a dict of config fields; ``source`` (the
    file they come from) prefixes any error."""
    try:
        if family not in FAMILIES:
            raise ValueError(f"unknown tokenizer family {family!r}; known: {', '.join(FAMILIES)}")
        config = FAMILIES[family].config_class.from_dict(fields)
    except (ValueError, TypeError) as err:
        if not source:
            raise
        raise ValueError(f"{source}: {err}") from err
    return build_tokenizer(config)


# names that moved up to mstok.persistence.loading (the model layer may not import it); they still resolve here
_MOVED = {"load_tokenizer": "mstok.persistence.loading"}


def __getattr__(name: str) -> Any:
    """Deprecation shim: a name in ``_MOVED`` resolves from its new home, with a DeprecationWarning."""
    if name in _MOVED:
        from mstok.persistence import loading  # deprecation shim: the one allowed upward import

        warnings.warn(f"{__name__}.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
