"""No quantization: a continuous bottleneck of K x C numbers.

The measurement device of the convergence study (benchmarks/convergence.py): the same
tokenizer with its quantizer taken out tells how much of its slow start is the quantizer's
and how much the transformer's. Its output has the fields of :class:`QuantizerOutput` with
``indices=None`` and zero losses.

Glossary: B batch, K latent tokens, C code dim.
"""

from __future__ import annotations

import torch
from torch import nn

from mstok.quantizers.vq import QuantizerOutput


class IdentityQuantizer(nn.Module):
    """Passes latents (B, K, C) through unchanged (as float32); no ids, no loss.

    Args:
        code_dim: C, checked against the input's last dimension.
    """

    def __init__(self, code_dim: int) -> None:
        super().__init__()
        self.code_dim = code_dim

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, K, C) -> :class:`QuantizerOutput` with ``codes = latents = z`` and ``indices=None``."""
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"expected latents with {self.code_dim} channels, got shape {tuple(z.shape)}")
        zero = z.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(z.float(), z, None, zero, zero, zero)
