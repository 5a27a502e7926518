"""Diffusion objectives for continuous generators (DiT over latent tokens, SemTok's decoder).

Two processes, each owning its loss, its samplers and the mapping of its time to the
network's "model time" (both in [0, 1000], so one timestep embedding serves either):

* :class:`GaussianDiffusion`: DDPM with epsilon prediction and a linear beta schedule;
  ancestral (``ddpm``) and ``ddim`` samplers over any S of the T steps. Model time = step index.
* :class:`RectifiedFlow`: ``x_t = (1 - t) x0 + t eps`` with velocity ``eps - x0``; ``euler``
  and ``heun`` samplers from t = 1 (noise) to t = 0 (data). Model time = ``1000 t``.

Any callable ``model(x (B, ...), t (B,) float, y (B,) int64) -> prediction shaped like x``
works; nothing here knows the architecture. Classifier-free guidance
(:func:`classifier_free_guidance`, ``uncond + s (cond - uncond)`` in one batched call) is
shared by every sampler through ``guidance_scale`` and ``null_label``.

Example::

    flow = RectifiedFlow()
    loss, terms = flow.loss(model, tokens, labels)                  # tokens (B, K, C)
    samples = flow.sample(model, (B, K, C), labels, steps=50, sampler="heun",
                          guidance_scale=4.0, null_label=num_classes)
"""

from mstok.diffusion.config import OBJECTIVES, DiffusionConfig, create_diffusion
from mstok.diffusion.ddpm import GaussianDiffusion
from mstok.diffusion.flow import RectifiedFlow
from mstok.diffusion.guidance import Denoiser, Guided, classifier_free_guidance

__all__ = [
    "OBJECTIVES",
    "Denoiser",
    "DiffusionConfig",
    "GaussianDiffusion",
    "Guided",
    "RectifiedFlow",
    "classifier_free_guidance",
    "create_diffusion",
]
