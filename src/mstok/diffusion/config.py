"""The diffusion objective as a config: which process a generator trains and samples with.

A generator's training config can nest a :class:`DiffusionConfig`, so a run records whether
it trained DDPM (with which schedule) or rectified flow (with which time distribution), and
:func:`create_diffusion` rebuilds the same object for sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mstok.config_schema import STRICTLY_POSITIVE, ConfigDict, Rule, one_of, positive
from mstok.diffusion.ddpm import MAX_TIMESTEPS, GaussianDiffusion
from mstok.diffusion.flow import TIME_SAMPLINGS, RectifiedFlow

OBJECTIVES = ("ddpm", "flow")


@dataclass
class DiffusionConfig(ConfigDict):
    """Settings of the diffusion objective.

    Attributes:
        objective: ``ddpm`` (epsilon prediction, :mod:`mstok.diffusion.ddpm`) or ``flow``
            (rectified flow, velocity prediction, :mod:`mstok.diffusion.flow`).
        num_timesteps, beta_start, beta_end: DDPM's T and linear beta schedule (DiT: 1000, 1e-4, 0.02).
        time_sampling, logit_mean, logit_std: the flow's training-time distribution
            (``uniform`` or ``logit_normal``).
    """

    objective: str = "ddpm"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    field_rules: ClassVar[dict[str, Rule]] = {
        "objective": one_of(OBJECTIVES, "a diffusion objective"),
        "num_timesteps": positive(MAX_TIMESTEPS),
        "beta_start": Rule(gt=0, lt=1),
        "beta_end": Rule(gt=0, lt=1),
        "time_sampling": one_of(TIME_SAMPLINGS, "a time sampling"),
        "logit_mean": Rule(gt=-1e3, lt=1e3),
        "logit_std": STRICTLY_POSITIVE,
    }

    def __post_init__(self) -> None:
        super().__post_init__()  # the schema (field_rules); the cross-field check follows
        if self.beta_start > self.beta_end:
            raise ValueError(f"beta_start {self.beta_start} must not exceed beta_end {self.beta_end}")


def create_diffusion(config: DiffusionConfig | None = None) -> GaussianDiffusion | RectifiedFlow:
    """The objective ``config`` describes (default: DiT's DDPM)."""
    config = config or DiffusionConfig()
    if config.objective == "flow":
        return RectifiedFlow(config.time_sampling, config.logit_mean, config.logit_std)
    return GaussianDiffusion(config.num_timesteps, config.beta_start, config.beta_end)
