"""What every generator family's model and sampler share: class-label checks, the sampler's
set-up, the one batched pass of classifier-free guidance, and Gumbel noise.

Below the models and their samplers (MaskGIT's :mod:`~mstok.generators.maskgit_sampling`,
:mod:`~mstok.generators.dit_sampling`, :mod:`~mstok.generators.bitmar_sampling`), so a model
can check its labels with the samplers' rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


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
