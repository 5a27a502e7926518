"""Lookup-free quantization (LFQ, MAGVIT-v2, Yu et al. 2023).

Glossary: B batch, K latent tokens, C code dim = the number of bits, V = 2^C codes.

Each channel is quantized to its sign, ``q = +1 if z > 0 else -1``, with a straight-through
gradient; the code is its own id, ``id = sum_i [q_i > 0] 2^i``. There is no codebook to learn,
so the only training signal besides reconstruction is the entropy objective (see
:mod:`mstok.quantizers.binary`): the soft assignment of a latent to code c is
``softmax_c(-inverse_temperature * ||z - c||^2)``, which factorises into per-bit probabilities
``sigmoid(4 * inverse_temperature * z_d)`` because every code has the same norm. The loss is
``entropy_weight * (per_sample - diversity_gamma * codebook)`` plus an optional commitment term
``commitment_weight * mean((z - sg[q])^2)``.

Written here rather than wrapping vector-quantize-pytorch's ``LFQ``: that class needs three
further packages (einx, loguru, torch-einops-utils), computes the codebook entropy over all 2^C
codes at once (an (N, 2^C) tensor: impossible at C = 32, 8 GiB at C = 18 for N = 8192), and
numbers bits most-significant-first. The tests use it as an oracle for small C, where its
definitions agree with these (its distance -2 z.c differs from ||z - c||^2 by a constant).
"""

from __future__ import annotations

import torch

from mstok.quantizers.base import MAX_ID_BITS, Quantizer, QuantizerOutput, check_ids, make_output
from mstok.quantizers.binary import bits_to_ids, check_bits, entropy_terms, ids_to_bits, straight_through


class LookupFreeQuantizer(Quantizer):
    """Sign quantizer with V = 2^C codes in {-1, +1}^C.

    Args:
        code_dim: C, the number of bits (at most 62).
        entropy_weight: weight of the entropy objective in ``losses["entropy"]``.
        diversity_gamma: weight of the codebook entropy inside the objective.
        inverse_temperature: sharpness of the soft code assignment.
        commitment_weight: weight of ``mean((z - sg[q])^2)``; 0 leaves the term out.
        exact_max_bits: codebook entropy exact over all 2^C codes up to this many bits.
        group_bits: above ``exact_max_bits``, bits are grouped in groups of at most this many.
    """

    def __init__(
        self,
        code_dim: int,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        inverse_temperature: float = 100.0,
        commitment_weight: float = 0.25,
        exact_max_bits: int = 16,
        group_bits: int = 9,
    ) -> None:
        super().__init__()
        check_bits("lfq", code_dim, MAX_ID_BITS)
        self.code_dim = code_dim
        self.codebook_size = 2**code_dim
        self.entropy_weight = entropy_weight
        self.diversity_gamma = diversity_gamma
        self.inverse_temperature = inverse_temperature
        self.commitment_weight = commitment_weight
        self.exact_max_bits = exact_max_bits
        self.group_bits = group_bits

    def entropy_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, C) latents -> (per-sample entropy, codebook entropy), unweighted, in nats."""
        return entropy_terms(4.0 * self.inverse_temperature * z.float(), self.exact_max_bits, self.group_bits)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, K, C) -> codes in {-1, +1} (straight-through), int64 ids, losses.

        The entropy term is computed in training mode only (it is a training signal, and at
        C = 16 costs an N x 2^16 sum); the commitment term always.
        """
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"lfq: expected latents with {self.code_dim} channels, got shape {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            positive = z > 0
            quantized = torch.where(positive, 1.0, -1.0)
            codes = straight_through(quantized, z)
            losses: dict[str, torch.Tensor] = {}
            if self.commitment_weight > 0:
                losses["commitment"] = self.commitment_weight * (z - quantized).square().mean()
            if self.training and self.entropy_weight > 0:
                per_sample, codebook = self.entropy_terms(z)
                losses["entropy"] = self.entropy_weight * (per_sample - self.diversity_gamma * codebook)
        return make_output(z, codes, bits_to_ids(positive), losses)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, K) int64 ids -> (B, K, C) float32 codes in {-1, +1}."""
        check_ids(indices, self.codebook_size, "lfq ids")
        return torch.where(ids_to_bits(indices, self.code_dim), 1.0, -1.0)
