"""The bitwise masked-token objective of BitMAR generators (SemTok 3.3, A.2).

Each example masks a fraction ``r ~ U(min_mask_ratio, max_mask_ratio)`` (0.7 to 1, MAR's range)
of its K tokens, ``round(r K)`` of them and at least one, at uniformly random positions, and
the generator predicts the masked tokens' bits from the rest. :class:`BitMaskedTokens` draws
this per sample from the sample's own seed (with the class dropout of classifier-free guidance),
so a run's corruption is the same on any number of ranks or loader workers and after a resume.

The loss counts masked positions only. With the bitwise head (``group_bits = 1``) it is the
binary cross-entropy of each of the C bit logits against the id's bit ``(id >> i) & 1``; with
groups of g bits, the cross-entropy of each group's 2^g logits against the group's value. Label
smoothing eps (the paper: 0.01) is PyTorch's: the target puts ``1 - eps`` on the true value and
``eps`` spread evenly over all values (for a bit: ``bit (1 - eps) + eps / 2``). The loss is the
mean over every predicted bit (or group) of every masked position of the global batch.

Glossary: B batch, K tokens, C bits, g bits per group, G = C / g groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mstok.losses.seeded import SeededInputs, seed_stream
from mstok.quantizers.binary import ids_to_bits


def group_values(ids: torch.Tensor, num_bits: int, group_bits: int) -> torch.Tensor:
    """(...) ids -> (..., C/g) int64 values of the groups of g bits, low bits first."""
    mask = (1 << group_bits) - 1
    shifts = group_bits * torch.arange(num_bits // group_bits, device=ids.device, dtype=torch.int64)
    return (ids.long()[..., None] >> shifts) & mask


def values_to_bits(values: torch.Tensor, group_bits: int) -> torch.Tensor:
    """(..., G) group values -> (..., G g) bool bits, low bits first."""
    return ids_to_bits(values, group_bits).flatten(-2)


def check_mask_ratios(low: float, high: float) -> None:
    """ValueError unless ``0 < low <= high <= 1``."""
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"mask ratios must satisfy 0 < min_mask_ratio <= max_mask_ratio <= 1, got {low} and {high}")


class BitMaskedTokens(SeededInputs):
    """Wraps a token dataset (``ds[(index, seed)] -> (ids (K,), label)``) into training inputs:
    ``ds[(index, seed)] -> (stacked (2, K) int64, label)`` with ``stacked`` = [ids, mask (1 =
    masked)], the label replaced by ``null_class`` with probability ``class_dropout``. All
    randomness comes from ``seed`` (module docstring, :mod:`mstok.losses.seeded`)."""

    def __init__(
        self, dataset: Dataset, min_ratio: float, max_ratio: float, class_dropout: float, null_class: int
    ) -> None:
        check_mask_ratios(min_ratio, max_ratio)
        super().__init__(dataset, class_dropout, null_class)
        self.min_ratio, self.max_ratio = min_ratio, max_ratio

    def draw(self, seed: int, num_tokens: int) -> tuple[torch.Tensor, bool]:
        """The (K,) bool mask and whether the label is dropped, for the sample of ``seed``."""
        rng = seed_stream(seed, 0x6269746D)
        ratio = rng.uniform(self.min_ratio, self.max_ratio)
        count = min(max(round(ratio * num_tokens), 1), num_tokens)
        mask = torch.zeros(num_tokens, dtype=torch.bool)
        mask[torch.from_numpy(rng.permutation(num_tokens)[:count])] = True
        return mask, self.drops_label(rng)

    def corrupt(self, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, bool]:
        """(stacked (2, K) int64, whether the label is dropped) for the sample of ``seed``."""
        mask, dropped = self.draw(seed, tokens.shape[0])
        return torch.stack([tokens.long(), mask.long()]), dropped


def bitwise_sums(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, group_bits: int, label_smoothing: float = 0.0
) -> dict[str, torch.Tensor]:
    """Un-normalised sums over the masked positions of a batch.

    Args:
        logits: (B, K, C) bit logits (``group_bits = 1``) or (B, K, G, 2^g) group logits.
        ids: (B, K) the target ids.
        mask: (B, K) bool, the positions that count.
        group_bits: g.
        label_smoothing: eps (module docstring).

    Returns:
        ``loss`` (differentiable sum of the smoothed cross-entropies of every bit or group) and
        detached ``ce`` (unsmoothed), ``bits_right`` (bits of the argmax prediction that match)
        and ``tokens_right`` (positions whose every bit matches).
    """
    logits, eps = logits.float(), label_smoothing
    if group_bits == 1:
        num_bits = logits.shape[-1]
        bits = ids_to_bits(ids, num_bits).float()  # (B, K, C)
        per = F.binary_cross_entropy_with_logits(logits, bits * (1 - eps) + eps / 2, reduction="none")
        with torch.no_grad():
            plain = F.binary_cross_entropy_with_logits(logits, bits, reduction="none") if eps else per
            right = (logits > 0) == bits.bool()  # (B, K, C)
    else:
        num_bits = logits.shape[-2] * group_bits
        values = group_values(ids, num_bits, group_bits)  # (B, K, G)
        flat = logits.flatten(0, -2)  # (B K G, 2^g)
        per = F.cross_entropy(flat, values.flatten(), label_smoothing=eps, reduction="none").view(values.shape)
        with torch.no_grad():
            plain = F.cross_entropy(flat, values.flatten(), reduction="none").view(values.shape) if eps else per
            guess = values_to_bits(logits.argmax(-1), group_bits)  # (B, K, C)
            right = guess == values_to_bits(values, group_bits)
    weight = mask[..., None].float()  # (B, K, 1)
    with torch.no_grad():
        out = {
            "ce": (plain.detach() * weight).sum(),
            "bits_right": (right.float() * weight).sum(),
            "tokens_right": (right.all(-1).float() * mask.float()).sum(),
        }
    return {"loss": (per * weight).sum(), **out}


class BitwiseObjective:
    """BitMAR's training objective in the generator trainer's interface
    (:class:`~mstok.training.generator_trainer.GeneratorObjective`): :class:`BitMaskedTokens`
    inputs and the masked bitwise cross-entropy, normalised by the global batch's masked count.

    A batch is ``(ids (B, K), mask (B, K) bool, labels (B,))``; its total is the masked-position
    count, which normalises the loss (per bit or group: divided by C or G too) and the logged
    ``ce``, ``bit_accuracy`` and ``token_accuracy`` (all on masked positions).

    Args:
        num_bits, group_bits: the generator's C and g.
        null_class: its null class.
        min_mask_ratio, max_mask_ratio: the range of the masked fraction.
        class_dropout: probability of training a sample with the null class.
        label_smoothing: eps of the targets.
    """

    postfix_keys = ("loss", "bit_accuracy")

    def __init__(
        self,
        num_bits: int,
        group_bits: int,
        null_class: int,
        min_mask_ratio: float = 0.7,
        max_mask_ratio: float = 1.0,
        class_dropout: float = 0.1,
        label_smoothing: float = 0.01,
    ) -> None:
        check_mask_ratios(min_mask_ratio, max_mask_ratio)
        if num_bits % group_bits:
            raise ValueError(f"group_bits {group_bits} must divide num_bits {num_bits}")
        self.num_bits, self.group_bits, self.null_class = num_bits, group_bits, null_class
        self.min_mask_ratio, self.max_mask_ratio = min_mask_ratio, max_mask_ratio
        self.class_dropout, self.label_smoothing = class_dropout, label_smoothing

    @property
    def predictions(self) -> int:
        """Categoricals per position: C bits or G groups."""
        return self.num_bits // self.group_bits

    def inputs(self, tokens: Dataset) -> BitMaskedTokens:
        """Per-sample training items from a token dataset (all randomness from each sample's seed)."""
        return BitMaskedTokens(tokens, self.min_mask_ratio, self.max_mask_ratio, self.class_dropout, self.null_class)

    def prepare(self, stacked: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """A collated micro-batch ((B, 2, K), (B,)) on ``device`` as (ids, mask, labels)."""
        ids, mask = stacked.to(device, non_blocking=True).unbind(1)  # 2 x (B, K)
        return ids, mask.bool(), labels.to(device, non_blocking=True)

    def totals(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(1,) float: the batch's masked-position count, known before the forward."""
        return batch[1].sum().float()[None]

    def forward(self, model: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The logits of every position given the unmasked tokens."""
        ids, mask, labels = batch
        return model(ids, mask, labels)

    def loss(
        self, logits: torch.Tensor, batch: tuple[torch.Tensor, ...], share: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's part of the global loss and logged terms, ``share`` being this
        rank's share (global total / world size) of the masked count."""
        ids, mask, _ = batch
        s = bitwise_sums(logits, ids, mask, self.group_bits, self.label_smoothing)
        masked = share[0]  # every sample masks at least one position, so it is positive
        loss = s["loss"] / (masked * self.predictions)
        terms = {
            "loss": loss.detach(),
            "ce": s["ce"] / (masked * self.predictions),
            "bit_accuracy": s["bits_right"] / (masked * self.num_bits),
            "token_accuracy": s["tokens_right"] / masked,
        }
        return loss, terms
