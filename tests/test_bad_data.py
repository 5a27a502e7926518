"""Bad data and image inputs: unusual image modes, oversized files, all-broken folders, shard
indexes that point outside their folder, wrong image tensors, and what eval says about them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mstok.cli import main
from mstok.data import (
    DEFAULT_MAX_PIXELS,
    CorruptImageError,
    ImageFolder,
    NoReadableImageError,
    OversizedImageError,
    ShardDataset,
    SkipBroken,
    center_crop_transform,
    load_rgb,
    to_tensor,
    write_shards,
)
from mstok.data.decode import to_rgb
from mstok.evaluation import evaluate as ev
from mstok.tokenizers import create_tokenizer
from mstok.training import Trainer, load_train_config
from mstok.training.components import build_dataset
from mstok.training.config import DataConfig

SIZE = 64  # titok_tiny's resolution


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # a small one: these tests check the plumbing, not reconstructions
    return create_tokenizer("titok_tiny", width=32, depth=1, num_heads=2, patch_size=16).eval()


def _sixteen_bit() -> np.ndarray:
    """A 16-bit ramp whose values would all be white if clipped at 255."""
    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    ramp[0, :3] = (0, 32768, 65535)
    return ramp


def _expected(values: np.ndarray) -> torch.Tensor:
    """The numpy reference: value / 65535 as a (3, H, W) grey image."""
    grey = torch.from_numpy(values.astype(np.float64) / 65535.0).float()
    return grey.expand(3, *grey.shape)


def _save_rgb(path: Path, size: tuple[int, int], value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 60)).save(path)
    return path


# ------------------------------------------------------------------ decoding
def test_sixteen_bit_png_decodes_to_its_values_everywhere(tmp_path):
    values = _sixteen_bit()
    png = tmp_path / "folder" / "a" / "deep.png"
    png.parent.mkdir(parents=True)
    Image.fromarray(values).save(png)
    assert Image.open(png).mode == "I;16"
    expected = _expected(values)
    decoded = to_tensor(load_rgb(png))
    # 8 bits after scaling: within half a grey level of value / 65535, and not white
    assert torch.allclose(decoded, expected, atol=0.5 / 255 + 1e-6)
    assert torch.equal(decoded[:, 0, :3], torch.tensor([[0.0, 128.0, 255.0]] * 3) / 255.0)
    # training folders, shards (to-shards and their reader) and eval decode it the same way
    identity = center_crop_transform(32)
    from_folder = ImageFolder(tmp_path / "folder", identity)[(0, 0)][0]
    write_shards(tmp_path / "folder", tmp_path / "shards", progress=False)
    from_shards = ShardDataset(tmp_path / "shards", identity)[(0, 0)][0]
    from_eval = ev.eval_dataset(tmp_path / "folder", 32)[(0, 0)][0]
    for tensor in (from_folder, from_shards, from_eval):
        assert torch.equal(tensor, decoded)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_wide_integer_modes_scale_by_65535(mode):
    values = _sixteen_bit()
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    image = Image.frombytes(mode, (32, 32), values.astype(dtype).tobytes())
    assert torch.allclose(to_tensor(to_rgb(image)), _expected(values), atol=0.5 / 255 + 1e-6)


def test_float_images_in_unit_and_sixteen_bit_ranges(tmp_path):
    values = _sixteen_bit()
    unit = tmp_path / "unit.tif"
    Image.fromarray((values / 65535.0).astype(np.float32)).save(unit)
    wide = tmp_path / "wide.tif"
    Image.fromarray(values.astype(np.float32)).save(wide)
    for path in (unit, wide):
        assert Image.open(path).mode == "F"
        assert torch.allclose(to_tensor(load_rgb(path)), _expected(values), atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        pytest.param(np.full((4, 4), -2.0, np.float32), r"values span \[-2, -2\]", id="negative-F"),
        pytest.param(np.full((4, 4), 70000.0, np.float32), r"values span \[70000, 70000\]", id="huge-F"),
        pytest.param(np.full((4, 4), np.nan, np.float32), "NaN or infinity", id="nan-F"),
        pytest.param(np.full((4, 4), 100000, np.int32), r"outside the 16-bit range", id="huge-I"),
    ],
)
def test_out_of_range_wide_images_are_unreadable_not_clipped(tmp_path, array, match):
    path = tmp_path / "odd.tif"
    Image.fromarray(array).save(path)
    with pytest.raises(CorruptImageError, match=match) as info:
        load_rgb(path)
    assert str(path) in str(info.value)


def _palette_with_transparency(path: Path) -> Path:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.save(path, transparency=0)  # palette entry 0 is transparent
    return path


@pytest.mark.parametrize(
    ("mode", "make", "pixel", "expected"),
    [
        ("P", _palette_with_transparency, (1, 1), (200, 30, 40)),
        ("P", _palette_with_transparency, (0, 0), (255, 255, 255)),
        ("LA", lambda p: Image.new("LA", (4, 4), (90, 255)).save(p), (2, 2), (90, 90, 90)),
        ("LA", lambda p: Image.new("LA", (4, 4), (90, 0)).save(p), (2, 2), (255, 255, 255)),
        ("RGBA", lambda p: Image.new("RGBA", (4, 4), (10, 20, 30, 255)).save(p), (1, 1), (10, 20, 30)),
        ("RGBA", lambda p: Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(p), (1, 1), (255, 255, 255)),
        ("1", lambda p: Image.new("1", (4, 4), 1).save(p), (3, 3), (255, 255, 255)),
        ("L", lambda p: Image.new("L", (4, 4), 77).save(p), (3, 3), (77, 77, 77)),
    ],
)
def test_every_mode_decodes_to_rgb(tmp_path, mode, make, pixel, expected):
    path = tmp_path / "x.png"
    result = make(path)
    assert Image.open(result or path).mode == mode
    image = load_rgb(path)
    assert image.mode == "RGB" and image.getpixel(pixel) == expected


def test_cmyk_decodes_to_rgb(tmp_path):
    path = tmp_path / "cmyk.tif"
    Image.new("CMYK", (4, 4), (255, 0, 0, 0)).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (0, 255, 255)


# ------------------------------------------------------------------ oversized images
def test_oversized_image_is_refused_naming_file_and_limit(tmp_path):
    path = _save_rgb(tmp_path / "big.png", (20, 10))
    with pytest.raises(OversizedImageError, match=r"20x10 = 200 pixels is over the limit of 199") as info:
        load_rgb(path, max_pixels=199)
    assert str(path) in str(info.value) and isinstance(info.value, CorruptImageError)
    assert load_rgb(path, max_pixels=200).size == (20, 10)
    with pytest.raises(ValueError, match=r"max_pixels must be a positive integer \(width x height\), got 0"):
        load_rgb(path, max_pixels=0)
    assert DataConfig().max_pixels == DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


def test_pils_own_bomb_error_is_an_unreadable_file(tmp_path, monkeypatch):
    path = _save_rgb(tmp_path / "bomb.png", (20, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL refuses above twice this
    with pytest.raises(OversizedImageError, match=r"bomb\.png.*decompression bomb"):
        load_rgb(path, max_pixels=10**6)


@pytest.fixture
def folder_with_bomb(tmp_path) -> Path:
    """Three small images and one over a 10,000-pixel limit, in two classes."""
    root = tmp_path / "imgs"
    for i in range(3):
        _save_rgb(root / ("a" if i < 2 else "b") / f"ok{i}.png", (70, 70), 40 * i)
    _save_rgb(root / "b" / "huge.png", (120, 100))
    return root


def test_bomb_is_skipped_and_counted_in_training(folder_with_bomb, tmp_path):
    config = load_train_config(None, [f"data.path='{folder_with_bomb}'", "data.max_pixels=10000"])
    dataset = build_dataset(config, SIZE)
    huge = next(i for i, (path, _) in enumerate(dataset.samples) if path.name == "huge.png")
    assert dataset[(huge, 0)] is None
    _image, _label, skipped = SkipBroken(dataset)[(huge, 0)]
    assert skipped == 1


def test_bomb_is_skipped_and_counted_in_eval(folder_with_bomb, model):
    dataset = ev.eval_dataset(folder_with_bomb, SIZE, max_pixels=10000)
    results = ev.evaluate_reconstruction(model, dataset, batch_size=4, progress=False)
    assert results["images"] == 3 and results["skipped"] == 1


def test_bomb_is_skipped_and_counted_by_to_shards(folder_with_bomb, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["data", "to-shards", str(folder_with_bomb), str(out), "--max-pixels", "10000", "--no-progress"]) == 0
    assert "skipped 1 unreadable file(s), e.g. b/huge.png" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 3 and [s["path"] for s in index["skipped"]] == ["b/huge.png"]
    assert "over the limit of 10,000" in index["skipped"][0]["error"]


# ------------------------------------------------------------------ all-broken folders
@pytest.fixture
def broken_folder(tmp_path) -> Path:
    root = tmp_path / "broken"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        (root / "a" / f"b{i}.png").write_bytes(b"not a png")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_all_broken_folder_is_one_clear_error_in_training(broken_folder, tmp_path, workers):
    config = load_train_config(
        None,
        [
            "model.preset='mstok_tiny'",
            "steps=2",
            "batch_size=2",
            f"out_dir='{tmp_path / 'run'}'",
            f"data.path='{broken_folder}'",
            f"data.num_workers={workers}",
        ],
    )
    with pytest.raises(NoReadableImageError) as info:
        Trainer(config, progress=False).fit()
    message = str(info.value)
    assert message.startswith(f"no readable image in {broken_folder}: all 3 image file(s) failed to decode")
    assert "Traceback" not in message and "worker" not in message


def test_all_broken_folder_is_one_clear_error_in_eval(broken_folder, model):
    with pytest.raises(NoReadableImageError, match=f"no readable image in {broken_folder}: all 3 image"):
        ev.evaluate_reconstruction(model, ev.eval_dataset(broken_folder, SIZE), num_workers=2, progress=False)


def test_all_broken_folder_is_one_clear_error_in_to_shards(broken_folder, tmp_path):
    with pytest.raises(ValueError, match=f"no readable image under {broken_folder}: all 3 image files failed"):
        write_shards(broken_folder, tmp_path / "shards", progress=False)


# ------------------------------------------------------------------ shard index paths
@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.tar", "sub/../../outside.tar", "C:\\x.tar", "", 7])
def test_shard_index_paths_must_stay_in_the_folder(folder_with_bomb, tmp_path, name):
    out = tmp_path / "shards"
    write_shards(folder_with_bomb, out, progress=False)
    ShardDataset(out, center_crop_transform(SIZE))  # the index as written is fine
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["file"] = name
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard entry 0 has file") as info:
        ShardDataset(out, center_crop_transform(SIZE))
    assert repr(name) in str(info.value) and "index.json" in str(info.value)


# ------------------------------------------------------------------ eval: upscaling and the grid
def test_eval_warns_with_the_count_of_upscaled_images(tmp_path, model, caplog):
    small, large = tmp_path / "small", tmp_path / "large"
    for i in range(2):
        _save_rgb(small / f"{i}.png", (40, 90), 30 * i)
        _save_rgb(large / f"{i}.png", (64, 80), 30 * i)
    _save_rgb(small / "big_enough.png", (70, 64))
    with caplog.at_level(logging.WARNING, logger="mstok.evaluation.evaluate"):
        results = ev.evaluate_reconstruction(model, ev.eval_dataset(small, SIZE), progress=False)
    assert results["upscaled"] == 2
    assert f"2 of 3 images in {small} are smaller than 64x64 and were upscaled" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mstok.evaluation.evaluate"):
        assert ev.evaluate_reconstruction(model, ev.eval_dataset(large, SIZE), progress=False)["upscaled"] == 0
    assert "upscaled" not in caplog.text


def test_grid_indices_spread_across_classes():
    assert ev.grid_indices([0, 0, 0, 1, 1, 1, 2], 7, 4) == [0, 3, 6, 1]
    assert ev.grid_indices([0, 0, 0, 1, 1, 1, 2], 3, 4) == [0, 1, 2]  # only the evaluated ones
    assert ev.grid_indices(list(range(10)), 10, 3) == [0, 3, 6]  # more classes than slots: spread
    assert ev.grid_indices(None, 10, 3) == [0, 1, 2]


def test_eval_grid_shows_every_class(tmp_path, model, monkeypatch):
    for cls, value in (("a", 0), ("b", 255)):
        for i in range(4):
            path = tmp_path / "data" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (value,) * 3).save(path)
    shown = []
    monkeypatch.setattr(ev, "make_grid", lambda rows, *a, **k: shown.append(rows) or np.zeros((4, 4, 3), np.uint8))
    dataset = ev.eval_dataset(tmp_path / "data", SIZE)
    ev.evaluate_reconstruction(model, dataset, batch_size=3, out_dir=tmp_path / "out", grid_images=4, progress=False)
    originals = shown[0][0]  # (N, 3, H, W) row of originals
    assert [round(float(image.mean())) for image in originals] == [0, 1, 0, 1]


# ------------------------------------------------------------------ image tensors
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_converted_to_the_models(model, dtype):
    images = torch.rand(2, 3, SIZE, SIZE).to(dtype)
    reference = images.float()
    assert torch.equal(model.encode(images), model.encode(reference))
    with torch.no_grad():
        out = model(images)
    assert out.reconstruction.dtype == torch.float32
    assert torch.equal(out.reconstruction, model(reference).reconstruction)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
def test_integer_images_are_refused_with_how_to_scale(model, dtype):
    with pytest.raises(ValueError, match=rf"got dtype {dtype}: scale them to \[0, 1\] floats"):
        model.encode(torch.zeros(1, 3, SIZE, SIZE, dtype=dtype))


@pytest.mark.parametrize("call", ["encode", "forward"])
def test_non_finite_pixels_are_named(model, call):
    images = torch.rand(2, 3, SIZE, SIZE)
    images[1, 2, 5, 7] = float("inf")
    with pytest.raises(
        ValueError, match=r"NaN or infinite values: 1 of .*inf at image 1, channel 2, pixel \(y=5, x=7\)"
    ):
        getattr(model, call)(images)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, SIZE, SIZE), r"shape \(B, 3, H, W\), got \(3, 64, 64\)"),
        ((1, 4, SIZE, SIZE), "3 channels.*got 4"),
        ((1, 3, 32, SIZE), "takes 64x64 images, got 32x64"),
    ],
)
def test_wrong_shapes_keep_clear_errors(model, shape, match):
    with pytest.raises(ValueError, match=match):
        model.encode(torch.rand(*shape, dtype=torch.float64))


def test_bomb_is_skipped_by_pretokenize_and_probe(folder_with_bomb, model, tmp_path, capsys):
    saved = model.save_pretrained(tmp_path / "tok")
    tokens = tmp_path / "tokens"
    argv = ["pretokenize", "--checkpoint", str(saved), "--data", str(folder_with_bomb), "--out", str(tokens)]
    assert main([*argv, "--max-pixels", "10000", "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
    index = json.loads((tokens / "index.json").read_text())
    assert index["num_images"] == 4 and index["num_valid"] == 3  # the bomb is a counted, invalid row
    probe = ["probe", "--checkpoint", str(saved), "--train", str(folder_with_bomb), "--val", str(folder_with_bomb)]
    probe += ["--epochs", "1", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "p.json")]
    assert main([*probe, "--max-pixels", "10000", "--no-progress"]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["num_train"] == 3 and result["num_val"] == 3 and result["skipped_images"] == 2
