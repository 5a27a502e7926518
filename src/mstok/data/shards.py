"""WebDataset tar shards: convert an image folder to shards and read them back by index.

:func:`write_shards` stores each image's original encoded bytes, its class (``cls``) and its
source path (``path.txt``) as one WebDataset sample, in a seeded shuffled order so that plain
sequential WebDataset readers see mixed classes. Beside the shards it writes ``index.json``
with the class names and, for every sample, the byte offset, size and label of its image
member.

:class:`ShardDataset` keeps the ``(index, seed)`` contract of :class:`ImageFolder`, because
that is what makes training resume bit-identically and lets each DDP rank take its own slice
of an epoch's global permutation. Random access design: a sample is one ``os.pread`` at the
offset recorded in ``index.json``, on a file handle that each process opens lazily. We chose
this over the webdataset project's indexed reader ``wids`` (evaluated: version 0.1.11) because
``wids`` indexes a shard by scanning all its tar headers when it opens it and keeps only a
small LRU of open shards (10 by default), so the uniformly random order of a global
permutation re-opens and re-scans a shard on nearly every read; it also copies local shards
into a cache folder (``/tmp/_wids_cache``) unless given a custom ``localname``, prints to
stderr on every construction, and would add a dependency for about forty lines of code here.
Shards written by other tools (no ``index.json``) are scanned once with :mod:`tarfile`.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from webdataset.tariterators import base_plus_ext

from mstok.data.decode import CorruptImageError, check_max_pixels, load_rgb
from mstok.data.images import IMAGE_EXTENSIONS, DecodedImages, ImageFolder, Transform, find_images

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "mstok-webdataset-shards"
INDEX_VERSION = 1
SHARD_PATTERN = "shard-%06d.tar"
_IMAGE_SUFFIXES = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}
_LABEL_SUFFIXES = ("cls", "cls.txt")
# a fixed member mtime makes the same folder, seed and shard size give byte-identical shards
_MTIME = 0.0


class _NamedBytes(io.BytesIO):
    """In-memory image bytes whose repr is a readable name, so that decode errors raised by
    :func:`load_rgb` (which formats its argument into the message) name the sample."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __repr__(self) -> str:
        return self.label


def _read_checked(item: tuple[Path, str, int]) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a file that decodes within ``max_pixels``, (None, reason) otherwise;
    runs in pool workers."""
    path, name, max_pixels = item
    try:
        data = path.read_bytes()
        load_rgb(_NamedBytes(data, name), max_pixels)
    except (OSError, CorruptImageError) as err:
        return None, str(err)
    return data, None


@contextmanager
def _checked_reader(workers: int) -> Iterator[Callable[[Iterator[tuple[Path, str, int]]], Iterator]]:
    """Yield a lazy, order-preserving map of :func:`_read_checked`, in ``workers`` processes if > 0."""
    if workers <= 0:
        yield lambda items: map(_read_checked, items)
        return
    # full decodes dominate the conversion time (hours for ImageNet on one core)
    with multiprocessing.get_context().Pool(workers) as pool:
        yield lambda items: pool.imap(_read_checked, items, chunksize=16)


def _prepare_output(dst: Path, overwrite: bool) -> None:
    """Create ``dst``; refuse (or, with ``overwrite``, delete) shards written there before."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"shard output {dst} exists and is not a folder")
    index = dst / INDEX_NAME
    existing = sorted(dst.glob("*.tar")) + ([index] if index.exists() else [])
    if existing and not overwrite:
        raise FileExistsError(
            f"shard output {dst} already holds {len(existing)} shard/index file(s) (e.g. {existing[0].name}); "
            "pass overwrite=True (--overwrite) to replace them"
        )
    # only our own files go: a foreign .tar left there is ignored by readers once index.json exists
    for path in [*dst.glob("shard-*.tar"), index]:
        path.unlink(missing_ok=True)
    dst.mkdir(parents=True, exist_ok=True)


def write_shards(
    src: str | Path,
    dst: str | Path,
    shard_size: int = 1000,
    seed: int | None = 0,
    progress: bool = True,
    *,
    overwrite: bool = False,
    workers: int = 0,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Convert an image folder (see :func:`find_images`) into WebDataset tar shards.

    Args:
        src: image folder; the class is the first-level sub-folder.
        dst: output folder for ``shard-000000.tar, ...`` and ``index.json``.
        shard_size: samples per shard.
        seed: seed of the shuffled sample order; ``None`` keeps the sorted file order.
        progress: show a tqdm progress bar.
        overwrite: replace shards and ``index.json`` already in ``dst`` instead of refusing.
        workers: processes that read and test-decode files (0: in this process).
        max_pixels: images with more pixels are skipped like unreadable files (None: the default
            of :func:`~mstok.data.decode.load_rgb`).

    Returns:
        The content of ``index.json``: ``classes``, ``num_samples``, ``shards`` and ``skipped``.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    src, dst = Path(src), Path(dst)
    max_pixels = check_max_pixels(max_pixels)
    files, classes = find_images(src)
    _prepare_output(dst, overwrite)
    order = range(len(files)) if seed is None else np.random.default_rng(seed).permutation(len(files))
    ordered = [files[i] for i in order]
    items = ((path, path.relative_to(src).as_posix(), max_pixels) for path, _ in ordered)

    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    writer: wds.ShardWriter | None = None
    count = 0
    try:
        with _checked_reader(workers) as read, tqdm(total=len(ordered), disable=not progress, unit="img") as bar:
            for (path, label), (data, error) in zip(ordered, read(items), strict=True):
                bar.update()
                rel = path.relative_to(src).as_posix()
                if data is None:
                    log.warning("skipping unreadable file: %s", error)
                    skipped.append({"path": rel, "error": str(error)})
                    continue
                if writer is None:  # opened lazily: ShardWriter creates its first file at once
                    writer = wds.ShardWriter(
                        str(dst / SHARD_PATTERN),
                        maxcount=shard_size,
                        verbose=0,
                        post=lambda name: shards.append(_scan_tar(Path(name))),
                        mtime=_MTIME,
                    )
                ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
                writer.write({"__key__": f"{count:09d}", ext: data, "cls": str(label), "path.txt": rel})
                count += 1
    finally:
        if writer is not None:
            writer.close()
    if count == 0:
        raise ValueError(f"no readable image under {src}: all {len(files)} image files failed to decode")
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "classes": classes,
        "num_samples": count,
        "seed": seed,
        "shards": shards,
        "skipped": skipped,
    }
    # written last and atomically: a folder without index.json is an unfinished conversion
    tmp = dst / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, separators=(",", ":")))
    os.replace(tmp, dst / INDEX_NAME)
    return index


def _scan_tar(path: Path) -> dict[str, Any]:
    """Index one uncompressed WebDataset tar: per sample, its image's offset, size and label.

    Members are grouped by key with webdataset's own rule; the image is the first member with
    an image extension, the label the integer in ``cls``/``cls.txt`` (0 when absent).
    """
    offsets: list[int] = []
    sizes: list[int] = []
    labels: list[int] = []
    no_image = 0
    try:
        # "r:" (not "r"): offsets only mean something in an uncompressed tar
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and base_plus_ext(m.name)[0] is not None]
            for _, group in groupby(members, key=lambda m: base_plus_ext(m.name)[0]):
                image, label = None, 0
                for member in group:
                    suffix = base_plus_ext(member.name)[1].lower()
                    if image is None and suffix.rsplit(".", 1)[-1] in _IMAGE_SUFFIXES:
                        image = member
                    elif suffix in _LABEL_SUFFIXES:
                        label = _parse_label(tar.extractfile(member).read(), path, member.name)
                if image is None:
                    no_image += 1
                    continue
                offsets.append(image.offset_data)
                sizes.append(image.size)
                labels.append(label)
    except tarfile.TarError as err:
        raise ValueError(f"cannot read shard {path} as an uncompressed tar file: {err}") from err
    if no_image:
        log.warning("%s: %d sample(s) without an image member were left out", path, no_image)
    return {
        "file": path.name,
        "num_samples": len(offsets),
        "bytes": path.stat().st_size,
        "offsets": offsets,
        "sizes": sizes,
        "labels": labels,
    }


def _parse_label(raw: bytes, path: Path, member: str) -> int:
    """The class index stored as text in a ``cls`` member."""
    try:
        label = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: member {member} should hold an integer class index, got {raw[:40]!r}") from None
    if label < 0:
        raise ValueError(f"{path}: member {member} holds a negative class index {label}")
    return label


def _load_index(path: Path) -> dict[str, Any]:
    """Read and check an ``index.json`` written by :func:`write_shards`."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not an mstok shard index (expected format {INDEX_FORMAT!r})")
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path} has index version {index.get('version')!r}; this mstok reads {INDEX_VERSION}")
    for key in ("classes", "shards"):
        if not isinstance(index.get(key), list):
            raise ValueError(f"{path} lacks the list {key!r}")
    for number, shard in enumerate(index["shards"]):
        if not isinstance(shard, dict):
            raise ValueError(f"{path}: shard entry {number} is not an object: {shard!r:.80}")
        missing = [k for k in ("file", "num_samples", "bytes", "offsets", "sizes", "labels") if k not in shard]
        if missing:
            raise ValueError(f"{path}: a shard entry lacks {', '.join(missing)}")
        _check_shard_file(path, number, shard["file"])
        if not len(shard["offsets"]) == len(shard["sizes"]) == len(shard["labels"]) == shard["num_samples"]:
            raise ValueError(f"{path}: shard {shard['file']} lists a different number of offsets, sizes and labels")
    return index


def _check_shard_file(path: Path, number: int, name: Any) -> None:
    """A shard entry's ``file`` must be a relative path inside the shard folder: an index that
    points elsewhere (absolute, ``..``, a drive) would make the reader open arbitrary files."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: shard entry {number} has file {name!r}; expected a name like shard-000000.tar")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise ValueError(
            f"{path}: shard entry {number} has file {name!r}, which leaves the shard folder {path.parent} "
            "(absolute paths and '..' are not allowed; list shards relative to the folder)"
        )


# Shards scanned in this process, by file identity: a read-only folder (a shared dataset) cannot take
# an index.json, and a process that opens it again (a benchmark's runs, a resumed trainer, the test
# suite) would otherwise rescan its tars each time (~0.4 s per 5,000-image tar). The entries are
# only read, never changed, by ShardDataset.
_SCANNED: dict[tuple[str, int, int, int], dict[str, Any]] = {}


def _file_key(path: Path) -> tuple[str, int, int, int]:
    """A file's identity for :data:`_SCANNED`: a rewritten or replaced tar gets a new key."""
    stat = path.stat()
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


def _scan_folder(root: Path) -> dict[str, Any]:
    """Build an in-memory index for a folder of ``*.tar`` shards that has no ``index.json``."""
    tars = sorted(root.glob("*.tar"))
    if not tars:
        raise ValueError(f"no {INDEX_NAME} and no .tar shards in {root}")
    keys = {path: _file_key(path) for path in tars}
    unseen = [path for path in tars if keys[path] not in _SCANNED]
    if unseen:
        log.warning("%s has no %s: scanning %d tar file(s), which may take a while", root, INDEX_NAME, len(unseen))
        for path in tqdm(unseen, desc="scanning shards", unit="tar", leave=False):
            _SCANNED[keys[path]] = _scan_tar(path)
    shards = [_SCANNED[keys[path]] for path in tars]
    num_classes = max((max(s["labels"], default=0) for s in shards), default=0) + 1
    # foreign shards carry label numbers only, so the class names are those numbers
    return {"classes": [str(i) for i in range(num_classes)], "shards": shards}


class ShardDataset(DecodedImages):
    """Samples of WebDataset tar shards, read by index (see the module docstring).

    ``dataset[(i, seed)]`` returns ``(image (3, S, S) in [0, 1], label)`` or ``None`` when the
    image cannot be decoded, exactly like :class:`ImageFolder` over the source folder.

    Args:
        root: folder with the shards and, if written by :func:`write_shards`, ``index.json``.
        transform: augmentation driven by a numpy Generator seeded with the sample's seed.
        max_open_files: open shard handles kept per process (least recently used are closed).
        max_pixels: images with more pixels are skipped like unreadable ones (None: the default
            of :func:`~mstok.data.decode.load_rgb`).
    """

    def __init__(
        self, root: str | Path, transform: Transform, max_open_files: int = 64, max_pixels: int | None = None
    ) -> None:
        self.root = Path(root)
        self.max_pixels = check_max_pixels(max_pixels)
        if not self.root.is_dir():
            raise FileNotFoundError(f"shard folder not found: {self.root}")
        index_path = self.root / INDEX_NAME
        index = _load_index(index_path) if index_path.is_file() else _scan_folder(self.root)
        self.classes: list[str] = list(index["classes"])
        self.transform = transform
        self.max_open_files = max(1, max_open_files)
        shards = [s for s in index["shards"] if s["num_samples"] > 0]
        if not shards:
            raise ValueError(f"no samples with an image in the shards of {self.root}")
        self.files = [self.root / s["file"] for s in shards]
        for path, shard in zip(self.files, shards, strict=True):
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the index is missing")
            if path.stat().st_size != shard["bytes"]:
                raise ValueError(f"shard {path} is {path.stat().st_size} bytes but was indexed at {shard['bytes']}")
        # flat numpy arrays, not per-sample Python objects: forked workers then share them copy-free
        counts = [s["num_samples"] for s in shards]
        self._shard = np.repeat(np.arange(len(shards), dtype=np.int32), counts)
        self._offsets = np.concatenate([np.asarray(s["offsets"], dtype=np.int64) for s in shards])
        self._sizes = np.concatenate([np.asarray(s["sizes"], dtype=np.int64) for s in shards])
        self.labels = np.concatenate([np.asarray(s["labels"], dtype=np.int64) for s in shards])
        if self.labels.min() < 0 or self.labels.max() >= len(self.classes):
            raise ValueError(f"labels in {self.root} fall outside the {len(self.classes)} classes")
        self._handles: OrderedDict[int, io.FileIO] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:
        # handles never travel to another process (spawned DataLoader workers unpickle this)
        return {**self.__dict__, "_handles": OrderedDict(), "_pid": None}

    def _handle(self, shard: int) -> io.FileIO:
        """This process's open handle on a shard file, opened on first use."""
        if self._pid != os.getpid():
            # a forked worker inherits the parent's handles; open its own so neither closes the other's
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.files[shard], "rb", buffering=0)  # noqa: SIM115
            if len(self._handles) > self.max_open_files:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(shard)
        return handle

    def read_bytes(self, index: int) -> bytes:
        """The encoded image bytes of sample ``index``, as stored in its shard."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        shard, offset, size = int(self._shard[index]), int(self._offsets[index]), int(self._sizes[index])
        # pread keeps no file position, so one handle serves any order of reads
        return os.pread(self._handle(shard).fileno(), size, offset)

    def load_image(self, index: int) -> tuple[Image.Image, int] | None:
        """The decoded, untransformed RGB image ``index`` and its label, or None (logged) if unreadable."""
        data = self.read_bytes(index)
        name = f"{self.files[int(self._shard[index])].name}@{int(self._offsets[index])}"
        try:
            if len(data) != int(self._sizes[index]):
                raise CorruptImageError(f"cannot decode image {name}: the shard ends early")
            return load_rgb(_NamedBytes(data, name), self.max_pixels), int(self.labels[index])
        except CorruptImageError as err:
            log.warning("skipping %s", err)
            return None

    def close(self) -> None:
        """Close this process's shard handles (they reopen on the next read)."""
        while self._handles:
            self._handles.popitem()[1].close()


def open_image_dataset(path: str | Path, transform: Transform, max_pixels: int | None = None) -> Dataset:
    """A :class:`ShardDataset` for a folder of shards (``index.json`` or ``*.tar``), else an
    :class:`ImageFolder`; images over ``max_pixels`` pixels are skipped as unreadable."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image folder not found: {path} (expected a folder of images or of .tar shards)")
    if not path.is_dir():
        raise ValueError(f"expected a folder of images or of .tar shards, got the file {path}")
    if (path / INDEX_NAME).is_file() or any(path.glob("*.tar")):
        return ShardDataset(path, transform, max_pixels=max_pixels)
    return ImageFolder(path, transform, max_pixels)
