"""Pre-tokenized token shards: encode a dataset once, train generators on the tokens.

A token-shard folder (written by :func:`pretokenize`, behind ``mstok pretokenize``) holds::

    meta.json                  tokenizer identity and settings, written when the run starts
    shard-000000.safetensors   dataset items [0, shard_size): tokens (n, views, K) int16/int32/int64,
    shard-000001.safetensors   labels (n,) int64, valid (n,) bool
    ...
    index.json                 meta + per-shard counts, written last: the run is complete

Shard ``s`` holds items ``[s * shard_size, (s + 1) * shard_size)`` of the dataset in order,
including the ones that failed to decode (``valid`` False, tokens 0, label -1), so a row's
position is always its dataset index. Shards are written atomically and never rewritten, so
an interrupted run resumes by skipping the shard files that exist; shard ``s`` belongs to
rank ``s % world_size``, which lets a resumed run use another number of processes.
``meta.json`` pins the tokenizer (config and a hash of its weights): tokens from two different
tokenizers never end up in one folder. :class:`TokenDataset` reads a complete folder back.

**Continuous tokens.** A tokenizer with a continuous bottleneck (``quantizer="vae"`` or
``"none"``) has latents, not ids: its shards hold ``tokens`` (n, views, K, C) float16 (half
the bytes of float32; a DiT trains on them in float32). For a VAE they are the posterior
means by default, or one posterior sample per image with ``sample_latents`` (drawn from a
seed fixed by the batch's first dataset index, so any number of ranks writes the same
bytes). The metadata says ``"continuous": true`` with ``token_dim`` C and ``sampled``, and
``codebook_size`` is null; ``index.json`` adds ``latent_mean`` and ``latent_std``: per-channel
(C values each) mean and population standard deviation of the stored latents over every
valid image, view and token, accumulated in float64. Per channel rather than one global
scale because a KL bottleneck's channels differ in spread by orders of magnitude; a
generator normalises each channel to zero mean and unit variance with them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.io import atomic_save_safetensors, read_safetensors

FORMAT = "mstok-tokens"
VERSION = 1
META_NAME = "meta.json"
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:06d}.safetensors"
# what must agree between a folder's meta.json and a run that adds shards to it
_PINNED = ("format", "version", "views", "resolution", "shard_size", "num_images", "sampled")
_IDENTITY_KEYS = ("family", "config", "weights_sha256")
_FINISH = "run mstok pretokenize to completion first"


def tokenizer_identity(model: nn.Module, checkpoint: str | Path = "") -> dict[str, Any]:
    """What makes two tokenizers produce the same ids: family, config and a weight hash.

    ``weights_sha256`` hashes each tensor's name and raw bytes in sorted name order, so it
    does not depend on the device or on how the weights were loaded. ``checkpoint`` is only
    recorded (the same weights may live at different paths).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode("utf-8"))
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy())
    # a JSON round trip turns tuples into lists, so a fresh identity equals one read from disk
    config = json.loads(json.dumps(model.config.to_dict()))
    return {
        "family": model.config.family,
        "config": config,
        "weights_sha256": digest.hexdigest(),
        "checkpoint": str(checkpoint),
    }


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The identity fields (family, config, weights_sha256) in which ``a`` and ``b`` differ."""
    return [key for key in _IDENTITY_KEYS if a.get(key) != b.get(key)]


def token_dtype(codebook_size: int) -> torch.dtype:
    """The smallest signed dtype that holds ids in [0, codebook_size) (int64 past 2^31: BSQ/LFQ bits)."""
    if codebook_size <= 2**15:
        return torch.int16
    return torch.int32 if codebook_size <= 2**31 else torch.int64


def _write_json(path: Path, value: dict[str, Any], tmp_suffix: str = ".tmp") -> None:
    tmp = path.with_name(path.name + tmp_suffix)
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _check_meta(out: Path, stored: dict[str, Any], meta: dict[str, Any]) -> None:
    """Refuse to add shards to a folder whose meta.json describes another tokenizer or settings."""
    where = f"{out / META_NAME}"
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise ValueError(f"{where} is not an mstok token-shard meta file (expected format {FORMAT!r})")
    differ = identity_differences(stored.get("tokenizer") or {}, meta["tokenizer"])
    if differ:
        raise ValueError(
            f"{out} holds tokens of a different tokenizer (it differs in {', '.join(differ)}; those tokens came "
            f"from {stored['tokenizer'].get('checkpoint') or 'an unnamed checkpoint'}): pretokenize refuses to mix "
            "shards from different tokenizers; write to another --out folder"
        )
    for key in _PINNED:  # "sampled" exists for continuous tokens only
        if stored.get(key) != meta.get(key):
            raise ValueError(
                f"{where} has {key}={stored.get(key)!r} but this run has {key}={meta.get(key)!r}: pretokenize "
                "refuses to mix shards from different tokenizers or settings; write to another --out folder"
            )


def _prepare_folder(out: Path, meta: dict[str, Any], rank: int) -> None:
    """Check ``out`` against ``meta`` before any rank writes a shard; rank 0 creates meta.json."""
    meta_path = out / META_NAME
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if meta_path.is_file():
        _check_meta(out, json.loads(meta_path.read_text()), meta)
        return
    # before the first barrier nobody writes anything but meta.json, so every rank can run this check
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(META_NAME)) if out.is_dir() else []
    if foreign:
        raise ValueError(
            f"{out} is not empty ({', '.join(foreign[:3])}, ...) and has no {META_NAME}: it is not a token-shard "
            "folder; pretokenize refuses to write into it"
        )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(meta_path, meta)


def _collate(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Unlike :func:`collate_skip_broken`, keep the place of undecodable items:
    returns (images of the valid items (B', 3, S, S) or None, labels (B,) with -1 where broken, valid (B,))."""
    valid = torch.tensor([item is not None for item in batch], dtype=torch.bool)
    labels = torch.tensor([-1 if item is None else int(item[1]) for item in batch], dtype=torch.long)
    good = [item[0] for item in batch if item is not None]
    return (torch.stack(good) if good else None), labels, valid


def pretokenize(
    tokenizer: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    flip: bool = False,
    sample_latents: bool = False,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    shard_size: int = 4096,
    num_workers: int = 0,
    source: str = "",
    checkpoint: str | Path = "",
    progress: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Encode every item of ``dataset`` with ``tokenizer`` into token shards under ``out_dir``.

    Args:
        tokenizer: a 1D tokenizer (``encode`` gives (B, K) ids, or (B, K, C) latents for a
            continuous bottleneck: stored as float16, see the module docstring).
        dataset: indexed by ``(index, seed)``, returns ``(image (3, S, S) in [0, 1], label)`` or
            None for an undecodable file (e.g. :func:`open_image_dataset` with
            :func:`center_crop_transform`); seed 0 is used.
        out_dir: the token-shard folder; existing shards of the same run are kept (resume).
        flip: also store the tokens of the horizontally flipped image (views = 2).
        sample_latents: a VAE tokenizer's latents are posterior samples instead of means.
        rank, world_size: this process among the writers; shard ``s`` is written by rank
            ``s % world_size``. ``barrier`` synchronizes them (a no-op for one process).
        source, checkpoint: recorded in the metadata.

    Returns:
        the index (what ``index.json`` holds) on rank 0; on other ranks the index once rank 0
        has written it, else the metadata with ``"complete": False``.

    Raises:
        ValueError: when ``out_dir`` holds shards of another tokenizer or other settings, or is
            a non-empty folder that is not a token-shard folder; when latents leave float16's range.
    """
    if not hasattr(tokenizer.config, "num_latent_tokens"):
        raise ValueError(f"pretokenize needs a 1D tokenizer (TiTok, MsTok), got {type(tokenizer).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    num_images = len(dataset)
    if num_images < 1:
        raise ValueError("pretokenize got an empty dataset")
    cfg, out = tokenizer.config, Path(out_dir)
    continuous = tokenizer.vocab_size is None
    if sample_latents and not (continuous and tokenizer.is_vae):
        raise ValueError(
            f"sample_latents draws from a VAE's posterior, but this tokenizer's bottleneck is "
            f"quantizer={cfg.quantizer!r}: only quantizer='vae' tokenizers have one"
        )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": tokenizer_identity(tokenizer, checkpoint),
        "views": 2 if flip else 1,
        "num_tokens": cfg.num_latent_tokens,
        "codebook_size": tokenizer.vocab_size,
        "resolution": cfg.image_size,
        "num_images": num_images,
        "shard_size": shard_size,
        "source": str(source),
        "classes": [str(name) for name in getattr(dataset, "classes", [])],  # labels of `mstok sample` grids
    }
    if continuous:
        meta.update(continuous=True, token_dim=cfg.code_dim, sampled=sample_latents)
    _prepare_folder(out, meta, rank)
    num_shards = math.ceil(num_images / shard_size)
    files = [out / SHARD_PATTERN.format(s) for s in range(num_shards)]
    if rank == 0 and (out / INDEX_NAME).exists() and not all(f.is_file() for f in files):
        (out / INDEX_NAME).unlink()  # a folder with missing shards must not look complete
    barrier()
    if not (out / META_NAME).is_file():
        # only when ``barrier`` did not wait for rank 0 (independent processes, tests)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / META_NAME, meta, tmp_suffix=f".tmp{rank}")

    pending = [s for s in range(rank, num_shards, world_size) if not files[s].is_file()]
    # batches never cross a shard boundary: a shard's batches, hence its bytes, do not depend
    # on world_size or on which shards a resumed run skips
    batches = []
    for s in pending:
        end = min((s + 1) * shard_size, num_images)
        batches += [
            [(i, 0) for i in range(lo, min(lo + batch_size, end))] for lo in range(s * shard_size, end, batch_size)
        ]
    dev = torch.device(device)
    tokenizer.to(dev).eval()
    # no loader when every shard exists: iterating one would still start its worker processes
    loader = (
        DataLoader(
            dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate, pin_memory=dev.type == "cuda"
        )
        if batches
        else []
    )
    views = meta["views"]
    # a row of one view: K ids, or K latents of C channels
    dtype, row = (
        (torch.float16, (cfg.num_latent_tokens, cfg.code_dim))
        if continuous
        else (token_dtype(tokenizer.vocab_size), (cfg.num_latent_tokens,))
    )
    bar = tqdm(total=sum(len(b) for b in batches), disable=not (progress and rank == 0), desc="pretokenize", unit="img")
    current: dict[str, Any] | None = None
    with torch.inference_mode():
        for keys, (images, labels, valid) in zip(batches, loader, strict=True):
            shard, lo = divmod(keys[0][0], shard_size)
            if current is None:
                count = min(shard_size, num_images - shard * shard_size)
                current = {
                    "shard": shard,
                    "filled": 0,
                    "tokens": torch.zeros(count, views, *row, dtype=dtype),  # (n_s, views, K[, C])
                    "labels": torch.full((count,), -1, dtype=torch.long),
                    "valid": torch.zeros(count, dtype=torch.bool),
                }
            rows = slice(lo, lo + len(keys))
            if images is not None:
                images = images.to(dev, non_blocking=True)
                encoded = _encode_views(tokenizer, images, flip, sample_latents, seed=keys[0][0])
                block = torch.zeros(len(keys), views, *row, dtype=dtype)
                block[valid] = encoded.to("cpu", dtype)  # (B', views, K[, C])
                if continuous and not bool(block.isfinite().all()):
                    raise ValueError(
                        f"the latents of images {keys[0][0]}..{keys[-1][0]} are not finite in float16 (|x| > "
                        f"65504, or NaN from the tokenizer): they cannot be stored as continuous tokens"
                    )
                current["tokens"][rows] = block
            current["labels"][rows], current["valid"][rows] = labels, valid
            current["filled"] += len(keys)
            bar.update(len(keys))
            if current["filled"] == len(current["labels"]):
                atomic_save_safetensors(
                    {name: current[name] for name in ("tokens", "labels", "valid")}, files[current["shard"]]
                )
                current = None
    bar.close()

    barrier()
    if rank == 0:
        index = _write_index(out, meta, files)
    barrier()
    if rank == 0:
        return index
    index_path = out / INDEX_NAME
    return json.loads(index_path.read_text()) if index_path.is_file() else {**meta, "complete": False}


def _encode_views(tokenizer: nn.Module, images: torch.Tensor, flip: bool, sample: bool, seed: int) -> torch.Tensor:
    """(B, views, K) ids or (B, views, K, C) latents of a batch (and of its mirror image with
    ``flip``). Posterior samples draw from torch's RNG seeded with ``seed`` (the batch's first
    dataset index) inside a fork of it, so they do not depend on the ranks or on earlier batches."""
    if not sample:
        views = [tokenizer.encode(images)] + ([tokenizer.encode(images.flip(-1))] if flip else [])
        return torch.stack(views, dim=1)
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        views = [tokenizer.encode(images, sample=True)]
        if flip:
            views.append(tokenizer.encode(images.flip(-1), sample=True))
    return torch.stack(views, dim=1)


def _latent_statistics(files: list[Path]) -> dict[str, list[float]]:
    """Per-channel mean and population std of the valid rows' latents, in float64, one shard
    in memory at a time."""
    total = square = None
    count = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            tokens, valid = handle.get_tensor("tokens"), handle.get_tensor("valid")
        values = tokens[valid].double().flatten(0, -2)  # (n * views * K, C)
        sums, squares = values.sum(0), values.square().sum(0)
        total = sums if total is None else total + sums
        square = squares if square is None else square + squares
        count += values.shape[0]
    mean = total / max(count, 1)
    std = (square / max(count, 1) - mean.square()).clamp_min(0.0).sqrt()
    return {"latent_mean": mean.tolist(), "latent_std": std.tolist()}


def _write_index(out: Path, meta: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """Rank 0, after every rank finished: list the shards and write index.json."""
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} shard file(s) missing in {out} ({', '.join(missing[:3])}): did every rank finish? "
            "Run pretokenize again to write them"
        )
    shards, num_valid, max_label = [], 0, -1
    for path in files:
        # labels and valid only: safe_open reads single tensors, not the (large) token block
        with safe_open(str(path), framework="pt") as handle:
            labels, valid = handle.get_tensor("labels"), handle.get_tensor("valid")
        shards.append({"file": path.name, "count": len(labels), "valid": int(valid.sum())})
        num_valid += int(valid.sum())
        if valid.any():
            max_label = max(max_label, int(labels[valid].max()))
    index = {**meta, "shards": shards, "num_valid": num_valid, "num_classes": max_label + 1}
    if meta.get("continuous"):
        index.update(_latent_statistics(files))
    index["complete"] = True
    _write_json(out / INDEX_NAME, index)
    return index


class TokenDataset(Dataset):
    """The valid rows of a complete token-shard folder, all in memory.

    ``dataset[(i, seed)]`` returns ``(tokens (K,) int64, label)``, or ``(latents (K, C)
    float32, label)`` for continuous tokens (:attr:`continuous`); with two views (``--flip``)
    the view is drawn from ``numpy.random.default_rng(seed)``, which is the flip augmentation.
    A plain int index gives view 0.
    """

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"no {INDEX_NAME} in {self.root}: not a finished token-shard folder; {_FINISH}")
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{index_path} is not valid JSON ({err}); {_FINISH}") from err
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not an mstok token-shard index (expected format {FORMAT!r})")
        if index.get("version") != VERSION:
            raise ValueError(f"{index_path} has version {index.get('version')!r}; this mstok reads {VERSION}")
        if index.get("complete") is not True:
            raise ValueError(f"{self.root} is not complete: {_FINISH}")
        self.index = index
        if self.continuous:
            self._check_statistics(index_path)
        tokens, labels, valid = [], [], []
        for entry in index["shards"]:
            part = self._read_shard(self.root / entry["file"], entry)
            tokens.append(part["tokens"])
            labels.append(part["labels"])
            valid.append(part["valid"])
        valid_all = torch.cat(valid)
        if len(valid_all) != index["num_images"]:
            raise ValueError(
                f"{self.root}: the shards hold {len(valid_all)} rows, the index says {index['num_images']}"
            )
        self.tokens = torch.cat(tokens)[valid_all]  # (N_valid, views, K[, C]), stored dtype
        self.labels = torch.cat(labels)[valid_all]  # (N_valid,) int64
        if not len(self.labels):
            raise ValueError(f"{self.root} holds no valid image (every image failed to decode)")
        self._item_dtype = torch.float32 if self.continuous else torch.int64

    @property
    def _row(self) -> tuple[int, ...]:
        """The shape of one view's tokens: (K,) ids or (K, C) latents."""
        return (self.num_tokens, self.token_dim) if self.continuous else (self.num_tokens,)

    def _check_statistics(self, index_path: Path) -> None:
        """A continuous index's C and per-channel statistics: C finite numbers each, std >= 0."""
        c = self.index.get("token_dim")
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"{index_path}: continuous tokens need token_dim, a positive int, got {c!r}")
        for key in ("latent_mean", "latent_std"):
            values = self.index.get(key)
            ok = isinstance(values, list) and len(values) == c
            ok = ok and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in values
            )
            if not ok or (key == "latent_std" and min(values) < 0):
                raise ValueError(
                    f"{index_path}: {key} must be a list of token_dim = {c} finite numbers"
                    f"{' >= 0' if key == 'latent_std' else ''}, got {values!r}; {_FINISH}"
                )

    def _read_shard(self, path: Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One shard's tensors, checked against the index: shapes, dtypes, valid count, and the
        values (ids inside the codebook, or finite latents)."""
        if not {"file", "count", "valid"} <= set(entry):
            raise ValueError(f"{path.parent / INDEX_NAME}: a shard entry lacks file, count or valid")
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in the index is missing; {_FINISH}")
        part = read_safetensors(path)
        missing = {"tokens", "labels", "valid"} - set(part)
        if missing:
            raise ValueError(f"shard {path} lacks the tensor(s) {', '.join(sorted(missing))}")
        tokens, labels, valid = part["tokens"], part["labels"], part["valid"]
        n, expected = entry["count"], (entry["count"], self.views, *self._row)
        if tuple(tokens.shape) != expected or labels.shape != (n,) or valid.shape != (n,):
            raise ValueError(
                f"shard {path} has tokens {tuple(tokens.shape)}, labels {tuple(labels.shape)}, valid "
                f"{tuple(valid.shape)}; the index expects {expected}, ({n},), ({n},)"
            )
        dtypes = (torch.float16, torch.float32) if self.continuous else (torch.int16, torch.int32, torch.int64)
        if tokens.dtype not in dtypes or valid.dtype != torch.bool:
            raise ValueError(f"shard {path} has tokens of dtype {tokens.dtype} and valid of dtype {valid.dtype}")
        if int(valid.sum()) != entry["valid"]:
            raise ValueError(f"shard {path} has {int(valid.sum())} valid rows, the index says {entry['valid']}")
        if self.continuous:
            if not bool(tokens.isfinite().all()):
                raise ValueError(f"shard {path} holds NaN or infinite latents: it is corrupt")
        elif tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.codebook_size):
            raise ValueError(
                f"shard {path} holds token ids in [{int(tokens.min())}, {int(tokens.max())}], outside the "
                f"codebook [0, {self.codebook_size}): it is corrupt or was written for another tokenizer"
            )
        return {"tokens": tokens, "labels": labels.long(), "valid": valid}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, seed = key
            view = int(np.random.default_rng(seed).integers(self.views)) if self.views > 1 else 0
        else:
            index, view = key, 0
        if not 0 <= index < len(self):
            raise IndexError(f"token index {index} out of range for {len(self)} images")
        return self.tokens[index, view].to(self._item_dtype), int(self.labels[index])

    @property
    def num_tokens(self) -> int:
        """K, tokens per image."""
        return self.index["num_tokens"]

    @property
    def codebook_size(self) -> int | None:
        """V, the tokenizer's codebook size (None for continuous tokens)."""
        return self.index["codebook_size"]

    @property
    def continuous(self) -> bool:
        """True when the tokens are float latents (K, C) of a continuous tokenizer, not ids."""
        return self.index.get("continuous", False) is True

    @property
    def token_dim(self) -> int | None:
        """C, the channels of each continuous token (None for ids)."""
        return self.index["token_dim"] if self.continuous else None

    @property
    def latent_mean(self) -> torch.Tensor | None:
        """(C,) float64 per-channel mean of the latents over the dataset (None for ids)."""
        return torch.tensor(self.index["latent_mean"], dtype=torch.float64) if self.continuous else None

    @property
    def latent_std(self) -> torch.Tensor | None:
        """(C,) float64 per-channel population std of the latents over the dataset (None for ids)."""
        return torch.tensor(self.index["latent_std"], dtype=torch.float64) if self.continuous else None

    @property
    def num_classes(self) -> int:
        """Largest label + 1."""
        return self.index["num_classes"]

    @property
    def views(self) -> int:
        """1, or 2 when the flipped image was encoded too."""
        return self.index["views"]

    @property
    def identity(self) -> dict[str, Any]:
        """The tokenizer identity (see :func:`tokenizer_identity`) the tokens were made with."""
        return self.index["tokenizer"]

    @property
    def meta(self) -> dict[str, Any]:
        """The run's metadata (what meta.json holds)."""
        return {
            key: value
            for key, value in self.index.items()
            if key not in ("shards", "num_valid", "num_classes", "complete", "latent_mean", "latent_std")
        }

    def check_matches(self, tokenizer: nn.Module) -> None:
        """Raise ValueError unless ``tokenizer`` is the one that made these tokens."""
        differ = identity_differences(self.identity, tokenizer_identity(tokenizer))
        if differ:
            raise ValueError(
                f"the tokens in {self.root} were made by another tokenizer ({self.identity.get('checkpoint')}); "
                f"this one differs in {', '.join(differ)}"
            )
