"""WebDataset shards: writing, random access equal to ImageFolder, foreign tars, CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from mstok.cli import main
from mstok.data import (
    EpochSampler,
    ImageFolder,
    RandomResizedCropFlip,
    ShardDataset,
    collate_skip_broken,
    open_image_dataset,
    write_shards,
)

TRANSFORM = RandomResizedCropFlip(16, scale=(0.5, 1.0))


def _make_folder(root: Path, n: int = 10) -> Path:
    """n small random images over 3 classes (PNG, .jpg and .JPEG) plus one corrupt .jpg."""
    rng = np.random.default_rng(1)
    for i in range(n):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        array = rng.integers(0, 255, (20 + i, 24 + 2 * i, 3), dtype=np.uint8)
        suffix = (".png", ".jpg", ".JPEG")[i % 3]
        Image.fromarray(array).save(folder / f"img{i}{suffix}", format="PNG" if suffix == ".png" else "JPEG")
    (root / "class1" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("shards")
    return dst, write_shards(folder, dst, shard_size=3, seed=0, progress=False)


def _webdataset_samples(root: Path) -> list[dict]:
    urls = [str(p) for p in sorted(root.glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_write_shards_index_and_skipped_file(shards, folder):
    dst, index = shards
    assert index == json.loads((dst / "index.json").read_text())
    assert index["format"] == "mstok-webdataset-shards" and index["version"] == 1
    assert index["classes"] == ["class0", "class1", "class2"]
    assert index["num_samples"] == 10
    assert [s["file"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s["num_samples"] for s in index["shards"]] == [3, 3, 3, 1]
    assert sorted(p.name for p in dst.iterdir()) == ["index.json"] + [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s["path"] for s in index["skipped"]] == ["class1/broken.jpg"]
    assert "cannot decode" in index["skipped"][0]["error"]
    # the recorded offset and size cut exactly the original file's bytes out of the shard
    first = index["shards"][0]
    raw = (dst / first["file"]).read_bytes()
    paths = [s["path.txt"].decode() for s in _webdataset_samples(dst)]
    for offset, size, path in zip(first["offsets"], first["sizes"], paths, strict=False):
        assert raw[offset : offset + size] == (folder / path).read_bytes()


def test_order_is_seeded_and_reproducible(folder, shards, tmp_path):
    dst, _ = shards
    shuffled = [s["path.txt"].decode() for s in _webdataset_samples(dst)]
    assert sorted(shuffled) != shuffled
    write_shards(folder, tmp_path / "sorted", shard_size=3, seed=None, progress=False)
    in_order = [s["path.txt"].decode() for s in _webdataset_samples(tmp_path / "sorted")]
    assert in_order == sorted(shuffled)
    # same seed, with the decode check spread over 2 processes: byte-identical shards
    write_shards(folder, tmp_path / "again", shard_size=3, seed=0, progress=False, workers=2)
    for path in sorted(dst.iterdir()):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name


def test_plain_webdataset_reads_every_sample(shards, folder):
    dst, index = shards
    samples = _webdataset_samples(dst)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(10)]
    for sample in samples:
        path = folder / sample["path.txt"].decode()
        image_key = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}[path.suffix.lower()]
        assert sample[image_key] == path.read_bytes()
        assert index["classes"][int(sample["cls"])] == path.parent.name


def test_shard_dataset_equals_image_folder(shards, folder):
    dst, _ = shards
    dataset, reference = ShardDataset(dst, TRANSFORM, max_open_files=2), ImageFolder(folder, TRANSFORM)
    assert len(dataset) == 10 and dataset.classes == reference.classes
    position = {path: j for j, (path, _) in enumerate(reference.samples)}
    for i, sample in enumerate(_webdataset_samples(dst)):
        j = position[folder / sample["path.txt"].decode()]
        if reference[(j, 0)] is None:
            continue  # the corrupt file: never written, so nothing to compare
        for seed in (0, 12345):
            image, label = dataset[(i, seed)]
            expected, expected_label = reference[(j, seed)]
            assert image.shape == (3, 16, 16) and torch.equal(image, expected)
            assert label == expected_label
    assert len(dataset._handles) == 2  # least recently used shards were closed
    assert not torch.equal(dataset[(0, 0)][0], dataset[(0, 1)][0])  # the seed drives the crop
    with pytest.raises(IndexError, match="out of range"):
        dataset[(10, 0)]


def _corrupt_copy(dst: Path, tmp_path: Path, sample: int) -> Path:
    """A copy of the shards whose sample's image bytes are overwritten in place."""
    copy = tmp_path / "damaged"
    shutil.copytree(dst, copy)
    index = json.loads((copy / "index.json").read_text())
    shard = index["shards"][sample // 3]
    offset, size = shard["offsets"][sample % 3], shard["sizes"][sample % 3]
    with open(copy / shard["file"], "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * size)
    return copy


def test_dataloader_workers_and_broken_sample(shards, tmp_path, caplog):
    dst, _ = shards
    dataset = ShardDataset(_corrupt_copy(dst, tmp_path, sample=4), TRANSFORM)
    with caplog.at_level(logging.WARNING):
        assert dataset[(4, 0)] is None
    assert "shard-000001.tar@" in caplog.text
    dataset[(0, 0)]  # the parent opens a handle before the workers fork
    loader = DataLoader(
        dataset,
        batch_size=5,
        sampler=EpochSampler(len(dataset), seed=3),
        num_workers=2,
        collate_fn=collate_skip_broken,
    )
    batches = list(itertools.islice(loader, 2))  # one epoch
    assert sum(skipped for _, _, skipped in batches) == 1
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    expected = [dataset[key] for key in itertools.islice(EpochSampler(len(dataset), seed=3), 10)]
    expected = [item for item in expected if item is not None]
    assert torch.equal(images, torch.stack([e[0] for e in expected]))
    assert labels.tolist() == [e[1] for e in expected]
    # handles never travel in a pickle (spawned workers), and reopen on demand
    clone = pickle.loads(pickle.dumps(dataset))
    assert not clone._handles and torch.equal(clone[(0, 7)][0], dataset[(0, 7)][0])
    dataset.close()


def test_tars_without_index_are_scanned(shards, tmp_path, caplog):
    dst, _ = shards
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in dst.glob("*.tar"):
        shutil.copy(path, bare / path.name)
    indexed = ShardDataset(dst, TRANSFORM)
    with caplog.at_level(logging.WARNING):
        scanned = open_image_dataset(bare, TRANSFORM)
    assert isinstance(scanned, ShardDataset) and "may take a while" in caplog.text
    assert len(scanned) == len(indexed) and scanned.classes == ["0", "1", "2"]
    assert scanned.labels.tolist() == indexed.labels.tolist()
    for i in range(len(indexed)):
        assert torch.equal(scanned[(i, 5)][0], indexed[(i, 5)][0])


def test_a_scanned_folder_is_scanned_once_per_process_until_a_tar_changes(shards, tmp_path, caplog):
    """Reopening a folder without index.json reuses this process's scan; a rewritten tar is rescanned."""
    dst, _ = shards
    bare = tmp_path / "bare"
    bare.mkdir()
    tars = sorted(dst.glob("*.tar"))
    for path in tars:
        shutil.copy(path, bare / path.name)
    first = ShardDataset(bare, TRANSFORM)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = ShardDataset(bare, TRANSFORM)
    assert "may take a while" not in caplog.text
    assert again.labels.tolist() == first.labels.tolist() and torch.equal(again[(0, 1)][0], first[(0, 1)][0])
    # the last shard replaced by the first one's bytes: a new file identity, so a new scan
    (bare / tars[-1].name).unlink()
    shutil.copy(tars[0], bare / tars[-1].name)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        changed = ShardDataset(bare, TRANSFORM)
    assert "scanning 1 tar file(s)" in caplog.text
    # shards of 3, 3, 3 and 1 images: the last now holds the first one's 3
    assert len(changed) == len(first) + 2 and changed.labels[-3:].tolist() == first.labels[:3].tolist()


def test_foreign_tar_conventions(tmp_path, caplog):
    """Other tools' shards: .jpeg members, cls.txt or no label, a sample without an image."""
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(png, format="PNG")
    jpg = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(jpg, format="JPEG")
    (tmp_path / "data").mkdir()
    with wds.TarWriter(str(tmp_path / "data" / "part-a.tar")) as writer:
        writer.write({"__key__": "x/a", "jpeg": jpg.getvalue(), "cls.txt": "4", "json": b"{}"})
        writer.write({"__key__": "x/b", "json": b"{}"})  # no image: left out
        writer.write({"__key__": "x/c", "seg.png": png.getvalue()})  # no label: 0
    with caplog.at_level(logging.WARNING):
        dataset = ShardDataset(tmp_path / "data", TRANSFORM)
    assert "without an image" in caplog.text
    assert len(dataset) == 2 and dataset.labels.tolist() == [4, 0] and len(dataset.classes) == 5
    assert dataset.read_bytes(0) == jpg.getvalue() and dataset.read_bytes(1) == png.getvalue()
    (tmp_path / "bad").mkdir()
    with wds.TarWriter(str(tmp_path / "bad" / "x.tar")) as writer:
        writer.write({"__key__": "k", "png": png.getvalue(), "cls": "dog"})
    with pytest.raises(ValueError, match="integer class index"):
        ShardDataset(tmp_path / "bad", TRANSFORM)


def test_open_image_dataset_dispatch_and_errors(shards, folder, tmp_path):
    dst, _ = shards
    assert isinstance(open_image_dataset(dst, TRANSFORM), ShardDataset)
    assert type(open_image_dataset(folder, TRANSFORM)) is ImageFolder
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        open_image_dataset(tmp_path / "missing", TRANSFORM)
    with pytest.raises(ValueError, match="got the file"):
        open_image_dataset(dst / "index.json", TRANSFORM)
    gz = tmp_path / "gz"
    gz.mkdir()
    with tarfile.open(gz / "a.tar", "w:gz") as tar:
        tar.add(next(folder.rglob("*.png")), arcname="0.png")
    with pytest.raises(ValueError, match="uncompressed tar"):
        open_image_dataset(gz, TRANSFORM)


def test_shard_dataset_rejects_stale_index(shards, tmp_path):
    dst, _ = shards
    copy = tmp_path / "copy"
    shutil.copytree(dst, copy)
    with open(copy / "shard-000002.tar", "ab") as handle:
        handle.write(b"\0" * 512)
    with pytest.raises(ValueError, match="was indexed at"):
        ShardDataset(copy, TRANSFORM)
    (copy / "shard-000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-000002\.tar"):
        ShardDataset(copy, TRANSFORM)
    (copy / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an mstok shard index"):
        ShardDataset(copy, TRANSFORM)


def test_write_shards_errors(folder, shards, tmp_path):
    dst, _ = shards
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        write_shards(folder, tmp_path / "out", shard_size=0, progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        write_shards(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="no readable image"):
        write_shards(tmp_path / "junk", tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*"))  # nothing half-written
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(folder, dst, progress=False)
    redo = tmp_path / "redo"
    write_shards(folder, redo, shard_size=3, progress=False)
    index = write_shards(folder, redo, shard_size=5, progress=False, overwrite=True)
    assert len(index["shards"]) == 2 and len(list(redo.glob("*.tar"))) == 2


def test_cli_to_shards(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "to-shards", str(folder), str(out), "--shard-size", "4", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 10 images of 3 classes into 3 shards" in summary and "skipped 1" in summary
    assert len(ShardDataset(out, TRANSFORM)) == 10
    assert main(["data", "to-shards", str(folder), str(out), "--no-progress", "--no-shuffle"]) == 2
    assert "already holds" in capsys.readouterr().err
    args = ["data", "to-shards", str(folder), str(out), "--no-progress", "--no-shuffle", "--overwrite"]
    assert main(args) == 0 and "sorted order" in capsys.readouterr().out


def test_tiny_imagenet_round_trip(tiny_imagenet, tmp_path):
    """Two real classes, linked (not copied) into a temporary folder."""
    with open(tiny_imagenet / "manifest.csv", newline="") as handle:
        sha = {row["file"]: row["sha256"] for row in csv.DictReader(handle)}
    wnids = sorted(p.name for p in tiny_imagenet.iterdir() if p.is_dir())[:2]
    src = tmp_path / "src"
    for wnid in wnids:
        (src / wnid).mkdir(parents=True)
        for path in sorted((tiny_imagenet / wnid).iterdir())[:8]:
            (src / wnid / path.name).symlink_to(path)
    index = write_shards(src, tmp_path / "shards", shard_size=5, progress=False)
    assert index["num_samples"] == 16 and not index["skipped"] and index["classes"] == wnids
    for sample in _webdataset_samples(tmp_path / "shards"):
        assert hashlib.sha256(sample["jpg"]).hexdigest() == sha[sample["path.txt"].decode()]
    dataset, reference = ShardDataset(tmp_path / "shards", TRANSFORM), ImageFolder(src, TRANSFORM)
    position = {path: j for j, (path, _) in enumerate(reference.samples)}
    for i, sample in enumerate(_webdataset_samples(tmp_path / "shards")):
        image, label = dataset[(i, i)]
        expected, expected_label = reference[(position[src / sample["path.txt"].decode()], i)]
        assert torch.equal(image, expected) and label == expected_label
