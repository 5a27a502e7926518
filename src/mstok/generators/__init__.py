"""Generators over 1D tokens: MaskGIT over token ids and DiT over continuous latents, their
samplers, and one registry for both families."""

from mstok.generators.dit import DIT_PRESETS, DiT, DiTConfig, create_dit, dit_config
from mstok.generators.dit_sampling import DiTSamplingConfig, sample_latents
from mstok.generators.maskgit import GeneratorConfig, MaskGITGenerator
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
from mstok.generators.sampling import SamplingConfig, generate_images, guided_logits, sample
from mstok.generators.schedules import MASK_SCHEDULES, guidance_weight, mask_ratio, masked_counts

__all__ = [
    "DIT_PRESETS",
    "FAMILIES",
    "GENERATOR_PRESETS",
    "MASK_SCHEDULES",
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
    "sample_latents",
]
