"""Sampling a BitMAR generator: random-order masked generation of bit tokens (SemTok A.2, B.2).

Unlike MaskGIT's sampler (:mod:`mstok.generators.maskgit_sampling`), which keeps its most confident
predictions, BitMAR reveals tokens in a random order, as MAR does (SemTok Table 14: better gFID
than confidence-based choice). With S steps and K tokens:

1. One uniformly random order of the K positions is drawn per sample. The masking schedule
   (cosine by default) says how many tokens ``n_t`` stay masked after step t
   (:func:`~mstok.generators.schedules.masked_counts`: strictly fewer each step while it can,
   none after the last), and the positions ranked ``n_t .. n_{t-1} - 1`` in the order are
   revealed at step t: every position exactly once, all of them by step S.
2. At each step the model reads the tokens revealed so far (the rest masked) and predicts
   every position; with classifier-free guidance the logits are ``uncond + s_t (cond - uncond)``
   (``uncond``: the null class), in logit space for bits and groups alike. ``linear`` guidance
   (the paper's) raises ``s_t`` from 1 with the fraction of tokens predicted:
   ``s_t = 1 + (s - 1) (K - n_t) / K``, reaching ``s`` at the last step; ``constant`` uses
   ``s`` throughout. ``s = 1`` is no guidance (and skips the unconditional pass).
3. Each revealed position draws its bits: every bit (a logit l is the two-way categorical
   ``[0, l]``) or every group of g bits is a categorical, divided by the temperature and
   filtered by top-p (nucleus: the most probable values whose mass first reaches p; for one
   bit, the likelier value alone when its probability is at least p, else both, as the
   paper's per-bit top-p at p = 0.75), then drawn by Gumbel-max. Temperature 0 is argmax.
   The bits assemble into the id ``sum_i bit_i 2^i`` (int64).

All randomness (the orders and every draw) comes from one ``torch.Generator``.

Glossary: B batch, K tokens, C bits, g bits per group, G = C / g groups, S steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from mstok.config_schema import NON_NEGATIVE, ConfigDict, Rule, one_of, positive
from mstok.generators.bitmar import BitMAR
from mstok.generators.common import conditional_pair, gumbel_noise, prepare_sampling
from mstok.generators.schedules import MASK_SCHEDULES, masked_counts

BIT_GUIDANCE_SCHEDULES = ("linear", "constant")


@dataclass
class BitSamplingConfig(ConfigDict):
    """How to sample a BitMAR generator (module docstring); the defaults are the paper's.

    Attributes:
        steps: S, the number of generation steps (64 for K = 256 tokens).
        schedule: masking schedule (``cosine``, ``arccos``, ``linear``, ``sqrt``).
        temperature: sampling temperature of every bit or group (0 = argmax).
        top_p: nucleus mass p of every bit or group (1 = no filtering).
        guidance_scale: the largest classifier-free guidance scale s (1 = none; SemTok-AR-L: 6.0).
        guidance_schedule: ``linear`` (from 1 to s with the fraction of predicted tokens) or ``constant``.
    """

    steps: int = 64
    schedule: str = "cosine"
    temperature: float = 1.0
    top_p: float = 0.75
    guidance_scale: float = 6.0
    guidance_schedule: str = "linear"

    field_rules: ClassVar[dict[str, Rule]] = {
        "steps": positive(4096),
        "schedule": one_of(MASK_SCHEDULES, "a masking schedule"),
        "temperature": NON_NEGATIVE,
        "top_p": Rule(gt=0, le=1),
        "guidance_scale": NON_NEGATIVE,
        "guidance_schedule": one_of(BIT_GUIDANCE_SCHEDULES, "a BitMAR guidance schedule"),
    }


def guidance_scales(counts: list[int], num_tokens: int, scale: float, schedule: str = "linear") -> list[float]:
    """The guidance scale ``s_t`` of each step, given the tokens ``counts[t]`` still masked after it."""
    if schedule == "constant":
        return [scale] * len(counts)
    if schedule == "linear":
        return [1.0 + (scale - 1.0) * (num_tokens - n) / num_tokens for n in counts]
    raise ValueError(f"unknown guidance schedule {schedule!r}; choose one of {', '.join(BIT_GUIDANCE_SCHEDULES)}")


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in logit space: ``uncond + scale (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def categorical_logits(logits: torch.Tensor, group_bits: int) -> torch.Tensor:
    """The model's output as categoricals (B, K, G, 2^g): a bit logit l becomes ``[0, l]``
    (P(1) = sigmoid(l)); group logits pass as they are."""
    if group_bits == 1:
        return torch.stack([torch.zeros_like(logits), logits], dim=-1)  # (B, K, C, 2)
    return logits


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every value outside the nucleus of mass ``top_p`` along the last dim: the most
    probable values, in order, up to and including the one whose cumulative mass reaches p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # the mass of the strictly more probable values
    drop_sorted = before >= top_p  # never the first: its "before" is 0
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw from each categorical (..., n) after temperature and top-p -> (...) int64 values."""
    if temperature == 0:
        return logits.argmax(-1)
    filtered = top_p_filter(logits.float() / temperature, top_p)
    return (filtered + gumbel_noise(filtered.shape, generator, filtered.device)).argmax(-1)


def values_to_ids(values: torch.Tensor, group_bits: int) -> torch.Tensor:
    """(..., G) group values in [0, 2^g) -> (...) int64 ids ``sum_j value_j 2^(g j)``."""
    shifts = group_bits * torch.arange(values.shape[-1], device=values.device, dtype=torch.int64)
    return (values.long() << shifts).sum(-1)


def _predict(model: BitMAR, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """The (guided) float32 logits of every position; one batched pass for both halves when ``scale != 1``."""
    if scale == 1.0:
        return model(ids, mask, labels).float()
    return guided(*conditional_pair(model, (ids, mask), labels, model.config.null_class), scale)


@torch.inference_mode()
def sample_bits(
    model: BitMAR,
    labels: Any,
    config: BitSamplingConfig | None = None,
    generator: torch.Generator | None = None,
    return_history: bool = False,
    progress: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate token ids for the class ``labels`` in random order (module docstring).

    Args:
        model: the generator (put in eval mode here).
        labels: (B,) class ids (the null class gives unconditional samples).
        config: sampling settings (default: the paper's: 64 cosine steps, top-p 0.75, linear guidance to 6).
        generator: the source of all randomness (on the model's device); None uses the global RNG.
        return_history: also return the (B, K) bool masks after every step (True = still masked).
        progress: a tqdm bar over the steps.

    Returns:
        (B, K) int64 ids in [0, 2^C), and the per-step masks when asked.
    """
    config = config or BitSamplingConfig()
    cfg = model.config
    device, labels = prepare_sampling(model, labels)
    b, k = labels.shape[0], cfg.num_tokens
    counts = masked_counts(k, config.steps, config.schedule)
    scales = guidance_scales(counts, k, config.guidance_scale, config.guidance_schedule)
    order = torch.rand(b, k, generator=generator, device=device).argsort(dim=-1)  # (B, K) positions by rank
    ids = torch.zeros(b, k, dtype=torch.long, device=device)
    mask = torch.ones(b, k, dtype=torch.bool, device=device)
    history, before = [], k
    for t in tqdm(range(config.steps), disable=not progress, desc="sample", unit="step"):
        if counts[t] < before:  # more steps than tokens: some steps reveal nothing
            logits = categorical_logits(_predict(model, ids, mask, labels, scales[t]), cfg.group_bits)
            where = order[:, counts[t] : before]  # (B, n): the positions revealed now
            picked = logits.gather(1, where[:, :, None, None].expand(-1, -1, *logits.shape[2:]))  # (B, n, G, 2^g)
            new = values_to_ids(draw(picked, config.temperature, config.top_p, generator), cfg.group_bits)
            ids = ids.scatter(1, where, new)
            mask = mask.scatter(1, where, False)
            before = counts[t]
        if return_history:
            history.append(mask.clone())
    return (ids, history) if return_history else ids
