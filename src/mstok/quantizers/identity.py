"""No quantization: a continuous bottleneck of K x C numbers.

The measurement device of the convergence study (benchmarks/convergence.py): the same
tokenizer with its quantizer taken out tells how much of its slow start is the quantizer's
and how much the transformer's. Its output has the fields of :class:`QuantizerOutput` with
``indices=None`` and zero losses.

Glossary: B batch, K latent tokens, C code dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mstok.quantizers.base import Quantizer, QuantizerOutput


class IdentityQuantizer(Quantizer):
    """Passes latents (B, K, C) through (as float32), optionally L2-normalised; no ids, no loss.

    Args:
        code_dim: C, checked against the input's last dimension.
        use_l2_norm: project each latent onto the unit sphere, as the VQ quantizer does before
            its search. The decoder then sees inputs of the scale VQ codes have; without it a
            continuous TiTok-tiny started slower than the same model with VQ (benchmarks/RESULTS.md,
            "Convergence of the tiny tokenizers"; the run: benchmarks/history/convergence.md,
            "Continuous bottleneck: L2-normalised latents").
    """

    def __init__(self, code_dim: int, use_l2_norm: bool = False) -> None:
        super().__init__()
        self.code_dim = code_dim
        self.codebook_size = None  # continuous: no ids
        self.use_l2_norm = use_l2_norm

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, K, C) -> :class:`QuantizerOutput` with ``codes = latents`` (z, normalised when
        ``use_l2_norm``) and ``indices=None``."""
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"expected latents with {self.code_dim} channels, got shape {tuple(z.shape)}")
        zero = z.new_zeros((), dtype=torch.float32)
        codes = F.normalize(z.float(), dim=-1) if self.use_l2_norm else z.float()
        return QuantizerOutput(codes, codes, None, zero, zero, zero)
