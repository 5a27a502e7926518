"""The config schema (mstok.config_schema): every bad value of a training, generator or tokenizer
config fails at load time with an error naming its dotted key and the value given; every shipped
config and preset still validates."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import mstok
from mstok.config_schema import ConfigError, Rule, check_config, describe, field_rules, one_of
from mstok.generators.maskgit import GeneratorConfig
from mstok.generators.maskgit_sampling import SamplingConfig
from mstok.generators.registry import GENERATOR_PRESETS, generator_config
from mstok.persistence import load_generator
from mstok.tokenizers.mstok import MsTokConfig
from mstok.tokenizers.registry import create_tokenizer, list_presets, preset_config
from mstok.tokenizers.titok import TiTokConfig
from mstok.tokenizers.vqgan import VQGANConfig
from mstok.training.config import (
    GeneratorTrainConfig,
    OptimConfig,
    TrainConfig,
    load_train_config,
    train_config_from_dict,
)
from mstok.training.distributed import DistContext

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
TRAIN_BASE = ROOT / "configs" / "mstok_tiny.toml"
GENERATOR_BASE = ROOT / "configs" / "maskgit_tiny.toml"


def _kind(path: Path) -> type:
    """Generator configs name a generator preset; every other config trains a tokenizer."""
    text = path.read_text()
    return GeneratorTrainConfig if any(f'preset = "{name}"' in text for name in GENERATOR_PRESETS) else TrainConfig


def _set(*overrides: str) -> Callable[[Path], object]:
    """``mstok train --config configs/mstok_tiny.toml --set ...``."""
    return lambda tmp: load_train_config(TRAIN_BASE, list(overrides))


def _gen_set(*overrides: str) -> Callable[[Path], object]:
    """``mstok train-generator --config configs/maskgit_tiny.toml --set ...``."""
    return lambda tmp: load_train_config(GENERATOR_BASE, list(overrides), GeneratorTrainConfig)


def _toml(text: str) -> Callable[[Path], object]:
    """A whole config file."""

    def load(tmp: Path) -> object:
        path = tmp / "bad.toml"
        path.write_text(text)
        return load_train_config(path)

    return load


def _direct(make: Callable[[], object]) -> Callable[[Path], object]:
    """Python API: a dataclass or preset built directly."""
    return lambda tmp: make()


# (how the bad config is built, error type, the key the message names, the bad value as it is shown)
BAD = [
    # --set on a training config
    pytest.param(_set("steps=2.5"), ConfigError, "steps", "2.5", id="steps-float"),
    pytest.param(_set("steps='ten'"), ConfigError, "steps", "'ten'", id="steps-string"),
    pytest.param(_set("batch_size=true"), ConfigError, "batch_size", "True", id="batch-bool"),
    pytest.param(_set("data.flip='no'"), ConfigError, "data.flip", "'no'", id="flip-string"),
    pytest.param(_set("optim.warmup_steps=-1"), ConfigError, "optim.warmup_steps", "-1", id="warmup-negative"),
    pytest.param(_set("optim.lr='fast'"), ConfigError, "optim.lr", "'fast'", id="lr-string"),
    pytest.param(_set("optim.lr=0"), ConfigError, "optim.lr", "got 0", id="lr-zero"),
    pytest.param(_set("optim.lr=inf"), ConfigError, "optim.lr", "inf", id="lr-inf"),
    pytest.param(_set("optim.betas=[0.9, nan]"), ConfigError, "optim.betas", "nan", id="betas-nan"),
    pytest.param(_set("optim.grad_clip=0"), ConfigError, "optim.grad_clip", "got 0", id="grad-clip-zero"),
    pytest.param(_set("data.crop_scale=[0.8]"), ConfigError, "data.crop_scale", "[0.8]", id="crop-short"),
    pytest.param(_set("data.crop_scale=[0.9, 0.5]"), ConfigError, "data.crop_scale", "[0.9, 0.5]", id="crop-order"),
    pytest.param(_set("loss.l1_weight=-inf"), ConfigError, "loss.l1_weight", "-inf", id="loss-inf"),
    pytest.param(_set("ema_decay=1.0"), ConfigError, "ema_decay", "1.0", id="ema-one"),
    pytest.param(_set("precision='fp8'"), ConfigError, "precision", "'fp8'", id="precision"),
    pytest.param(_set("device='gpu'"), ConfigError, "device", "'gpu'", id="device-name"),
    pytest.param(_set("data.max_pixels=0"), ConfigError, "data.max_pixels", "got 0", id="max-pixels"),
    pytest.param(_set("out_dir=5"), ConfigError, "out_dir", "5", id="out-dir-int"),
    pytest.param(_set("stage.train=['encoder', 3]"), ConfigError, "stage.train", "3", id="stage-item"),
    pytest.param(_set("model.overrides=5"), ConfigError, "model.overrides", "5", id="overrides-int"),
    pytest.param(
        _set("model.overrides.codebook_size=1000000000000"),
        ConfigError,
        "model.overrides.codebook_size",
        "1000000000000",
        id="codebook-huge",
    ),
    pytest.param(
        _set("model.overrides.commitment_weight=inf"),
        ConfigError,
        "model.overrides.commitment_weight",
        "inf",
        id="commitment-inf",
    ),
    pytest.param(
        _set("model.overrides.head='proxy_codes'", "model.overrides.pixel_decoder={dropout=inf}"),
        ConfigError,
        "model.overrides.pixel_decoder.dropout",
        "inf",
        id="pixel-decoder-inf",
    ),
    pytest.param(_set("model.preset='mstok_tny'"), ValueError, "model.preset", "'mstok_tny'", id="preset-typo"),
    # whole TOML files
    pytest.param(_toml('[optim]\nlr = "fast"\n'), ConfigError, "optim.lr", "'fast'", id="toml-lr"),
    pytest.param(_toml("optim = 5\n"), ConfigError, "optim", "5", id="toml-section-scalar"),
    pytest.param(_toml(f"[optim]\nlr = {10**400}\n"), ConfigError, "optim.lr", "got 1000", id="toml-lr-huge-int"),
    pytest.param(_toml("seed = -1\n"), ConfigError, "seed", "-1", id="toml-seed"),
    pytest.param(
        _toml("[data]\ncrop_scale = [0.5, 1.0, 1.0]\n"),
        ConfigError,
        "data.crop_scale",
        "[0.5, 1.0, 1.0]",
        id="toml-crop",
    ),
    pytest.param(_toml("[model]\noverrides = [1]\n"), ConfigError, "model.overrides", "[1]", id="toml-overrides"),
    # --set on a generator training config
    pytest.param(_gen_set("loss.class_dropout=1.5"), ConfigError, "loss.class_dropout", "1.5", id="gen-dropout"),
    pytest.param(_gen_set("loss.schedule='cubic'"), ConfigError, "loss.schedule", "'cubic'", id="gen-schedule"),
    pytest.param(_gen_set("sampling.steps=0"), ConfigError, "sampling.steps", "got 0", id="gen-sampling-steps"),
    pytest.param(
        _gen_set("sampling.guidance_scale=nan"), ConfigError, "sampling.guidance_scale", "nan", id="gen-guidance"
    ),
    pytest.param(
        _gen_set("model.overrides.dropout=2"), ConfigError, "model.overrides.dropout", "got 2", id="gen-override"
    ),
    pytest.param(_gen_set("data.num_workers=-1"), ConfigError, "data.num_workers", "-1", id="gen-workers"),
    # dataclasses and presets built directly
    pytest.param(
        _direct(lambda: preset_config("titok_tiny", commitment_weight=math.inf)),
        ConfigError,
        "commitment_weight",
        "inf",
        id="titok-commitment-inf",
    ),
    pytest.param(
        _direct(lambda: preset_config("mstok_tiny", codebook_size=10**12)),
        ConfigError,
        "codebook_size",
        "1000000000000",
        id="mstok-codebook-huge",
    ),
    pytest.param(_direct(lambda: MsTokConfig(qk_norm="yes")), ConfigError, "qk_norm", "'yes'", id="mstok-bool"),
    pytest.param(_direct(lambda: TiTokConfig(decoder_width=7.5)), ConfigError, "decoder_width", "7.5", id="titok-opt"),
    pytest.param(_direct(lambda: VQGANConfig(dropout=math.nan)), ConfigError, "dropout", "nan", id="vqgan-nan"),
    pytest.param(
        _direct(lambda: VQGANConfig(channel_mult=[1, 2.0])), ConfigError, "channel_mult", "2.0", id="vqgan-mult"
    ),
    pytest.param(_direct(lambda: GeneratorConfig(num_classes=2.5)), ConfigError, "num_classes", "2.5", id="gen-cls"),
    pytest.param(
        _direct(lambda: generator_config("maskgit_tiny", codebook_size=10**12)),
        ConfigError,
        "codebook_size",
        "1000000000000",
        id="gen-codebook-huge",
    ),
    pytest.param(_direct(lambda: SamplingConfig(temperature=-1)), ConfigError, "temperature", "-1", id="sampling"),
    pytest.param(
        _direct(lambda: TrainConfig(optim=OptimConfig(lr=math.inf))), ConfigError, "optim.lr", "inf", id="train-direct"
    ),
    pytest.param(
        _direct(lambda: TrainConfig(model=mstok.training.config.ModelConfig(overrides=None))),
        ConfigError,
        "model.overrides",
        "None",
        id="train-direct-overrides",
    ),
]


@pytest.mark.parametrize(("build", "error", "key", "shown"), BAD)
def test_bad_config_names_key_and_value(tmp_path, build, error, key, shown):
    with pytest.raises(error) as info:
        build(tmp_path)
    message = str(info.value)
    assert message.startswith(key + " ") or message.startswith(key + ":"), message
    assert shown in message, message
    if isinstance(info.value, ConfigError):
        assert info.value.key == key


@pytest.mark.parametrize(
    ("build", "allowed"),
    [
        (_set("precision='fp8'"), "'fp32', 'bf16', 'fp16'"),
        (_gen_set("loss.schedule='cubic'"), "'cosine', 'arccos', 'linear', 'sqrt'"),
        (_set("model.overrides.head='rgb'"), "'pixels', 'proxy_codes'"),
        (_set("optim.warmup_steps=-1"), "an integer >= 0"),
        (_set("ema_decay=1.0"), "a number in [0, 1)"),
        (_set("data.crop_scale=[0.8]"), "2 items, each a number in (0, 1]"),
        (_set("model.overrides.codebook_size=1000000000000"), "maximum 1048576"),
        (_set("device='gpu'"), "'cuda:<index>'"),
    ],
)
def test_messages_list_what_is_allowed(tmp_path, build, allowed):
    with pytest.raises(ValueError) as info:
        build(tmp_path)
    assert allowed in str(info.value)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_validates(path):
    config = load_train_config(path, kind=_kind(path))
    check_config(config)  # idempotent on a valid config
    if isinstance(config, TrainConfig):
        assert train_config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", list_presets())
def test_every_tokenizer_preset_validates(name):
    config = preset_config(name)
    check_config(config)
    assert type(config).from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", list(GENERATOR_PRESETS))
def test_every_generator_preset_validates(name):
    check_config(generator_config(name))


def test_no_coercion_but_ints_stand_for_floats():
    config = load_train_config(TRAIN_BASE, ["optim.lr=1", "optim.betas=[0, 0.5]", "loss.l1_weight=2"])
    assert config.optim.lr == 1 and isinstance(config.optim.lr, int)  # kept as given: no silent rewrite
    assert config.optim.betas == (0, 0.5) and isinstance(config.optim.betas, tuple)  # TOML lists become tuples
    assert isinstance(GeneratorConfig(norm_eps=1).norm_eps, int)
    with pytest.raises(ConfigError, match=r"^steps must be a positive integer, got 3\.0$"):
        load_train_config(TRAIN_BASE, ["steps=3.0"])


def test_every_rule_names_a_field():
    # field_rules raises TypeError on a rule for a missing field, so a renamed field cannot drop its rule silently
    for cls in (TrainConfig, GeneratorTrainConfig, TiTokConfig, MsTokConfig, VQGANConfig, GeneratorConfig):
        assert field_rules(cls)
    assert "vae" in field_rules(TiTokConfig)["quantizer"].choices  # inherited from TokenizerConfig

    @dataclasses.dataclass
    class Parent:
        mode: str = "a"
        field_rules: ClassVar[dict[str, Rule]] = {"mode": one_of(("a", "b"))}

    @dataclasses.dataclass
    class Child(Parent):
        field_rules: ClassVar[dict[str, Rule]] = {"mode": one_of(("a", "c"))}

    assert field_rules(Child)["mode"].choices == ("a", "c")  # the subclass's rule wins
    assert field_rules(Parent)["mode"].choices == ("a", "b")


def test_a_union_field_takes_any_arm_and_says_so():
    with pytest.raises(ConfigError, match=r"^quantizer must be one of .*'vae'.* or a table \(dict\), got 3$"):
        TiTokConfig(quantizer=3)
    with pytest.raises(ConfigError, match=r"^quantizer must be one of .*, got 'vqq'$"):
        MsTokConfig(quantizer="vqq")
    assert TiTokConfig(quantizer={"type": "bsq"}).quantizer == {"type": "bsq"}


def test_describe():
    assert describe(int, field_rules(TrainConfig)["steps"]) == "a positive integer"
    assert describe(bool) == "true or false"
    assert describe(int | None, field_rules(TiTokConfig)["decoder_width"]) == "a positive integer or null (None)"
    assert describe(float, field_rules(OptimConfig)["lr"]) == "a finite number > 0"


def test_section_errors_keep_their_dotted_key():
    # SamplingConfig checks itself when built inside a generator config: the key still carries "sampling."
    with pytest.raises(ConfigError) as info:
        load_train_config(GENERATOR_BASE, ["sampling.schedule='cubic'"], GeneratorTrainConfig)
    assert info.value.key == "sampling.schedule" and "a masking schedule" in str(info.value)


@pytest.mark.parametrize("name", [None, 3, ["mstok_tiny"]])
def test_create_tokenizer_needs_a_preset_name(name):
    with pytest.raises(TypeError, match=r"create_tokenizer\(name=\.\.\.\): name must be a preset name.*got"):
        create_tokenizer(name)
    with pytest.raises(TypeError, match=r"generator_config\(name=\.\.\.\)"):
        generator_config(name)


def test_unknown_preset_keeps_its_suggestion():
    with pytest.raises(ValueError, match=r"unknown preset 'titok_tin' \(did you mean titok_tiny"):
        create_tokenizer("titok_tin")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"family": "titok", "config": null}', "'config' must be a table"),
        (b'{"family": "titok", "config": [1, 2]}', "'config' must be a table"),
        (b'{"family": 7, "config": {}}', "'family' must be a string"),
        (b'{"family": "titok"}', "no 'config' entry"),
        (b"[1, 2]", "must hold a JSON object"),
        (b"\xff\xfe\x00\x01 not utf-8", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b'{"family": "titok", "config": {"codebook_size": 1e999}}', "codebook_size must be a positive integer"),
    ],
)
@pytest.mark.parametrize("load", [mstok.load_tokenizer, load_generator], ids=["tokenizer", "generator"])
def test_broken_config_json_names_the_file(tmp_path, content, problem, load):
    family = b'"maskgit"' if load is load_generator else b'"titok"'
    (tmp_path / "config.json").write_bytes(content.replace(b'"titok"', family))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as info:
        load(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value) and problem in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^device = 'cuda', but CUDA is not available"):
        DistContext.from_env("cuda")
    config = load_train_config(TRAIN_BASE, ["device='cuda'", f"out_dir='{tmp_path}'"])  # loads anywhere
    from mstok.training import Trainer

    with pytest.raises(ValueError, match=r"^device = 'cuda', but CUDA is not available"):
        Trainer(config, progress=False)


def test_config_errors_survive_pickling():
    # raised in a worker process (benchmarks train runs in a process pool), it must reach the parent intact
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("optim.lr", "must be > 0, got 0")))
    assert isinstance(err, ConfigError) and err.key == "optim.lr" and str(err) == "optim.lr must be > 0, got 0"
