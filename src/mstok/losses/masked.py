"""The masked-token objective of MaskGIT generators.

Each example draws a progress ``r ~ U(0, 1)`` and masks ``round(gamma(r) * K)`` of its K
tokens (at least one), chosen uniformly at random; the generator then predicts the
original ids. :class:`MaskedTokens` does this per sample from the sample's own seed (with
the class dropout of classifier-free guidance), so a run's corruption is the same on any
number of ranks or loader workers and after a resume; :func:`mask_tokens` does it for a batch.

The loss is a label-smoothed cross-entropy weighted 1 on masked slots and
``unmasked_weight`` on the others (the official TiTok recipe uses 0.1, which keeps the
visible tokens' predictions calibrated), normalised by the total weight.
:class:`MaskedTokenObjective` is MaskGIT's objective for the generator trainer
(:mod:`mstok.training.generator_trainer`), which calls every family's through one interface.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mstok.generators.schedules import check_schedule, mask_ratio
from mstok.losses.seeded import SeededInputs, seed_stream


def num_masked(r: torch.Tensor, num_tokens: int, schedule: str) -> torch.Tensor:
    """How many of K tokens to mask at progress ``r``: ``round(gamma(r) K)``, at least one."""
    ratio = mask_ratio(r, schedule).clamp(1e-6, 1.0)
    return (ratio * num_tokens).round().clamp(1, num_tokens).long()


def mask_tokens(
    tokens: torch.Tensor, mask_id: int, schedule: str = "arccos", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a random, schedule-distributed fraction of each row.

    Args:
        tokens: (B, K) ids.
        mask_id: the id written into masked slots.
        schedule: masking schedule name (schedules.py).
        generator: optional RNG (on ``tokens.device``).

    Returns:
        ``(masked (B, K), mask (B, K) bool)`` where ``mask`` marks the replaced slots.
    """
    check_schedule(schedule)
    b, k = tokens.shape
    count = num_masked(torch.rand(b, generator=generator, device=tokens.device), k, schedule)  # (B,)
    # a uniform random permutation per row; its first `count` values mark a uniform random subset
    perm = torch.rand(b, k, generator=generator, device=tokens.device).argsort(dim=-1)
    mask = perm < count[:, None]  # (B, K)
    return torch.where(mask, mask_id, tokens), mask


class MaskedTokens(SeededInputs):
    """Wraps a token dataset (``ds[(index, seed)] -> (tokens (K,), label)``) into training
    inputs: ``ds[(index, seed)] -> (stacked (3, K) = [masked ids, mask, target ids], label)``,
    the label replaced by ``null_class`` with probability ``class_dropout``. All randomness
    comes from ``seed`` (:mod:`mstok.losses.seeded`).
    """

    def __init__(self, dataset: Dataset, mask_id: int, schedule: str, class_dropout: float, null_class: int) -> None:
        super().__init__(dataset, class_dropout, null_class)
        self.mask_id, self.schedule = mask_id, check_schedule(schedule)

    def corrupt(self, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, bool]:
        """(stacked (3, K), whether the label is dropped) for the sample of ``seed``."""
        rng = seed_stream(seed, 0x6D61736B)
        k = tokens.shape[0]
        count = int(num_masked(torch.tensor(rng.random(), dtype=torch.float64), k, self.schedule))
        mask = torch.zeros(k, dtype=torch.bool)
        mask[torch.from_numpy(rng.permutation(k)[:count])] = True
        dropped = self.drops_label(rng)
        masked = torch.where(mask, self.mask_id, tokens)
        return torch.stack([masked, mask.long(), tokens]), dropped


class MaskedTokenLoss(nn.Module):
    """Weighted, label-smoothed cross-entropy over the K slots (module docstring).

    Args:
        label_smoothing: smoothing of the one-hot targets (official recipe: 0.1).
        unmasked_weight: weight of the unmasked slots relative to the masked ones.
    """

    def __init__(self, label_smoothing: float = 0.1, unmasked_weight: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if unmasked_weight < 0:
            raise ValueError(f"unmasked_weight must be >= 0, got {unmasked_weight}")
        self.label_smoothing = label_smoothing
        self.unmasked_weight = unmasked_weight

    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, K) per-slot weights: 1 on masked slots, ``unmasked_weight`` elsewhere."""
        return torch.where(mask, 1.0, self.unmasked_weight)

    def sums(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Un-normalised sums over a batch: ``weighted`` (differentiable sum of weight x smoothed
        cross-entropy), and detached ``weight``, ``masked``, ``masked_ce``, ``correct``.

        Normalising by totals over the whole global batch (see the generator trainer) makes data
        parallel training equal to one process, which a per-rank ratio would not."""
        # one log-softmax serves both cross-entropies: label smoothing eps is
        # (1 - eps) * nll + eps * mean over the V codes of -log p (PyTorch's definition)
        logp = logits.float().log_softmax(-1)  # (B, K, V)
        nll = -logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, K)
        eps = self.label_smoothing
        ce = nll if eps == 0 else (1.0 - eps) * nll - eps * logp.mean(-1)
        weights = self.weights(mask)
        with torch.no_grad():
            masked = mask.float()
            out = {
                "weight": weights.sum(),
                "masked": masked.sum(),
                "masked_ce": (nll * masked).sum(),
                "correct": ((logp.argmax(-1) == targets).float() * masked).sum(),
            }
        return {"weighted": (ce * weights).sum(), **out}

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """logits (B, K, V), targets (B, K), mask (B, K) bool -> (loss, terms) for one batch.

        Terms: ``loss``, ``masked_ce`` (plain cross-entropy on masked slots, comparable across
        smoothing settings) and ``accuracy`` (argmax on masked slots); all detached."""
        s = self.sums(logits, targets, mask)
        loss = s["weighted"] / s["weight"]
        n = s["masked"].clamp_min(1.0)
        return loss, {"loss": loss.detach(), "masked_ce": s["masked_ce"] / n, "accuracy": s["correct"] / n}


class MaskedTokenObjective:
    """MaskGIT's training objective in the generator trainer's interface
    (:class:`~mstok.training.generator_trainer.GeneratorObjective`): :class:`MaskedTokens`
    inputs and the :class:`MaskedTokenLoss`, normalised by totals over the global batch.

    A batch is ``(masked ids (B, K), mask (B, K) bool, target ids (B, K), labels (B,))``; its
    totals are (slot weight, masked slots), which normalise the loss and the logged
    ``masked_ce`` and ``accuracy`` (both on masked slots).

    Args:
        mask_id, null_class: the generator's mask id and null class.
        schedule: the masking schedule (schedules.py).
        class_dropout: probability of training a sample with the null class.
        label_smoothing, unmasked_weight: the :class:`MaskedTokenLoss` settings.
    """

    postfix_keys = ("loss", "accuracy")

    def __init__(
        self,
        mask_id: int,
        null_class: int,
        schedule: str = "arccos",
        class_dropout: float = 0.1,
        label_smoothing: float = 0.1,
        unmasked_weight: float = 0.1,
    ) -> None:
        self.mask_id, self.null_class, self.schedule = mask_id, null_class, check_schedule(schedule)
        self.class_dropout = class_dropout
        self.loss_fn = MaskedTokenLoss(label_smoothing, unmasked_weight)

    def inputs(self, tokens: Dataset) -> MaskedTokens:
        """Per-sample training items from a token dataset (all randomness from each sample's seed)."""
        return MaskedTokens(tokens, self.mask_id, self.schedule, self.class_dropout, self.null_class)

    def prepare(self, stacked: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """A collated micro-batch ((B, 3, K), (B,)) on ``device`` as (masked, mask, targets, labels)."""
        masked, mask, targets = stacked.to(device, non_blocking=True).unbind(1)  # 3 x (B, K)
        return masked, mask.bool(), targets, labels.to(device, non_blocking=True)

    def totals(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(2,) float: the batch's slot weight and masked-slot count, known before the forward."""
        mask = batch[1]
        return torch.stack([self.loss_fn.weights(mask).sum(), mask.sum().float()])

    def forward(self, model: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The (B, K, V) logits of the masked ids."""
        masked, _, _, labels = batch
        return model(masked, labels)

    def loss(
        self, logits: torch.Tensor, batch: tuple[torch.Tensor, ...], share: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's part of the global loss and logged terms, ``share`` being this
        rank's share (global total / world size) of each :meth:`totals` entry."""
        _, mask, targets, _ = batch
        s = self.loss_fn.sums(logits, targets, mask)
        loss = s["weighted"] / share[0]
        # every sample masks at least one slot, so the masked share is positive
        terms = {"loss": loss.detach(), "masked_ce": s["masked_ce"] / share[1], "accuracy": s["correct"] / share[1]}
        return loss, terms
