"""The web app's handlers, without a browser: each tab's function on small random-weight models
saved to disk (a saved model is what the pickers load; random weights are fine for plumbing),
and every kind of bad input the page must turn into one readable line."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mstok
from mstok.app import command, generation, handlers, models
from mstok.app.handlers import decode_prefix, prefix_slider, read_image, reconstruct, redraw, user_message
from mstok.app.models import ModelCache, Runtime
from mstok.cli import build_parser
from mstok.data.tokens import tokenizer_identity
from mstok.generators import create_generator


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved models: titok_tiny, hieratok_tiny (scale-causal: its scales decode alone), maskgit_tiny."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    folders = {"titok": root / "titok", "hiera": root / "hiera", "gen": root / "gen"}
    mstok.create_tokenizer("titok_tiny").save_pretrained(folders["titok"])
    mstok.create_tokenizer("hieratok_tiny").save_pretrained(folders["hiera"])
    create_generator("maskgit_tiny").save_pretrained(folders["gen"])
    return folders


@pytest.fixture
def cache() -> ModelCache:
    return ModelCache(Runtime(torch.device("cpu")))


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)  # uint16 arrays become 16-bit PNGs (mode I;16)
    return path


# ----------------------------------------------------------------------------- Tokenize
def test_reconstruct_shows_images_scores_and_token_ids(cache: ModelCache, saved: dict[str, Path]) -> None:
    result = reconstruct(cache, str(saved["titok"]), None, "chelsea")
    assert result.original.shape == result.recon.shape == result.heatmap.shape == (256, 256, 3)  # 64 px, enlarged
    assert result.recon.dtype == np.uint8 and np.isfinite(result.psnr) and -1 <= result.ssim <= 1
    assert f"PSNR {result.psnr:.2f} dB" in result.metrics and "32 tokens, ids of 1024 codes (320 bits" in result.metrics
    ids = [v for row in result.rows for v in row[1:] if v != ""]
    assert ids == result.state["tokens"][0].tolist() and len(result.rows) == 2  # 32 ids in rows of 16
    assert not result.slider.interactive and "full K tokens only" in result.slider.info  # not a nested model


def test_upload_wins_over_the_example_and_a_16_bit_png_is_read_not_refused(
    cache: ModelCache, saved: dict[str, Path], tmp_path: Path
) -> None:
    wide = _png(tmp_path / "deep.png", np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 12)
    result = reconstruct(cache, str(saved["titok"]), str(wide), "chelsea")
    assert "deep.png: 80x64 I;16 (16-bit or float image, scaled to 8 bits)" in result.note
    assert result.original[..., 0].max() > 200  # scaled by 1/65535, not clipped to white or black
    image, note = read_image(None, "coffee")
    assert image.mode == "RGB" and "scikit-image" in note


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: (d / "notes.png").write_text("not an image") and d / "notes.png", "notes.png is not an image file"),
        (lambda d: _png(d / "big.png", np.zeros((80, 90), np.uint8)), "big.png is 90x80 = 7,200 pixels, over"),
        (lambda d: None, "upload an image or pick an example photo first"),
    ],
)
def test_bad_uploads_give_one_readable_line(make, expected: str, cache: ModelCache, saved, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        reconstruct(cache, str(saved["titok"]), make(tmp_path), None, max_pixels=5000)
    message = user_message(err.value)
    assert expected in message and "\n" not in message and str(tmp_path) not in message  # no server temp path


def test_a_huge_image_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    huge = _png(tmp_path / "huge.png", np.zeros((6400, 6400), np.uint8))  # 41 M pixels, a small file
    with pytest.raises(ValueError, match=r"huge.png is 6400x6400 = 40,960,000 pixels, over this app's limit"):
        read_image(str(huge))


def test_presets_and_non_models_are_refused_with_a_reason(cache: ModelCache, tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    cases = {
        "titok_tiny": "titok_tiny is a preset, whose weights are random",
        "titok_l32": "the released weights of this size are official:titok_l32",
        "": "pick a tokenizer first",
        str(tmp_path): "not a saved mstok tokenizer, nor a run folder",
        str(tmp_path / "junk"): "is not a valid mstok tokenizer config: not JSON",
    }
    for spec, expected in cases.items():
        with pytest.raises((ValueError, OSError)) as err:
            cache.get(spec)
        assert expected in user_message(err.value), spec
    with pytest.raises(ValueError, match="maskgit_tiny is a preset, whose weights are random: its samples"):
        cache.get("maskgit_tiny", "generator")


def test_a_bug_is_named_as_one_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    message = user_message(AttributeError("'NoneType' object has no attribute 'shape'"))
    assert message.startswith("⚠️ internal error, a bug") and "AttributeError" in message
    assert "app handler failed" in caplog.text


def test_the_cache_loads_once_and_again_when_the_checkpoint_changes(saved, tmp_path: Path) -> None:
    cache = ModelCache(Runtime(torch.device("cpu")), size=1)
    first = cache.get(str(saved["titok"]))
    assert cache.get(str(saved["titok"])) is first
    folder = tmp_path / "copy"
    first.model.save_pretrained(folder)
    second = cache.get(str(folder))
    assert second is not first and len(cache._models) == 1  # the oldest left
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # as a newer save would
    assert cache.get(str(folder)) is not second


# ----------------------------------------------------------------------------- the slider
def test_hieratok_slider_redraws_each_number_of_scales(cache: ModelCache, saved: dict[str, Path]) -> None:
    result = reconstruct(cache, str(saved["hiera"]), None, "coffee")
    slider = result.slider
    assert (slider.label, slider.minimum, slider.maximum, slider.interactive) == ("scales decoded", 1, 4, True)
    assert result.headers[:2] == ["token", "norm"] and len(result.rows) == 85  # latents: a row per token
    model = cache.get(str(saved["hiera"])).model
    for n in (1, 2):
        recon, heat, text = redraw(cache, result.state, n)
        assert recon.shape == heat.shape == (256, 256, 3) and f"decoded: {n} of 4 scales" in text
        coarse = model.decode(result.state["tokens"], scales=n)
        side = coarse.shape[-1]
        assert side == [1, 2, 4, 8][n - 1] * 8  # shown enlarged, each coarse pixel a block
        assert np.array_equal(recon[:: 256 // side, :: 256 // side], handlers.to_uint8(coarse[0]))
    assert "decoded" not in redraw(cache, result.state, 4)[2]


def test_redraw_needs_a_tokenized_image_and_a_movable_slider(cache: ModelCache, saved: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="tokenize an image first"):
        redraw(cache, None, 2)
    state = reconstruct(cache, str(saved["titok"]), None, "chelsea").state
    with pytest.raises(ValueError, match="decodes its full K tokens only"):
        redraw(cache, state, 8)


def test_decode_prefix_of_a_nested_model_and_the_refusal_of_any_other(saved: dict[str, Path]) -> None:
    """A nested model decodes any prefix (the slider is on); a model trained without nested tokens
    decodes only all K, refuses a prefix with its reason, and gets a disabled slider."""
    model = mstok.load_tokenizer(saved["titok"])
    tokens = torch.randint(0, 1024, (2, 32))
    assert torch.equal(decode_prefix(model, tokens, 32), model.decode(tokens))
    assert not model.supports_prefix and not prefix_slider(model, 32).interactive
    with pytest.raises(ValueError, match="without nested tokens"):
        decode_prefix(model, tokens, 8)
    with pytest.raises(ValueError, match=r"k must be a number of tokens in 1\.\.32"):
        decode_prefix(model, tokens, 0)
    nested = mstok.create_tokenizer("titok_tiny", nested=True).eval()
    assert nested.supports_prefix and prefix_slider(nested, 32).interactive
    prefix = decode_prefix(nested, tokens, 8)
    other = tokens.clone()
    other[:, 8:] = torch.randint(0, 1024, (2, 24))
    assert prefix.shape == (2, 3, 64, 64) and torch.equal(prefix, decode_prefix(nested, other, 8))
    assert not torch.equal(prefix, nested.decode(tokens))


# ----------------------------------------------------------------------------- Compare
def test_compare_puts_two_models_side_by_side(cache: ModelCache, saved: dict[str, Path]) -> None:
    a, b, table = handlers.compare(cache, str(saved["titok"]), str(saved["hiera"]), None, "chelsea")
    assert a.recon.shape == b.recon.shape == (256, 256, 3) and np.array_equal(a.original, b.original)
    assert f"| A: {saved['titok']} | {a.psnr:.2f} | {a.ssim:.4f} | 32 |" in table
    assert f"| B: {saved['hiera']} | {b.psnr:.2f} | {b.ssim:.4f} | 85 |" in table


# ----------------------------------------------------------------------------- Generate
def _trained_on_tokens(tmp_path: Path, generator: Path, tokenizer: torch.nn.Module) -> Path:
    """Give a saved generator the training record ``mstok train-generator`` leaves: its token
    shards' index (naming the tokenizer and the class folders) and the images' manifest.csv."""
    images, tokens = tmp_path / "images", tmp_path / "tokens"
    images.mkdir()
    tokens.mkdir()
    with (images / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "class_idx", "class_name"])
        writer.writerow(["n02099601/a.JPEG", "n02099601", "1", "golden retriever"])
    index = {"tokenizer": tokenizer_identity(tokenizer), "classes": ["n01443537", "n02099601"], "source": str(images)}
    (tokens / "index.json").write_text(json.dumps(index))
    (generator / "train_config.json").write_text(json.dumps({"data": {"path": str(tokens)}}))
    return generator


def test_generate_draws_samples_of_a_class_by_name(cache: ModelCache, saved, tmp_path: Path) -> None:
    generator = tmp_path / "gen"
    mstok.load_generator(saved["gen"]).save_pretrained(generator)
    _trained_on_tokens(tmp_path, generator, mstok.load_tokenizer(saved["titok"]))
    found = generation.generator_settings(cache, str(generator), str(saved["titok"]))
    assert found.classes[:3] == ["0 n01443537", "1 golden retriever", "2"] and len(found.classes) == 200
    assert (found.guidance, found.steps) == (0.0, 8)  # MaskGIT's defaults: no sampling.json
    images, caption = generation.generate(cache, str(generator), str(saved["titok"]), found.classes[1], 2.0, 2, 3, 0)
    assert len(images) == 3 and images[0].shape == (256, 256, 3)
    assert "3 samples of class 1" in caption and "guidance 2, 2 steps, seed 0" in caption
    again, _ = generation.generate(cache, str(generator), str(saved["titok"]), "1", 2.0, 2, 3, 0)
    assert all(np.array_equal(x, y) for x, y in zip(images, again, strict=True))  # the seed fixes the samples
    torch.manual_seed(1)
    mstok.create_tokenizer("titok_tiny").save_pretrained(tmp_path / "other")  # same K and V, other weights
    with pytest.raises(ValueError, match="this generator was trained on tokens of"):
        generation.generator_settings(cache, str(generator), str(tmp_path / "other"))
    (generator / "sampling.json").write_text(json.dumps({"guidance_scale": 4.5, "steps": 12}))
    assert generation.generator_settings(cache, str(generator), str(saved["titok"])).guidance == 4.5


def test_generate_refuses_bad_classes_counts_and_mismatched_tokenizers(cache: ModelCache, saved) -> None:
    gen, tok = str(saved["gen"]), str(saved["titok"])
    for choice, expected in (("golden", "pick a class from the list"), ("200 x", "200 classes, numbered 0 to 199")):
        with pytest.raises(ValueError, match=expected):
            generation.generate(cache, gen, tok, choice, 1.0, 2, 1, 0)
    with pytest.raises(ValueError, match="samples must be 1 to 16"):
        generation.generate(cache, gen, tok, "0", 1.0, 2, 17, 0)
    with pytest.raises(ValueError, match="use the tokenizer its tokens came from"):
        generation.generate(cache, gen, str(saved["hiera"]), "0", 1.0, 2, 1, 0)


def test_class_names_come_from_a_manifest_or_a_list(tmp_path: Path) -> None:
    listed = tmp_path / "names.txt"
    listed.write_text("tench\ngoldfish\n")
    assert generation.read_class_names(listed) == {"0": "tench", "1": "goldfish"}
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,label,class_idx,class_name\na.jpg,n01,0,tench\n")
    assert generation.read_class_names(manifest) == {"0": "tench", "n01": "tench"}
    assert generation.parse_class("207 golden retriever", 1000) == 207


# ----------------------------------------------------------------------------- pickers and the command
def test_the_pickers_list_trained_models_and_official_releases(saved: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "runs" / "titok_run" / "checkpoints" / "step_0000002"
    mstok.load_tokenizer(saved["titok"]).save_pretrained(run)
    mstok.load_generator(saved["gen"]).save_pretrained(tmp_path / "runs" / "gen")
    (tmp_path / "runs" / "empty").mkdir()
    assert models.find_models([tmp_path / "runs"], "tokenizer") == [str(tmp_path / "runs" / "titok_run")]
    assert models.find_models([tmp_path / "runs"], "generator") == [str(tmp_path / "runs" / "gen")]
    assert models.find_models([tmp_path / "nowhere"]) == []
    assert "official:titok_l32" in models.official_choices() and "official:titok_s128" in models.official_choices(
        "generator"
    )


def test_mstok_app_parses_and_the_cpu_runs_in_float32() -> None:
    args = build_parser().parse_args(["app", "--model", "runs/a", "--model", "runs/b", "--port", "0", "--half"])
    assert (args.model, args.port, args.half, args.func) == (["runs/a", "runs/b"], 0, True, command.cmd_app)
    assert models.choose_runtime("cpu", half=True) == Runtime(torch.device("cpu"), torch.float32)


def test_the_browser_is_found_on_the_path_or_named_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import app_browser

    monkeypatch.delenv("MSTOK_CHROMIUM", raising=False)
    monkeypatch.delenv("MSTOK_CHROMEDRIVER", raising=False)
    monkeypatch.setattr(app_browser.shutil, "which", lambda name: None)
    assert app_browser.find_chromium() is None  # the end-to-end test then skips, or fails under CI
    monkeypatch.setenv("MSTOK_CHROMIUM", "/opt/chrome")
    monkeypatch.setenv("MSTOK_CHROMEDRIVER", "/opt/chromedriver")
    assert app_browser.find_chromium() == ("/opt/chrome", "/opt/chromedriver")


def test_mstok_app_without_gradio_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mstok.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # as where the "app" extra is not installed
    assert main(["app", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err == 'mstok app: error: mstok app needs Gradio, the optional extra "app": pip install "mstok[app]"\n'


def test_an_official_generator_starts_from_its_release_settings(saved: dict[str, Path]) -> None:
    loaded = models.Loaded(mstok.load_generator(saved["gen"]), "official", None)
    settings = generation.sampling_defaults(loaded, "official:titok_l32")
    assert (settings["guidance_scale"], settings["steps"]) == (4.5, 8)  # docs/official-checkpoints.md's table
    assert generation.sampling_defaults(loaded, str(saved["gen"])) == {}  # no sampling.json: the family's defaults
