"""Import the official TiTok tokenizers (bytedance/1d-tokenizer) as :class:`mstok.TiTok`.

A release is a state dict in the official key layout plus the official config (the hub
``config.json``, an OmegaConf dump with ``model.vq_model`` and ``dataset.preprocessing``).
:func:`titok_config_from_official` turns that config into a :class:`TiTokConfig`;
:func:`convert_titok_state_dict` renames and reshapes every tensor, after checking the file
key for key and shape for shape against the layout that config implies.

The released tokenizers, all 256 px with 16 px patches (:data:`RELEASES`, hub repos
``yucornetto/tokenizer_<name>_imagenet``):

================  =======  =======  ====  ==========  =====  ==============================
release           encoder  decoder  K     codes       C      layout
================  =======  =======  ====  ==========  =====  ==============================
titok_l32         L        L        32    4096, L2    12     two-stage legacy (proxy head)
titok_b64         B        B        64    4096, L2    12     two-stage legacy (proxy head)
titok_s128        S        S        128   4096, L2    12     two-stage legacy (proxy head)
titok_bl64_vq8k   B        L        64    8192        64     single-stage (pixel head)
titok_bl128_vq8k  B        L        128   8192        64     single-stage (pixel head)
titok_sl256_vq8k  S        L        256   8192        64     single-stage (pixel head)
titok_ll32_vae..  L        L        32    Gaussian    16     VAE, single-stage
titok_bl64_vae..  B        L        64    Gaussian    16     VAE, single-stage
titok_bl128_vae.  B        L        128   Gaussian    16     VAE, single-stage
================  =======  =======  ====  ==========  =====  ==============================

Official -> mstok: ``latent_tokens`` -> ``encoder.latent_tokens``; ``encoder.patch_embed`` ->
``encoder.patch_tokens.patch_embed.proj``; ``class_embedding`` / ``positional_embedding`` /
``latent_token_positional_embedding`` -> ``class_token`` / ``pos_embed`` / ``latent_pos_embed``
(the encoder's first two under ``patch_tokens``); per block ``ln_1, attn.in_proj_*,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj`` -> ``norm1, attn.qkv.*, attn.proj, norm2, mlp.fc1,
mlp.fc2`` (q, k, v are stacked the same way); ``encoder.conv_out`` (1x1 conv) ->
``encoder.proj`` (linear); ``decoder.decoder_embed`` -> ``decoder.embed``; ``decoder.mask_token``
(1, 1, D) -> (1, D); ``decoder.ffn.0/.2`` (1x1 convs) -> ``decoder.head.fc1/.fc2`` (proxy head)
or ``decoder.ffn.0`` + ``decoder.conv_out`` -> ``decoder.head.proj`` + ``decoder.head.conv``
(pixel head); ``quantize.embedding`` -> ``quantizer.embedding``; ``pixel_quantize.embedding.weight``
-> ``pixel_decoder.codebook``; ``pixel_decoder.*`` -> ``pixel_decoder.decoder.*``.

Checkpoints trained with a modified official code (other ViT sizes, another proxy VQGAN) can
describe the difference in an ``"mstok_extensions"`` entry of their config.json, or through the
``model_sizes`` / ``pixel_decoder`` arguments: ``{"model_sizes": {"tiny": {"width": 64, "depth": 2,
"num_heads": 4}}, "pixel_decoder": {"hidden_channels": 32, "channel_mult": [1, 1], ...}}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mstok.storage.weights import load_torch_state_dict
from mstok.tokenizers.titok import TiTok, TiTokConfig

HUB_OWNER = "yucornetto"
EXTENSIONS_KEY = "mstok_extensions"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# ViT sizes of the official code (modeling/modules/blocks.py), MLP ratio 4
OFFICIAL_SIZES: dict[str, dict[str, int]] = {
    "small": {"width": 512, "depth": 8, "num_heads": 8},
    "base": {"width": 768, "depth": 12, "num_heads": 12},
    "large": {"width": 1024, "depth": 24, "num_heads": 16},
}
# The MaskGIT-VQGAN decoder and codebook that the official two-stage model hard-codes
OFFICIAL_PIXEL_DECODER: dict[str, Any] = {
    "hidden_channels": 128,
    "channel_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "z_channels": 256,
    "codebook_size": 1024,
}
OFFICIAL_PROXY_CODES = 1024  # outputs of the official legacy head, hard-coded
OFFICIAL_NORM_GROUPS = 32  # GroupNorm groups of the official VQGAN blocks, hard-coded


def _two_stage(enc: str, dec: str, k: int) -> dict[str, Any]:
    return {
        "vit_enc_model_size": enc,
        "vit_dec_model_size": dec,
        "num_latent_tokens": k,
        "codebook_size": 4096,
        "token_size": 12,
        "use_l2_norm": True,
        "commitment_cost": 0.25,
        "finetune_decoder": True,
        "is_legacy": True,
    }


def _vq8k(enc: str, dec: str, k: int) -> dict[str, Any]:
    return {
        **_two_stage(enc, dec, k),
        "codebook_size": 8192,
        "token_size": 64,
        "use_l2_norm": False,
        "finetune_decoder": False,
        "is_legacy": False,
    }


def _vae(enc: str, dec: str, k: int) -> dict[str, Any]:
    return {
        "quantize_mode": "vae",
        "vit_enc_model_size": enc,
        "vit_dec_model_size": dec,
        "num_latent_tokens": k,
        "token_size": 16,
        "finetune_decoder": False,
        "is_legacy": False,
    }


# The ``model.vq_model`` part of each release's official config (configs/infer/TiTok/*.yaml)
RELEASES: dict[str, dict[str, Any]] = {
    "titok_l32": _two_stage("large", "large", 32),
    "titok_b64": _two_stage("base", "base", 64),
    "titok_s128": _two_stage("small", "small", 128),
    "titok_bl64_vq8k": _vq8k("base", "large", 64),
    "titok_bl128_vq8k": _vq8k("base", "large", 128),
    "titok_sl256_vq8k": _vq8k("small", "large", 256),
    "titok_ll32_vae_c16": _vae("large", "large", 32),
    "titok_bl64_vae_c16": _vae("base", "large", 64),
    "titok_bl128_vae_c16": _vae("base", "large", 128),
}
for _fields in RELEASES.values():
    _fields.update(vit_enc_patch_size=16, vit_dec_patch_size=16)


class ConversionError(ValueError):
    """An official checkpoint or config that does not map onto an mstok TiTok."""


def release_key(name: str) -> str:
    """The :data:`RELEASES` key a release is known by: ``yucornetto/tokenizer_titok_l32_imagenet``,
    ``tokenizer_titok_l32.bin`` (fun-research/TiTok) and ``titok_l32`` all give ``titok_l32``."""
    stem = str(name).rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".bin", ".yaml"):
        stem = stem.removesuffix(suffix)
    return stem.removeprefix("tokenizer_").removesuffix("_imagenet")


def release_config(name: str) -> dict[str, Any]:
    """The official config of a released tokenizer, by any name :func:`release_key` knows."""
    key = release_key(name)
    if key not in RELEASES:
        raise ConversionError(f"unknown TiTok release {name!r}; known releases: {', '.join(RELEASES)}")
    return {"model": {"vq_model": dict(RELEASES[key])}, "dataset": {"preprocessing": {"crop_size": 256}}}


def is_official_titok_config(values: Any) -> bool:
    """Whether a parsed config.json looks like an official TiTok one (``model.vq_model``)."""
    if isinstance(values, Mapping) and isinstance(values.get("config"), Mapping):
        values = values["config"]  # a hub-mixin dump may nest it
    model = values.get("model") if isinstance(values, Mapping) else None
    return isinstance(model, Mapping) and isinstance(model.get("vq_model"), Mapping)


def _pixel_decoder_fields(desc: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """An official MaskGIT-VQGAN decoder description -> :class:`VQGANConfig` fields."""
    unknown = sorted(set(desc) - set(OFFICIAL_PIXEL_DECODER))
    if unknown:
        raise ConversionError(f"unknown pixel_decoder field(s) {unknown}; valid: {', '.join(OFFICIAL_PIXEL_DECODER)}")
    return {
        "image_size": image_size,
        "channels": desc["hidden_channels"],
        "channel_mult": tuple(desc["channel_mult"]),
        "num_res_blocks": desc["num_res_blocks"],
        "z_channels": desc["z_channels"],
        "codebook_size": desc["codebook_size"],
        "norm_groups": OFFICIAL_NORM_GROUPS,
    }


def titok_config_from_official(
    official: Mapping[str, Any],
    model_sizes: Mapping[str, Mapping[str, int]] | None = None,
    pixel_decoder: Mapping[str, Any] | None = None,
) -> TiTokConfig:
    """Map an official TiTok config onto a :class:`TiTokConfig`.

    Args:
        official: the parsed hub ``config.json`` (or :func:`release_config`).
        model_sizes: extra ViT sizes by name, ``{"name": {"width", "depth", "num_heads"}}``.
        pixel_decoder: overrides of the official MaskGIT-VQGAN pixel decoder (two-stage only).
    """
    if is_official_titok_config(official) and "model" not in official:
        official = official["config"]
    if not is_official_titok_config(official):
        raise ConversionError("not an official TiTok config: it has no model.vq_model section")
    vq = official["model"]["vq_model"]
    extensions = official.get(EXTENSIONS_KEY) or {}
    sizes = {**OFFICIAL_SIZES, **extensions.get("model_sizes", {}), **(model_sizes or {})}

    def need(key: str) -> Any:
        if key not in vq:
            raise ConversionError(f"the official config has no model.vq_model.{key}")
        return vq[key]

    def size(key: str) -> dict[str, int]:
        name = need(key)
        if name not in sizes:
            raise ConversionError(f"model.vq_model.{key} is {name!r}, not a known ViT size ({', '.join(sizes)})")
        return dict(sizes[name])

    try:
        crop = official["dataset"]["preprocessing"]["crop_size"]
    except (KeyError, TypeError):
        raise ConversionError("the official config has no dataset.preprocessing.crop_size") from None
    mode = vq.get("quantize_mode", "vq")
    legacy = bool(vq.get("is_legacy", True))
    two_stage = bool(vq.get("finetune_decoder", True))
    if mode not in ("vq", "vae"):
        raise ConversionError(f"quantize_mode {mode!r} is not supported (vq or vae)")
    if two_stage and (mode != "vq" or not legacy):
        raise ConversionError("finetune_decoder (a two-stage model) needs quantize_mode vq and is_legacy true")
    patch = need("vit_enc_patch_size")
    if need("vit_dec_patch_size") != patch:
        raise ConversionError(f"encoder and decoder patch sizes differ ({patch} vs {vq['vit_dec_patch_size']})")
    enc, dec = size("vit_enc_model_size"), size("vit_dec_model_size")
    fields: dict[str, Any] = {
        "image_size": crop,
        "patch_size": patch,
        **enc,
        "num_latent_tokens": need("num_latent_tokens"),
        "code_dim": need("token_size"),
        "token_projection": "legacy" if legacy else "per_token",
        "head": "proxy_codes" if legacy else "pixels",
        "proxy_codebook_size": OFFICIAL_PROXY_CODES,
        "quantizer": mode,
    }
    if dec != enc:
        fields.update(decoder_width=dec["width"], decoder_depth=dec["depth"], decoder_num_heads=dec["num_heads"])
    if mode == "vq":
        fields.update(
            codebook_size=need("codebook_size"),
            use_l2_norm=bool(need("use_l2_norm")),
            commitment_weight=need("commitment_cost"),
        )
    if two_stage:
        desc = {**OFFICIAL_PIXEL_DECODER, **extensions.get("pixel_decoder", {}), **(pixel_decoder or {})}
        fields["pixel_decoder"] = _pixel_decoder_fields(desc, crop)
    try:
        return TiTokConfig.from_dict(fields)
    except ValueError as err:
        raise ConversionError(f"the official config gives an invalid mstok TiTok config: {err}") from err


def _official_key(key: str) -> str | None:
    """The official name of an mstok TiTok state-dict key (None: not in official files)."""
    if key == "quantizer.usage_ema":
        return None  # mstok's codebook-usage statistics start fresh
    parts = key.split(".")
    if parts[1:3] == ["transformer", "blocks"]:
        rest = ".".join(parts[4:])
        for ours, theirs in _BLOCK_RENAMES:
            if rest.startswith(ours):
                return f"{parts[0]}.transformer.{parts[3]}.{theirs}{rest[len(ours) :]}"
    for ours, theirs in _RENAMES:
        if key == ours or (ours.endswith(".") and key.startswith(ours)):
            return theirs + key[len(ours) :]
    if parts[0] in ("encoder", "decoder") and parts[1] in ("ln_pre", "ln_post"):
        return key
    raise AssertionError(f"no official name for mstok key {key}")  # a new mstok parameter


_BLOCK_RENAMES = (
    ("norm1.", "ln_1."),
    ("attn.qkv.weight", "attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.", "attn.out_proj."),
    ("norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
_RENAMES = (
    ("encoder.latent_tokens", "latent_tokens"),
    ("encoder.patch_tokens.patch_embed.proj.", "encoder.patch_embed."),
    ("encoder.patch_tokens.class_token", "encoder.class_embedding"),
    ("encoder.patch_tokens.pos_embed", "encoder.positional_embedding"),
    ("encoder.latent_pos_embed", "encoder.latent_token_positional_embedding"),
    ("encoder.proj.", "encoder.conv_out."),
    ("decoder.embed.", "decoder.decoder_embed."),
    ("decoder.latent_pos_embed", "decoder.latent_token_positional_embedding"),
    ("decoder.class_token", "decoder.class_embedding"),
    ("decoder.mask_token", "decoder.mask_token"),
    ("decoder.pos_embed", "decoder.positional_embedding"),
    ("decoder.head.fc1.", "decoder.ffn.0."),
    ("decoder.head.fc2.", "decoder.ffn.2."),
    ("decoder.head.proj.", "decoder.ffn.0."),
    ("decoder.head.conv.", "decoder.conv_out."),
    ("quantizer.embedding.weight", "quantize.embedding.weight"),
    ("pixel_decoder.codebook", "pixel_quantize.embedding.weight"),
    ("pixel_decoder.decoder.", "pixel_decoder."),
)
# linear layers that are 1x1 convs in the official code: (O, I) here, (O, I, 1, 1) there
_CONV_1X1 = {"encoder.proj.weight", "decoder.head.fc1.weight", "decoder.head.fc2.weight", "decoder.head.proj.weight"}


def official_layout(config: TiTokConfig) -> dict[str, tuple[str | None, tuple[int, ...], tuple[int, ...]]]:
    """mstok key -> (official key or None, official shape, mstok shape) for a TiTok of ``config``."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = TiTok(config)
    layout = {}
    for key, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        official = (*shape, 1, 1) if key in _CONV_1X1 else (1, *shape) if key == "decoder.mask_token" else shape
        layout[key] = (_official_key(key), official, shape)
    return layout


def describe(config: TiTokConfig) -> str:
    """One line naming the architecture a config describes (for error messages)."""
    width, depth, heads = config.decoder_dims
    codes = "Gaussian (VAE)" if config.vocab_size is None else f"{config.vocab_size} codes"
    stage = "two-stage (proxy head + pixel decoder)" if config.pixel_decoder else f"{config.head} head"
    return (
        f"{config.image_size}px, encoder {config.width}x{config.depth} ({config.num_heads} heads), decoder "
        f"{width}x{depth} ({heads} heads), K={config.num_latent_tokens}, C={config.code_dim}, {codes}, "
        f"{config.token_projection} projection, {stage}"
    )


def _listing(label: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:10]) + (f"\n    ... ({len(items)} in all)" if len(items) > 10 else "")
    return f"  {label} ({len(items)}):\n    {shown}"


def check_official_keys(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    headline: str,
    hint: str = "Check that the config (config.json or --release) is the one these weights were released with.",
) -> None:
    """Compare a checkpoint with the official key -> shape layout it should have.

    Raises:
        ConversionError: ``headline``, then every missing key, every unexpected key (with its
            shape) and every shape mismatch (expected vs found), at once, then ``hint``.
    """
    missing = [f"{k} (expected shape {shape})" for k, shape in expected.items() if k not in state]
    unexpected = [f"{k} (shape {tuple(v.shape)})" for k, v in state.items() if k not in expected]
    wrong = [
        f"{k}: expected {shape}, found {tuple(state[k].shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if missing or unexpected or wrong:
        problems = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        raise ConversionError(
            f"{headline}:\n" + "\n".join(_listing(label, items) for label, items in problems if items) + f"\n{hint}"
        )


def convert_titok_state_dict(
    state: Mapping[str, torch.Tensor], config: TiTokConfig, source: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """Official-layout tensors -> an mstok TiTok state dict for ``config`` (float32).

    Raises:
        ConversionError: listing every missing key and every unexpected key (with its shape),
            and every shape mismatch (expected vs found), at once.
    """
    layout = official_layout(config)
    expected = {official: shape for official, shape, _ in layout.values() if official is not None}
    check_official_keys(state, expected, f"{source} does not match the official TiTok layout for {describe(config)}")
    converted = {}
    for key, (official, _, shape) in layout.items():
        if official is None:
            converted[key] = torch.zeros(shape)
            continue
        tensor = state[official]
        converted[key] = (tensor.float() if tensor.is_floating_point() else tensor).reshape(shape).contiguous()
    return converted


def locate_release(
    src: str | Path,
    release: str | None,
    *,
    kind: str,
    releases: Mapping[str, Any],
    release_key: Callable[[str], str],
    release_config: Callable[[str], dict[str, Any]],
    loader: str,
    check_config: Callable[[Any, Path], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """The official config and the weights file of a release folder or weights file, for the
    ``kind`` of release (``tokenizer`` or ``generator``) whose table is ``releases``.

    The config is, in this order: the table entry of ``release``; ``config.json`` in the folder
    (or beside the file; ``check_config(values, path)`` may refuse it); the release the folder's
    or file's name names. ``loader`` names the mstok function that opens an mstok checkpoint.
    """
    src = Path(src)
    if src.is_dir():
        found = [src / name for name in WEIGHT_FILES if (src / name).is_file()]
        found = found or sorted(p for p in src.iterdir() if p.suffix in (".safetensors", ".bin"))
        if not found:
            raise FileNotFoundError(
                f"no weights in {src}: expected model.safetensors or pytorch_model.bin "
                f"(the files of a {HUB_OWNER}/{kind}_titok_* hub repository)"
            )
        weights, folder = found[0], src
    elif src.is_file():
        weights, folder = src, src.parent
    else:
        raise FileNotFoundError(f"no such file or folder: {src}")
    if release is not None:
        return release_config(release), weights
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            values = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{config_path} is not valid JSON ({err})") from err
        if isinstance(values, dict) and "family" in values:
            raise ConversionError(f"{src} is already an mstok checkpoint: load it with mstok.{loader}")
        if check_config is not None:
            check_config(values, config_path)
        return values, weights
    for name in (weights.name, folder.name):
        if release_key(name) in releases:
            return release_config(name), weights
    raise ConversionError(
        f"no config.json beside {weights} and its name is no known release: pass the release "
        f"(release=..., --release NAME), one of {', '.join(releases)}"
    )


def locate_official(src: str | Path, release: str | None = None) -> tuple[dict[str, Any], Path]:
    """The official config and the weights file of a tokenizer release folder or weights file
    (see :func:`locate_release`)."""
    return locate_release(
        src, release, kind="tokenizer", releases=RELEASES, release_key=release_key,
        release_config=release_config, loader="load_tokenizer",
    )  # fmt: skip


def load_official_titok(
    src: str | Path,
    release: str | None = None,
    model_sizes: Mapping[str, Mapping[str, int]] | None = None,
    pixel_decoder: Mapping[str, Any] | None = None,
) -> TiTok:
    """An official TiTok release (folder with config.json + weights, or a weights file) as an mstok TiTok.

    Weights are read through safetensors or ``torch.load(weights_only=True)`` only.
    """
    official, weights = locate_official(src, release)
    config = titok_config_from_official(official, model_sizes, pixel_decoder)
    converted = convert_titok_state_dict(load_torch_state_dict(weights), config, str(weights))
    with torch.device("meta"):  # every tensor comes from the file: skip allocating and initialising
        model = TiTok(config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def convert_titok(
    src: str | Path,
    out: str | Path,
    release: str | None = None,
    model_sizes: Mapping[str, Mapping[str, int]] | None = None,
    pixel_decoder: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an official TiTok release into an mstok checkpoint folder ``out`` (``save_pretrained``).

    ``out`` also gets ``conversion.json``: the source, and the official config it was read with.
    """
    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint (config.json); pass overwrite=True (--overwrite)")
    official, weights = locate_official(src, release)
    model = load_official_titok(src, release, model_sizes, pixel_decoder)
    model.save_pretrained(out)
    record = {"source": str(weights), "release": release, "official_config": official}
    (out / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
