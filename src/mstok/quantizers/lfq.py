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

from mstok.quantizers.binary import SignQuantizer


class LookupFreeQuantizer(SignQuantizer):
    """Sign quantizer with V = 2^C codes in {-1, +1}^C (arguments: :class:`SignQuantizer`).

    The soft assignment ``softmax_c(-inverse_temperature * ||z - c||^2)`` gives bit d the logit
    ``4 * inverse_temperature * z_d``; MAGVIT-v2's defaults: inverse temperature 100, commitment 0.25.
    """

    name = "lfq"
    default_inverse_temperature = 100.0
    default_commitment_weight = 0.25

    @property
    def logit_scale(self) -> float:
        return 4.0 * self.inverse_temperature
