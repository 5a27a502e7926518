"""Image datasets: a recursive image folder and a list of in-memory photos.

Datasets are indexed by ``(index, seed)`` pairs produced by :class:`EpochSampler`; the seed
drives the augmentation, so the same pair always gives the same tensor. A file that cannot
be decoded yields ``None`` and a warning; :class:`SkipBroken` replaces those samples by the
next readable one and :func:`collate_skip_broken` counts them, so one broken JPEG never
stops a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from mstok.data.decode import CorruptImageError, check_max_pixels, load_rgb
from mstok.data.transforms import to_tensor

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
Transform = Callable[[Image.Image, np.random.Generator], Image.Image]


def find_images(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """All image files under ``root`` (recursive), labelled by their first-level sub-folder.

    Returns:
        (path, class index) pairs in sorted order, and the sorted class names. Files lying
        directly in ``root`` get the class ``"."``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    names = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "." for p in files]
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return [(p, index[n]) for p, n in zip(files, names, strict=True)], classes


class DecodedImages(Dataset):
    """Base of the datasets that decode stored images (a folder, shards).

    A subclass provides ``transform`` and :meth:`load_image`; ``dataset[(i, seed)]`` returns
    ``(image (3, S, S) in [0, 1], label)``, the transform drawing from ``seed``, or ``None``
    when the file cannot be decoded.
    """

    transform: Transform

    def load_image(self, index: int) -> tuple[Image.Image, int] | None:
        """The decoded, untransformed RGB image ``index`` and its label, or None (logged) if unreadable."""
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        index, seed = key
        item = self.load_image(index)
        if item is None:
            return None
        return to_tensor(self.transform(item[0], np.random.default_rng(seed))), item[1]


class ImageFolder(DecodedImages):
    """Images under a folder, recursively; the label is the first-level sub-folder.

    ``dataset[(i, seed)]`` returns ``(image (3, S, S) in [0, 1], label)`` or ``None`` when
    the file cannot be decoded.
    """

    def __init__(self, root: str | Path, transform: Transform, max_pixels: int | None = None) -> None:
        self.root = Path(root)
        self.samples, self.classes = find_images(root)
        self.transform = transform
        self.max_pixels = check_max_pixels(max_pixels)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """The class index of every file, in dataset order (known without decoding)."""
        return [label for _, label in self.samples]

    def load_image(self, index: int) -> tuple[Image.Image, int] | None:
        """The decoded, untransformed RGB image ``index`` and its label, or None (logged) if unreadable."""
        path, label = self.samples[index]
        try:
            return load_rgb(path, self.max_pixels), label
        except CorruptImageError as err:
            log.warning("skipping %s", err)
            return None


class InMemoryImages(Dataset):
    """A few PIL images (e.g. scikit-image's bundled photos) sampled with replacement."""

    def __init__(self, images: Sequence[Image.Image], transform: Transform, labels: Sequence[int] | None = None):
        if not images:
            raise ValueError("InMemoryImages needs at least one image")
        self.images = [im.convert("RGB") for im in images]
        self.labels = list(labels) if labels is not None else list(range(len(images)))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        image = self.transform(self.images[index], np.random.default_rng(seed))
        return to_tensor(image), self.labels[index]


class IndexSubset(Dataset):
    """The items ``indices`` of a dataset indexed by ``(index, seed)``, renumbered from 0
    (e.g. a training set with its held-out images taken out)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray) -> None:
        if not len(indices):
            raise ValueError("IndexSubset needs at least one index")
        # a numpy array, not a list of Python ints: forked loader workers share it copy-free
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        index, seed = key
        return self.dataset[(int(self.indices[index]), seed)]


class EpochSampler(Sampler):
    """Endless ``(index, seed)`` stream: a fresh permutation per epoch, a seed per sample.

    Both depend only on ``(seed, epoch, position)``, so starting at ``start`` (a count of
    samples already consumed) reproduces exactly the stream an uninterrupted run would see.

    Data parallelism: the global stream is cut into chunks of ``world_size * chunk`` samples
    (one micro-batch per rank) and rank ``r`` takes the ``r``-th slice of every chunk. The
    ranks thus see disjoint samples, and their union per step is exactly the batch a single
    process with the same global batch would see, so DDP and single-process runs match.
    ``start`` always counts global samples.
    """

    def __init__(
        self, num_items: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1, chunk: int = 1
    ) -> None:
        if num_items < 1:
            raise ValueError("EpochSampler needs at least one item")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_items, self.seed, self.start = num_items, seed, start
        self.rank, self.world_size, self.chunk = rank, world_size, chunk

    def global_stream(self) -> Iterator[tuple[int, int]]:
        """Every rank's samples, in order, from ``start``."""
        epoch, offset = divmod(self.start, self.num_items)
        while True:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
            for position in range(offset, self.num_items):
                sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + position
                yield int(order[position]), sample_seed % 2**63
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        span = self.world_size * self.chunk
        lo, hi = self.rank * self.chunk, (self.rank + 1) * self.chunk
        for i, item in enumerate(self.global_stream()):
            if lo <= i % span < hi:
                yield item


class NoReadableImageError(ValueError):
    """A dataset none of whose files decodes."""


def data_source(dataset: Dataset) -> str:
    """The folder a dataset reads (looking through wrappers such as :class:`IndexSubset`), for messages."""
    while dataset is not None:
        root = getattr(dataset, "root", None)
        if root is not None:
            return str(root)
        dataset = getattr(dataset, "dataset", None)
    return "the dataset"


def no_readable_image(dataset: Dataset, count: int | None = None) -> NoReadableImageError:
    """The error for a dataset without one readable file, naming its folder and the count."""
    count = len(dataset) if count is None else count
    return NoReadableImageError(
        f"no readable image in {data_source(dataset)}: all {count} image file(s) failed to decode "
        "(the warnings above name each file and why)"
    )


class SkipBroken(Dataset):
    """Replace an undecodable sample by the next readable one, keeping batch sizes fixed.

    Wraps a dataset whose items may be ``None`` (a corrupt file) and returns
    ``(image, label, skipped)`` where ``skipped`` counts the files passed over. Fixed batch
    sizes keep DDP ranks in lockstep (no rank ever holds an empty batch) and let compiled
    models keep static shapes; the substitute depends only on ``(index, seed)``, so runs stay
    reproducible.

    A dataset with no readable file at all is an error, raised here in the constructor, in
    the main process: raised later inside a DataLoader worker it would reach the user as the
    worker's traceback. Finding the first readable file usually costs one decode.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        if not any(dataset[(i, 0)] is not None for i in range(len(dataset))):
            raise no_readable_image(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, seed = key
        for skipped in range(len(self.dataset)):
            item = self.dataset[((index + skipped) % len(self.dataset), seed)]
            if item is not None:
                return item[0], item[1], skipped
        raise no_readable_image(self.dataset)  # only if files broke after the constructor's check


def collate_skip_broken(
    batch: list[tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; returns (images (B', 3, S, S), labels (B',), skipped count).

    Items are ``(image, label)``, ``None`` (dropped and counted) or ``(image, label, skipped)``
    from :class:`SkipBroken` (kept; its count is added)."""
    good = [item for item in batch if item is not None]
    skipped = len(batch) - len(good) + sum(item[2] for item in good if len(item) == 3)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    return images, labels, skipped
