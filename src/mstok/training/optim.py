"""AdamW parameter groups, the warmup + cosine learning-rate schedule and the weight EMA."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from mstok.layers.adaln import AdaLNZeroBlock
from mstok.layers.blocks import CrossAttentionBlock, SelfAttentionBlock
from mstok.layers.joint import JointBlock


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


def muon_parameter_names(model: nn.Module) -> set[str]:
    """The hidden matrices Muon updates: the weights of every ``nn.Linear`` inside a transformer
    block (attention qkv / kv / q / out, MLP).

    Muon orthogonalises a matrix's update, which suits maps from a hidden space to a hidden
    space; the maps in from pixels or codes and out to pixels or logits, the embeddings, norms,
    biases and codebooks stay with AdamW (as in Muon's reference recipe).
    """
    blocks = (SelfAttentionBlock, CrossAttentionBlock, JointBlock, AdaLNZeroBlock)
    names = set()
    for block_name, block in model.named_modules():
        if not isinstance(block, blocks):
            continue
        for module_name, module in block.named_modules():
            if isinstance(module, nn.Linear) and module.weight.dim() == 2:
                names.add(".".join(n for n in (block_name, module_name, "weight") if n))
    return names


def _fused_ok(params: list[torch.Tensor]) -> bool:
    # the fused kernel is several times faster than the default per-tensor loop on CPU
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with its Newton-Schulz iteration in the gradients' own dtype.

    Written here because torch's step runs the iteration in bfloat16, which on a CPU without
    native bf16 is emulated: a titok_tiny step took 2.2 s against 0.44 s with AdamW. The update
    is torch's (momentum, Nesterov, decoupled weight decay, ``adjust_lr_fn``) and its state
    dict is torch's; matrices of one shape are orthogonalised as one batch.
    """

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("Muon.step does not take a closure")
        for group in self.param_groups:
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for (shape, _, _), params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = [
                    self.state[p].setdefault(
                        "momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format)
                    )
                    for p in params
                ]
                momentum = group["momentum"]
                torch._foreach_lerp_(bufs, grads, 1 - momentum)
                if group["nesterov"]:
                    update = torch.stack(grads).lerp_(torch.stack(bufs), momentum)  # (N, A, B)
                else:
                    update = torch.stack(bufs)
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                lr = group["lr"]
                adjusted = _adjust_lr(lr, group["adjust_lr_fn"], torch.Size(shape))
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                torch._foreach_add_(params, list(update.unbind(0)), alpha=-adjusted)


def newton_schulz(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Approximately orthogonalise a batch of matrices (N, A, B): Muon's quintic iteration,
    which maps each singular value into about [0.5, 1.5] with the singular vectors kept."""
    a, b, c = coefficients
    tall = update.size(-2) > update.size(-1)
    x = update.mT if tall else update  # (N, min, max): the Gram matrix is the small one
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + torch.baddbmm(gram, gram, gram, beta=b, alpha=c) @ x
    return x.mT if tall else x


def _adjust_lr(lr: float, rule: str | None, shape: torch.Size) -> float:
    # torch's rules (torch.optim._muon), restated because that module is private
    rows, cols = shape[:2]
    if rule is None or rule == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices, fused AdamW on everything else, as one optimizer.

    The learning-rate schedule, gradient clipping and checkpoints see one object: its
    ``param_groups`` are the two inner optimizers' groups (a scheduler scales both), and its
    state dict holds both states. Muon's step is scaled to AdamW's update size
    (``adjust_lr_fn="match_rms_adamw"``), so one ``lr`` serves both.
    """

    def __init__(
        self,
        muon_params: list[torch.Tensor],
        adamw_groups: list[dict],
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        momentum: float = 0.95,
    ) -> None:
        adamw_params = [p for g in adamw_groups for p in g["params"]]
        self.muon = Muon(
            muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=_fused_ok(adamw_params))
        super().__init__(muon_params + adamw_params, {"lr": lr})
        self._share_groups()

    def _share_groups(self) -> None:
        # the inner optimizers' own group dicts, so a scheduler's lr reaches them
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        self.muon.step()
        self.adamw.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError(
                "this optimizer state is not a Muon + AdamW state (keys "
                f"{sorted(state_dict)}): resume with the optimizer the checkpoint was trained with"
            )
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self._share_groups()


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
    name: str = "adamw",
) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters of ``model``: ``"adamw"`` (two groups, decay /
    no decay) or ``"muon"`` (:class:`MuonAdamW`: Muon on :func:`muon_parameter_names`, AdamW on
    the rest)."""
    if name not in ("adamw", "muon"):
        raise ValueError(f"unknown optimizer {name!r}: expected 'adamw' or 'muon'")
    exempt = no_decay_parameter_names(model)
    hidden = muon_parameter_names(model) if name == "muon" else set()
    decay, no_decay, muon = [], [], []
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            target = muon if param_name in hidden else no_decay if param_name in exempt else decay
            target.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if muon:
        return MuonAdamW(muon, groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=_fused_ok(decay + no_decay))


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
