"""Sampling a DiT: from Gaussian noise to K continuous tokens for a tokenizer to decode.

A trained :class:`~mstok.generators.dit.DiT` records in its config the diffusion objective it
learned (``diffusion``: DDPM epsilon prediction or rectified flow) and the per-channel
statistics of the latents it was trained on (``latent_mean``, ``latent_std``). Sampling runs
that objective's sampler on the normalised scale and maps the result back::

    x = sampler(model, noise (B, K, C), labels)      # normalised latents
    latents = latent_mean + latent_std * x           # what tokenizer.decode takes

Samplers: ``ddpm`` (ancestral) and ``ddim`` for a DDPM model, ``euler`` and ``heun`` for a
flow model (:mod:`mstok.diffusion`); ``auto`` picks ``ddpm`` or ``euler``. Classifier-free
guidance has the diffusion convention ``uncond + s (cond - uncond)``: ``s = 1`` is none, and
``s = 1 + w`` for MaskGIT's weight ``w``. All randomness comes from one ``torch.Generator``.

Glossary: B batch, K tokens, C token channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mstok.config_schema import NON_NEGATIVE, PROBABILITY, ConfigDict, Rule, one_of
from mstok.diffusion import DiffusionConfig, create_diffusion
from mstok.generators.common import prepare_sampling
from mstok.generators.dit import DiT, DiTConfig

# sampler -> the objective whose model it integrates
SAMPLER_OBJECTIVE = {"ddpm": "ddpm", "ddim": "ddpm", "euler": "flow", "heun": "flow"}
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "euler"}
# steps = 0 means these: DiT's 250 DDPM steps for its FID numbers, 50 for a flow ODE
DEFAULT_STEPS = {"ddpm": 250, "ddim": 250, "euler": 50, "heun": 50}


@dataclass
class DiTSamplingConfig(ConfigDict):
    """How to sample a DiT (module docstring).

    Attributes:
        sampler: ``auto`` (``ddpm`` for a DDPM model, ``euler`` for a flow model), ``ddpm``,
            ``ddim``, ``euler`` or ``heun``; it must fit the model's objective.
        steps: sampling steps S (0: 250 for ddpm/ddim, at most the model's T; 50 for euler/heun).
        guidance_scale: classifier-free guidance scale s (1 = none, 0 = unconditional).
        eta: DDIM's noise scale in [0, 1] (0 = deterministic, 1 = ancestral; ``ddim`` only).
    """

    sampler: str = "auto"
    steps: int = 0
    guidance_scale: float = 1.0
    eta: float = 0.0

    field_rules: ClassVar[dict[str, Rule]] = {
        "sampler": one_of(("auto", *SAMPLER_OBJECTIVE), "a DiT sampler"),
        "steps": Rule(ge=0, cap=100_000),
        "guidance_scale": NON_NEGATIVE,
        "eta": PROBABILITY,
    }


def diffusion_of(config: DiTConfig) -> DiffusionConfig:
    """The diffusion objective a DiT was trained with (its config's ``diffusion``; default DDPM)."""
    return DiffusionConfig.from_dict(config.diffusion)


def latent_scale(config: DiTConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (C,), std (C,)) float32 of the latents a DiT models; zeros and ones when it has none."""
    c = config.token_dim
    mean = torch.tensor(config.latent_mean or (0.0,) * c, dtype=torch.float32, device=device)
    std = torch.tensor(config.latent_std or (1.0,) * c, dtype=torch.float32, device=device)
    return mean, std


def normalize_latents(config: DiTConfig, latents: torch.Tensor) -> torch.Tensor:
    """Tokenizer latents (..., C) -> the DiT's scale ``(latents - mean) / std``."""
    mean, std = latent_scale(config, latents.device)
    return (latents - mean) / std


def denormalize_latents(config: DiTConfig, x: torch.Tensor) -> torch.Tensor:
    """The DiT's scale (..., C) -> tokenizer latents ``mean + std * x``."""
    mean, std = latent_scale(config, x.device)
    return mean + std * x


def resolve_sampler(config: DiTConfig, settings: DiTSamplingConfig) -> tuple[str, int]:
    """(sampler, steps) for this model: ``auto`` and ``steps = 0`` resolved, the sampler checked
    against the model's objective."""
    diffusion = diffusion_of(config)
    objective = diffusion.objective
    sampler = DEFAULT_SAMPLER[objective] if settings.sampler == "auto" else settings.sampler
    if SAMPLER_OBJECTIVE[sampler] != objective:
        fits = [name for name, kind in SAMPLER_OBJECTIVE.items() if kind == objective]
        raise ValueError(
            f"sampler {sampler!r} integrates a {SAMPLER_OBJECTIVE[sampler]!r} model, but this DiT was trained "
            f"with the {objective!r} objective: use {' or '.join(fits)}"
        )
    if settings.eta and sampler != "ddim":
        raise ValueError(f"eta = {settings.eta} is DDIM's noise scale; sampler {sampler!r} takes none (set eta = 0)")
    default = DEFAULT_STEPS[sampler]
    if objective == "ddpm":  # DDPM visits at most its T steps
        default = min(default, diffusion.num_timesteps)
    return sampler, settings.steps or default


@torch.inference_mode()
def sample_latents(
    model: DiT,
    labels: Any,
    config: DiTSamplingConfig | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate latents for the class ``labels`` with the DiT's own diffusion objective.

    Args:
        model: the DiT (put in eval mode here).
        labels: (B,) class ids in [0, num_classes] (``num_classes``, the null label, gives
            unconditional samples).
        config: sampling settings (default: the objective's sampler, no guidance).
        generator: the source of the starting noise and every sampler draw (on the model's
            device); None uses the global RNG.
        progress: a tqdm bar over the steps.

    Returns:
        (B, K, C) float32 latents on the tokenizer's scale (``latent_mean + latent_std * x``).
    """
    config = config or DiTSamplingConfig()
    cfg = model.config
    sampler, steps = resolve_sampler(cfg, config)
    _, labels = prepare_sampling(model, labels)
    process = create_diffusion(diffusion_of(cfg))
    extra = {"eta": config.eta} if sampler == "ddim" else {}
    x = process.sample(
        model,
        (labels.shape[0], cfg.num_tokens, cfg.token_dim),
        labels,
        steps=steps,
        sampler=sampler,
        guidance_scale=config.guidance_scale,
        null_label=cfg.null_class,
        generator=generator,
        progress=progress,
        **extra,
    )
    return denormalize_latents(cfg, x.float())
