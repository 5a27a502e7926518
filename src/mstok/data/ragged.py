"""Ragged token shards: one prefix length per image, chosen from a PSNR target (``pretokenize
--target-psnr``), in the token-shard format of :mod:`mstok.data.tokens`.

A ragged folder is a token-shard folder with ``"version": 2`` and a ``"ragged"`` table in
``meta.json`` / ``index.json``::

    "ragged": {"target_psnr": 24.0, "max_tokens": 32, "candidates": null, "end_id": 1024}

Each shard holds, besides ``tokens`` (n, views, K), ``labels`` and ``valid``:

    lengths  (n, views) int16    the prefix length of each image and view, 1..max_tokens (0: invalid row)
    psnr     (n, views) float32  the PSNR (dB) its decode at that length reached

``tokens`` keeps the K slots of the tokenizer; the slots past a row's length hold 0 (not
tokens). ``index.json`` adds ``mean_length`` and ``mean_psnr`` over the valid rows and views.
:class:`~mstok.data.tokens.TokenDataset` returns a ragged row with the *end id* V (``end_id``,
one past the codebook) in every slot past its length, which is how a MaskGIT generator with an
end token (``GeneratorConfig.end_token``) learns where an image's tokens stop; the tokenizer
decodes a sample's first ``length`` ids (``decode(ids, lengths=...)``).

Glossary: B batch, K latent tokens, V codebook size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

RAGGED_VERSION = 2
RAGGED_TENSORS = ("lengths", "psnr")


def ragged_settings(
    tokenizer: nn.Module, target_psnr: float, max_tokens: int | None, candidates: list[int] | None
) -> dict[str, Any]:
    """The ``ragged`` table of a folder pretokenized with ``target_psnr``, checked against the tokenizer:
    a nested tokenizer with token ids (a continuous bottleneck has no end id)."""
    cfg = tokenizer.config
    if not getattr(cfg, "nested", False):
        raise ValueError(
            "--target-psnr chooses a prefix length per image: it needs a tokenizer trained with nested tokens "
            "(config.nested = true; docs/nested.md), and this one decodes only all its tokens"
        )
    if tokenizer.vocab_size is None:
        raise ValueError(
            "--target-psnr writes ragged token ids with an end id for a MaskGIT generator; this tokenizer has "
            "continuous latents (no generator here models ragged latents)"
        )
    if isinstance(target_psnr, bool) or not isinstance(target_psnr, (int, float)) or not math.isfinite(target_psnr):
        raise ValueError(f"--target-psnr must be a finite number of dB, got {target_psnr!r}")
    total = cfg.num_latent_tokens
    most = total if max_tokens is None else max_tokens
    if isinstance(most, bool) or not isinstance(most, int) or not 1 <= most <= total:
        raise ValueError(f"--max-tokens must be an integer in 1..{total} (the tokenizer's K), got {max_tokens!r}")
    return {
        "target_psnr": float(target_psnr),
        "max_tokens": most,
        "candidates": None if candidates is None else sorted({int(k) for k in candidates}),
        "end_id": tokenizer.vocab_size,
    }


def encode_ragged(
    tokenizer: nn.Module, images: torch.Tensor, flip: bool, settings: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, views, K) zero past each length, lengths (B, views), psnr (B, views)) of a batch and,
    with ``flip``, of its mirror image: the shortest prefix reaching ``settings["target_psnr"]``."""
    total = tokenizer.config.num_latent_tokens
    views = [images, images.flip(-1)] if flip else [images]
    ids, lengths, psnr = [], [], []
    for view in views:
        chosen = tokenizer.encode_adaptive(
            view, settings["target_psnr"], settings["max_tokens"], settings["candidates"]
        )
        padded = torch.zeros(len(view), total, dtype=chosen.ids.dtype, device=chosen.ids.device)
        padded[:, : chosen.ids.shape[1]] = chosen.ids
        ids.append(padded)
        lengths.append(chosen.lengths)
        psnr.append(chosen.psnr)
    return torch.stack(ids, 1), torch.stack(lengths, 1), torch.stack(psnr, 1)


def with_end_ids(tokens: torch.Tensor, lengths: torch.Tensor, end_id: int) -> torch.Tensor:
    """Rows of ids (..., K) with ``end_id`` in every slot at or past their ``lengths`` (...)."""
    slots = torch.arange(tokens.shape[-1], device=tokens.device)
    return torch.where(slots >= lengths[..., None], end_id, tokens.long())


def length_statistics(files: list[Path]) -> dict[str, float]:
    """``mean_length`` and ``mean_psnr`` over the valid rows and views of a ragged folder's shards."""
    count, length_sum, psnr_sum = 0, 0.0, 0.0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            valid, lengths, psnr = (handle.get_tensor(name) for name in ("valid", "lengths", "psnr"))
        count += int(valid.sum()) * lengths.shape[1]
        length_sum += float(lengths[valid].double().sum())
        psnr_sum += float(psnr[valid].double().sum())
    return {"mean_length": length_sum / max(count, 1), "mean_psnr": psnr_sum / max(count, 1)}


def check_ragged_shard(path: Path, part: dict[str, torch.Tensor], views: int, most: int) -> None:
    """A ValueError unless a ragged shard's lengths and PSNRs have the rows' shape, and every valid
    row's lengths lie in 1..max_tokens."""
    n = len(part["valid"])
    missing = [name for name in RAGGED_TENSORS if name not in part]
    if missing:
        raise ValueError(f"shard {path} of a ragged folder lacks the tensor(s) {', '.join(missing)}")
    lengths = part["lengths"]
    if lengths.shape != (n, views) or part["psnr"].shape != (n, views) or lengths.is_floating_point():
        raise ValueError(
            f"shard {path} has lengths {tuple(lengths.shape)} ({lengths.dtype}) and psnr {tuple(part['psnr'].shape)}; "
            f"a ragged shard needs integer lengths and psnr of shape ({n}, {views})"
        )
    kept = lengths[part["valid"]]
    if kept.numel() and (kept.min() < 1 or kept.max() > most):
        raise ValueError(
            f"shard {path} holds lengths in [{int(kept.min())}, {int(kept.max())}], outside 1..{most} (max_tokens): "
            "it is corrupt"
        )
