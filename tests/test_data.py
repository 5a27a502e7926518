"""Image folders, decoding, augmentation determinism, the epoch sampler and broken files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from mstok.data import (
    CorruptImageError,
    EpochSampler,
    ImageFolder,
    RandomResizedCropFlip,
    center_crop_resize,
    collate_skip_broken,
    find_images,
    load_rgb,
    to_tensor,
)


def _save(path, mode="RGB", size=(40, 30), color=(10, 200, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    value = color if mode in ("RGB", "RGBA") else color[0]
    if mode == "RGBA":
        value = (*color, 0)  # fully transparent
    Image.new(mode, size, value).save(path)
    return path


def test_find_images_recursive_with_classes(tmp_path):
    _save(tmp_path / "cat" / "a.png")
    _save(tmp_path / "cat" / "deep" / "b.jpg")
    _save(tmp_path / "dog" / "c.PNG")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    samples, classes = find_images(tmp_path)
    assert classes == ["cat", "dog"]
    assert [(p.name, label) for p, label in samples] == [("a.png", 0), ("b.jpg", 0), ("c.PNG", 1)]


def test_find_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        find_images(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        find_images(tmp_path)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "RGB"])
def test_load_rgb_converts_every_mode(tmp_path, mode):
    image = load_rgb(_save(tmp_path / f"x_{mode}.png", mode=mode))
    assert image.mode == "RGB" and image.size == (40, 30)


def test_transparent_pixels_become_white(tmp_path):
    image = load_rgb(_save(tmp_path / "t.png", mode="RGBA"))
    assert np.asarray(image).min() == 255


def test_corrupt_file_is_reported_and_skipped(tmp_path):
    good = _save(tmp_path / "a" / "good.png")
    bad = tmp_path / "a" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(CorruptImageError, match=r"bad\.jpg"):
        load_rgb(bad)
    dataset = ImageFolder(tmp_path, RandomResizedCropFlip(16))
    items = [dataset[(i, 0)] for i in range(len(dataset))]
    assert sum(item is None for item in items) == 1
    images, labels, skipped = collate_skip_broken(items)
    assert images.shape == (1, 3, 16, 16) and labels.tolist() == [0] and skipped == 1
    assert good.exists()


def test_collate_all_broken_gives_empty_batch():
    images, labels, skipped = collate_skip_broken([None, None])
    assert images.numel() == 0 and labels.numel() == 0 and skipped == 2


def test_random_crop_is_a_function_of_the_seed():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8))
    crop = RandomResizedCropFlip(32, scale=(0.2, 0.6))
    a = to_tensor(crop(photo, np.random.default_rng(7)))
    b = to_tensor(crop(photo, np.random.default_rng(7)))
    c = to_tensor(crop(photo, np.random.default_rng(8)))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_box_respects_scale_and_bounds():
    crop = RandomResizedCropFlip(8, scale=(0.25, 0.5))
    rng = np.random.default_rng(1)
    for _ in range(200):
        left, top, right, bottom = crop.crop_box(100, 80, rng)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 80
        area = (right - left) * (bottom - top) / (100 * 80)
        assert 0.2 < area < 0.55  # rounding of w and h moves the area slightly


def test_flip_happens_about_half_the_time():
    photo = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8)[None, :, None], (16, 1, 3)))
    crop = RandomResizedCropFlip(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flips = 0
    for seed in range(200):
        out = np.asarray(crop(photo, np.random.default_rng(seed)))
        flips += int(out[0, 0, 0] > out[0, -1, 0])
    assert 70 < flips < 130


def test_crop_scale_validated():
    with pytest.raises(ValueError, match="crop scale"):
        RandomResizedCropFlip(8, scale=(0.5, 1.5))


def test_center_crop_resize_keeps_the_centre():
    array = np.zeros((100, 200, 3), dtype=np.uint8)
    array[:, 50:150] = 255  # the central square is white, the sides black
    out = np.asarray(center_crop_resize(Image.fromarray(array), 20))
    assert out.shape == (20, 20, 3) and out.min() > 200


def test_epoch_sampler_resumes_the_same_stream():
    full = list(itertools.islice(iter(EpochSampler(7, seed=3)), 30))
    tail = list(itertools.islice(iter(EpochSampler(7, seed=3, start=11)), 19))
    assert full[11:] == tail
    for epoch in range(4):  # every epoch visits every item once
        assert sorted(i for i, _ in full[epoch * 7 : (epoch + 1) * 7]) == list(range(7))
    assert len({seed for _, seed in full}) == 30  # a fresh augmentation seed per sample
    assert full[:7] != full[7:14]
