"""Per-sample training inputs drawn from each sample's own seed, shared by the generator objectives.

A token dataset is indexed by ``(index, seed)`` and returns ``(tokens, label)`` (or None for
a sample to skip), the seed fixed by the sampler for that position of that epoch. Every
generator objective corrupts each sample on its own (MaskGIT masks ids, BitMAR masks bit
tokens, a DiT noises latents) and drops its label to the null class for classifier-free
guidance. Drawing all of that from the sample's seed alone, not from a per-process RNG, makes
a run's corruption the same on any number of ranks or loader workers and after a resume.

:class:`SeededInputs` is that wrapping once; an objective's subclass says only how one sample
is corrupted (:meth:`SeededInputs.corrupt`). :func:`seed_stream` gives each kind of draw a
stream apart from the dataset's own, which uses ``default_rng(seed)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def seed_stream(seed: int, stream: int) -> np.random.Generator:
    """The NumPy generator of one kind of draw (tagged by the constant ``stream``) of the sample of ``seed``."""
    return np.random.default_rng([seed, stream])


class SeededInputs(Dataset):
    """Wraps a token dataset (``ds[(index, seed)] -> (tokens, label)``) into training inputs
    ``ds[(index, seed)] -> (stacked, label)``: ``stacked`` is what :meth:`corrupt` makes of the
    tokens, and the label is replaced by ``null_class`` when :meth:`corrupt` says it is dropped
    (with probability ``class_dropout``). All randomness comes from ``seed``.

    Args:
        dataset: the tokens.
        class_dropout, null_class: label dropout for classifier-free guidance.
    """

    def __init__(self, dataset: Dataset, class_dropout: float, null_class: int) -> None:
        self.dataset, self.class_dropout, self.null_class = dataset, class_dropout, null_class

    def __len__(self) -> int:
        return len(self.dataset)

    def drops_label(self, rng: np.random.Generator) -> bool:
        """One draw from ``rng``: whether this sample trains with the null class."""
        return bool(rng.random() < self.class_dropout)

    def corrupt(self, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, bool]:
        """(the stacked training input of ``tokens``, whether the label is dropped) for the
        sample of ``seed``; every subclass defines it."""
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, Any] | None:
        item = self.dataset[key]
        if item is None:
            return None
        tokens, label = item
        stacked, dropped = self.corrupt(tokens, key[1])
        return stacked, self.null_class if dropped else label
