"""What LFQ and BSQ share: bit ids and the entropy objective over a codebook of 2^C sign patterns.

Glossary: N latent vectors, C bits (the code dim), G bits in a group.

Both quantizers give each latent a soft distribution over the 2^C codes that factorises over
the bits: bit d is +1 with probability ``sigmoid(a_d)``, where ``a`` is a scaled copy of the
latent (LFQ and BSQ differ only in the scale). Hence

- the per-sample entropy H(q(z)) is exactly the sum of C binary entropies (closed form, cheap
  at any C);
- the codebook entropy H(E[q(z)]) of the batch mean does not factorise (a mixture of
  factorised distributions is not factorised). For C <= ``exact_max_bits`` it is computed
  exactly over all 2^C codes (in chunks of latents so memory stays bounded); above, the bits
  are split into groups of at most ``group_bits`` and the entropies of the groups' marginals are
  summed: the approximation of BSQ-ViT (Zhao et al. 2024), an upper bound on the exact value,
  equal to it when the groups are independent under the batch mean.

The objective ``per_sample - diversity_gamma * codebook`` is smallest when each latent is
certain of its code and the batch uses all codes equally (Jansen et al. 2020, MAGVIT-v2).
Under DDP the batch mean is averaged over ranks, so every rank sees the global codebook entropy;
the per-sample term stays each rank's own mean, so the mean of the ranks' losses (what DDP's
gradient averaging optimises) equals the one-process loss on the whole batch.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist

from mstok.quantizers.base import MAX_ID_BITS, Quantizer, QuantizerOutput, check_ids, make_output

# Latents x codes per chunk when summing a group's 2^G code probabilities (bounds peak memory).
CHUNK_ELEMENTS = 2**22


def straight_through(quantized: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``quantized`` in value (exactly: ``x - sg[x]`` is 0), the identity's gradient to ``x``.

    Unlike ``x + sg[quantized - x]`` the value is bit-equal to ``quantized``, so
    ``indices_to_codes(ids) == codes`` holds exactly.
    """
    return quantized + (x - x.detach())


def bits_to_ids(bits: torch.Tensor) -> torch.Tensor:
    """(..., C) bool/0-1 bits -> (...) int64 ids, bit i weighted 2^i (SemTok eq. 3)."""
    weights = 2 ** torch.arange(bits.shape[-1], device=bits.device, dtype=torch.int64)
    return (bits.long() * weights).sum(-1)


def ids_to_bits(ids: torch.Tensor, num_bits: int) -> torch.Tensor:
    """(...) int64 ids -> (..., C) bool bits; inverse of :func:`bits_to_ids`."""
    shifts = torch.arange(num_bits, device=ids.device, dtype=torch.int64)
    return ((ids.long()[..., None] >> shifts) & 1).bool()


def binary_entropy_from_logits(a: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of a bit with P(+1) = sigmoid(a), elementwise; stable for large |a|."""
    p = torch.sigmoid(a)
    # H = -p log p - (1-p) log(1-p) = softplus(a) - p * a, with log-sigmoids instead of logs of ~0
    return torch.nn.functional.softplus(a) - p * a


def bit_groups(num_bits: int, exact_max_bits: int, group_bits: int) -> list[tuple[int, int]]:
    """Split bits [0, C) into (start, stop) groups: one group when C <= ``exact_max_bits``, else
    as few groups of at most ``group_bits`` as possible, as equal in size as possible."""
    if num_bits <= exact_max_bits:
        return [(0, num_bits)]
    n = math.ceil(num_bits / group_bits)
    edges = [round(i * num_bits / n) for i in range(n + 1)]
    return list(itertools.pairwise(edges))


def group_code_probs_sum(p: torch.Tensor) -> torch.Tensor:
    """(..., N, G) per-bit P(+1) -> (..., 2^G) the sum over N of each code's probability.

    Code c (bit i of c = bit i of the group) has probability prod_i p_i^{c_i} (1 - p_i)^{1 - c_i};
    built bit by bit as an outer product, over chunks of latents so memory is bounded (leading
    dimensions, e.g. token positions, count towards the chunk).
    """
    *lead, n, g = p.shape
    chunk = max(1, CHUNK_ELEMENTS // (math.prod(lead) << g))
    total = p.new_zeros(*lead, 2**g)
    for start in range(0, n, chunk):
        part = p[..., start : start + chunk, :]
        probs = part.new_ones(*part.shape[:-1], 1)
        for i in range(g):
            # new bit i is the most significant so far: codes [0, 2^i) have it 0, [2^i, 2^(i+1)) have it 1
            pi = part[..., i : i + 1]
            probs = torch.cat([probs * (1 - pi), probs * pi], dim=-1)
        total = total + probs.sum(-2)
    return total


def _global_mean(sums: torch.Tensor, count: int) -> torch.Tensor:
    """``sums / count`` averaged over DDP ranks when torch.distributed is initialised.

    The value is the global mean; the gradient flows to this rank's latents as if its batch were
    the global one (scale 1/local count), so DDP's averaging of gradients over ranks yields the
    gradient of the global entropy.
    """
    local = sums / count
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    packed = torch.cat([sums.detach().reshape(-1), sums.new_tensor([float(count)])])
    dist.all_reduce(packed)
    global_mean = (packed[:-1] / packed[-1]).reshape(sums.shape)
    return local + (global_mean - local).detach()


def _codebook_entropy(probs: torch.Tensor, exact_max_bits: int, group_bits: int) -> torch.Tensor:
    """(..., N, C) per-bit P(+1) of N latents -> (...) H(E[q(z)]) (nats), exact or summed over bit groups."""
    codebook = probs.new_zeros(probs.shape[:-2])
    for start, stop in bit_groups(probs.shape[-1], exact_max_bits, group_bits):
        mean = _global_mean(group_code_probs_sum(probs[..., start:stop]), probs.shape[-2])
        # clamped inside the log: an unused code (mean 0) would otherwise give 0 * -inf = nan gradients
        codebook = codebook - torch.special.xlogy(mean, mean.clamp_min(1e-30)).sum(-1)
    return codebook


def entropy_terms(
    logits: torch.Tensor, exact_max_bits: int = 16, group_bits: int = 9, per_position: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample and codebook entropies (nats) of factorised bit distributions.

    Args:
        logits: (..., C) float32; bit d of a latent is +1 with probability sigmoid(logits[..., d]).
        exact_max_bits: the codebook entropy is exact over all 2^C codes up to this many bits.
        group_bits: above that, bits are split into groups of at most this many (see module doc).
        per_position: for (B, K, C) logits, the codebook entropy is taken over the batch at each
            of the K token positions, then averaged: a 1D tokenizer's token k has its own learnt
            query, so the batch-wide entropy is met by K position-specific constant codes that
            carry nothing about the image; per position it needs the images to differ. Logits
            without a position axis, (N, C), are one position.

    Returns:
        (mean over latents of H(q(z)), H(E[q(z)]) exact or summed over groups), both scalars.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    per_sample = binary_entropy_from_logits(flat).sum(-1).mean()
    if not per_position or logits.dim() < 3:
        return per_sample, _codebook_entropy(torch.sigmoid(flat), exact_max_bits, group_bits)
    if logits.dim() != 3:
        raise ValueError(f"per-position entropy needs (B, K, C) logits, got shape {tuple(logits.shape)}")
    probs = torch.sigmoid(logits.float()).transpose(0, 1)  # (K, B, C): each position's own batch
    return per_sample, _codebook_entropy(probs, exact_max_bits, group_bits).mean()


def check_bits(name: str, code_dim: int, max_bits: int) -> None:
    """Clear errors for a bit count that cannot give int64 ids."""
    if isinstance(code_dim, bool) or not isinstance(code_dim, int) or code_dim < 1:
        raise ValueError(f"{name}: code_dim (the number of bits) must be a positive integer, got {code_dim!r}")
    if code_dim > max_bits:
        raise ValueError(
            f"{name}: code_dim={code_dim} bits gives ids beyond int64; at most {max_bits} bits are supported"
        )


class SignQuantizer(Quantizer):
    """The body LFQ and BSQ share: codes are ``sign(project(z)) / divisor``, ids their bits.

    A subclass says how latents are projected before the sign (:meth:`project`), the codes'
    divisor and the scale that turns a projected latent into per-bit logits; the rest (checks,
    straight-through codes, commitment and entropy terms, ids) is here once.

    Args:
        code_dim: C, the number of bits (at most 62).
        entropy_weight: weight of the entropy objective in ``losses["entropy"]`` (None: the
            subclass's default).
        diversity_gamma: weight of the codebook entropy inside the objective.
        inverse_temperature: sharpness of the soft code assignment (None: the subclass's default).
        commitment_weight: weight of ``mean((project(z) - sg[q])^2)``; 0 leaves the term out
            (None: the subclass's default).
        exact_max_bits: codebook entropy exact over all 2^C codes up to this many bits.
        group_bits: above ``exact_max_bits``, bits are grouped in groups of at most this many.
        entropy_per_position: the codebook entropy over the batch at each token position,
            averaged over positions, instead of over all latents at once (see :func:`entropy_terms`).
    """

    name: str = "sign"
    # A subclass's defaults for the settings LFQ and BSQ disagree on (each sets them all).
    default_commitment_weight: float
    default_entropy_weight: float

    def default_inverse_temperature(self, code_dim: int) -> float:
        """The inverse temperature when none is given (a subclass's choice)."""
        raise NotImplementedError

    def __init__(
        self,
        code_dim: int,
        entropy_weight: float | None = None,
        diversity_gamma: float = 1.0,
        inverse_temperature: float | None = None,
        commitment_weight: float | None = None,
        exact_max_bits: int = 16,
        group_bits: int = 9,
        entropy_per_position: bool = True,
    ) -> None:
        super().__init__()
        check_bits(self.name, code_dim, MAX_ID_BITS)
        self.code_dim = code_dim
        self.codebook_size = 2**code_dim
        self.entropy_weight = self.default_entropy_weight if entropy_weight is None else entropy_weight
        self.diversity_gamma = diversity_gamma
        self.inverse_temperature = (
            self.default_inverse_temperature(code_dim) if inverse_temperature is None else inverse_temperature
        )
        self.commitment_weight = self.default_commitment_weight if commitment_weight is None else commitment_weight
        self.exact_max_bits = exact_max_bits
        self.group_bits = group_bits
        self.entropy_per_position = entropy_per_position

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """(B, K, C) float32 latents -> what the sign is taken of (identity here)."""
        return z

    @property
    def divisor(self) -> float:
        """Every code entry is +-1 / divisor."""
        return 1.0

    @property
    def logit_scale(self) -> float:
        """Bit d of a projected latent u is +1 with probability ``sigmoid(logit_scale * u_d)``."""
        raise NotImplementedError

    def entropy_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, C) latents -> (per-sample entropy, codebook entropy), unweighted, in nats."""
        u = self.project(z.float())
        return entropy_terms(self.logit_scale * u, self.exact_max_bits, self.group_bits, self.entropy_per_position)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, K, C) -> codes (straight-through), int64 ids, losses; ``latents`` is ``project(z)``.

        The entropy term is computed in training mode only (a training signal, and at C = 16 an
        N x 2^16 sum); the commitment term, when weighted, always.
        """
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"{self.name}: expected latents with {self.code_dim} channels, got shape {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            u = self.project(z)
            positive = u > 0
            quantized = torch.where(positive, 1.0, -1.0) / self.divisor
            codes = straight_through(quantized, u)
            losses: dict[str, torch.Tensor] = {}
            if self.commitment_weight > 0:
                losses["commitment"] = self.commitment_weight * (u - quantized).square().mean()
            if self.training and self.entropy_weight > 0:
                per_sample, codebook = self.entropy_terms(z)
                losses["entropy"] = self.entropy_weight * (per_sample - self.diversity_gamma * codebook)
        return make_output(u, codes, bits_to_ids(positive), losses)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, K) int64 ids -> (B, K, C) float32 codes in {-1/divisor, +1/divisor}."""
        check_ids(indices, self.codebook_size, f"{self.name} ids")
        return torch.where(ids_to_bits(indices, self.code_dim), 1.0, -1.0) / self.divisor
