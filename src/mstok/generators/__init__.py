"""Generators over 1D tokens: the MaskGIT transformer, its schedules and its sampler."""

from mstok.generators.maskgit import GeneratorConfig, MaskGITGenerator
from mstok.generators.registry import GENERATOR_PRESETS, create_generator, generator_config, load_generator
from mstok.generators.sampling import SamplingConfig, generate_images, guided_logits, sample
from mstok.generators.schedules import MASK_SCHEDULES, guidance_weight, mask_ratio, masked_counts

__all__ = [
    "GENERATOR_PRESETS",
    "MASK_SCHEDULES",
    "GeneratorConfig",
    "MaskGITGenerator",
    "SamplingConfig",
    "create_generator",
    "generate_images",
    "generator_config",
    "guidance_weight",
    "guided_logits",
    "load_generator",
    "mask_ratio",
    "masked_counts",
    "sample",
]
