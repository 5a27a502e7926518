"""Generators over 1D tokens: MaskGIT over token ids, DiT over continuous latents and BitMAR
over the bits of BSQ ids, their samplers, and one registry for the three families."""

from mstok.generators.bitmar import BITMAR_PRESETS, BitMAR, BitMARConfig
from mstok.generators.bitmar_sampling import BitSamplingConfig, sample_bits
from mstok.generators.dit import DIT_PRESETS, DiT, DiTConfig, create_dit, dit_config
from mstok.generators.dit_sampling import DiTSamplingConfig, sample_latents
from mstok.generators.maskgit import GeneratorConfig, MaskGITGenerator
from mstok.generators.maskgit_sampling import SamplingConfig, guided_logits, sample
from mstok.generators.registry import (
    FAMILIES,
    GENERATOR_PRESETS,
    GeneratorFamily,
    TokenSpace,
    check_tokenizer,
    create_generator,
    family_of,
    generator_config,
    load_generator,
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
    "load_generator",
    "mask_ratio",
    "masked_counts",
    "preset_family",
    "sample",
    "sample_bits",
    "sample_latents",
]
