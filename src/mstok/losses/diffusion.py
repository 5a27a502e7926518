"""The diffusion objective of DiT generators on continuous tokens.

Each training example is a tokenizer's latents (K, C), normalised per channel by the DiT's
latent statistics (``x0 = (latents - mean) / std``). From the sample's own seed it draws a
diffusion time and Gaussian noise, and its label becomes the null label with probability
``class_dropout``:

* DDPM (epsilon prediction): step ``i ~ U{0 .. T-1}``,
  ``x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps``, model time ``i``, target ``eps``;
* rectified flow: ``t`` (uniform or logit-normal), ``x_t = (1 - t) x0 + t eps``, model time
  ``1000 t``, target the velocity ``eps - x0``.

The draws are exactly those of the objective's own batched ``loss`` for a batch of one with
a ``torch.Generator`` seeded the same way (:mod:`mstok.diffusion`), made per sample by
:class:`DiffusionInputs` so a run's corruption is the same on any number of ranks or loader
workers and after a resume. :class:`DiffusionObjective` is the mean squared error between
prediction and target over every number of the global batch, in the generator trainer's
interface (:class:`~mstok.training.generator_trainer.GeneratorObjective`).

Glossary: B batch, K tokens, C token channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from mstok.diffusion import DiffusionConfig, GaussianDiffusion, RectifiedFlow, create_diffusion
from mstok.diffusion.guidance import noise_like
from mstok.losses.seeded import SeededInputs, seed_stream

Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (model input, model time (B,), target)


def _ddpm_example(process: GaussianDiffusion, x0: torch.Tensor, generator: torch.Generator) -> Example:
    """The draws of :meth:`GaussianDiffusion.loss`, in its order: steps, then eps."""
    i = torch.randint(0, process.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    eps = noise_like(x0.shape, generator, x0.device, x0.dtype)
    return process.q_sample(x0, i, eps), process.model_time(i), eps


def _flow_example(process: RectifiedFlow, x0: torch.Tensor, generator: torch.Generator) -> Example:
    """The draws of :meth:`RectifiedFlow.loss`, in its order: times, then noise."""
    t = process.sample_time(x0.shape[0], generator, x0.device)
    noise = noise_like(x0.shape, generator, x0.device, x0.dtype)
    return process.interpolate(x0, noise, t), process.model_time(t), process.velocity_target(x0, noise)


# objective name (DiffusionConfig.objective) -> (process, x0 (B, K, C), generator) -> example
EXAMPLES: dict[str, Callable[[Any, torch.Tensor, torch.Generator], Example]] = {
    "ddpm": _ddpm_example,
    "flow": _flow_example,
}


def sample_generator(seed: int) -> torch.Generator:
    """The CPU generator of one training sample's diffusion draws, from the sample's seed (a
    stream apart from the dataset's own draws, which use ``default_rng(seed)``)."""
    return torch.Generator().manual_seed(int(seed_stream(seed, 0x64696666).integers(2**63)))


class DiffusionInputs(SeededInputs):
    """Wraps a continuous token dataset (``ds[(index, seed)] -> (latents (K, C), label)``) into
    training inputs: ``ds[(index, seed)] -> (stacked (3, K, C), label)`` with ``stacked`` =
    [model input, target, model time (a constant plane)], the label replaced by ``null_class``
    with probability ``class_dropout`` (module docstring). All randomness comes from ``seed``
    (:mod:`mstok.losses.seeded`).

    Args:
        dataset: the latents, e.g. a continuous :class:`~mstok.data.tokens.TokenDataset`.
        diffusion: the objective.
        mean, std: (C,) the per-channel statistics the latents are normalised by.
        class_dropout, null_class: label dropout for classifier-free guidance.
    """

    def __init__(
        self,
        dataset: Dataset,
        diffusion: DiffusionConfig,
        mean: torch.Tensor,
        std: torch.Tensor,
        class_dropout: float,
        null_class: int,
    ) -> None:
        super().__init__(dataset, class_dropout, null_class)
        self.process, self.example = create_diffusion(diffusion), EXAMPLES[diffusion.objective]
        self.mean, self.std = mean.float(), std.float()

    def corrupt(self, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, bool]:
        """(stacked (3, K, C), whether the label is dropped) for the sample of ``seed``."""
        x0 = ((tokens.float() - self.mean) / self.std)[None]  # (1, K, C)
        x, time, target = self.example(self.process, x0, sample_generator(seed))
        dropped = self.drops_label(seed_stream(seed, 0x6C61626C))
        return torch.stack([x[0], target[0], torch.full_like(x[0], float(time[0]))]), dropped


class DiffusionObjective:
    """The DiT's training objective in the generator trainer's interface: :class:`DiffusionInputs`
    and the squared error summed over a micro-batch, normalised by the global batch's count of
    latent numbers (so accumulation and data parallelism give the gradient of one big batch).

    A batch is ``(model input (B, K, C), model time (B,), target (B, K, C), labels (B,))``.

    Args:
        diffusion: the objective (DDPM or rectified flow).
        mean, std: (C,) the latent statistics the DiT models normalised latents with.
        class_dropout, null_class: label dropout for classifier-free guidance (the DiT's own
            ``class_dropout`` and null label).
    """

    postfix_keys = ("loss",)

    def __init__(
        self, diffusion: DiffusionConfig, mean: torch.Tensor, std: torch.Tensor, class_dropout: float, null_class: int
    ) -> None:
        self.diffusion, self.mean, self.std = diffusion, mean, std
        self.class_dropout, self.null_class = class_dropout, null_class

    def inputs(self, tokens: Dataset) -> DiffusionInputs:
        """Per-sample training items from continuous tokens (all randomness from each sample's seed)."""
        return DiffusionInputs(tokens, self.diffusion, self.mean, self.std, self.class_dropout, self.null_class)

    def prepare(self, stacked: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """A collated micro-batch ((B, 3, K, C), (B,)) on ``device`` as (input, time, target, labels)."""
        x, target, time = stacked.to(device, non_blocking=True).unbind(1)  # 3 x (B, K, C)
        return x, time[:, 0, 0], target, labels.to(device, non_blocking=True)

    def totals(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(1,) float: the number of latent numbers in the batch."""
        target = batch[2]
        return torch.full((1,), float(target.numel()), device=target.device)

    def forward(self, model: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The (B, K, C) prediction; the labels were dropped per sample already, so the model
        must not drop more at random."""
        x, time, _, labels = batch
        return model(x, time, labels, drop_mask=torch.zeros_like(labels, dtype=torch.bool))

    def loss(
        self, prediction: torch.Tensor, batch: tuple[torch.Tensor, ...], share: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's part of the global mean squared error (``share``: this rank's share,
        global total / world size, of :meth:`totals`), in float32."""
        loss = (prediction.float() - batch[2]).square().sum() / share[0]
        return loss, {"loss": loss.detach()}
