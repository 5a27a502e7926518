"""Import the official TiTok generators (bytedance/1d-tokenizer) as :class:`MaskGITGenerator`.

A release is a state dict in the official key layout plus the official config (the hub
``config.json``, the OmegaConf dump that ``ImageBert.save_pretrained`` writes, with
``model.vq_model`` and ``model.generator``). :func:`generator_config_from_official` turns the
config into a :class:`GeneratorConfig`; :func:`convert_generator_state_dict` renames, stacks
and folds every tensor after checking the file key for key and shape for shape (the same
precise errors as the tokenizer converter, :func:`mstok.persistence.convert.titok.check_official_keys`).

The released generators (:data:`GENERATOR_RELEASES`, hub repos
``yucornetto/generator_<name>_imagenet``, files ``generator_<name>.bin`` in fun-research/TiTok),
as ``configs/infer/TiTok/<name>.yaml`` describes them; all model V = 4096 codes and 1000 classes:

==========  ==========  ==============  =====  =========  =====  ====  =====  ====================
release     class       mstok layout    D      depth      heads  MLP   K      official sampling
==========  ==========  ==============  =====  =========  =====  ====  =====  ====================
titok_l32   ImageBert   vit, post-LN    768    24         16     3072  32     8 steps, T 9.5,
                                                                                4.5 linear
titok_b64   ImageBert   vit, post-LN    768    24         16     3072  64     8 steps, T 11.0,
                                                                                3.0 linear
titok_s128  UViTBert    uvit, pre-LN    1024   20 (10 in  16     4096  128    64 steps, T 2.8,
                                               + mid + 10                       6.9 power-cosine
                                               out)
==========  ==========  ==============  =====  =========  =====  ====  =====  ====================

``ImageBert`` (``model_type: ViT``) is a Hugging Face ``BertModel`` (post-LN, LayerNorm eps
1e-12, an embedding LayerNorm) with an ``lm_head``: ``model.embeddings.word_embeddings`` ->
``token_embed``; ``model.embeddings.position_embeddings`` + ``model.embeddings.token_type_embeddings[0]``
-> ``pos_embed`` (ImageBert never passes token types, so BERT adds type 0's row at every
position: a constant that is folded into the position table; row 1 is never used and is
dropped); ``model.embeddings.LayerNorm`` -> ``embed_norm``; per layer ``attention.self.query``,
``.key``, ``.value`` -> ``attn.qkv`` (stacked q, k, v, each head-major like mstok's
``(three h d)`` split), ``attention.output.dense`` -> ``attn.proj``, ``attention.output.LayerNorm``
-> ``norm1``, ``intermediate.dense`` -> ``mlp.fc1``, ``output.dense`` -> ``mlp.fc2``,
``output.LayerNorm`` -> ``norm2``; ``model.lm_head`` -> ``head``. ``model.embeddings.position_ids``
and ``token_type_ids`` (an arange and zeros that older transformers versions saved) are ignored.

``UViTBert`` (``model_type: UViT``) is a pre-LN U-ViT without qkv bias (LayerNorm eps 1e-5):
``embeddings`` -> ``token_embed``; ``pos_embed`` (1, K+1, D) -> (K+1, D); ``in_blocks``,
``mid_block``, ``out_blocks`` keep their names, except ``out_blocks.i.skip_linear`` ->
``skips.i``; ``norm`` -> ``norm``; ``lm_head`` -> ``head``.

Sampling: the release's config gives the official sampler's settings (``randomize_temperature``,
``guidance_scale``, ``guidance_decay``, ``num_steps``); :func:`sampling_from_official` maps them
through :meth:`SamplingConfig.official_titok`, and a converted folder keeps them in
``sampling.json``, which ``mstok sample`` reads. The official FID script
(``sample_imagenet_titok.py``) also passes ``softmax_temperature_annealing=True`` (logits divided
by ``0.5 + 0.8 (1 - r)`` before the noise); the demo and the infer configs do not, so
``sampling.json`` leaves it off and ``mstok sample --softmax-annealing`` (``SamplingConfig.
softmax_annealing``) turns it on (``conversion.json`` records it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mstok.generators.maskgit import GeneratorConfig, MaskGITGenerator
from mstok.generators.maskgit_sampling import SamplingConfig
from mstok.persistence.convert.titok import (
    ConversionError,
    check_official_keys,
    is_official_titok_config,
    locate_release,
    release_key,
)
from mstok.persistence.hub import download, read_release_config
from mstok.storage.weights import load_torch_state_dict

SAMPLING_FILE = "sampling.json"
MODEL_TYPES = {"ViT": "ImageBert", "UViT": "UViTBert"}
# buffers (not parameters) that older transformers versions saved with a BertModel
IGNORED_BUFFERS = ("model.embeddings.position_ids", "model.embeddings.token_type_ids")
SAMPLING_KEYS = ("randomize_temperature", "guidance_scale", "guidance_decay")
OFFICIAL_GUIDANCE_POWER = 3.0  # ImageBert.generate's guidance_scale_pow default; no script changes it


def _release(
    model_type: str, hidden: int, layers: int, mlp: int, k: int, steps: int, temp: float, scale: float, decay: str
) -> dict[str, Any]:
    return {
        "model": {
            "vq_model": {"codebook_size": 4096, "num_latent_tokens": k},
            "generator": {
                "model_type": model_type,
                "hidden_size": hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": 16,
                "intermediate_size": mlp,
                "dropout": 0.1,
                "attn_drop": 0.1,
                "num_steps": steps,
                "class_label_dropout": 0.1,
                "image_seq_len": k,
                "condition_num_classes": 1000,
                "randomize_temperature": temp,
                "guidance_scale": scale,
                "guidance_decay": decay,
            },
        }
    }


# The ``model`` part of each release's official config (configs/infer/TiTok/<name>.yaml)
GENERATOR_RELEASES: dict[str, dict[str, Any]] = {
    "titok_l32": _release("ViT", 768, 24, 3072, 32, 8, 9.5, 4.5, "linear"),
    "titok_b64": _release("ViT", 768, 24, 3072, 64, 8, 11.0, 3.0, "linear"),
    "titok_s128": _release("UViT", 1024, 20, 4096, 128, 64, 2.8, 6.9, "power-cosine"),
}


def generator_release_key(name: str) -> str:
    """The :data:`GENERATOR_RELEASES` key a release is known by: ``yucornetto/generator_titok_l32_imagenet``,
    ``generator_titok_l32.bin`` (fun-research/TiTok) and ``titok_l32`` all give ``titok_l32``."""
    return release_key(name).removeprefix("generator_")


def generator_release_config(name: str) -> dict[str, Any]:
    """The official config of a released generator, by any name :func:`generator_release_key` knows."""
    key = generator_release_key(name)
    if key not in GENERATOR_RELEASES:
        raise ConversionError(
            f"unknown TiTok generator release {name!r}; known releases: {', '.join(GENERATOR_RELEASES)}"
        )
    return json.loads(json.dumps(GENERATOR_RELEASES[key]))  # a deep copy


def _unwrap(values: Any) -> Any:
    if isinstance(values, Mapping) and "model" not in values and isinstance(values.get("config"), Mapping):
        return values["config"]  # a hub-mixin dump may nest it
    return values


def is_official_generator_config(values: Any) -> bool:
    """Whether a parsed config.json looks like an official TiTok generator one (``model.generator``)."""
    values = _unwrap(values)
    model = values.get("model") if isinstance(values, Mapping) else None
    return isinstance(model, Mapping) and isinstance(model.get("generator"), Mapping)


_INTERPOLATION = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


def _resolve(value: Any, root: Mapping[str, Any]) -> Any:
    """An OmegaConf ``${a.b.c}`` reference (kept unresolved by the official save_pretrained) -> its value."""
    seen = set()
    while isinstance(value, str) and (match := _INTERPOLATION.match(value.strip())):
        if value in seen:
            raise ConversionError(f"circular reference {value} in the official config")
        seen.add(value)
        node: Any = root
        for part in match.group(1).split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConversionError(f"the official config refers to {value}, which it does not define")
            node = node[part]
        value = node
    return value


def _official_fields(official: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The resolved ``model.generator`` and ``model.vq_model`` sections of an official config."""
    official = _unwrap(official)
    if not is_official_generator_config(official):
        raise ConversionError("not an official TiTok generator config: it has no model.generator section")
    model = official["model"]
    generator = {k: _resolve(v, official) for k, v in model["generator"].items()}
    vq = {k: _resolve(v, official) for k, v in (model.get("vq_model") or {}).items()}
    return generator, vq


def generator_config_from_official(official: Mapping[str, Any], model_type: str | None = None) -> GeneratorConfig:
    """Map an official TiTok generator config onto a :class:`GeneratorConfig`.

    Args:
        official: the parsed hub ``config.json`` (or :func:`generator_release_config`).
        model_type: ``ViT`` (ImageBert) or ``UViT`` (UViTBert) when the config does not say.
    """
    gen, vq = _official_fields(official)

    def need(section: dict[str, Any], name: str, key: str) -> Any:
        if key not in section:
            raise ConversionError(f"the official config has no model.{name}.{key}")
        value = section[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConversionError(f"model.{name}.{key} must be an integer, got {value!r}")
        return value

    kind = gen.get("model_type", model_type)
    if kind is None:
        raise ConversionError("the official config has no model.generator.model_type (ViT or UViT)")
    if kind not in MODEL_TYPES:
        raise ConversionError(f"model.generator.model_type is {kind!r}; mstok converts {', '.join(MODEL_TYPES)}")
    width = need(gen, "generator", "hidden_size")
    hidden = need(gen, "generator", "intermediate_size")
    if int(width * (hidden / width)) != hidden:  # mstok's MLP is int(width * mlp_ratio) wide
        raise ConversionError(f"intermediate_size {hidden} cannot be expressed as hidden_size {width} x a ratio")
    fields: dict[str, Any] = {
        "num_tokens": need(gen, "generator", "image_seq_len"),
        "codebook_size": need(vq, "vq_model", "codebook_size"),
        "num_classes": need(gen, "generator", "condition_num_classes"),
        "width": width,
        "depth": need(gen, "generator", "num_hidden_layers"),
        "num_heads": need(gen, "generator", "num_attention_heads"),
        "mlp_ratio": hidden / width,
        "dropout": float(gen.get("dropout", 0.1)),
    }
    if kind == "ViT":  # BERT: post-LN with an embedding LayerNorm, eps 1e-12
        fields.update(architecture="vit", norm_first=False, embed_norm=True, qkv_bias=True, norm_eps=1e-12)
    else:  # U-ViT: pre-LN, no qkv bias, torch's default eps
        fields.update(architecture="uvit", norm_first=True, embed_norm=False, qkv_bias=False, norm_eps=1e-5)
    try:
        return GeneratorConfig.from_dict(fields)
    except ValueError as err:
        raise ConversionError(f"the official config gives an invalid mstok generator config: {err}") from err


def sampling_from_official(official: Mapping[str, Any]) -> SamplingConfig | None:
    """The official sampler settings of a config as a :class:`SamplingConfig` (None: the config has none)."""
    gen, _ = _official_fields(official)
    if not all(key in gen for key in SAMPLING_KEYS):
        return None
    try:
        return SamplingConfig.official_titok(
            float(gen["randomize_temperature"]),
            float(gen["guidance_scale"]),
            str(gen["guidance_decay"]),
            steps=int(gen.get("num_steps", 8)),
            guidance_power=OFFICIAL_GUIDANCE_POWER,
        )
    except ValueError as err:
        raise ConversionError(f"the official sampling settings do not map onto mstok's sampler: {err}") from err


def describe_generator(config: GeneratorConfig) -> str:
    """One line naming the architecture a config describes (for messages)."""
    layout = f"{config.architecture}, {'pre' if config.norm_first else 'post'}-LN"
    hidden = round(config.width * config.mlp_ratio)
    return (
        f"{layout} {config.width}x{config.depth} ({config.num_heads} heads, MLP {hidden}), "
        f"K={config.num_tokens}, V={config.codebook_size}, {config.num_classes} classes"
    )


_BERT_BLOCK = (
    ("attn.proj.", "attention.output.dense."),
    ("norm1.", "attention.output.LayerNorm."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
    ("norm2.", "output.LayerNorm."),
)


def _bert_sources(key: str) -> tuple[str, ...]:
    """The official ImageBert keys an mstok key is built from."""
    fixed = {
        "token_embed": ("model.embeddings.word_embeddings.weight",),
        "pos_embed": ("model.embeddings.position_embeddings.weight", "model.embeddings.token_type_embeddings.weight"),
        "head.weight": ("model.lm_head.weight",),
        "head.bias": ("model.lm_head.bias",),
    }
    if key in fixed:
        return fixed[key]
    if key.startswith("embed_norm."):
        return ("model.embeddings.LayerNorm." + key.removeprefix("embed_norm."),)
    _, index, rest = key.split(".", 2)  # blocks.<i>.<rest>
    layer = f"model.encoder.layer.{index}."
    if rest.startswith("attn.qkv."):
        leaf = rest.removeprefix("attn.qkv.")
        return tuple(f"{layer}attention.self.{name}.{leaf}" for name in ("query", "key", "value"))
    for ours, theirs in _BERT_BLOCK:
        if rest.startswith(ours):
            return (layer + theirs + rest.removeprefix(ours),)
    raise AssertionError(f"no official name for mstok key {key}")  # a new mstok parameter


def _uvit_sources(key: str) -> tuple[str, ...]:
    """The official UViTBert keys an mstok key is built from."""
    if key == "token_embed":
        return ("embeddings.weight",)
    if key.startswith("skips."):
        _, index, leaf = key.split(".")
        return (f"out_blocks.{index}.skip_linear.{leaf}",)
    if key.startswith("head."):
        return ("lm_head." + key.removeprefix("head."),)
    return (key,)  # pos_embed, in_blocks, mid_block, out_blocks, norm: the same names


def official_generator_layout(
    config: GeneratorConfig,
) -> dict[str, tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[int, ...]]]:
    """mstok key -> (the official (key, shape) pairs it is built from, mstok shape) for ``config``."""
    with torch.device("meta"):  # shapes only
        model = MaskGITGenerator(config)
    bert = config.architecture == "vit"
    layout = {}
    for key, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        sources = _bert_sources(key) if bert else _uvit_sources(key)
        if len(sources) == 3:  # q, k, v of a fused qkv
            shapes = [(shape[0] // 3, *shape[1:])] * 3
        elif key == "pos_embed" and bert:
            shapes = [shape, (2, shape[1])]  # position table, token-type table
        elif key == "pos_embed":
            shapes = [(1, *shape)]
        else:
            shapes = [shape]
        layout[key] = (tuple(zip(sources, shapes, strict=True)), shape)
    return layout


def _looks_like(state: Mapping[str, torch.Tensor]) -> str | None:
    """The official class whose keys a state dict has, if it is clear."""
    if any(k.startswith("model.encoder.layer.") for k in state):
        return "ViT"
    if "embeddings.weight" in state or any(k.startswith("in_blocks.") for k in state):
        return "UViT"
    return None


def convert_generator_state_dict(
    state: Mapping[str, torch.Tensor], config: GeneratorConfig, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Official-layout tensors -> an mstok generator state dict for ``config`` (float32).

    Raises:
        ConversionError: listing every missing key, unexpected key and shape mismatch at once.
    """
    layout = official_generator_layout(config)
    state = {k: v for k, v in state.items() if k not in IGNORED_BUFFERS}
    expected = {k: shape for sources, _ in layout.values() for k, shape in sources}
    kind = "ViT" if config.architecture == "vit" else "UViT"
    hint = "Check that the config (config.json or --release) is the one these weights were released with."
    seen = _looks_like(state)
    if seen is not None and seen != kind:
        hint += f" These weights look like an official {MODEL_TYPES[seen]} (model.generator.model_type {seen})."
    check_official_keys(
        state,
        expected,
        f"{source} does not match the official TiTok {MODEL_TYPES[kind]} layout for {describe_generator(config)}",
        hint,
    )
    converted = {}
    for key, (sources, shape) in layout.items():
        tensors = [state[name].float() for name, _ in sources]
        if len(tensors) == 3:
            value = torch.cat(tensors)  # (3D, D) / (3D,): q, k, v blocks, as mstok splits "(three h d)"
        elif len(tensors) == 2:
            value = tensors[0] + tensors[1][0]  # positions + token type 0, the only type ImageBert uses
        else:
            value = tensors[0]
        converted[key] = value.reshape(shape).contiguous()
    return converted


def _check_generator_config(values: Any, config_path: Path) -> None:
    if not is_official_generator_config(values):
        tokenizer = is_official_titok_config(values)  # model.vq_model only: a tokenizer's config
        raise ConversionError(
            f"{config_path} is not an official TiTok generator config (it has no model.generator section)"
            + ("; it is a tokenizer's: convert it with mstok convert titok" if tokenizer else "")
        )


def locate_official_generator(src: str | Path, release: str | None = None) -> tuple[dict[str, Any], Path]:
    """The official config and the weights file of a generator release folder or weights file
    (see :func:`mstok.persistence.convert.titok.locate_release`)."""
    return locate_release(
        src, release, kind="generator", releases=GENERATOR_RELEASES, release_key=generator_release_key,
        release_config=generator_release_config, loader="load_generator", check_config=_check_generator_config,
    )  # fmt: skip


def load_official_generator(src: str | Path, release: str | None = None) -> MaskGITGenerator:
    """An official TiTok generator (folder with config.json + weights, or a weights file) as an mstok generator.

    Weights are read through safetensors or ``torch.load(weights_only=True)`` only.
    """
    official, weights = locate_official_generator(src, release)
    state = load_torch_state_dict(weights)
    config = generator_config_from_official(official, model_type=_looks_like(state))
    converted = convert_generator_state_dict(state, config, str(weights))
    with torch.device("meta"):  # every tensor comes from the file
        model = MaskGITGenerator(config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def convert_titok_generator(
    src: str | Path, out: str | Path, release: str | None = None, overwrite: bool = False
) -> Path:
    """Convert an official TiTok generator into an mstok generator folder ``out`` (``save_pretrained``).

    ``out`` also gets ``sampling.json`` (the release's official sampler settings as
    :class:`SamplingConfig` fields, read by ``mstok sample``) when the config has them, and
    ``conversion.json``: the source, and the official config it was read with.
    """
    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint (config.json); pass overwrite=True (--overwrite)")
    official, weights = locate_official_generator(src, release)
    model = load_official_generator(src, release)
    model.save_pretrained(out)
    sampling = sampling_from_official(official)
    if sampling is not None:
        (out / SAMPLING_FILE).write_text(json.dumps(sampling.to_dict(), indent=2) + "\n")
    gen, _ = _official_fields(official)
    record = {
        "source": str(weights),
        "release": release,
        "official_config": official,
        "official_sampling": {
            **{k: gen[k] for k in (*SAMPLING_KEYS, "num_steps") if k in gen},
            "guidance_scale_pow": OFFICIAL_GUIDANCE_POWER,
            "softmax_temperature_annealing": "true in sample_imagenet_titok.py: mstok sample --softmax-annealing",
        },
    }
    (out / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def load_generator_from_hub(repo_id: str, revision: str | None = None) -> MaskGITGenerator:
    """Download (or read from the hub cache) an official TiTok generator and convert it on the fly."""
    folder = download(repo_id, revision, kind="generator")
    read_release_config(folder, repo_id, is_official_generator_config, "generator", "generator")
    return load_official_generator(folder)
