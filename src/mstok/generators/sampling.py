"""MaskGIT sampling: from all masks to K tokens in S parallel steps.

At step t (0-based) of S, with progress ``r = (t + 1) / S``:

1. The generator predicts logits at every slot, with classifier-free guidance
   ``logits = cond + w_t * (cond - uncond)`` where ``uncond`` uses the null class. ``w_t = 0``
   is plain conditional sampling (and skips the unconditional pass); this equals
   ``uncond + (1 + w_t)(cond - uncond)``, the form with scale ``1 + w_t``.
   With ``softmax_annealing`` the logits are then divided by ``0.5 + 0.8 (1 - r)``.
2. Every masked slot draws a token from ``softmax(logits / tau)`` (Gumbel-max, so ``tau = 0``
   is argmax); ``tau`` is ``temperature``, times ``1 - r`` when ``anneal_temperature``.
3. Each new token gets a confidence, its log-probability (or its raw logit, as in the
   official TiTok code), plus Gumbel noise of scale ``choice_temperature * (1 - r)``, so
   the choice is random early and greedy at the end. Already-revealed tokens are final.
4. The ``masked_counts(K, S, schedule)[t]`` least confident new tokens are masked again; at
   the last step none are, so every token is fixed.

All randomness comes from one ``torch.Generator``: a fixed seed reproduces samples exactly.
``SamplingConfig.official_titok(...)`` gives the official TiTok sampler's settings.

:func:`generate_images` is every family's way from labels to pixels: it runs the generator's
own sampler (this module's for MaskGIT, :mod:`mstok.generators.dit_sampling` for a DiT; the
registry's :class:`~mstok.generators.registry.GeneratorFamily` says which) and decodes the
tokens with the tokenizer; :func:`write_samples` saves the images. The pieces every family's
sampler shares live here too: :func:`prepare_sampling` (eval mode, device, checked labels),
:func:`conditional_pair` (the one batched pass of classifier-free guidance) and :func:`gumbel_noise`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from einops import rearrange
from tqdm.auto import tqdm

from mstok.config_schema import NON_NEGATIVE, ConfigDict, Rule, one_of, positive
from mstok.generators.maskgit import MaskGITGenerator
from mstok.generators.schedules import GUIDANCE_SCHEDULES, MASK_SCHEDULES, guidance_weight, masked_counts

CONFIDENCES = ("log_prob", "logit")


@dataclass
class SamplingConfig(ConfigDict):
    """How to sample (module docstring).

    Attributes:
        steps: S, the number of parallel decoding steps (8 for TiTok, 64 for its U-ViT setting).
        schedule: masking schedule (``arccos``, ``cosine``, ``linear``, ``sqrt``).
        temperature: token sampling temperature tau (0 = argmax).
        anneal_temperature: multiply tau by ``1 - r`` (the official TiTok sampler does).
        choice_temperature: scale of the Gumbel noise on confidences, annealed to 0.
        confidence: ``log_prob`` (MaskGIT) or ``logit`` (official TiTok).
        guidance_scale: classifier-free guidance weight w (0 = none).
        guidance_schedule: ``constant``, ``linear`` or ``power_cosine`` (see schedules.py).
        guidance_power: the exponent p of ``power_cosine``.
        softmax_annealing: divide the (guided) logits by ``0.5 + 0.8 (1 - r)`` before sampling
            and scoring (the official TiTok FID script's ``softmax_temperature_annealing``).
    """

    steps: int = 8
    schedule: str = "arccos"
    temperature: float = 1.0
    anneal_temperature: bool = False
    choice_temperature: float = 4.5
    confidence: str = "log_prob"
    guidance_scale: float = 0.0
    guidance_schedule: str = "constant"
    guidance_power: float = 3.0
    softmax_annealing: bool = False

    # checked by ConfigDict.__post_init__ (mstok.config_schema)
    field_rules: ClassVar[dict[str, Rule]] = {
        "steps": positive(4096),
        "schedule": one_of(MASK_SCHEDULES, "a masking schedule"),
        "temperature": NON_NEGATIVE,
        "choice_temperature": NON_NEGATIVE,
        "confidence": one_of(CONFIDENCES),
        "guidance_scale": NON_NEGATIVE,
        "guidance_schedule": one_of(GUIDANCE_SCHEDULES, "a guidance schedule"),
    }

    @classmethod
    def official_titok(
        cls, randomize_temperature: float, guidance_scale: float, guidance_decay: str, steps: int = 8, **kw: Any
    ) -> SamplingConfig:
        """The official TiTok sampler: its ``randomize_temperature`` drives both the token
        and the confidence noise (annealed), confidences are raw logits, arccos schedule.
        Its ``power-cosine`` scale ``g`` is our ``w = g - 1`` (schedules.py)."""
        schedule = guidance_decay.replace("-", "_")
        weight = guidance_scale - 1.0 if schedule == "power_cosine" else guidance_scale
        return cls(
            steps=steps,
            temperature=randomize_temperature,
            anneal_temperature=True,
            choice_temperature=randomize_temperature,
            confidence="logit",
            guidance_scale=weight,
            guidance_schedule=schedule,
            **kw,
        )


def gumbel_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))``, u ~ U(0, 1), float32, clamped away from log(0)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))


def conditional_pair(
    model: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], labels: torch.Tensor, null_class: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 (cond, uncond) outputs of ``model(*inputs, labels)`` and of the same inputs
    with the ``null_class``, from ONE batched call on ``[inputs; inputs]`` (2B rows), as every
    generator family's classifier-free guidance computes them.

    inputs: tensors (B, ...) the model reads before the labels; labels: (B,)."""
    null = torch.full_like(labels, null_class)
    both = model(*(torch.cat([x, x]) for x in inputs), torch.cat([labels, null])).float()  # (2B, ...)
    cond, uncond = both.chunk(2)
    return cond, uncond


def guided_logits(model: MaskGITGenerator, tokens: torch.Tensor, labels: torch.Tensor, weight: float) -> torch.Tensor:
    """``cond + weight * (cond - uncond)`` in float32; one batched pass when ``weight != 0``.

    tokens: (B, K); labels: (B,). -> (B, K, V)"""
    if weight == 0:
        return model(tokens, labels).float()
    cond, uncond = conditional_pair(model, (tokens,), labels, model.config.null_class)
    return cond + weight * (cond - uncond)


def check_class_labels(labels: Any, num_classes: int, allow_null: bool = True) -> torch.Tensor:
    """Class ids as a (B,) int64 tensor, each in [0, num_classes) (or the null class
    ``num_classes`` with ``allow_null``), else a clear ValueError."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D tensor of integer class ids, got {labels.dtype} {tuple(labels.shape)}")
    top = num_classes + (1 if allow_null else 0)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= top):
        raise ValueError(
            f"class ids must be in [0, {num_classes}) (this generator has {num_classes} classes), "
            f"got min {int(labels.min())} max {int(labels.max())}"
        )
    return labels.long()


def prepare_sampling(model: torch.nn.Module, labels: Any) -> tuple[torch.device, torch.Tensor]:
    """Every family's sampler set-up: ``model`` in eval mode, and (its device, the checked class
    ``labels`` (B,) int64 on it; the null class allowed)."""
    model.eval()
    device = next(model.parameters()).device
    return device, check_class_labels(labels, model.config.num_classes).to(device)


@torch.inference_mode()
def sample(
    model: MaskGITGenerator,
    labels: Any,
    config: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    return_history: bool = False,
    progress: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate token ids for the class ``labels`` with MaskGIT decoding.

    Args:
        model: the generator (put in eval mode here).
        labels: (B,) class ids (the null class gives unconditional samples).
        config: sampling settings (defaults: 8 arccos steps, no guidance).
        generator: the source of all randomness (on the model's device); None uses the global RNG.
        return_history: also return the (B, K) ids after every step (masked slots = mask id).
        progress: a tqdm bar over the steps.

    Returns:
        (B, K) int64 ids in [0, V), and the per-step history when asked.
    """
    config = config or SamplingConfig()
    device, labels = prepare_sampling(model, labels)
    cfg = model.config
    b, k, steps = labels.shape[0], cfg.num_tokens, config.steps
    ids = torch.full((b, k), cfg.mask_id, dtype=torch.long, device=device)
    counts = masked_counts(k, steps, config.schedule)
    history = []
    for t in tqdm(range(steps), disable=not progress, desc="sample", unit="step"):
        r = (t + 1) / steps
        weight = guidance_weight(config.guidance_scale, t, steps, config.guidance_schedule, config.guidance_power)
        logits = guided_logits(model, ids, labels, weight)  # (B, K, V)
        if config.softmax_annealing:
            logits = logits / (0.5 + 0.8 * (1.0 - r))
        tau = config.temperature * ((1.0 - r) if config.anneal_temperature else 1.0)
        noisy = logits if tau == 0 else logits + tau * gumbel_noise(logits.shape, generator, device)
        drawn = noisy.argmax(-1)  # (B, K)
        confidence = logits.gather(-1, drawn[..., None]).squeeze(-1)  # (B, K)
        if config.confidence == "log_prob":
            confidence = confidence - logits.logsumexp(-1)  # log-softmax at the drawn ids only
        is_mask = ids == cfg.mask_id
        ids = torch.where(is_mask, drawn, ids)
        if counts[t] > 0:
            confidence = torch.where(is_mask, confidence, torch.inf)  # revealed tokens stay
            noise_scale = config.choice_temperature * (1.0 - r)
            if noise_scale > 0:
                confidence = confidence + noise_scale * gumbel_noise(confidence.shape, generator, device)
            remask = confidence.topk(counts[t], dim=-1, largest=False).indices  # (B, counts[t])
            ids = ids.scatter(1, remask, cfg.mask_id)
        if return_history:
            history.append(ids.clone())
    return (ids, history) if return_history else ids


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
        (images (N, 3, H, W) in [0, 1], tokens: (N, K) ids or (N, K, C) latents), on the CPU.
    """
    from mstok.generators.registry import check_tokenizer, family_of  # lazy: the registry imports this module

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
            images.append(tokenizer.decode(drawn, **decode_options).float().cpu())
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
) -> list[str]:
    """Save generated images: a grid PNG (one row of ``per_class`` images per class, at most
    32 rows, named by ``row_labels``, one per class, default ``class <id>``) and/or a folder of
    ``class{c}_{i}.png`` files plus ``samples.npz`` (``arr_0``: uint8 (N, H, W, 3) as the ADM
    evaluator reads it, ``labels``, ``tokens``: the ids (N, K) or latents (N, K, C)). Returns the paths."""
    from PIL import Image

    from mstok.images import make_grid

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
        np.savez(out / "samples.npz", arr_0=nhwc, labels=labels.numpy(), tokens=ids.numpy())
        written.append(f"{out}/ ({len(nhwc)} PNGs + samples.npz)")
    return written
