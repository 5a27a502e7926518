"""Binary spherical quantization (BSQ: Zhao et al. 2024, BSQ-ViT; SemTok eq. 3-4).

Glossary: B batch, K latent tokens, C code dim = the number of bits, V = 2^C codes.

The latent is projected onto the unit sphere, ``u = z / ||z||``, and quantized to the nearest
corner of the hypercube inscribed in it, ``q = sign(u) / sqrt(C)`` (straight-through), so codes
are unit vectors too and the quantization error is bounded. The id is
``sum_i [u_i > 0] 2^i`` (SemTok eq. 3). The entropy objective (SemTok eq. 4)
``E[H(q(u))] - H(E[q(u)])`` uses BSQ-ViT's soft quantization
``q(c | u) = prod_d sigmoid(2 * inverse_temperature * c_d * u_d)`` with ``c_d = +-1/sqrt(C)``,
so bit d is +1 with probability ``sigmoid(2 * inverse_temperature * u_d / sqrt(C))``: the
per-sample term is a closed-form sum of binary entropies and the codebook term is exact for
small C and summed over groups of bits for large C (:mod:`mstok.quantizers.binary`), which is
what makes C = 32 (a 2^32 codebook) trainable at all.

The loss is ``entropy_weight * (per_sample - diversity_gamma * codebook)`` plus an optional
``commitment_weight * mean((u - sg[q])^2)``. Written here because vector-quantize-pytorch's
``LFQ(spherical=True)`` computes the codebook entropy over all 2^C codes (an (N, 2^C) tensor,
impossible at C = 32) and has no grouped approximation; its soft assignment
``softmax(2 tau' u.c)`` is this one with ``tau' = inverse_temperature / 2`` (the tests check the
two agree at small C under that mapping).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mstok.quantizers.base import MAX_ID_BITS, Quantizer, QuantizerOutput, check_ids, make_output
from mstok.quantizers.binary import bits_to_ids, check_bits, entropy_terms, ids_to_bits, straight_through


class BinarySphericalQuantizer(Quantizer):
    """BSQ with V = 2^C codes in {-1/sqrt(C), +1/sqrt(C)}^C.

    Args:
        code_dim: C, the number of bits (at most 62).
        entropy_weight: weight of the entropy objective in ``losses["entropy"]``.
        diversity_gamma: weight of the codebook entropy inside the objective.
        inverse_temperature: sharpness of the soft quantization (BSQ-ViT's tau).
        commitment_weight: weight of ``mean((u - sg[q])^2)``; 0 (BSQ-ViT's default) leaves it out.
        exact_max_bits: codebook entropy exact over all 2^C codes up to this many bits.
        group_bits: above ``exact_max_bits``, bits are grouped in groups of at most this many.
    """

    def __init__(
        self,
        code_dim: int,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        inverse_temperature: float = 1.0,
        commitment_weight: float = 0.0,
        exact_max_bits: int = 16,
        group_bits: int = 9,
    ) -> None:
        super().__init__()
        check_bits("bsq", code_dim, MAX_ID_BITS)
        self.code_dim = code_dim
        self.codebook_size = 2**code_dim
        self.entropy_weight = entropy_weight
        self.diversity_gamma = diversity_gamma
        self.inverse_temperature = inverse_temperature
        self.commitment_weight = commitment_weight
        self.exact_max_bits = exact_max_bits
        self.group_bits = group_bits

    def entropy_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, C) raw latents -> (per-sample entropy, codebook entropy), unweighted, in nats."""
        u = F.normalize(z.float(), dim=-1)
        scale = 2.0 * self.inverse_temperature / math.sqrt(self.code_dim)
        return entropy_terms(scale * u, self.exact_max_bits, self.group_bits)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, K, C) -> unit-norm codes (straight-through), int64 ids, losses.

        ``latents`` of the output is the normalised ``u``. The entropy term is computed in
        training mode only; the commitment term (if weighted) always.
        """
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"bsq: expected latents with {self.code_dim} channels, got shape {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            u = F.normalize(z, dim=-1)
            positive = u > 0
            quantized = torch.where(positive, 1.0, -1.0) / math.sqrt(self.code_dim)
            codes = straight_through(quantized, u)
            losses: dict[str, torch.Tensor] = {}
            if self.commitment_weight > 0:
                losses["commitment"] = self.commitment_weight * (u - quantized).square().mean()
            if self.training and self.entropy_weight > 0:
                per_sample, codebook = self.entropy_terms(z)
                losses["entropy"] = self.entropy_weight * (per_sample - self.diversity_gamma * codebook)
        return make_output(u, codes, bits_to_ids(positive), losses)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, K) int64 ids -> (B, K, C) float32 codes in {-1/sqrt(C), +1/sqrt(C)}."""
        check_ids(indices, self.codebook_size, "bsq ids")
        return torch.where(ids_to_bits(indices, self.code_dim), 1.0, -1.0) / math.sqrt(self.code_dim)
