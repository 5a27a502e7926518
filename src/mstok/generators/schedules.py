"""Masking and guidance schedules of MaskGIT, shared by training and sampling.

A masking schedule ``gamma`` maps progress ``r`` in [0, 1] to the fraction of tokens that
are masked: ``gamma(0) = 1`` (everything masked) and ``gamma(1) = 0`` (nothing masked), and
it decreases in between. Training draws ``r ~ U(0, 1)`` per example and masks
``round(gamma(r) * K)`` tokens; sampling with S steps keeps ``floor(gamma((t + 1) / S) * K)``
tokens masked after step t (TiTok Table 3b compares the four schedules below).

A guidance schedule gives the classifier-free guidance weight ``w_t`` of step t of S, used as
``logits = cond + w_t * (cond - uncond)`` (see :mod:`mstok.generators.maskgit_sampling`):

* ``constant``: ``w_t = w``.
* ``linear``: ``w_t = w * t / S``, from no guidance at the first step (as in MUSE).
* ``power_cosine``: ``w_t = w * (1 - cos(pi * (t / S) ** p)) / 2`` (MDT); the official TiTok
  code writes this one as ``uncond + g_t (cond - uncond)``, i.e. its scale ``g`` is ``w + 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Schedule = Callable[[torch.Tensor], torch.Tensor]


def _cosine(r: torch.Tensor) -> torch.Tensor:
    return torch.cos(r * (math.pi / 2))


def _arccos(r: torch.Tensor) -> torch.Tensor:
    return torch.arccos(r) / (math.pi / 2)


def _linear(r: torch.Tensor) -> torch.Tensor:
    return 1.0 - r


def _sqrt(r: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.sqrt(r)


MASK_SCHEDULES: dict[str, Schedule] = {"cosine": _cosine, "arccos": _arccos, "linear": _linear, "sqrt": _sqrt}
GUIDANCE_SCHEDULES = ("constant", "linear", "power_cosine")


def check_schedule(name: str) -> str:
    """Return ``name`` if it is a masking schedule, else raise a ValueError listing them."""
    if name not in MASK_SCHEDULES:
        raise ValueError(f"unknown masking schedule {name!r}; choose one of {', '.join(MASK_SCHEDULES)}")
    return name


def mask_ratio(r: torch.Tensor | float, schedule: str) -> torch.Tensor:
    """Fraction of masked tokens at progress ``r`` in [0, 1] (float64 for python floats)."""
    r = torch.as_tensor(r, dtype=torch.float64) if not isinstance(r, torch.Tensor) else r
    return MASK_SCHEDULES[check_schedule(schedule)](r.clamp(0.0, 1.0))


def masked_counts(num_tokens: int, steps: int, schedule: str) -> list[int]:
    """How many of ``num_tokens`` stay masked after each of ``steps`` sampling steps.

    Step t (0-based) keeps ``floor(K * gamma((t + 1) / S))`` masked, but always reveals at
    least one token and keeps at least one masked until the last step, which reveals all.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    counts, masked = [], num_tokens
    for t in range(steps):
        if t == steps - 1:
            masked = 0
        else:
            target = math.floor(num_tokens * float(mask_ratio((t + 1) / steps, schedule)))
            masked = max(1, min(masked - 1, target))
        counts.append(masked)
    return counts


def guidance_weight(scale: float, step: int, steps: int, schedule: str = "constant", power: float = 3.0) -> float:
    """The guidance weight ``w_t`` of step ``step`` (0-based) of ``steps`` (module docstring)."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return scale * step / steps
    if schedule == "power_cosine":
        return scale * (1.0 - math.cos(math.pi * (step / steps) ** power)) / 2.0
    raise ValueError(f"unknown guidance schedule {schedule!r}; choose one of {', '.join(GUIDANCE_SCHEDULES)}")
