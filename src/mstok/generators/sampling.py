"""From class labels to pixels, for every generator family; and writing the samples.

:func:`generate_images` runs the generator's own sampler (MaskGIT's in
:mod:`~mstok.generators.maskgit_sampling`, a DiT's in :mod:`~mstok.generators.dit_sampling`,
BitMAR's in :mod:`~mstok.generators.bitmar_sampling`; the registry's
:class:`~mstok.generators.registry.GeneratorFamily` says which) and decodes the tokens with the
tokenizer; :func:`write_samples` saves the images.

MaskGIT's sampler (``SamplingConfig``, ``sample``, ``guided_logits``) and the pieces every
family's sampler shares (``prepare_sampling``, ``conditional_pair``, ``gumbel_noise``,
``check_class_labels``) lived here; they are re-exported from their modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from tqdm.auto import tqdm

from mstok.generators.common import (  # re-exported: they lived here
    check_class_labels,
)
from mstok.generators.common import (
    conditional_pair as conditional_pair,
)
from mstok.generators.common import (
    gumbel_noise as gumbel_noise,
)
from mstok.generators.common import (
    prepare_sampling as prepare_sampling,
)
from mstok.generators.maskgit_sampling import (  # re-exported: MaskGIT's sampler lived here
    CONFIDENCES as CONFIDENCES,
)
from mstok.generators.maskgit_sampling import (
    SamplingConfig as SamplingConfig,
)
from mstok.generators.maskgit_sampling import (
    guided_logits as guided_logits,
)
from mstok.generators.maskgit_sampling import (
    sample as sample,
)
from mstok.generators.maskgit_sampling import (
    token_lengths as token_lengths,
)
from mstok.generators.registry import check_tokenizer, family_of
from mstok.images import make_grid


def check_decode_steps(tokenizer: torch.nn.Module, steps: Any) -> int:
    """``steps`` if ``tokenizer``'s decoder integrates an ODE in steps (its ``decodes_in_steps``),
    else a ValueError naming why."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"decode steps must be a positive integer, got {steps!r}")
    if not tokenizer.decodes_in_steps:
        raise ValueError(
            f"this {type(tokenizer).__name__} decodes tokens in one pass: decode steps apply only to a tokenizer "
            "whose decoder samples (a SemTok stage-I model, decoder_mode='flow')"
        )
    return steps


@torch.inference_mode()
def generate_images(
    generator_model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    labels: Any,
    config: Any = None,
    seed: int | None = 0,
    batch_size: int = 32,
    progress: bool = False,
    decode_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample tokens for ``labels`` with the generator's own sampler and decode them.

    Args:
        generator_model: a generator of any family (MaskGIT, DiT, BitMAR).
        tokenizer: the tokenizer whose tokens it models (checked: kind, K, V or C).
        labels: (N,) class ids.
        config: the family's sampling settings (:class:`SamplingConfig` for MaskGIT,
            :class:`~mstok.generators.dit_sampling.DiTSamplingConfig` for a DiT); None = defaults.
        seed: seeds one ``torch.Generator`` on the model's device that drives every batch, and the global
            RNG a decoder that draws noise reads (restored afterwards); None: the global RNG.
        batch_size: labels per sampling call.
        decode_steps: ODE steps of a tokenizer whose decoder samples (a ``decode(tokens, steps=...)``,
            SemTok's stage-I flow decoder); None: its default. A ValueError for a one-pass decoder.

    Returns:
        (images (N, 3, H, W) in [0, 1], tokens: (N, K) ids or (N, K, C) latents), on the CPU. A
        MaskGIT generator with an end token (ragged tokens) samples a length per image: its ids
        hold the end id past it (:func:`token_lengths`), and the tokenizer decodes the prefix.
    """
    family = family_of(generator_model)
    check_tokenizer(generator_model, tokenizer)
    config = family.sampling_class() if config is None else config
    if not isinstance(config, family.sampling_class):
        raise TypeError(
            f"a {family.title} generator samples with a {family.sampling_class.__name__}, got {type(config).__name__}"
        )
    device = next(generator_model.parameters()).device
    labels = check_class_labels(labels, generator_model.config.num_classes)
    decode_options = {} if decode_steps is None else {"steps": check_decode_steps(tokenizer, decode_steps)}
    rng = None
    if seed is not None:
        rng = torch.Generator(device=device).manual_seed(seed)
    images, tokens = [], []
    # a decoder that draws noise (SemTok's flow decoder) takes it from torch's global RNG: seed
    # it too, inside fork_rng so the caller's RNG state is left as it was
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for chunk in tqdm(labels.split(batch_size), disable=not progress, desc="generate", unit="batch"):
            drawn = family.sample(generator_model, chunk, config, generator=rng)
            end_id = getattr(generator_model.config, "end_id", None)
            ragged = {} if end_id is None else {"lengths": token_lengths(drawn, end_id)}
            images.append(tokenizer.decode(drawn, **ragged, **decode_options).float().cpu())
            tokens.append(drawn.cpu())
    return torch.cat(images), torch.cat(tokens)


def write_samples(
    images: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    per_class: int,
    grid: str | Path | None = None,
    out_dir: str | Path | None = None,
    row_labels: Sequence[str] | None = None,
    lengths: torch.Tensor | None = None,
) -> list[str]:
    """Save generated images: a grid PNG (one row of ``per_class`` images per class, at most
    32 rows, named by ``row_labels``, one per class, default ``class <id>``) and/or a folder of
    ``class{c}_{i}.png`` files plus ``samples.npz`` (``arr_0``: uint8 (N, H, W, 3) as the ADM
    evaluator reads it, ``labels``, ``tokens``: the ids (N, K) or latents (N, K, C), and ``lengths`` (N,)
    when given: a ragged generator's sample lengths). Returns the paths."""
    written = []
    pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)  # (N, 3, H, W)
    if grid:
        rows = images[: 32 * per_class].reshape(-1, per_class, *images.shape[1:])  # (classes, n, 3, H, W)
        names = list(row_labels) if row_labels is not None else [f"class {c}" for c in labels[::per_class].tolist()]
        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_grid(rows, labels=names[: len(rows)])).save(grid)
        written.append(str(grid))
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        nhwc = rearrange(pixels, "n c h w -> n h w c").numpy()
        for i, (image, label) in enumerate(zip(nhwc, labels.tolist(), strict=True)):
            Image.fromarray(image).save(out / f"class{label:04d}_{i % per_class:04d}.png")
        extra = {} if lengths is None else {"lengths": lengths.numpy()}
        np.savez(out / "samples.npz", arr_0=nhwc, labels=labels.numpy(), tokens=ids.numpy(), **extra)
        written.append(f"{out}/ ({len(nhwc)} PNGs + samples.npz)")
    return written
