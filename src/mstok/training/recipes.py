"""The tiny CPU recipe: the training settings under which the tiny tokenizers learn fast.

Found by ``benchmarks/convergence.py`` (its rows, numbers and reading are in
``benchmarks/RESULTS.md``, section "Convergence of the tiny tokenizers"). The shipped
``configs/*_tiny.toml``, ``mstok demo`` and ``benchmarks/replicate.py`` use these values;
a test checks that the TOML files agree with this module.

The model side of the recipe (sin-cos positions, qk-norm, ...) is part of the ``*_tiny``
presets themselves (``mstok.tokenizers.registry``); this module holds what is not a model
field: the optimiser and the EMA.
"""

from __future__ import annotations

from typing import Any

from mstok.training.config import OptimConfig

# AdamW: a larger step than the B/L recipes (1e-4), which a width-128 model with qk-norm
# takes without diverging; beta2 0.95 lets the second-moment estimate follow the fast early
# change of gradient scale instead of averaging over ~100 steps of a different regime.
TINY_OPTIM: dict[str, Any] = {"lr": 2e-3, "end_lr": 2e-4, "warmup_steps": 50, "betas": (0.9, 0.95)}
# The EMA the held-out numbers are read from. With the EMA warm-up (decay min(d, (1+n)/(10+n)))
# a 2000-step run never averages over more than ~200 steps, so the usual 0.999 is kept.
TINY_EMA_DECAY = 0.999


def tiny_optim() -> OptimConfig:
    """The tiny recipe's :class:`OptimConfig` (weight decay, eps and clipping at their defaults)."""
    return OptimConfig(**TINY_OPTIM)


def tiny_settings() -> list[str]:
    """The tiny recipe as ``--set`` overrides (``key=value`` strings for ``load_train_config``)."""
    optim = [f"optim.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY_OPTIM.items()]
    return [*optim, f"ema_decay={TINY_EMA_DECAY}"]
