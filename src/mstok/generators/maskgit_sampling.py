"""MaskGIT sampling: from all masks to K tokens in S parallel steps.

At step t (0-based) of S, with progress ``r = (t + 1) / S``:

1. The generator predicts logits at every slot, with classifier-free guidance
   ``logits = cond + w_t * (cond - uncond)`` where ``uncond`` uses the null class. ``w_t = 0``
   is plain conditional sampling (and skips the unconditional pass); this equals
   ``uncond + (1 + w_t)(cond - uncond)``, the form with scale ``1 + w_t``.
   With ``softmax_annealing`` the logits are then divided by ``0.5 + 0.8 (1 - r)``.
2. Every masked slot draws a token from ``softmax(logits / tau)`` (Gumbel-max, so ``tau = 0``
   is argmax); ``tau`` is ``temperature``, times ``1 - r`` when ``anneal_temperature``.
3. Each new token gets a confidence, its log-probability (or its raw logit, as in the
   official TiTok code), plus Gumbel noise of scale ``choice_temperature * (1 - r)``, so
   the choice is random early and greedy at the end. Already-revealed tokens are final.
4. The ``masked_counts(K, S, schedule)[t]`` least confident new tokens are masked again; at
   the last step none are, so every token is fixed.

With an end token (ragged data) the first slot never draws the end id, so every sample has
at least one token, and after the last step every slot past a sample's first end id holds the
end id too: :func:`token_lengths` gives the lengths.

All randomness comes from one ``torch.Generator``: a fixed seed reproduces samples exactly.
``SamplingConfig.official_titok(...)`` gives the official TiTok sampler's settings.

The pieces every family's sampler shares (label checks, the batched guidance pass, Gumbel
noise) are in :mod:`mstok.generators.common`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from mstok.config_schema import NON_NEGATIVE, ConfigDict, Rule, one_of, positive
from mstok.generators.common import conditional_pair, gumbel_noise, prepare_sampling
from mstok.generators.maskgit import MaskGITGenerator
from mstok.generators.schedules import GUIDANCE_SCHEDULES, MASK_SCHEDULES, guidance_weight, masked_counts

CONFIDENCES = ("log_prob", "logit")


@dataclass
class SamplingConfig(ConfigDict):
    """How to sample (module docstring).

    Attributes:
        steps: S, the number of parallel decoding steps (8 for TiTok, 64 for its U-ViT setting).
        schedule: masking schedule (``arccos``, ``cosine``, ``linear``, ``sqrt``).
        temperature: token sampling temperature tau (0 = argmax).
        anneal_temperature: multiply tau by ``1 - r`` (the official TiTok sampler does).
        choice_temperature: scale of the Gumbel noise on confidences, annealed to 0.
        confidence: ``log_prob`` (MaskGIT) or ``logit`` (official TiTok).
        guidance_scale: classifier-free guidance weight w (0 = none).
        guidance_schedule: ``constant``, ``linear`` or ``power_cosine`` (see schedules.py).
        guidance_power: the exponent p of ``power_cosine``.
        softmax_annealing: divide the (guided) logits by ``0.5 + 0.8 (1 - r)`` before sampling
            and scoring (the official TiTok FID script's ``softmax_temperature_annealing``).
    """

    steps: int = 8
    schedule: str = "arccos"
    temperature: float = 1.0
    anneal_temperature: bool = False
    choice_temperature: float = 4.5
    confidence: str = "log_prob"
    guidance_scale: float = 0.0
    guidance_schedule: str = "constant"
    guidance_power: float = 3.0
    softmax_annealing: bool = False

    # checked by ConfigDict.__post_init__ (mstok.config_schema)
    field_rules: ClassVar[dict[str, Rule]] = {
        "steps": positive(4096),
        "schedule": one_of(MASK_SCHEDULES, "a masking schedule"),
        "temperature": NON_NEGATIVE,
        "choice_temperature": NON_NEGATIVE,
        "confidence": one_of(CONFIDENCES),
        "guidance_scale": NON_NEGATIVE,
        "guidance_schedule": one_of(GUIDANCE_SCHEDULES, "a guidance schedule"),
    }

    @classmethod
    def official_titok(
        cls, randomize_temperature: float, guidance_scale: float, guidance_decay: str, steps: int = 8, **kw: Any
    ) -> SamplingConfig:
        """The official TiTok sampler: its ``randomize_temperature`` drives both the token
        and the confidence noise (annealed), confidences are raw logits, arccos schedule.
        Its ``power-cosine`` scale ``g`` is our ``w = g - 1`` (schedules.py)."""
        schedule = guidance_decay.replace("-", "_")
        weight = guidance_scale - 1.0 if schedule == "power_cosine" else guidance_scale
        return cls(
            steps=steps,
            temperature=randomize_temperature,
            anneal_temperature=True,
            choice_temperature=randomize_temperature,
            confidence="logit",
            guidance_scale=weight,
            guidance_schedule=schedule,
            **kw,
        )


def guided_logits(model: MaskGITGenerator, tokens: torch.Tensor, labels: torch.Tensor, weight: float) -> torch.Tensor:
    """``cond + weight * (cond - uncond)`` in float32; one batched pass when ``weight != 0``.

    tokens: (B, K); labels: (B,). -> (B, K, V)"""
    if weight == 0:
        return model(tokens, labels).float()
    cond, uncond = conditional_pair(model, (tokens,), labels, model.config.null_class)
    return cond + weight * (cond - uncond)


def token_lengths(ids: torch.Tensor, end_id: int | None) -> torch.Tensor:
    """(B,) int64: each row's slots before its first ``end_id`` (K when it has none, or when
    ``end_id`` is None). ids: (B, K)."""
    if end_id is None:
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
    ended = ids == end_id
    return torch.where(ended.any(1), ended.int().argmax(1), ids.shape[1]).long()


def end_after_first(ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """ids (B, K) with every slot after a row's first ``end_id`` set to it (what the training data holds)."""
    past = torch.arange(ids.shape[1], device=ids.device)[None, :] >= token_lengths(ids, end_id)[:, None]
    return torch.where(past, end_id, ids)


@torch.inference_mode()
def sample(
    model: MaskGITGenerator,
    labels: Any,
    config: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    return_history: bool = False,
    progress: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate token ids for the class ``labels`` with MaskGIT decoding.

    Args:
        model: the generator (put in eval mode here).
        labels: (B,) class ids (the null class gives unconditional samples).
        config: sampling settings (defaults: 8 arccos steps, no guidance).
        generator: the source of all randomness (on the model's device); None uses the global RNG.
        return_history: also return the (B, K) ids after every step (masked slots = mask id).
        progress: a tqdm bar over the steps.

    Returns:
        (B, K) int64 ids in [0, V) (with an end token: in [0, V], V past each sample's length,
        :func:`token_lengths`), and the per-step history when asked.
    """
    config = config or SamplingConfig()
    device, labels = prepare_sampling(model, labels)
    cfg = model.config
    b, k, steps = labels.shape[0], cfg.num_tokens, config.steps
    ids = torch.full((b, k), cfg.mask_id, dtype=torch.long, device=device)
    counts = masked_counts(k, steps, config.schedule)
    history = []
    for t in tqdm(range(steps), disable=not progress, desc="sample", unit="step"):
        r = (t + 1) / steps
        weight = guidance_weight(config.guidance_scale, t, steps, config.guidance_schedule, config.guidance_power)
        logits = guided_logits(model, ids, labels, weight)  # (B, K, V)
        if cfg.end_token:  # a sample has at least one token: the first slot never ends it
            logits[:, 0, cfg.end_id] = -torch.inf
        if config.softmax_annealing:
            logits = logits / (0.5 + 0.8 * (1.0 - r))
        tau = config.temperature * ((1.0 - r) if config.anneal_temperature else 1.0)
        noisy = logits if tau == 0 else logits + tau * gumbel_noise(logits.shape, generator, device)
        drawn = noisy.argmax(-1)  # (B, K)
        confidence = logits.gather(-1, drawn[..., None]).squeeze(-1)  # (B, K)
        if config.confidence == "log_prob":
            confidence = confidence - logits.logsumexp(-1)  # log-softmax at the drawn ids only
        is_mask = ids == cfg.mask_id
        ids = torch.where(is_mask, drawn, ids)
        if counts[t] > 0:
            confidence = torch.where(is_mask, confidence, torch.inf)  # revealed tokens stay
            noise_scale = config.choice_temperature * (1.0 - r)
            if noise_scale > 0:
                confidence = confidence + noise_scale * gumbel_noise(confidence.shape, generator, device)
            remask = confidence.topk(counts[t], dim=-1, largest=False).indices  # (B, counts[t])
            ids = ids.scatter(1, remask, cfg.mask_id)
        if return_history:
            history.append(ids.clone())
    if cfg.end_token:
        ids = end_after_first(ids, cfg.end_id)
    return (ids, history) if return_history else ids
