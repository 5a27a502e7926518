"""Official TiTok generators -> mstok: equivalence with the official code, sampling, and precise errors.

The fixtures tests/fixtures/titok/generator_{bert,uvit}/ were made with the official
bytedance/1d-tokenizer code (ImageBert = HF BertModel, and UViTBert; hidden 32, 2 heads, MLP
64, K=8, V=64, 10 classes; random weights stored as float16): the official ``config.json``
(OmegaConf dump, ``image_seq_len`` left as ``${model.vq_model.num_latent_tokens}``) + weights,
and ``reference.safetensors`` with inputs, the official logits and the ids of the official
``generate()`` for several sampler settings. ``official_generator_layouts.json`` records the
key/shape layout and the ``model.generator`` config of each full-size release.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import mstok
from mstok.cli import main
from mstok.generators import MaskGITGenerator, SamplingConfig, generate_images, masked_counts, sample
from mstok.io import read_safetensors
from mstok.persistence import load_generator
from mstok.persistence.convert.generator import (
    GENERATOR_RELEASES,
    ConversionError,
    convert_generator_state_dict,
    convert_titok_generator,
    generator_config_from_official,
    generator_release_config,
    generator_release_key,
    load_official_generator,
    official_generator_layout,
    sampling_from_official,
)
from mstok.storage.weights import MissingWeightsError, load_torch_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "titok"
NAMES = ("generator_bert", "generator_uvit")
TOLERANCE = 1e-5  # max abs logit difference, float32


def _fixture_tool() -> ModuleType:
    """tools/regenerate_fixtures.py, which wrote the fixtures (importable without the official code)."""
    path = Path(__file__).resolve().parents[1] / "tools" / "regenerate_fixtures.py"
    spec = importlib.util.spec_from_file_location("mstok_regenerate_fixtures", path)
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


# The fixture sampler cases, from the tool that generated them: official generate() arguments
# (randomize_temperature, guidance_scale, guidance_decay, num_sample_steps) and the
# torch.manual_seed set before it (None: no noise).
SAMPLERS = _fixture_tool().SAMPLERS


def _reference(name: str) -> dict[str, torch.Tensor]:
    return read_safetensors(FIXTURES / name / "reference.safetensors")


def _official_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def _weights(name: str) -> Path:
    folder = FIXTURES / name
    return next(folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file())


def _logits(model: MaskGITGenerator, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, labels)


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_official(name: str) -> None:
    ref = _reference(name)
    model = load_official_generator(FIXTURES / name)
    assert (_logits(model, ref["tokens"], ref["labels"]) - ref["logits_cond"]).abs().max() < TOLERANCE
    null = torch.full_like(ref["labels"], model.config.null_class)  # cond_drop_prob=1: every label dropped
    assert (_logits(model, ref["tokens"], null) - ref["logits_uncond"]).abs().max() < TOLERANCE
    assert ref["labels"][-1] == model.config.null_class  # the dropped-label id as an input label too


def test_architectures() -> None:
    bert = load_official_generator(FIXTURES / "generator_bert").config
    assert (bert.architecture, bert.norm_first, bert.embed_norm, bert.qkv_bias, bert.norm_eps) == (
        "vit", False, True, True, 1e-12)  # fmt: skip
    assert (bert.num_tokens, bert.codebook_size, bert.num_classes, bert.width, bert.depth, bert.mlp_ratio) == (
        8, 64, 10, 32, 2, 2.0)  # fmt: skip
    uvit = load_official_generator(FIXTURES / "generator_uvit").config
    assert (uvit.architecture, uvit.norm_first, uvit.embed_norm, uvit.qkv_bias, uvit.norm_eps) == (
        "uvit", True, False, False, 1e-5)  # fmt: skip
    assert uvit.depth == 4 and uvit.num_heads == 2


def test_token_type_row_is_folded_into_positions() -> None:
    state = load_torch_state_dict(_weights("generator_bert"))
    config = generator_config_from_official(_official_config("generator_bert"))
    converted = convert_generator_state_dict(state, config)
    expected = state["model.embeddings.position_embeddings.weight"].float()
    expected = expected + state["model.embeddings.token_type_embeddings.weight"][0].float()
    assert torch.equal(converted["pos_embed"], expected)
    ref = _reference("generator_bert")
    model = MaskGITGenerator(config).eval()
    converted["pos_embed"] = state["model.embeddings.position_embeddings.weight"].float()  # without the fold
    model.load_state_dict(converted)
    assert (_logits(model, ref["tokens"], ref["labels"]) - ref["logits_cond"]).abs().max() > 1e-2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(SAMPLERS))
def test_sampler_matches_official_generate(name: str, case: str) -> None:
    """``SamplingConfig.official_titok`` + mstok's sampler give the ids of the official ``generate()``.

    Without noise (temperature 0) this checks the schedule, guidance formulas and confidence
    rule. With noise both draw from the global torch RNG in the same order, except that the
    official forward also draws one uniform per row (its label-dropout mask), and that with
    power-cosine guidance its first step runs two forwards (scale 1, i.e. plain conditional
    logits) where mstok runs one; drawing as many before each mstok forward lines the streams
    up, so the noisy samples must match too.
    """
    temperature, scale, decay, steps, seed = SAMPLERS[case]
    ref = _reference(name)
    model = load_official_generator(FIXTURES / name)
    forward = model.forward
    first = {"extra": decay == "power-cosine"}

    def official_rng_use(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        torch.rand(tokens.shape[0] * (2 if first.pop("extra", False) else 1))
        return forward(tokens, labels)

    model.forward = official_rng_use
    config = SamplingConfig.official_titok(
        temperature, scale, decay, steps=steps, softmax_annealing=case == "noisy_softmax"
    )
    if seed is not None:
        torch.manual_seed(seed)
    ids = sample(model, ref["gen_labels"], config)
    assert torch.equal(ids, ref[f"ids_{case}"])


def test_noisy_reference_depends_on_the_noise() -> None:
    ref = _reference("generator_bert")
    assert not torch.equal(ref["ids_noisy_linear"], ref["ids_greedy_linear"])
    model = load_official_generator(FIXTURES / "generator_bert")
    torch.manual_seed(7)  # without the official forward's extra draws the streams drift apart
    ids = sample(model, ref["gen_labels"], SamplingConfig.official_titok(2.0, 2.0, "linear"))
    assert not torch.equal(ids, ref["ids_noisy_linear"])


@pytest.mark.parametrize("release", list(GENERATOR_RELEASES))
def test_mask_counts_match_official_formula(release: str) -> None:
    """ImageBert.generate keeps floor(K * arccos(r) / (pi/2)) masked, clamped to [1, masked - 1]."""
    gen = GENERATOR_RELEASES[release]["model"]["generator"]
    k, steps = gen["image_seq_len"], gen["num_steps"]
    masked, official = k, []
    for step in range(steps):
        target = np.floor(k * (np.arccos((step + 1) / steps) / (math.pi * 0.5)))
        masked = 0 if step == steps - 1 else int(max(1, min(masked - 1, target)))
        official.append(masked)
    assert masked_counts(k, steps, "arccos") == official


# ----------------------------------------------------------------------------- release table
def test_release_layouts_match_official_code() -> None:
    """Every full-size release maps onto exactly the keys and shapes the official code builds,
    and the release table holds the official infer configs' generator settings."""
    layouts = json.loads((FIXTURES / "official_generator_layouts.json").read_text())
    assert set(layouts) == set(GENERATOR_RELEASES)
    for name, expected in layouts.items():
        official = generator_release_config(name)
        assert official["model"]["generator"] == expected["generator"], name
        config = generator_config_from_official(official)
        assert config.architecture == {"ViT": "vit", "UViT": "uvit"}[expected["model_type"]]
        items = sorted({k: s for sources, _ in official_generator_layout(config).values() for k, s in sources}.items())
        lines = "".join(f"{key} {shape}\n" for key, shape in items)
        assert len(items) == expected["keys"], name
        assert sum(math.prod(shape) for _, shape in items) == expected["parameters"], name
        assert hashlib.sha256(lines.encode()).hexdigest() == expected["sha256"], name


def test_release_configs_and_sampling() -> None:
    l32 = generator_config_from_official(generator_release_config("yucornetto/generator_titok_l32_imagenet"))
    assert (l32.architecture, l32.width, l32.depth, l32.num_heads, l32.num_tokens) == ("vit", 768, 24, 16, 32)
    assert (l32.codebook_size, l32.num_classes, l32.vocab_size) == (4096, 1000, 5098)
    s128 = generator_config_from_official(generator_release_config("generator_titok_s128.bin"))
    assert (s128.architecture, s128.width, s128.depth, s128.num_tokens, s128.qkv_bias) == ("uvit", 1024, 20, 128, False)
    assert generator_release_key("fun-research/TiTok/generator_titok_b64.bin") == "titok_b64"

    sampling = sampling_from_official(generator_release_config("titok_l32"))
    assert sampling == SamplingConfig.official_titok(9.5, 4.5, "linear", steps=8)
    assert (sampling.guidance_scale, sampling.guidance_schedule, sampling.temperature) == (4.5, "linear", 9.5)
    s128_sampling = sampling_from_official(generator_release_config("titok_s128"))
    assert s128_sampling.steps == 64 and s128_sampling.guidance_schedule == "power_cosine"
    assert s128_sampling.guidance_scale == pytest.approx(5.9)  # the official power-cosine scale g is w + 1
    assert (s128_sampling.confidence, s128_sampling.anneal_temperature) == ("logit", True)
    with pytest.raises(ConversionError, match=r"unknown TiTok generator release 'titok_l64'; known releases: titok_"):
        generator_release_config("titok_l64")


# ----------------------------------------------------------------------------- files, CLI, load_generator
def test_cli_convert_writes_sampling_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gen"
    assert main(["convert", "titok-generator", str(FIXTURES / "generator_bert"), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "converted" in printed and "vit, post-LN 32x2 (2 heads, MLP 64), K=8, V=64, 10 classes" in printed
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "sampling.json", "conversion.json"}
    official = SamplingConfig.official_titok(2.0, 3.0, "linear")  # the fixture config's settings
    assert json.loads((out / "sampling.json").read_text()) == official.to_dict()
    record = json.loads((out / "conversion.json").read_text())
    assert record["official_sampling"]["randomize_temperature"] == 2.0
    assert "--softmax-annealing" in record["official_sampling"]["softmax_temperature_annealing"]
    ref = _reference("generator_bert")
    loaded = load_generator(out)
    assert (_logits(loaded, ref["tokens"], ref["labels"]) - ref["logits_cond"]).abs().max() < TOLERANCE
    assert main(["convert", "titok-generator", str(FIXTURES / "generator_bert"), str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_official_folders_load_directly() -> None:
    for name in NAMES:
        ref = _reference(name)
        model = mstok.load_generator(str(FIXTURES / name))
        assert (_logits(model, ref["tokens"], ref["labels"]) - ref["logits_cond"]).abs().max() < TOLERANCE


def test_sample_uses_sampling_json_and_flags_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gen = convert_titok_generator(FIXTURES / "generator_uvit", tmp_path / "gen")
    tok = tmp_path / "tok"
    mstok.create_tokenizer("titok_tiny", num_latent_tokens=8, codebook_size=64).save_pretrained(tok)
    argv = ["sample", "--generator", str(gen), "--tokenizer", str(tok), "--classes", "1,4", "--n", "2"]
    argv += ["--out-dir", str(tmp_path / "s"), "--no-progress", "--device", "cpu", "--seed", "3"]
    generator, tokenizer = load_generator(gen), mstok.load_tokenizer(tok)
    labels = torch.tensor([1, 1, 4, 4])

    def expected(config: SamplingConfig) -> np.ndarray:
        return generate_images(generator, tokenizer, labels, config, seed=3)[1].numpy()

    def written() -> np.ndarray:
        return np.load(tmp_path / "s" / "samples.npz")["tokens"]

    official = SamplingConfig.official_titok(2.0, 3.0, "power-cosine")
    assert main(argv) == 0
    assert f"sampling settings from {gen / 'sampling.json'}" in capsys.readouterr().out
    assert np.array_equal(written(), expected(official))
    assert main([*argv, "--steps", "3", "--guidance-scale", "0"]) == 0  # flags override the file
    assert np.array_equal(written(), expected(official.replace(steps=3, guidance_scale=0.0)))
    other = tmp_path / "greedy.json"
    other.write_text(json.dumps({"temperature": 0.0, "choice_temperature": 0.0, "steps": 4}))
    assert main([*argv, "--sampling", str(other)]) == 0  # --sampling replaces sampling.json
    assert np.array_equal(written(), expected(SamplingConfig(temperature=0.0, choice_temperature=0.0, steps=4)))
    other.write_text(json.dumps({"temprature": 1.0}))
    assert main([*argv, "--sampling", str(other)]) == 2
    assert "unknown SamplingConfig field(s) ['temprature']" in capsys.readouterr().err
    assert main([*argv, "--sampling", str(tmp_path / "none.json")]) == 2
    assert "--sampling: no such file" in capsys.readouterr().err


def test_hub_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MissingWeightsError) as err:
        load_generator("yucornetto/generator_titok_l32_imagenet")
    message = str(err.value)
    assert "getting it from the Hugging Face hub failed: LocalEntryNotFoundError" in message
    assert "hf download yucornetto/generator_titok_l32_imagenet --local-dir generator_titok_l32_imagenet" in message
    assert "mstok.load_generator('generator_titok_l32_imagenet')" in message
    assert "mstok convert titok-generator generator_titok_l32_imagenet OUT" in message
    assert main(["convert", "titok-generator", "yucornetto/generator_titok_l32_imagenet", "out"]) == 2


def test_hub_download_converts_on_the_fly(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = []

    def cached(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(FIXTURES / "generator_uvit")  # holds pytorch_model.bin only: a second call asks for it

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    model = load_generator("yucornetto/generator_titok_s128_imagenet")
    assert calls == [
        ("yucornetto/generator_titok_s128_imagenet", ("config.json", "model.safetensors")),
        ("yucornetto/generator_titok_s128_imagenet", ("pytorch_model.bin",)),
    ]
    ref = _reference("generator_uvit")
    assert (_logits(model, ref["tokens"], ref["labels"]) - ref["logits_cond"]).abs().max() < TOLERANCE
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(FIXTURES / "legacy_s"))
    with pytest.raises(ValueError, match="is not an official TiTok generator"):
        load_generator("yucornetto/tokenizer_titok_s128_imagenet")


# ----------------------------------------------------------------------------- precise errors
def _state_and_config(name: str = "generator_bert"):
    return load_torch_state_dict(_weights(name)), generator_config_from_official(_official_config(name))


def test_wrong_shape_error() -> None:
    state, config = _state_and_config()
    state["model.lm_head.weight"] = torch.zeros(64, 16)
    with pytest.raises(ConversionError) as err:
        convert_generator_state_dict(state, config, "test.safetensors")
    message = str(err.value)
    assert message.startswith(
        "test.safetensors does not match the official TiTok ImageBert layout for vit, post-LN 32x2 (2 heads, MLP 64)"
    )
    assert "wrong shapes (1):\n    model.lm_head.weight: expected (64, 32), found (64, 16)" in message
    assert "missing keys" not in message and "unexpected keys" not in message


def test_missing_and_unexpected_key_errors(tmp_path: Path) -> None:
    state, _ = _state_and_config()
    del state["model.encoder.layer.1.attention.self.key.bias"]
    state["model.pooler.dense.weight"] = torch.zeros(32, 32)
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(FIXTURES / "generator_bert" / "config.json", folder / "config.json")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ConversionError) as err:
        load_generator(folder)
    message = str(err.value)
    assert f"{folder / 'pytorch_model.bin'} does not match" in message
    assert "missing keys (1):\n    model.encoder.layer.1.attention.self.key.bias (expected shape (32,))" in message
    assert "unexpected keys (1):\n    model.pooler.dense.weight (shape (32, 32))" in message


def test_old_transformers_buffers_are_ignored() -> None:
    state, config = _state_and_config()
    state["model.embeddings.position_ids"] = torch.arange(9)[None]
    state["model.embeddings.token_type_ids"] = torch.zeros(1, 9, dtype=torch.long)
    assert set(convert_generator_state_dict(state, config)) == set(MaskGITGenerator(config).state_dict())


def test_architecture_mismatch_hint() -> None:
    state = load_torch_state_dict(_weights("generator_uvit"))
    official = _official_config("generator_uvit")
    official["model"]["generator"]["model_type"] = "ViT"
    with pytest.raises(ConversionError) as err:
        convert_generator_state_dict(state, generator_config_from_official(official))
    message = str(err.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert message.endswith("These weights look like an official UViTBert (model.generator.model_type UViT).")


def test_model_type_from_the_weights_when_the_config_has_none(tmp_path: Path) -> None:
    folder = tmp_path / "uvit"
    shutil.copytree(FIXTURES / "generator_uvit", folder)
    official = _official_config("generator_uvit")
    del official["model"]["generator"]["model_type"]
    (folder / "config.json").write_text(json.dumps(official))
    assert load_official_generator(folder).config.architecture == "uvit"
    with pytest.raises(ConversionError, match=r"no model\.generator\.model_type \(ViT or UViT\)"):
        generator_config_from_official(official)


def test_weights_file_and_release_errors(tmp_path: Path) -> None:
    weights = tmp_path / "weights.safetensors"
    shutil.copy(_weights("generator_bert"), weights)
    with pytest.raises(ConversionError, match=r"no config\.json beside .*weights\.safetensors.*pass the release"):
        load_official_generator(weights)
    named = tmp_path / "generator_titok_l32.bin"  # a bare file named like a release: that release's table entry
    torch.save(load_torch_state_dict(_weights("generator_bert")), named)
    with pytest.raises(ConversionError) as err:
        load_official_generator(named)
    message = str(err.value)
    assert "ImageBert layout for vit, post-LN 768x24 (16 heads, MLP 3072), K=32, V=4096, 1000 classes" in message
    assert "model.embeddings.word_embeddings.weight: expected (5098, 768), found (76, 32)" in message
    assert main(["convert", "titok-generator", str(weights), str(tmp_path / "o"), "--release", "titok_s128"]) == 2


def test_config_errors(tmp_path: Path) -> None:
    official = _official_config("generator_bert")
    official["model"]["generator"]["image_seq_len"] = "${model.vq_model.num_tokens}"
    with pytest.raises(ConversionError, match=r"refers to \$\{model\.vq_model\.num_tokens\}, which it does not define"):
        generator_config_from_official(official)
    official["model"]["generator"].update(image_seq_len=8, model_type="MaskGen")
    with pytest.raises(ConversionError, match=r"model_type is 'MaskGen'; mstok converts ViT, UViT"):
        generator_config_from_official(official)
    with pytest.raises(ConversionError, match=r"no model\.generator section"):
        generator_config_from_official(_official_config("legacy_s"))
    with pytest.raises(ConversionError, match="it is a tokenizer's: convert it with mstok convert titok"):
        convert_titok_generator(FIXTURES / "legacy_s", tmp_path / "out")
    mstok.create_generator("maskgit_tiny").save_pretrained(tmp_path / "ours")
    with pytest.raises(ConversionError, match="already an mstok checkpoint"):
        convert_titok_generator(tmp_path / "ours", tmp_path / "out")


def test_softmax_annealing_changes_the_samples() -> None:
    """The official FID script's softmax annealing is not a no-op: without it, seed 17 differs."""
    ref = _reference("generator_bert")
    model = load_official_generator(FIXTURES / "generator_bert")
    forward = model.forward
    model.forward = lambda tokens, labels: (torch.rand(tokens.shape[0]), forward(tokens, labels))[1]
    torch.manual_seed(17)
    ids = sample(model, ref["gen_labels"], SamplingConfig.official_titok(2.0, 2.0, "linear"))
    assert not torch.equal(ids, ref["ids_noisy_softmax"])
