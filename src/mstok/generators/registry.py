"""Named generator presets of every family, and the functions that create generators (loading a
saved one of any family is :func:`mstok.load_generator`, :mod:`mstok.persistence.loading`).

Three families share one registry: MaskGIT (:mod:`mstok.generators.maskgit`), a masked-token
transformer over the ids of a discrete tokenizer, DiT (:mod:`mstok.generators.dit`), a
diffusion transformer over the latents of a continuous one, and BitMAR
(:mod:`mstok.generators.bitmar`), SemTok's random-order masked generator over the bits of
BSQ ids (codebooks of 2^18 or 2^32 codes). A :class:`GeneratorFamily`
record holds what the shared code (trainer, sampler, CLI) needs of a family, so none of it
asks which family it holds; a saved generator's ``config.json`` names its family.

MaskGIT sizes follow the papers: ``maskgit_vit`` is MaskGIT-ViT (width 768, 24 layers, 16
heads, ~177M parameters with TiTok's K and V), ``maskgit_uvit`` the U-ViT variant for the
64-step setting, and ``maskgit_bert`` the post-LN layout of the official TiTok generators
(what ``mstok convert titok-generator`` produces). The DiT presets are the DiT paper's
(``dit_b``, ``dit_l``, ``dit_xl``), the BitMAR presets SemTok's (``bitmar_l``, ``bitmar_xl``,
``bitmar_xxl``). The tiny presets are for CPU tests and demos. K, V (or C)
and the class count are overridden from the tokens a generator is trained on.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mstok.config_schema import ConfigDict
from mstok.generators.bitmar import BITMAR_PRESETS, BitMAR, BitMARConfig
from mstok.generators.bitmar_sampling import BitSamplingConfig, sample_bits
from mstok.generators.dit import DIT_PRESETS, DiT, DiTConfig
from mstok.generators.dit_sampling import DiTSamplingConfig, sample_latents
from mstok.generators.maskgit import GeneratorConfig, MaskGITGenerator
from mstok.generators.maskgit_sampling import SamplingConfig, sample

_VIT = {"width": 768, "depth": 24, "num_heads": 16}
_TINY = {"width": 128, "depth": 4, "num_heads": 4, "num_tokens": 32, "codebook_size": 1024, "num_classes": 200}

MASKGIT_PRESETS: dict[str, dict[str, Any]] = {
    "maskgit_vit": dict(_VIT),
    "maskgit_uvit": {**_VIT, "architecture": "uvit", "qkv_bias": False},
    "maskgit_bert": {**_VIT, "norm_first": False, "embed_norm": True, "norm_eps": 1e-12},
    "maskgit_tiny": {**_TINY, "dropout": 0.0},
    "maskgit_tiny_uvit": {**_TINY, "dropout": 0.0, "architecture": "uvit", "qkv_bias": False},
}


@dataclass(frozen=True)
class TokenSpace:
    """What a generator models, a tokenizer produces or a token folder holds: K ids of a
    codebook of V codes, or K continuous latents of C channels."""

    continuous: bool
    num_tokens: int
    size: int  # V for ids, C for latents

    def __str__(self) -> str:
        if self.continuous:
            return f"K={self.num_tokens} continuous latents of C={self.size} channels"
        return f"K={self.num_tokens} token ids of V={self.size} codes"


@dataclass(frozen=True)
class GeneratorFamily:
    """What the shared generator code needs to know of one family.

    Attributes:
        name: the ``family`` its config records (and ``config.json`` holds).
        title: its name in messages.
        config_class, presets: its config dataclass and named presets.
        build: config -> a freshly initialised model.
        load: (saved-model folder, weights file name) -> the model in eval mode.
        continuous: it models float latents (B, K, C) rather than ids (B, K).
        size_field: the config field of V (ids) or C (latents); K is ``num_tokens``.
        sampling_class: its sampling settings.
        sample: ``(model, labels (B,), settings, generator=...) -> (B, K) ids or (B, K, C) latents``.
        layout: config -> a few words on the architecture (``mstok presets``).
    """

    name: str
    title: str
    config_class: type[ConfigDict]
    presets: dict[str, dict[str, Any]]
    build: Callable[[Any], nn.Module]
    load: Callable[[Path, str], nn.Module]
    continuous: bool
    size_field: str
    sampling_class: type[ConfigDict]
    sample: Callable[..., torch.Tensor]
    layout: Callable[[Any], str]

    def tokens(self, config: Any) -> TokenSpace:
        """The tokens a model of this family with ``config`` models."""
        return TokenSpace(self.continuous, config.num_tokens, getattr(config, self.size_field))


FAMILIES: dict[str, GeneratorFamily] = {
    family.name: family
    for family in (
        GeneratorFamily(
            name=GeneratorConfig.family,
            title="MaskGIT",
            config_class=GeneratorConfig,
            presets=MASKGIT_PRESETS,
            build=MaskGITGenerator,
            load=MaskGITGenerator.from_pretrained,
            continuous=False,
            size_field="codebook_size",
            sampling_class=SamplingConfig,
            sample=sample,
            layout=lambda c: f"{c.architecture}, {'pre' if c.norm_first else 'post'}-LN",
        ),
        GeneratorFamily(
            name=DiTConfig.family,
            title="DiT",
            config_class=DiTConfig,
            presets=DIT_PRESETS,
            build=DiT,
            load=DiT.from_pretrained,
            continuous=True,
            size_field="token_dim",
            sampling_class=DiTSamplingConfig,
            sample=sample_latents,
            layout=lambda c: f"DiT adaLN-Zero, {c.position_embedding} positions",
        ),
        GeneratorFamily(
            name=BitMARConfig.family,
            title="BitMAR",
            config_class=BitMARConfig,
            presets=BITMAR_PRESETS,
            build=BitMAR,
            load=BitMAR.from_pretrained,
            continuous=False,
            size_field="codebook_size",
            sampling_class=BitSamplingConfig,
            sample=sample_bits,
            layout=lambda c: f"bitwise MAR, RoPE, {'bit' if c.group_bits == 1 else f'{c.group_bits}-bit group'} head",
        ),
    )
}
GENERATOR_PRESETS: dict[str, dict[str, Any]] = {name: p for f in FAMILIES.values() for name, p in f.presets.items()}
_PRESET_FAMILY = {name: family for family in FAMILIES.values() for name in family.presets}


def preset_family(name: str) -> GeneratorFamily:
    """The family of generator preset ``name`` (unknown names raise, with close matches)."""
    if not isinstance(name, str):
        raise TypeError(
            f"generator_config(name=...): name must be a generator preset name (a string, e.g. 'maskgit_tiny'), "
            f"got {name!r} ({type(name).__name__})"
        )
    if name not in _PRESET_FAMILY:
        close = difflib.get_close_matches(name, GENERATOR_PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown generator preset {name!r}{hint}; available: {', '.join(GENERATOR_PRESETS)}")
    return _PRESET_FAMILY[name]


def family_of(model: Any) -> GeneratorFamily:
    """The family of a generator (or of a generator config), from its config's ``family``."""
    config = getattr(model, "config", model)
    family = FAMILIES.get(getattr(config, "family", None))
    if family is None:
        raise TypeError(f"{type(model).__name__} is not an mstok generator (families: {', '.join(FAMILIES)})")
    return family


def tokenizer_tokens(tokenizer: nn.Module) -> TokenSpace:
    """The tokens a tokenizer produces: ids, or latents for a continuous bottleneck."""
    cfg = tokenizer.config
    if tokenizer.vocab_size is None:
        return TokenSpace(True, cfg.num_latent_tokens, cfg.code_dim)
    return TokenSpace(False, cfg.num_latent_tokens, tokenizer.vocab_size)


def check_tokenizer(generator: nn.Module, tokenizer: nn.Module) -> None:
    """ValueError unless ``tokenizer`` decodes the tokens ``generator`` models (same kind, K, V or C)."""
    model, made = family_of(generator).tokens(generator.config), tokenizer_tokens(tokenizer)
    if model != made:
        raise ValueError(
            f"the generator models {model} but the tokenizer has {made}: use the tokenizer its tokens came from"
        )
    if getattr(generator.config, "end_token", False) and not getattr(tokenizer.config, "nested", False):
        raise ValueError(
            "the generator samples ragged tokens (an end token) but the tokenizer has no nested tokens, so it cannot "
            "decode a prefix: use the nested tokenizer its tokens came from"
        )


def generator_config(name: str, **overrides: Any) -> ConfigDict:
    """The config of generator preset ``name`` (any family) with ``overrides`` applied (unknown
    names/fields raise)."""
    family = preset_family(name)
    return family.config_class.from_dict({**family.presets[name], **overrides})


def create_generator(name: str, **overrides: Any) -> nn.Module:
    """A freshly initialised generator of any family, e.g. ``create_generator("maskgit_vit",
    num_tokens=32)`` or ``create_generator("dit_xl", num_tokens=256, token_dim=16)``."""
    return preset_family(name).build(generator_config(name, **overrides))


# names that moved up to mstok.persistence.loading (the model layer may not import it); they still resolve here
_MOVED = {"load_generator": "mstok.persistence.loading"}


def __getattr__(name: str) -> Any:
    """Deprecation shim: a name in ``_MOVED`` resolves from its new home, with a DeprecationWarning."""
    if name in _MOVED:
        from mstok.persistence import loading  # deprecation shim: the one allowed upward import

        warnings.warn(f"{__name__}.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
