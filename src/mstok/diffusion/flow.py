"""Rectified flow (Liu et al. 2023; SiT/SD3 style) with velocity prediction.

Convention: time runs from data at ``t = 0`` to noise at ``t = 1`` on straight lines::

    x_t = (1 - t) x0 + t eps,   eps ~ N(0, I)
    v   = d x_t / dt = eps - x0                      (the velocity target)

Training draws ``t`` per example, ``uniform`` on [0, 1) or ``logit_normal``
(``t = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)``, SD3 section 3.1: more weight on the
middle of the path), optionally shifted toward the noise end by ``time_shift`` s
(``t -> s t / (1 + (s - 1) t)``, SD3 section 5.3.2: at s > 1 more of the training sits where
the input says little and the condition must say the rest), and minimises
``mean || v_theta(x_t, 1000 t, y) - (eps - x0) ||^2``;
the model time is ``1000 t``, the scale of DDPM's step index, so one timestep embedding
serves both objectives.

Sampling integrates ``dx/dt = v_theta`` from pure noise at ``t = 1`` to data at ``t = 0`` over
S equal steps ``t_k = 1 - k / S`` (``h = t_{k+1} - t_k = -1/S``):

* Euler: ``x_{k+1} = x_k + h v(x_k, t_k)``;
* Heun (2nd order, two model calls per step, the last one at ``t = 0``)::

      x~ = x_k + h v(x_k, t_k)
      x_{k+1} = x_k + h / 2 (v(x_k, t_k) + v(x~, t_{k+1}))

Both are exact when the velocity field is constant along each straight path (e.g. the field
of a Gaussian-to-point flow, ``v(x, t) = (x - c) / t``), and draw no noise after the start.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mstok.diffusion.guidance import (
    Denoiser,
    Guided,
    check_data,
    check_prediction,
    check_sampler,
    noise_like,
    start_sampling,
)

TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun")
MAX_STEPS = 100_000  # far above any useful step count; a larger one is a typo
TIME_SCALE = 1000.0  # model time = TIME_SCALE * t


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RectifiedFlow:
    """Rectified-flow interpolation, velocity loss and the Euler/Heun samplers (module docstring).

    Args:
        time_sampling: how training draws t: ``uniform`` or ``logit_normal``.
        logit_mean, logit_std: the logit-normal's location and scale (SD3: 0 and 1).
        time_shift: s of the shift toward noise applied to the drawn times (1: none).
    """

    def __init__(
        self, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0, time_shift: float = 1.0
    ) -> None:
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}")
        if not _number(logit_mean) or not abs(logit_mean) < 1e3:
            raise ValueError(f"logit_mean must be a finite number, got {logit_mean!r}")
        if not _number(logit_std) or not 0 < logit_std < 1e3:
            raise ValueError(f"logit_std must be a finite number > 0, got {logit_std!r}")
        if not _number(time_shift) or not 0 < time_shift < 1e3:
            raise ValueError(f"time_shift must be a number in (0, 1000), got {time_shift!r}")
        self.time_sampling = time_sampling
        self.time_shift = float(time_shift)
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def __repr__(self) -> str:
        extra = ""
        if self.time_sampling == "logit_normal":
            extra = f", logit_mean={self.logit_mean:g}, logit_std={self.logit_std:g}"
        if self.time_shift != 1.0:
            extra += f", time_shift={self.time_shift:g}"
        return f"RectifiedFlow(time_sampling={self.time_sampling!r}{extra})"

    @staticmethod
    def model_time(t: torch.Tensor) -> torch.Tensor:
        """The network's time input for flow times ``t`` in [0, 1]: ``1000 t`` as float32."""
        return t.to(torch.float32) * TIME_SCALE

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t) x0 + t noise``: x0, noise (B, ...), t (B,) -> (B, ...)."""
        if noise.shape != x0.shape or t.shape != (x0.shape[0],):
            raise ValueError(
                f"interpolate needs x0 and noise of one shape and t (B,), got {tuple(x0.shape)}, "
                f"{tuple(noise.shape)}, {tuple(t.shape)}"
            )
        t = t.to(x0.dtype).view((-1,) + (1,) * (x0.dim() - 1))  # broadcast over the non-batch dims
        return (1.0 - t) * x0 + t * noise

    @staticmethod
    def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``v = d x_t / dt = noise - x0``."""
        return noise - x0

    def sample_time(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Training times t (B,) float32 in [0, 1), drawn as ``time_sampling`` says, then shifted
        by ``time_shift``."""
        if self.time_sampling == "uniform":
            t = torch.rand((batch,), generator=generator, device=device)
        else:
            n = noise_like((batch,), generator, device, torch.float32)
            t = torch.sigmoid(self.logit_mean + self.logit_std * n)
        if self.time_shift == 1.0:
            return t
        return self.time_shift * t / (1.0 + (self.time_shift - 1.0) * t)

    def loss(
        self, model: Denoiser, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Velocity MSE at a drawn time per example.

        Draws, from ``generator`` (on x0's device; None = the global RNG), first t (B,)
        (:meth:`sample_time`), then the noise like x0 with ``torch.randn``.

        Args:
            model: called as ``model(x_t, 1000 t, y)``, predicts the velocity ``noise - x0``.
            x0: (B, ...) clean data (e.g. (B, K, C) latent tokens).
            y: (B,) class labels (the caller drops some to the null label for guidance).

        Returns:
            The scalar loss and its detached terms ``{"mse", "loss"}``.
        """
        y = check_data(x0, y, generator)
        t = self.sample_time(x0.shape[0], generator, x0.device)  # (B,)
        noise = noise_like(x0.shape, generator, x0.device, x0.dtype)
        pred = check_prediction(model(self.interpolate(x0, noise, t), self.model_time(t), y), x0)
        mse = F.mse_loss(pred.float(), self.velocity_target(x0, noise).float())
        return mse, {"mse": mse.detach(), "loss": mse.detach()}

    @staticmethod
    def times(steps: int) -> torch.Tensor:
        """The S + 1 times ``1 - k / S`` of an S-step integration, from 1 to 0. -> (S + 1,) float64."""
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an int in [1, {MAX_STEPS}], got {steps!r}")
        return 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps

    def _velocity(self, velocity: Guided, x: torch.Tensor, t: float) -> torch.Tensor:
        return velocity(x, self.model_time(torch.full((x.shape[0],), t, device=x.device)))

    def euler_step(self, velocity: Guided, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """``x + (t_next - t) v(x, t)``; ``velocity`` is a guided ``f(x, model time)``."""
        return x + (t_next - t) * self._velocity(velocity, x, t)

    def heun_step(self, velocity: Guided, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        """Heun's step: the Euler guess, then the average of the slopes at both ends."""
        h = t_next - t
        v = self._velocity(velocity, x, t)
        guess = x + h * v
        return x + (h / 2) * (v + self._velocity(velocity, guess, t_next))

    @torch.inference_mode()
    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor | Sequence[int],
        y: torch.Tensor,
        steps: int = 50,
        sampler: str = "euler",
        guidance_scale: float = 1.0,
        null_label: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate from noise (t = 1) to data (t = 0) in ``steps`` equal steps.

        Args:
            model: ``model(x, 1000 t, y)`` predicting the velocity (put it in eval mode first).
            noise: the starting x (B, ...), or its shape (then drawn from ``generator`` on y's device).
            y: (B,) class labels.
            steps: S integration steps (Heun: 2 S model calls).
            sampler: ``euler`` or ``heun``.
            guidance_scale: classifier-free guidance scale s (1 = none; :mod:`mstok.diffusion.guidance`).
            null_label: the "no class" label; needed unless ``guidance_scale == 1``.
            generator: source of the starting noise when only a shape is given.
            progress: show a tqdm bar over the steps.

        Returns:
            (B, ...) samples, in the starting noise's dtype.
        """
        check_sampler(sampler, SAMPLERS)
        ts = self.times(steps).tolist()
        x, guided = start_sampling(model, noise, y, guidance_scale, null_label, generator)
        step = self.euler_step if sampler == "euler" else self.heun_step
        for k in tqdm(range(steps), disable=not progress, desc="sample", unit="step"):
            x = step(guided, x, ts[k], ts[k + 1])
        return x
