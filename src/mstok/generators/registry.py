"""Named generator presets, and the functions that create and load generators.

Sizes follow the papers: ``maskgit_vit`` is MaskGIT-ViT (width 768, 24 layers, 16 heads,
~177M parameters with TiTok's K and V), ``maskgit_uvit`` the U-ViT variant for the 64-step
setting, and ``maskgit_bert`` the post-LN layout of the official TiTok generators (what
``mstok convert titok-generator`` produces). The tiny presets are for CPU tests and demos.
K, V and the class count are overridden from the tokens a generator is trained on.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from mstok.generators.maskgit import GeneratorConfig, MaskGITGenerator
from mstok.saved import read_saved_config, split_saved_config
from mstok.weights import locate_model

_VIT = {"width": 768, "depth": 24, "num_heads": 16}
_TINY = {"width": 128, "depth": 4, "num_heads": 4, "num_tokens": 32, "codebook_size": 1024, "num_classes": 200}

GENERATOR_PRESETS: dict[str, dict[str, Any]] = {
    "maskgit_vit": dict(_VIT),
    "maskgit_uvit": {**_VIT, "architecture": "uvit", "qkv_bias": False},
    "maskgit_bert": {**_VIT, "norm_first": False, "embed_norm": True, "norm_eps": 1e-12},
    "maskgit_tiny": {**_TINY, "dropout": 0.0},
    "maskgit_tiny_uvit": {**_TINY, "dropout": 0.0, "architecture": "uvit", "qkv_bias": False},
}


def generator_config(name: str, **overrides: Any) -> GeneratorConfig:
    """The config of generator preset ``name`` with ``overrides`` applied (unknown names/fields raise)."""
    if not isinstance(name, str):
        raise TypeError(
            f"generator_config(name=...): name must be a generator preset name (a string, e.g. 'maskgit_tiny'), "
            f"got {name!r} ({type(name).__name__})"
        )
    if name not in GENERATOR_PRESETS:
        close = difflib.get_close_matches(name, GENERATOR_PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown generator preset {name!r}{hint}; available: {', '.join(GENERATOR_PRESETS)}")
    return GeneratorConfig.from_dict({**GENERATOR_PRESETS[name], **overrides})


def create_generator(name: str, **overrides: Any) -> MaskGITGenerator:
    """A freshly initialised generator, e.g. ``create_generator("maskgit_vit", num_tokens=32)``."""
    return MaskGITGenerator(generator_config(name, **overrides))


def load_generator(path: str | Path, weights: str | None = None) -> MaskGITGenerator:
    """Load a generator saved by ``save_pretrained``, a training checkpoint or a run folder, by the
    same rule as :func:`mstok.load_tokenizer` (:func:`mstok.weights.locate_model`: a run's newest
    checkpoint; the EMA weights when present, else ``model.safetensors``).

    Official TiTok generators load too, converted on the fly (:mod:`mstok.convert.generator`):
    a Hugging Face hub id such as ``"yucornetto/generator_titok_l32_imagenet"`` (a string that
    is not a local path; downloaded into the hub cache), or a folder holding such a release.

    Args:
        path: a model, checkpoint or run folder, a weights file in a model folder, or a hub id.
        weights: ``None`` (EMA when present, else model), ``"ema"``, ``"model"``, or a file name in the folder.
    """
    if isinstance(path, str) and not Path(path).exists():
        from mstok.convert.hub import is_hub_id  # lazy: only hub ids and official folders need the converter

        if is_hub_id(path):
            from mstok.convert.generator import load_generator_from_hub

            return load_generator_from_hub(path)
    path, weights = locate_model(path, weights, "generator")
    meta = read_saved_config(path, "generator")
    if isinstance(meta, dict) and "family" not in meta:
        from mstok.convert.generator import is_official_generator_config, load_official_generator

        if is_official_generator_config(meta):
            return load_official_generator(path)
    family, fields = split_saved_config(meta, path, "generator")
    if family != GeneratorConfig.family:
        raise ValueError(f"{path} holds a {family!r} model, not a generator (load it with mstok.load_tokenizer)")
    try:
        config = GeneratorConfig.from_dict(fields)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path / 'config.json'}: {err}") from err
    model = MaskGITGenerator(config)
    model.load_weights(path / weights)
    return model.eval()
