"""The tiny CPU recipe: the training settings under which the tiny tokenizers learn fast.

Two optimiser recipes, both measured in ``benchmarks/RESULTS.md``:

* :data:`TINY_OPTIM`, Muon on the transformer blocks' matrices and AdamW on the rest (since
  2026-12-07; section "Time to quality"): the single-stage ``configs/titok_tiny.toml`` and
  ``configs/mstok_tiny.toml`` and ``mstok demo`` use it.
* :data:`TINY_ADAMW_OPTIM`, the AdamW recipe found by ``benchmarks/convergence.py`` (section
  "Convergence of the tiny tokenizers"): the other tiny configs (HieraTok, SemTok, nested)
  and the benchmark tables measured with it (``benchmarks/harness.recipe``) keep it, so their
  published numbers still reproduce.

Tests check that the TOML files agree with this module.

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
TINY_ADAMW_OPTIM: dict[str, Any] = {"lr": 2e-3, "end_lr": 2e-4, "warmup_steps": 50, "betas": (0.9, 0.95)}
# Muon (orthogonalised momentum) on the blocks' matrices, AdamW (the betas above) on the rest,
# at twice the AdamW peak: after 300 s of training on 2 cores TiTok-tiny reads 17.89 dB on 500
# held-out images where AdamW at 2e-3 read 15.53 (RESULTS.md, "Time to quality", and its history).
TINY_OPTIM: dict[str, Any] = {**TINY_ADAMW_OPTIM, "name": "muon", "lr": 4e-3, "end_lr": 4e-4}
# The EMA the held-out numbers are read from. With the EMA warm-up (decay min(d, (1+n)/(10+n)))
# a 2000-step run never averages over more than ~200 steps, so the usual 0.999 is kept.
TINY_EMA_DECAY = 0.999


def tiny_optim(recipe: dict[str, Any] = TINY_OPTIM) -> OptimConfig:
    """A tiny recipe's :class:`OptimConfig` (weight decay, eps and clipping at their defaults)."""
    return OptimConfig(**recipe)


def tiny_settings(recipe: dict[str, Any] = TINY_OPTIM) -> list[str]:
    """A tiny recipe as ``--set`` overrides (``key=value`` strings for ``load_train_config``)."""
    optim = [f"optim.{k}={_toml(v)}" for k, v in recipe.items()]
    return [*optim, f"ema_decay={TINY_EMA_DECAY}"]


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return f"'{value}'"
    return str(list(value) if isinstance(value, tuple) else value)
