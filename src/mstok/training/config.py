"""The training configuration: nested dataclasses read from TOML, with ``key=value`` overrides.

A config file mirrors the dataclasses (see ``configs/`` for the papers' recipes)::

    steps = 2000
    batch_size = 32
    [model]
    preset = "mstok_tiny"
    [model.overrides]
    num_latent_tokens = 32
    [data]
    path = "../shared/datasets/tiny-imagenet-64"
    [optim]
    lr = 3e-4

Unknown keys are errors (a typo never silently falls back to a default), and every value is
checked against its field's type and rule (``field_rules``, :mod:`mstok.config_schema`) when
the config is built: no coercion, finite numbers, ranges, choices; an error names the key's
dotted path (``optim.lr``), what it must be and the value given. ``model.overrides`` are
checked against the preset's own config class at load time too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import tomllib

from mstok.config_schema import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    STRICTLY_POSITIVE,
    ConfigError,
    Rule,
    check_config,
    one_of,
)
from mstok.diffusion.config import DiffusionConfig
from mstok.generators.bitmar_sampling import BitSamplingConfig
from mstok.generators.dit_sampling import DiTSamplingConfig
from mstok.generators.maskgit_sampling import SamplingConfig
from mstok.generators.registry import GENERATOR_PRESETS, generator_config
from mstok.generators.schedules import MASK_SCHEDULES
from mstok.tokenizers.nested import PREFIX_DISTRIBUTIONS
from mstok.tokenizers.registry import PRESETS, preset_config

C = TypeVar("C", bound="RunConfig")


@dataclass
class ModelConfig:
    """Which model to train: a preset name plus config-field overrides, and where its
    starting weights come from (a stage-2 run starts from the stage-1 checkpoint)."""

    preset: str = "mstok_tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str = ""
    init_weights: str = ""  # "": EMA weights when the folder has them, else model.safetensors


@dataclass
class DataConfig:
    """Where images come from (an image folder or WebDataset shards) and their augmentation.

    ``val_path`` is a folder (or shards) of held-out images for validation (``val_every``);
    empty holds out ``val_images`` evenly spaced images of ``path`` and trains on the rest.
    ``max_pixels``: an image with more pixels (width x height, a possible decompression bomb)
    is skipped and counted like an unreadable file.
    """

    path: str = ""
    val_path: str = ""
    crop_scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = True
    num_workers: int = 2
    max_pixels: int = 89_478_485  # mstok.data.DEFAULT_MAX_PIXELS (PIL's warning threshold)

    field_rules: ClassVar[dict[str, Rule]] = {
        "crop_scale": Rule(item=Rule(gt=0, le=1)),
        "num_workers": NON_NEGATIVE,
        "max_pixels": POSITIVE,
    }


@dataclass
class OptimConfig:
    """The optimizer (``name``: "adamw", or "muon" for Muon on the transformer blocks' matrices and
    AdamW on the rest), linear warmup then cosine decay to ``end_lr``, and gradient clipping."""

    lr: float = 1e-4
    end_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    name: str = "adamw"

    field_rules: ClassVar[dict[str, Rule]] = {
        "name": one_of(("adamw", "muon")),
        "lr": STRICTLY_POSITIVE,
        "end_lr": NON_NEGATIVE,
        "betas": Rule(item=FRACTION),
        "eps": STRICTLY_POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
        "grad_clip": STRICTLY_POSITIVE,  # the max gradient norm: 0 would zero every update
    }


@dataclass
class LossConfig:
    """Loss weights. A weight of zero switches its term (and what it needs) off.

    ``multiscale_weight``: HieraTok's multi-scale RGB term (the L1/MSE mix of ``l1_weight`` and
    ``mse_weight`` at every coarser scale against the area-downsampled image); only for a
    multi-scale tokenizer (family ``hieratok``).

    SemTok (eq. 6): ``flow_weight``, the velocity MSE of a flow-matching decoder (stage I);
    ``distill_weight`` and ``contrastive_weight``, lambda_s times the semantic alignment terms
    of eq. 2 (the paper: 0.05 each), which run the ``[teacher]`` on every batch.

    ``entropy_boost`` / ``entropy_boost_steps``: a warm start of a bit quantizer's (LFQ, BSQ)
    entropy term, counted ``entropy_boost`` times at step 0 and linearly less until
    ``entropy_boost_steps`` (1 / 0: off; see :meth:`mstok.losses.objective.TokenizerLoss.entropy_factor`).
    """

    l1_weight: float = 1.0
    mse_weight: float = 1.0
    perceptual_weight: float = 0.0
    quantizer_weight: float = 1.0
    proxy_ce_weight: float = 0.0
    label_smoothing: float = 0.0
    gan_weight: float = 0.0
    gan_start_step: int = 0
    lecam_weight: float = 0.001
    multiscale_weight: float = 0.0
    flow_weight: float = 0.0
    distill_weight: float = 0.0
    contrastive_weight: float = 0.0
    entropy_boost: float = 1.0
    entropy_boost_steps: int = 0

    field_rules: ClassVar[dict[str, Rule]] = {
        **{name: NON_NEGATIVE for name in ("l1_weight", "mse_weight", "perceptual_weight", "quantizer_weight")},
        **{name: NON_NEGATIVE for name in ("proxy_ce_weight", "gan_weight", "gan_start_step", "lecam_weight")},
        **{name: NON_NEGATIVE for name in ("multiscale_weight", "flow_weight", "distill_weight", "contrastive_weight")},
        "label_smoothing": FRACTION,
        "entropy_boost": Rule(ge=1),
        "entropy_boost_steps": NON_NEGATIVE,
    }


@dataclass
class NestedConfig:
    """Nested dropout (tail drop): each training image keeps a random prefix of its K tokens and
    the decoder reads the tail token in place of the rest, so every prefix learns to decode
    (:mod:`mstok.tokenizers.nested`, docs/nested.md).

    ``distribution``: ``none`` (off), ``uniform`` (k uniform over ``min_tokens``..K) or ``pow2``
    (k uniform over the powers of two in ``min_tokens``..K, plus K). ``full_fraction``: the share of
    images that keep all K tokens whatever the distribution (the full sequence trains every step;
    the nested configs use 0.5, docs/nested.md). One length per image, drawn
    from (seed, step) alone: the same on any number of ranks and after a resume. A run with it
    on builds its model with ``nested = true`` (an explicit ``model.overrides.nested = false``
    is an error), and ``model.init_from`` may be a model without the tail token (it starts new).
    """

    distribution: str = "none"
    min_tokens: int = 1
    full_fraction: float = 0.0

    field_rules: ClassVar[dict[str, Rule]] = {
        "distribution": one_of(("none", *PREFIX_DISTRIBUTIONS)),
        "min_tokens": POSITIVE,
        "full_fraction": PROBABILITY,
    }


@dataclass
class PerceptualConfig:
    """Where the LPIPS weight files are (empty: the cache, downloading when online)."""

    vgg_weights: str = ""
    lpips_weights: str = ""
    cache: str = ""
    download: bool = True


@dataclass
class DiscriminatorConfig:
    """The PatchGAN discriminator and its own AdamW optimizer (constant lr after warmup)."""

    base_channels: int = 64
    num_layers: int = 3
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1e-4
    warmup_steps: int = 0

    field_rules: ClassVar[dict[str, Rule]] = {
        "base_channels": POSITIVE,
        "num_layers": POSITIVE,
        "lr": STRICTLY_POSITIVE,
        "betas": Rule(item=FRACTION),
        "weight_decay": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
    }


@dataclass
class StageConfig:
    """What a stage trains. ``train`` lists parameter-name prefixes of the model
    (``encoder``, ``quantizer``, ``decoder``, ``pixel_decoder``, ``encoder.query_tokens``...);
    every other parameter is frozen. An empty list trains everything."""

    name: str = "single"
    train: tuple[str, ...] = ()
    pixel_decoder_from_proxy: bool = False


@dataclass
class ProxyConfig:
    """The frozen 2D VQ tokenizer of two-stage training: a saved mstok MaskGIT-VQGAN folder,
    a training checkpoint of one, or the official ``maskgit-vqgan-imagenet-f16-256.bin``."""

    checkpoint: str = ""
    weights: str = "model.safetensors"


@dataclass
class TeacherConfig:
    """The frozen semantic teacher of SemTok's alignment terms (``loss.distill_weight``,
    ``loss.contrastive_weight``): a :func:`mstok.losses.teachers.build_teacher` spec, ``"tiny"``
    (a seeded random conv net, for CPU runs) or a table such as ``{type = "siglip", path = DIR}`` or
    ``{type = "reference", path = DIR}`` (a network trained by ``mstok reference train``).
    Its width must be the model's ``teacher_dim``. Built only when a semantic weight is on."""

    spec: str | dict[str, Any] = "tiny"


@dataclass
class RunConfig:
    """What every training run shares; the engine (engine.py) reads only these fields.
    ``batch_size`` is the global batch per optimizer step, split over ``grad_accum``
    micro-steps and the data-parallel ranks. ``threads`` is the number of torch intra-op
    threads: > 0 exactly that many; 0 (auto) on a CPU device the usable cores minus the
    data-loader workers minus the cores other processes keep busy, at least 1 (threads.py),
    and torch's default on CUDA or when ``OMP_NUM_THREADS`` is set. Resume is bit-identical
    for the same thread count: pin ``threads`` when a resumed run must match exactly."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    ema_decay: float = 0.999
    ema_warmup: bool = True
    seed: int = 0
    out_dir: str = "runs/train"
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    sample_every: int = 0
    num_samples: int = 8
    tensorboard: bool = True
    threads: int = 0

    field_rules: ClassVar[dict[str, Rule]] = {
        **{name: POSITIVE for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every")},
        **{name: POSITIVE for name in ("keep_last", "num_samples")},
        "sample_every": NON_NEGATIVE,  # 0 = never
        "threads": NON_NEGATIVE,  # 0 = auto
        "ema_decay": FRACTION,
        "seed": Rule(ge=0, le=2**32 - 1),  # what every seeded generator (torch, numpy) accepts
        "precision": one_of(("fp32", "bf16", "fp16")),
    }

    def __post_init__(self) -> None:
        check_config(self)  # every field, nested sections included, against its type and rule
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError("device", f"must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps', got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class TrainConfig(RunConfig):
    """A tokenizer training run: the model, its data, losses and stage.

    Validation: every ``val_every`` steps and at the last step (0 = never) the EMA model
    reconstructs a fixed held-out batch of ``val_images`` images (from ``data.val_path``, else
    held out of ``data.path``); PSNR, SSIM and, when its weights are on this machine, LPIPS
    go to the log as ``val`` events.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    nested: NestedConfig = field(default_factory=NestedConfig)
    dead_code_threshold: float = 0.01
    val_every: int = 0
    val_images: int = 64

    field_rules: ClassVar[dict[str, Rule]] = {
        "dead_code_threshold": NON_NEGATIVE,
        "val_every": NON_NEGATIVE,  # 0 = no validation
        "val_images": POSITIVE,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = self.data.crop_scale
        if low > high:
            raise ConfigError("data.crop_scale", f"must be [min, max] with min <= max, got {[low, high]}")

        check_model_overrides(self.model, preset_config, PRESETS)
        if self.nested.distribution != "none":
            check_nested_model(self)


@dataclass
class GeneratorModelConfig(ModelConfig):
    """:class:`ModelConfig` for a generator preset of any family (K, V or C and the class count
    default to the token data's; a DiT's ``latent_mean``/``latent_std`` too, see the trainer)."""

    preset: str = "maskgit_tiny"


@dataclass
class TokenDataConfig:
    """A folder written by ``mstok pretokenize``."""

    path: str = ""
    num_workers: int = 0

    field_rules: ClassVar[dict[str, Rule]] = {"num_workers": NON_NEGATIVE}


@dataclass
class MaskingConfig:
    """The masked-token objective of MaskGIT generators (losses/masked.py) and class dropout for
    guidance (a DiT drops labels with its own ``class_dropout``, a model field)."""

    schedule: str = "arccos"
    label_smoothing: float = 0.1
    unmasked_weight: float = 0.1
    class_dropout: float = 0.1

    field_rules: ClassVar[dict[str, Rule]] = {
        "schedule": one_of(MASK_SCHEDULES, "a masking schedule"),
        "label_smoothing": FRACTION,
        "unmasked_weight": NON_NEGATIVE,
        "class_dropout": PROBABILITY,
    }


@dataclass
class BitMaskingConfig:
    """The bitwise masked-token objective of BitMAR generators (losses/bitwise.py): each example
    masks a fraction drawn uniformly from [min_mask_ratio, max_mask_ratio] of its tokens; the
    masked bits' cross-entropy has label smoothing; labels drop to the null class for guidance.
    SemTok's values: 0.7 to 1, smoothing 0.01, dropout 0.1."""

    min_mask_ratio: float = 0.7
    max_mask_ratio: float = 1.0
    label_smoothing: float = 0.01
    class_dropout: float = 0.1

    field_rules: ClassVar[dict[str, Rule]] = {
        "min_mask_ratio": Rule(gt=0, le=1),
        "max_mask_ratio": Rule(gt=0, le=1),
        "label_smoothing": FRACTION,
        "class_dropout": PROBABILITY,
    }


@dataclass
class GeneratorTrainConfig(RunConfig):
    """A generator training run. ``tokenizer`` (a tokenizer folder or run) is only needed for
    sample grids every ``sample_every`` steps, decoded with the family's sampling settings.

    Each family reads its own sections: MaskGIT ``loss`` (the masked-token objective) and
    ``sampling``; DiT ``diffusion`` (the objective, recorded in the trained model's config;
    DDPM epsilon prediction by default, the HieraTok/DiT testbed's) and ``dit_sampling``;
    BitMAR ``bit_loss`` (the bitwise masked-token objective) and ``bit_sampling``.
    """

    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    data: TokenDataConfig = field(default_factory=TokenDataConfig)
    loss: MaskingConfig = field(default_factory=MaskingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    dit_sampling: DiTSamplingConfig = field(default_factory=DiTSamplingConfig)
    bit_loss: BitMaskingConfig = field(default_factory=BitMaskingConfig)
    bit_sampling: BitSamplingConfig = field(default_factory=BitSamplingConfig)
    tokenizer: str = ""
    tokenizer_weights: str = ""  # empty: ema.safetensors when the folder has it, else model.safetensors

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = self.bit_loss.min_mask_ratio, self.bit_loss.max_mask_ratio
        if low > high:
            raise ConfigError("bit_loss.min_mask_ratio", f"must be at most max_mask_ratio = {high}, got {low}")

        check_model_overrides(self.model, generator_config, GENERATOR_PRESETS)


# A device name torch understands and the trainer supports; CUDA's availability is checked when
# the run starts (training/distributed.py), so a config written for a GPU still loads anywhere.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_model_overrides(model: ModelConfig, make: Callable[..., Any], presets: dict[str, Any]) -> None:
    """Build the config of ``model.preset`` with ``model.overrides`` (``make``: the registry's
    config function) so a bad preset or override fails at load time, named ``model.preset`` or
    ``model.overrides.<field>``, rather than when the model is built."""
    try:
        make(model.preset, **model.overrides)
    except ConfigError as err:
        raise err.under("model.overrides") from None
    except (ValueError, TypeError) as err:
        key = "model.overrides" if model.preset in presets else "model.preset"
        raise ValueError(f"{key}: {err}") from None


def check_nested_model(config: TrainConfig) -> None:
    """A run with nested dropout needs a model that can have nested tokens, and ``min_tokens`` <= K."""
    overrides = config.model.overrides
    if overrides.get("nested", True) is not True:
        raise ConfigError(
            "model.overrides.nested",
            f"must be true or left out: nested.distribution = {config.nested.distribution!r} trains nested tokens",
        )
    try:
        model = preset_config(config.model.preset, **{**overrides, "nested": True})
    except (ValueError, TypeError) as err:
        raise ValueError(f"nested.distribution: {err}") from None
    if config.nested.min_tokens > model.num_latent_tokens:
        raise ConfigError(
            "nested.min_tokens", f"must be at most K = {model.num_latent_tokens}, got {config.nested.min_tokens}"
        )


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys; the schema
    checks of the dataclasses report a bad value under its full dotted key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in [{where or 'top level'}]; valid: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            key = f"{where}.{name}" if where else name
            if not isinstance(value, dict):
                raise ConfigError(key, f"must be a table ([{key}] in TOML), got {value!r}")
            value = _build(type(default), value, key)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a section that checks itself (e.g. SamplingConfig) names only its field
        raise err.under(where) if where else err from None


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML value, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as TOML)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        target = values
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        target[leaf] = _parse_value(text.strip())
    return values


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | None = None, kind: type[C] = TrainConfig
) -> C:
    """Read a TOML config, or the ``train_config.json`` a run saved (or start from defaults when
    ``path`` is None), and apply overrides; ``kind`` is the config class (:class:`TrainConfig` or
    :class:`GeneratorTrainConfig`)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        if path.suffix == ".json":
            try:
                values = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path} is not a valid saved config: not JSON ({err})") from None
            if not isinstance(values, dict):
                raise ValueError(f"{path} is not a valid saved config: not a JSON object")
        else:
            try:
                values = tomllib.loads(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{path} is not valid TOML: it is not UTF-8 text ({err})") from None
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{path} is not valid TOML: {err}") from err
    return _build(kind, apply_overrides(values, overrides or []), "")


def train_config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a :class:`TrainConfig` from :meth:`TrainConfig.to_dict` output."""
    return _build(TrainConfig, values, "")
