"""AdamW parameter groups, the warmup + cosine learning-rate schedule and the weight EMA."""

from __future__ import annotations

import copy
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
    params = decay + no_decay
    # the fused kernel is several times faster than the default per-tensor loop on CPU
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)


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


# What a config sets in each optimizer parameter group (the rest of a group is its state).
GROUP_SETTINGS = ("initial_lr", "betas", "eps", "weight_decay")


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optimizer_state: dict,
    scheduler_state: dict,
    keep_settings: bool = False,
) -> None:
    """Restore an optimizer and its schedule from a checkpoint.

    With ``keep_settings`` (a resume whose config changed on purpose) the moments and the step
    come from the checkpoint, but the lr, betas, eps, weight decay and schedule stay those this
    optimizer and scheduler were built with, applied at the restored step.
    """
    fresh = [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if not keep_settings:
        return
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        group.update(settings)
    scheduler.base_lrs = [s["initial_lr"] for s in fresh]
    step = scheduler.last_epoch
    for group, base, rule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * rule(step)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # get_last_lr()'s source


def ema_decay_at(decay: float, num_updates: int, warmup: bool = True) -> float:
    """Effective EMA decay at update ``num_updates`` (0-based).

    With warmup it is ``min(decay, (1 + n) / (10 + n))``, so the average forgets the random
    initialisation quickly in short runs; without it, a 0.999 EMA of a 500-step run would
    still be about 60% initial weights.
    """
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


class ModelEMA:
    """An exponential moving average of a model's parameters; buffers are copied.

    The update count lives on the host, so updating never waits for the device (unlike
    ``torch.optim.swa_utils.AveragedModel``, whose count is a tensor).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = ema_decay_at(self.decay, self.num_updates, self.warmup)
        ema_params = list(self.module.parameters())
        params = [p.detach().to(e.dtype) for e, p in zip(ema_params, model.parameters(), strict=True)]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
        self.num_updates += 1
