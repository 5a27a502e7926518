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

**Ragged tokens.** With ``target_psnr`` (``pretokenize --target-psnr DB``) a nested tokenizer
keeps, per image, the shortest prefix whose decode reaches the target: the folder is version 2,
with per-row ``lengths`` and ``psnr`` and a ``ragged`` table (:mod:`mstok.data.ragged`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mstok.data.ragged import RAGGED_TENSORS, RAGGED_VERSION, encode_ragged, length_statistics, ragged_settings
from mstok.data.token_dataset import (  # the format's names and the reader, re-exported: they lived here
    FORMAT,
    INDEX_NAME,
    META_NAME,
    SHARD_PATTERN,
    VERSION,
    TokenDataset,
    identity_differences,
    token_dtype,
    tokenizer_identity,
)
from mstok.io import atomic_save_safetensors

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "META_NAME",
    "SHARD_PATTERN",
    "VERSION",
    "TokenDataset",
    "identity_differences",
    "pretokenize",
    "token_dtype",
    "tokenizer_identity",
]
# what must agree between a folder's meta.json and a run that adds shards to it
_PINNED = ("format", "version", "views", "resolution", "shard_size", "num_images", "sampled", "ragged")


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
    target_psnr: float | None = None,
    max_tokens: int | None = None,
    candidates: list[int] | None = None,
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
        target_psnr: a nested tokenizer keeps, per image and view, the shortest prefix (at most
            ``max_tokens``, trying the ``candidates`` lengths) whose decode reaches this PSNR in
            dB: a ragged folder (module docstring, :mod:`mstok.data.ragged`).

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
    ragged = None if target_psnr is None else ragged_settings(tokenizer, target_psnr, max_tokens, candidates)
    if ragged is None and (max_tokens is not None or candidates is not None):
        raise ValueError("max_tokens and candidates bound the lengths a target_psnr chooses: give a target_psnr")
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
    if ragged is not None:
        meta.update(version=RAGGED_VERSION, ragged=ragged)
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
                if ragged is not None:  # length 0: an invalid row
                    current["lengths"] = torch.zeros(count, views, dtype=torch.int16)
                    current["psnr"] = torch.zeros(count, views, dtype=torch.float32)
            rows = slice(lo, lo + len(keys))
            if images is not None:
                images = images.to(dev, non_blocking=True)
                if ragged is None:
                    encoded = _encode_views(tokenizer, images, flip, sample_latents, seed=keys[0][0])
                else:
                    encoded, lengths, psnr = encode_ragged(tokenizer, images, flip, ragged)
                    current["lengths"][rows][valid] = lengths.to("cpu", torch.int16)
                    current["psnr"][rows][valid] = psnr.to("cpu", torch.float32)
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
                names = ("tokens", "labels", "valid", *(RAGGED_TENSORS if ragged is not None else ()))
                atomic_save_safetensors({name: current[name] for name in names}, files[current["shard"]])
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
    if meta.get("ragged"):
        index.update(length_statistics(files))
    index["complete"] = True
    _write_json(out / INDEX_NAME, index)
    return index
