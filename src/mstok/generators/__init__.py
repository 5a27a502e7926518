"""Generators over 1D tokens: MaskGIT over token ids, DiT over continuous latents and BitMAR
over the bits of BSQ ids, their samplers, and one registry for the three families.

Models only: loading a saved generator of any family is :func:`mstok.load_generator`
(:mod:`mstok.persistence`).
"""

import warnings
from typing import Any

from mstok.generators.bitmar import BITMAR_PRESETS, BitMAR, BitMARConfig
from mstok.generators.bitmar_sampling import BitSamplingConfig, sample_bits
from mstok.generators.dit import DIT_PRESETS, DiT, DiTConfig, create_dit, dit_config
from mstok.generators.dit_sampling import DiTSamplingConfig, sample_latents
from mstok.generators.maskgit import GeneratorConfig, MaskGITGenerator
from mstok.generators.maskgit_sampling import SamplingConfig, guided_logits, sample, token_lengths
from mstok.generators.registry import (
    FAMILIES,
    GENERATOR_PRESETS,
    GeneratorFamily,
    TokenSpace,
    check_tokenizer,
    create_generator,
    family_of,
    generator_config,
    preset_family,
)
from mstok.generators.sampling import generate_images
from mstok.generators.schedules import MASK_SCHEDULES, guidance_weight, mask_ratio, masked_counts

__all__ = [
    "BITMAR_PRESETS",
    "DIT_PRESETS",
    "FAMILIES",
    "GENERATOR_PRESETS",
    "MASK_SCHEDULES",
    "BitMAR",
    "BitMARConfig",
    "BitSamplingConfig",
    "DiT",
    "DiTConfig",
    "DiTSamplingConfig",
    "GeneratorConfig",
    "GeneratorFamily",
    "MaskGITGenerator",
    "SamplingConfig",
    "TokenSpace",
    "check_tokenizer",
    "create_dit",
    "create_generator",
    "dit_config",
    "family_of",
    "generate_images",
    "generator_config",
    "guidance_weight",
    "guided_logits",
    "mask_ratio",
    "masked_counts",
    "preset_family",
    "sample",
    "sample_bits",
    "sample_latents",
    "token_lengths",
]


# names that moved up to mstok.persistence (the model layer may not import it); they still resolve here
_MOVED = {"load_generator": "mstok.persistence"}


def __getattr__(name: str) -> Any:
    """Deprecation shim: a name in ``_MOVED`` resolves from its new home, with a DeprecationWarning."""
    if name in _MOVED:
        from mstok import persistence  # deprecation shim: the one allowed upward import

        warnings.warn(f"{__name__}.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(persistence, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
