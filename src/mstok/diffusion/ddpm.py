"""Gaussian diffusion (DDPM, Ho et al. 2020) with epsilon prediction: the DiT testbed objective.

Forward process, with a linear schedule ``beta_i`` from ``beta_start`` to ``beta_end`` over
the T steps ``i = 0 .. T-1`` (DDPM/DiT: 1e-4 to 0.02, T = 1000)::

    alpha_i = 1 - beta_i,   abar_i = prod_{j <= i} alpha_j
    x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps,   eps ~ N(0, I)

Training draws ``i ~ U{0 .. T-1}`` and ``eps`` per example and minimises
``mean || eps_theta(x_i, i, y) - eps ||^2``; the model time is ``i`` itself, as a float.

Sampling walks down S of the T steps, ``tau_1 < ... < tau_S`` (:meth:`GaussianDiffusion.timesteps`:
S evenly spaced steps from 0 to T-1, so S = T is every step, "respacing" otherwise). From
``t = tau_k`` to ``p = tau_{k-1}`` (``p = -1`` past the first, with ``abar_{-1} = 1``, i.e. clean
data), with ``x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)``:

* ancestral DDPM, on the respaced chain ``beta'_t = 1 - abar_t / abar_p``::

      x_p = sqrt(abar_p) beta'_t / (1 - abar_t) x0_hat + sqrt(1 - beta'_t) (1 - abar_p) / (1 - abar_t) x_t
            + sqrt(beta~_t) z,      beta~_t = (1 - abar_p) / (1 - abar_t) beta'_t    (posterior variance)

* DDIM (Song et al. 2021)::

      sigma_t = eta sqrt((1 - abar_p) / (1 - abar_t) (1 - abar_t / abar_p))
      x_p = sqrt(abar_p) x0_hat + sqrt(1 - abar_p - sigma_t^2) eps_theta + sigma_t z

  ``eta = 0`` is deterministic (no noise is drawn); ``eta = 1`` is the ancestral step above.

The last step (to ``p = -1``) has zero variance in both, so it returns the mean. Schedules are
kept in float64 and step coefficients are Python floats: ``1 - abar`` near ``i = 0`` is ~1e-4,
where float32 cumulative products lose digits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mstok.diffusion.guidance import (
    Denoiser,
    check_data,
    check_prediction,
    check_sampler,
    noise_like,
    start_sampling,
)

SAMPLERS = ("ddpm", "ddim")
MAX_TIMESTEPS = 100_000  # far above any published schedule; a larger T is a typo


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class GaussianDiffusion:
    """DDPM forward process, epsilon-prediction loss and the DDPM/DDIM samplers (module docstring).

    Args:
        num_timesteps: T, the number of diffusion steps.
        beta_start, beta_end: the linear beta schedule's ends, ``0 < beta_start <= beta_end < 1``.
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if not _is_int(num_timesteps) or not 1 <= num_timesteps <= MAX_TIMESTEPS:
            raise ValueError(f"num_timesteps must be an int in [1, {MAX_TIMESTEPS}], got {num_timesteps!r}")
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        if beta_start > beta_end:
            raise ValueError(f"beta_start {beta_start} must not exceed beta_end {beta_end} (betas grow with t)")
        self.num_timesteps = num_timesteps
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)  # (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,) abar_i
        self._coefficients: dict[torch.device, torch.Tensor] = {}  # per device: sqrt(abar), sqrt(1 - abar)

    def __repr__(self) -> str:
        return f"GaussianDiffusion(num_timesteps={self.num_timesteps}, beta={self.beta_start:g}..{self.beta_end:g})"

    def model_time(self, i: torch.Tensor) -> torch.Tensor:
        """The network's time input for step indices ``i``: the index itself, as float32."""
        return i.to(torch.float32)

    def _abar(self, i: int) -> float:
        """abar_i as a float; ``i = -1`` is clean data (abar = 1)."""
        return 1.0 if i < 0 else float(self.alphas_cumprod[i])

    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) noise``: x0, noise (B, ...), i (B,) int -> (B, ...)."""
        b = x0.shape[0]
        if i.dtype.is_floating_point or i.shape != (b,):
            raise ValueError(f"step indices must be an int tensor of shape ({b},), got {i.dtype} {tuple(i.shape)}")
        if i.numel() and (int(i.min()) < 0 or int(i.max()) >= self.num_timesteps):
            raise ValueError(f"step indices must lie in [0, {self.num_timesteps}), got {i.min()}..{i.max()}")
        if noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have x0's shape {tuple(x0.shape)}")
        return self._q_sample(x0, i.to(x0.device), noise)

    def _q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """:meth:`q_sample` without the checks, whose range test would wait for the device."""
        if x0.device not in self._coefficients:
            # computed in float64 (the table), stored in float32: MPS has no float64
            table = torch.stack([self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt()])
            self._coefficients[x0.device] = table.float().to(x0.device)  # (2, T)
        signal, spread = self._coefficients[x0.device][:, i].to(x0.dtype)  # (B,) each
        view = (-1,) + (1,) * (x0.dim() - 1)  # broadcast over the non-batch dims
        return signal.view(view) * x0 + spread.view(view) * noise

    def loss(
        self, model: Denoiser, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Epsilon-prediction MSE at a uniformly drawn step per example.

        Draws, from ``generator`` (on x0's device; None = the global RNG), first the steps
        ``i`` (B,) with ``torch.randint``, then ``eps`` like x0 with ``torch.randn``.

        Args:
            model: called as ``model(x_i, i as float, y)``, predicts eps.
            x0: (B, ...) clean data (e.g. (B, K, C) latent tokens).
            y: (B,) class labels (the caller drops some to the null label for guidance).

        Returns:
            The scalar loss and its detached terms ``{"mse", "loss"}``.
        """
        y = check_data(x0, y, generator)
        i = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        eps = noise_like(x0.shape, generator, x0.device, x0.dtype)
        pred = check_prediction(model(self._q_sample(x0, i, eps), self.model_time(i), y), x0)
        mse = F.mse_loss(pred.float(), eps.float())  # fp32: bf16 rounds away the small late-training errors
        return mse, {"mse": mse.detach(), "loss": mse.detach()}

    def timesteps(self, steps: int | None = None) -> torch.Tensor:
        """The S sampling steps, increasing: ``floor(k (T - 1) / (S - 1) + 1/2)`` for k < S, so
        both 0 and T-1 are visited (one step: T-1 only); None = all T steps. -> (S,) int64."""
        t = self.num_timesteps
        steps = t if steps is None else steps
        if not _is_int(steps) or not 1 <= steps <= t:
            raise ValueError(f"steps must be an int in [1, {t}] (the number of diffusion steps), got {steps!r}")
        if steps == 1:
            return torch.tensor([t - 1])
        # floor(x + 1/2), not round(): round-half-to-even could map two neighbours to one step
        return torch.floor(torch.arange(steps, dtype=torch.float64) * (t - 1) / (steps - 1) + 0.5).long()

    def _check_pair(self, t: int, prev: int) -> None:
        if not (_is_int(t) and _is_int(prev) and -1 <= prev < t < self.num_timesteps):
            raise ValueError(f"a step goes from t to prev with -1 <= prev < t < {self.num_timesteps}, got {t}, {prev}")

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        abar = self._abar(t)
        return (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)

    def ddpm_step(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        t: int,
        prev: int,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One ancestral step from step ``t`` to ``prev`` (-1 = clean) given the predicted ``eps``.

        ``noise`` is z (drawn from ``generator`` when None and the step has variance)."""
        self._check_pair(t, prev)
        abar, abar_prev = self._abar(t), self._abar(prev)
        beta = 1.0 - abar / abar_prev  # the respaced chain's beta
        x0 = self.predict_x0(x, eps, t)
        mean = (math.sqrt(abar_prev) * beta / (1.0 - abar)) * x0 + (
            math.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
        ) * x
        variance = (1.0 - abar_prev) / (1.0 - abar) * beta
        if variance <= 0:
            return mean
        noise = noise_like(x.shape, generator, x.device, x.dtype) if noise is None else noise
        return mean + math.sqrt(variance) * noise

    def ddim_step(
        self,
        x: torch.Tensor,
        eps: torch.Tensor,
        t: int,
        prev: int,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM step from ``t`` to ``prev`` (-1 = clean); eta = 0 draws no noise."""
        self._check_pair(t, prev)
        abar, abar_prev = self._abar(t), self._abar(prev)
        sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        x0 = self.predict_x0(x, eps, t)
        # max(0): with eta = 1 the difference is 0 up to rounding
        out = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1.0 - abar_prev - sigma**2)) * eps
        if sigma <= 0:
            return out
        noise = noise_like(x.shape, generator, x.device, x.dtype) if noise is None else noise
        return out + sigma * noise

    @torch.inference_mode()
    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor | Sequence[int],
        y: torch.Tensor,
        steps: int | None = None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        null_label: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Denoise from pure noise at step T-1 to data in ``steps`` steps.

        Args:
            model: ``model(x, t, y)`` predicting eps (put it in eval mode first).
            noise: the starting x (B, ...), or its shape (then drawn from ``generator`` on y's device).
            y: (B,) class labels.
            steps: S sampling steps in [1, T] (:meth:`timesteps`); None = all T.
            sampler: ``ddpm`` (ancestral, posterior variance) or ``ddim``.
            eta: DDIM's noise scale (0 = deterministic, 1 = ancestral); ``ddim`` only.
            guidance_scale: classifier-free guidance scale s (1 = none; :mod:`mstok.diffusion.guidance`).
            null_label: the "no class" label; needed unless ``guidance_scale == 1``.
            generator: source of the starting and per-step noise (one ``randn`` like x per noisy step).
            progress: show a tqdm bar over the steps.

        Returns:
            (B, ...) samples, in the starting noise's dtype.
        """
        check_sampler(sampler, SAMPLERS)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        if sampler == "ddpm" and eta != 0:
            raise ValueError("eta is a DDIM setting; the ddpm sampler always uses the posterior variance")
        taus = self.timesteps(steps).tolist()
        x, guided = start_sampling(model, noise, y, guidance_scale, null_label, generator)
        for k in tqdm(range(len(taus) - 1, -1, -1), disable=not progress, desc="sample", unit="step"):
            t, prev = taus[k], taus[k - 1] if k > 0 else -1
            eps = guided(x, self.model_time(torch.full((x.shape[0],), t, device=x.device)))
            if sampler == "ddpm":
                x = self.ddpm_step(x, eps, t, prev, generator=generator)
            else:
                x = self.ddim_step(x, eps, t, prev, eta=eta, generator=generator)
        return x
