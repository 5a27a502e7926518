"""Nested tokens: decoding any prefix of a 1D tokenizer's K tokens, and choosing its length per image.

A tokenizer built with ``nested = True`` (TiTok, MsTok, SemTok) has one learned *tail token*, a
code vector (C,) on its decoder (``decoder.tail_token``). Whatever stands past a prefix of length k
is replaced by that vector before the decoder reads the K slots, so ``decode(tokens[:, :k])`` is
``decode`` of the full sequence with positions k..K-1 masked (:func:`fill_tail`), in training and at
inference alike. Training (the trainer's ``[nested]`` section, nested dropout / tail drop) draws
one prefix length per image from :func:`prefix_lengths` and masks the rest, so the first tokens
learn to carry the coarse content and every prefix decodes to an image.

The prefix-length distributions (``PREFIX_DISTRIBUTIONS``):

* ``uniform``: k uniform over ``min_tokens .. K`` (One-D-Piece's tail drop);
* ``pow2``: k uniform over the powers of two in ``min_tokens .. K``, plus K itself (FlexTok's
  nested dropout): the lengths a user decodes at most often get the most training, and the full
  sequence about one step in log2(K) + 1.

``full_fraction`` f (the trainer's ``nested.full_fraction``) keeps all K tokens for a share f of the
images and draws the others' lengths from the distribution: the full sequence then trains on every
step, not one in log2(K) + 1 (measured in benchmarks/nested.py: without it, a short run leaves the
tail tokens unused and the full-K decode far below a dedicated model's).

:func:`encode_adaptive` picks the length per image: the shortest prefix whose decode reaches a
PSNR target (ragged output: ids padded to the longest prefix, plus a lengths tensor).

Glossary: B batch, K latent tokens, C code dim, V codebook size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mstok.images import image_psnr

PREFIX_DISTRIBUTIONS = ("uniform", "pow2")


def check_num_tokens(k: Any, total: int, name: str = "num_tokens") -> int:
    """``k`` when it is an integer in 1..total, else a ValueError naming ``name``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"{name} must be an integer in 1..{total} (the model's K), got {k!r}")
    return k


def prefix_choices(distribution: str, total: int, min_tokens: int = 1) -> list[int]:
    """The prefix lengths ``distribution`` draws from, for K = ``total`` (module docstring)."""
    if distribution not in PREFIX_DISTRIBUTIONS:
        choices = ", ".join(PREFIX_DISTRIBUTIONS)
        raise ValueError(f"unknown prefix distribution {distribution!r}; choose one of {choices}")
    check_num_tokens(min_tokens, total, "min_tokens")
    if distribution == "uniform":
        return list(range(min_tokens, total + 1))
    powers = [2**i for i in range(int(math.log2(total)) + 1) if 2**i >= min_tokens]
    return sorted({*powers, total})


def prefix_lengths(
    distribution: str,
    total: int,
    count: int,
    generator: torch.Generator | None = None,
    min_tokens: int = 1,
    full_fraction: float = 0.0,
) -> torch.Tensor:
    """``count`` prefix lengths (count,) int64 drawn from ``distribution`` over 1..K (``total``);
    each is K with probability ``full_fraction`` in [0, 1] and drawn from the distribution otherwise."""
    if not 0.0 <= full_fraction <= 1.0:
        raise ValueError(f"full_fraction must be in [0, 1], got {full_fraction!r}")
    choices = torch.tensor(prefix_choices(distribution, total, min_tokens))
    lengths = choices[torch.randint(len(choices), (count,), generator=generator)]
    full = torch.rand(count, generator=generator) < full_fraction  # drawn always: one stream per fraction
    return torch.where(full, total, lengths)


def check_lengths(lengths: Any, batch: int, most: int, check_values: bool = True) -> torch.Tensor:
    """Per-image prefix lengths: an integer tensor (B,) with every value in 1..most; returned as int64.
    ``check_values=False`` checks type and shape only (the value check syncs the device)."""
    if not isinstance(lengths, torch.Tensor) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        got = f"dtype {lengths.dtype}" if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be an integer tensor (B,) of prefix lengths, got {got}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), one per image, got {tuple(lengths.shape)}")
    if check_values and batch and (lengths.min() < 1 or lengths.max() > most):
        low, high = int(lengths.min()), int(lengths.max())
        raise ValueError(f"lengths must be in 1..{most} (the tokens given), got values in [{low}, {high}]")
    return lengths.long()


def nested_refusal(model: Any, what: str) -> str:
    """The message of a model without nested tokens asked for a prefix (``what``: the call)."""
    reason = model.config.no_nested_reason
    if reason:
        return f"{what}: this {type(model).__name__} has no nested tokens; {reason}"
    return (
        f"{what}: this model was trained without nested tokens (config.nested = false), so it decodes only all "
        f"K = {model.config.num_latent_tokens} tokens; train one with the [nested] section of the training config "
        "(docs/nested.md)"
    )


def check_prefix(model: Any, tokens: Any, lengths: Any = None) -> tuple[Any, torch.Tensor | None, int]:
    """The prefix checks of ``model.decode``: tokens (B, k[, C]) with 1 <= k <= K (only k = K without
    nested tokens) and optional lengths (B,) in 1..k, whose slots past each length may hold anything
    (a pad or a generator's end id): they are zeroed. Returns (tokens, lengths, k); the caller checks
    the ids' or latents' values for k tokens."""
    cfg = model.config
    total = cfg.num_latent_tokens
    shaped = isinstance(tokens, torch.Tensor) and tokens.dim() >= 2
    k = tokens.shape[1] if shaped else total
    if not cfg.nested and (lengths is not None or 1 <= k < total):
        what = f"tokens must have shape (B, {total}), got {tuple(tokens.shape)}" if k < total else "decode(lengths=...)"
        raise ValueError(nested_refusal(model, what))
    if cfg.nested and not 1 <= k <= total:
        raise ValueError(f"tokens must hold a prefix (B, k) with k in 1..{total}, got shape {tuple(tokens.shape)}")
    if lengths is not None and shaped:
        lengths = check_lengths(lengths, tokens.shape[0], k)
        beyond = torch.arange(k, device=tokens.device)[None, :] >= lengths.to(tokens.device)[:, None]  # (B, k)
        tokens = tokens.masked_fill(beyond if tokens.dim() == 2 else beyond[..., None], 0)
    return tokens, lengths, (k if cfg.nested else total)  # without nested tokens, any other count is refused


def fill_tail(codes: torch.Tensor, total: int, tail: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of a prefix (B, k, C) -> the decoder's K slots (B, K, C): the slots past each image's
    length (``lengths`` (B,), default k) hold the tail token ``tail`` (1, C). Differentiable in both."""
    b, k, _ = codes.shape
    tail = tail.to(codes.dtype)
    if k < total:
        codes = torch.cat([codes, tail.expand(b, total - k, -1)], dim=1)  # (B, K, C)
    if lengths is None:
        return codes
    kept = torch.arange(total, device=codes.device)[None, :] < lengths.to(codes.device)[:, None]  # (B, K)
    return torch.where(kept[..., None], codes, tail)


@dataclass
class AdaptiveTokens:
    """The ragged result of :func:`encode_adaptive`.

    Attributes:
        ids: (B, L) token ids (or (B, L, C) latents), L the longest length chosen; each row's
            entries past its length are 0 (they are not tokens).
        lengths: (B,) int64, each image's prefix length in 1..max_tokens.
        psnr: (B,) float64, the PSNR in dB of each image's decode at its length.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    psnr: torch.Tensor


@torch.no_grad()
def encode_adaptive(
    model: Any,
    images: torch.Tensor,
    min_psnr: float,
    max_tokens: int | None = None,
    candidates: Sequence[int] | None = None,
    **decode_options: Any,
) -> AdaptiveTokens:
    """Per image, the shortest prefix of ``model``'s tokens whose decode reaches ``min_psnr`` dB.

    Args:
        model: a nested tokenizer (``config.nested``).
        images: float (B, 3, H, W) in [0, 1].
        min_psnr: the target in dB; an image that misses it at every candidate gets the longest.
        max_tokens: the longest prefix allowed (default K).
        candidates: the lengths tried, shortest first (default every length 1..max_tokens; fewer,
            e.g. powers of two, cost fewer decodes); they must lie in 1..max_tokens.
        decode_options: passed to ``model.decode`` (a SemTok flow decoder's ``steps``, ``seed``).

    Returns:
        :class:`AdaptiveTokens`. Costs one encode and up to ``len(candidates)`` decodes of the
        images still short of the target.
    """
    total = model.config.num_latent_tokens
    if not model.config.nested:
        raise ValueError(nested_refusal(model, "encode_adaptive"))
    if isinstance(min_psnr, bool) or not isinstance(min_psnr, (int, float)) or math.isnan(min_psnr):
        raise ValueError(f"min_psnr must be a number of dB (inf: always the longest prefix), got {min_psnr!r}")
    most = total if max_tokens is None else check_num_tokens(max_tokens, total, "max_tokens")
    tried = list(range(1, most + 1)) if candidates is None else sorted({int(k) for k in candidates})
    if not tried or tried[0] < 1 or tried[-1] > most:
        raise ValueError(f"candidates must be lengths in 1..{most} (max_tokens), got {candidates!r}")
    if tried[-1] != most:
        tried.append(most)  # the fallback for images that never reach the target
    tokens = model.encode(images)  # checks the images
    b = tokens.shape[0]
    lengths = torch.full((b,), most, dtype=torch.long)
    psnr = torch.full((b,), -math.inf, dtype=torch.float64)
    pending = torch.ones(b, dtype=torch.bool)
    for k in tried:
        rows = pending.nonzero().squeeze(1)
        if not len(rows):
            break
        recon = model.decode(tokens[rows.to(tokens.device), :k], **decode_options)
        scores = image_psnr(images[rows.to(images.device)], recon).cpu()
        reached = (scores >= min_psnr) | (k == most)
        lengths[rows[reached]] = k
        psnr[rows[reached]] = scores[reached]
        pending[rows[reached]] = False
    longest = int(lengths.max()) if b else 1
    ids = tokens[:, :longest].clone()
    beyond = torch.arange(longest, device=ids.device)[None, :] >= lengths.to(ids.device)[:, None]  # (B, L)
    ids[beyond] = 0  # not tokens: zero, so the padded rows do not depend on what was cut
    return AdaptiveTokens(ids, lengths, psnr)
