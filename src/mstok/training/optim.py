"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Parameters exempt from weight decay: biases, norm weights, embeddings, learned tokens.

    Decay pulls a parameter towards zero. That regularises weight matrices, but for a
    LayerNorm gain, a codebook or a positional embedding, zero is not a sensible prior.
    Only the weight matrices of ``nn.Linear`` and ``nn.Conv2d`` are decayed.
    """
    names = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            decayed = isinstance(module, (nn.Linear, nn.Conv2d)) and param_name == "weight" and param.dim() >= 2
            if not decayed:
                names.add(full)
    return names


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model``, with two groups (decay / no decay)."""
    exempt = no_decay_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, end_lr: float) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``lr``, then cosine to ``end_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return end_lr + 0.5 * (lr - end_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, lr: float, end_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine` (the optimizer's base lr must be ``lr``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, lr, end_lr) / lr
    )


def ema_update_fn(decay: float, warmup: bool = True):
    """An ``AveragedModel`` multi-average function for an EMA with optional warmup.

    With warmup the effective decay at update n is ``min(decay, (1 + n) / (10 + n))``, so
    the average forgets the random initialisation quickly in short runs; without it, a
    0.999 EMA of a 500-step run would still be about 60% initial weights.
    """

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        torch._foreach_lerp_(ema_params, [p.to(e.dtype) for e, p in zip(ema_params, params, strict=True)], 1.0 - d)

    return update
