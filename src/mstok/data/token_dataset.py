"""The token-shard format's names and tokenizer identity, and :class:`TokenDataset`, which reads a
finished folder back. The folder's layout and its writer, ``pretokenize``, are in
:mod:`mstok.data.tokens` (which re-exports these names); ragged folders in :mod:`mstok.data.ragged`.

Glossary: K latent tokens, C code dim, V codebook size.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mstok.data.ragged import RAGGED_VERSION, check_ragged_shard, with_end_ids
from mstok.io import read_safetensors

FORMAT = "mstok-tokens"
VERSION = 1
META_NAME = "meta.json"
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:06d}.safetensors"
IDENTITY_KEYS = ("family", "config", "weights_sha256")
FINISH = "run mstok pretokenize to completion first"


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
    return [key for key in IDENTITY_KEYS if a.get(key) != b.get(key)]


def token_dtype(codebook_size: int) -> torch.dtype:
    """The smallest signed dtype that holds ids in [0, codebook_size) (int64 past 2^31: BSQ/LFQ bits)."""
    if codebook_size <= 2**15:
        return torch.int16
    return torch.int32 if codebook_size <= 2**31 else torch.int64


class TokenDataset(Dataset):
    """The valid rows of a complete token-shard folder, all in memory.

    ``dataset[(i, seed)]`` returns ``(tokens (K,) int64, label)``, or ``(latents (K, C)
    float32, label)`` for continuous tokens (:attr:`continuous`); with two views (``--flip``)
    the view is drawn from ``numpy.random.default_rng(seed)``, which is the flip augmentation.
    A plain int index gives view 0. A ragged folder's rows hold the end id (:attr:`end_id`, V)
    in every slot past their length (:attr:`lengths`; :mod:`mstok.data.ragged`).
    """

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"no {INDEX_NAME} in {self.root}: not a finished token-shard folder; {FINISH}")
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{index_path} is not valid JSON ({err}); {FINISH}") from err
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not an mstok token-shard index (expected format {FORMAT!r})")
        if index.get("version") not in (VERSION, RAGGED_VERSION):
            raise ValueError(
                f"{index_path} has version {index.get('version')!r}; this mstok reads {VERSION} and {RAGGED_VERSION}"
            )
        if (index.get("version") == RAGGED_VERSION) != isinstance(index.get("ragged"), dict):
            raise ValueError(f"{index_path}: version {RAGGED_VERSION} (and only it) has a 'ragged' table; {FINISH}")
        if index.get("complete") is not True:
            raise ValueError(f"{self.root} is not complete: {FINISH}")
        self.index = index
        if self.continuous:
            self._check_statistics(index_path)
        tokens, labels, valid, lengths = [], [], [], []
        for entry in index["shards"]:
            part = self._read_shard(self.root / entry["file"], entry)
            tokens.append(part["tokens"])
            labels.append(part["labels"])
            valid.append(part["valid"])
            lengths.append(part.get("lengths"))
        valid_all = torch.cat(valid)
        if len(valid_all) != index["num_images"]:
            raise ValueError(
                f"{self.root}: the shards hold {len(valid_all)} rows, the index says {index['num_images']}"
            )
        self.tokens = torch.cat(tokens)[valid_all]  # (N_valid, views, K[, C]), stored dtype
        self.labels = torch.cat(labels)[valid_all]  # (N_valid,) int64
        # (N_valid, views) prefix lengths of a ragged folder, else None
        self.lengths = torch.cat(lengths)[valid_all].long() if self.ragged else None
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
                    f"{' >= 0' if key == 'latent_std' else ''}, got {values!r}; {FINISH}"
                )

    def _read_shard(self, path: Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One shard's tensors, checked against the index: shapes, dtypes, valid count, and the
        values (ids inside the codebook, or finite latents)."""
        if not {"file", "count", "valid"} <= set(entry):
            raise ValueError(f"{path.parent / INDEX_NAME}: a shard entry lacks file, count or valid")
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in the index is missing; {FINISH}")
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
        out = {"tokens": tokens, "labels": labels.long(), "valid": valid}
        if self.ragged:
            check_ragged_shard(path, part, self.views, self.index["ragged"]["max_tokens"])
            out["lengths"] = part["lengths"]
        return out

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
        tokens = self.tokens[index, view].to(self._item_dtype)
        if self.lengths is not None:
            tokens = with_end_ids(tokens, self.lengths[index, view], self.end_id)
        return tokens, int(self.labels[index])

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
    def ragged(self) -> bool:
        """True for a folder of per-image prefix lengths (``pretokenize --target-psnr``)."""
        return isinstance(self.index.get("ragged"), dict)

    @property
    def end_id(self) -> int | None:
        """The id past a ragged row's length (V, one past the codebook); None for fixed-length rows."""
        return self.index["ragged"]["end_id"] if self.ragged else None

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
            if key
            not in (
                "shards",
                "num_valid",
                "num_classes",
                "complete",
                "latent_mean",
                "latent_std",
                "mean_length",
                "mean_psnr",
            )
        }

    def check_matches(self, tokenizer: nn.Module) -> None:
        """Raise ValueError unless ``tokenizer`` is the one that made these tokens."""
        differ = identity_differences(self.identity, tokenizer_identity(tokenizer))
        if differ:
            raise ValueError(
                f"the tokens in {self.root} were made by another tokenizer ({self.identity.get('checkpoint')}); "
                f"this one differs in {', '.join(differ)}"
            )
