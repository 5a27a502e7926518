"""Classifier-free guidance and the input checks shared by the diffusion objectives.

Every objective calls its network as ``model(x, t, y)``: ``x`` (B, ...) the noisy input,
``t`` (B,) float32 in the objective's "model time" (DDPM: the step index, flow: ``1000 t``),
``y`` (B,) int64 class labels, one of which, ``null_label``, means "no class". Samplers only
see a guided function ``f(x, t)`` built here:

    f(x, t) = uncond + s * (cond - uncond),   cond = model(x, t, y), uncond = model(x, t, null)

with both predictions from ONE batched call on ``[x; x]`` (2B rows), so a network sees the
same batch statistics as an unguided one and the GPU runs one large call, not two small ones.
``s = 1`` is plain conditional sampling and ``s = 0`` plain unconditional sampling; both skip
the second half of the batch. ``s`` relates to the MaskGIT sampler's weight ``w``
(:mod:`mstok.generators.maskgit_sampling`, ``cond + w (cond - uncond)``) by ``s = 1 + w``.

Every sampler starts the same way (:func:`start_sampling`): the starting noise, drawn or
given, and the guided function of the checked labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

# model(x (B, ...), t (B,) float, y (B,) long) -> prediction shaped like x
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# the guided model a sampler integrates: f(x (B, ...), t (B,) float) -> prediction shaped like x
Guided = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_labels(y: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """``y`` as int64 if it is a (B,) integer tensor (with ``B == batch`` when given), else a clear error."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"class labels y must be a torch.Tensor of shape (B,), got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"class labels y must be an integer tensor, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"class labels y must have shape (B,), got {tuple(y.shape)}")
    if batch is not None and y.shape[0] != batch:
        raise ValueError(f"batch mismatch: x has {batch} rows but y has {y.shape[0]} labels")
    return y.long()


def check_prediction(out: object, x: torch.Tensor) -> torch.Tensor:
    """The model's output if it is a tensor shaped like its input ``x``, else a clear error."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return a prediction shaped like x {tuple(x.shape)}, got {got}")
    return out


def check_guidance(scale: float, null_label: int | None) -> float:
    """``scale`` as a float if it is a finite number >= 0 with a ``null_label`` when it needs one."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {scale!r}")
    if scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance, 0 = unconditional), got {scale}")
    if scale != 1 and (isinstance(null_label, bool) or not isinstance(null_label, int)):
        raise ValueError(
            f"guidance_scale {scale} needs null_label, the int label meaning 'no class', got {null_label!r}"
        )
    return float(scale)


def classifier_free_guidance(
    model: Denoiser, y: torch.Tensor, scale: float = 1.0, null_label: int | None = None
) -> Guided:
    """``model`` with the labels ``y`` fixed and guidance of scale ``scale`` (module docstring).

    Args:
        model: the network, called as ``model(x, t, y)``.
        y: (B,) class labels.
        scale: s >= 0; 1 = conditional only, 0 = unconditional only (one model call each).
        null_label: the label meaning "no class"; needed unless ``scale == 1``.

    Returns:
        ``f(x, t)``: x (B, ...), t (B,) -> the guided prediction (B, ...), in x's dtype.
    """
    scale = check_guidance(scale, null_label)
    y = check_labels(y)

    def call(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # in x's dtype: a bf16 autocast output would otherwise demote the sampler's state
        return check_prediction(model(x, t, labels), x).to(x.dtype)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"batch mismatch: x has {x.shape[0]} rows but y has {y.shape[0]} labels")
        labels = y.to(x.device)
        if scale == 1:
            return call(x, t, labels)
        null = torch.full_like(labels, null_label)
        if scale == 0:
            return call(x, t, null)
        both = call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, ...)
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return guided


def noise_like(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise of ``shape``; a ``generator`` must live on ``device``."""
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the tensors are on {device}: create it there")
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def check_start(
    noise: torch.Tensor | Sequence[int], y: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's starting noise (given, or drawn of shape ``noise`` on y's device) and checked labels.

    Returns (x (B, ...) float, y (B,) int64)."""
    if isinstance(noise, torch.Tensor):
        if not noise.dtype.is_floating_point:
            raise TypeError(f"the starting noise must be a float tensor, got dtype {noise.dtype}")
        if noise.dim() < 1:
            raise ValueError("the starting noise must have shape (B, ...), got a 0-d tensor")
        x = noise
    else:
        shape = tuple(noise) if isinstance(noise, (tuple, list, torch.Size)) else ()
        if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise ValueError(f"the sample shape must be positive ints (B, ...), got {noise!r}")
        device = y.device if isinstance(y, torch.Tensor) else torch.device("cpu")
        x = noise_like(shape, generator, device, torch.float32)
    return x, check_labels(y, x.shape[0]).to(x.device)


def check_sampler(sampler: str, samplers: Sequence[str]) -> str:
    """``sampler`` if it is one of an objective's ``samplers``, else a ValueError listing them."""
    if sampler not in samplers:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers)}")
    return sampler


def start_sampling(
    model: Denoiser,
    noise: torch.Tensor | Sequence[int],
    y: torch.Tensor,
    guidance_scale: float,
    null_label: int | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, Guided]:
    """Every objective's sampler set-up: the starting x (B, ...) (:func:`check_start`) and the
    guided model ``f(x, t)`` it integrates (:func:`classifier_free_guidance`)."""
    x, y = check_start(noise, y, generator)
    return x, classifier_free_guidance(model, y, guidance_scale, null_label)


def check_data(x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Check a training batch: x0 (B, ...) float, y (B,) labels, a generator on x0's device.

    Returns y as int64 on x0's device."""
    if not isinstance(x0, torch.Tensor) or not x0.dtype.is_floating_point or x0.dim() < 1:
        got = f"{x0.dtype} {tuple(x0.shape)}" if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a float tensor of shape (B, ...), got {got}")
    if generator is not None and generator.device.type != x0.device.type:
        raise ValueError(f"the generator is on {generator.device} but x0 is on {x0.device}: create it there")
    return check_labels(y, x0.shape[0]).to(x0.device)
