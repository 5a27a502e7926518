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

from mstok.quantizers.binary import SignQuantizer


class BinarySphericalQuantizer(SignQuantizer):
    """BSQ with V = 2^C codes in {-1/sqrt(C), +1/sqrt(C)}^C (arguments: :class:`SignQuantizer`).

    ``latents`` of the output is the normalised ``u``; bit d has the logit
    ``2 * inverse_temperature * u_d / sqrt(C)``. A typical ``|u_d|`` is ``1 / sqrt(C)``, so the
    default inverse temperature C gives a typical bit the logit 2 at every C, where the entropy
    terms have gradients (BSQ-ViT's 1 gives 2 / C: at C = 10 every bit is nearly a fair coin
    whatever u, and the entropy objective is flat: measured in benchmarks/RESULTS.md, "Binary
    quantizers that keep their codes: diagnosis"). No commitment term (BSQ-ViT's choice); the
    codebook entropy per token position (:func:`~mstok.quantizers.binary.entropy_terms`). Entropy weight
    0.005: at logit 2 the entropy term is 40x larger than at BSQ-ViT's temperature, and
    BSQ-ViT's weight 0.1 then rivals the reconstruction loss all through training (-0.21 against
    0.18 at step 300), which costs 0.9 dB at 2000 steps (benchmarks/RESULTS.md, "Quantizers at equal
    bits"; the runs: benchmarks/history/quantizers.md, "The bit quantizers' entropy weight").
    BSQ-ViT's settings: ``entropy_weight=0.1, inverse_temperature=1, entropy_per_position=False``.
    """

    name = "bsq"
    default_commitment_weight = 0.0
    default_entropy_weight = 0.005

    def default_inverse_temperature(self, code_dim: int) -> float:
        return float(code_dim)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Onto the unit sphere: u = z / ||z||."""
        return F.normalize(z, dim=-1)

    @property
    def divisor(self) -> float:
        return math.sqrt(self.code_dim)

    @property
    def logit_scale(self) -> float:
        return 2.0 * self.inverse_temperature / math.sqrt(self.code_dim)
