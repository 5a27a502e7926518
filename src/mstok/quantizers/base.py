"""The contract every quantizer keeps, and codebook-usage statistics that scale to 2^32 codes.

Glossary: B batch, K latent tokens, C code dim, V codebook size, N = B*K latent vectors.

A :class:`Quantizer` takes encoder latents (B, K, ``input_dim``) and returns a
:class:`QuantizerOutput`: codes (B, K, C) with straight-through gradients, int64 ids (B, K)
(``None`` for a continuous bottleneck), and named loss terms. Callers outside ``quantizers/``
use only this contract, never a quantizer's internals:

- ``forward(z) -> QuantizerOutput``; ``out.losses`` holds each term already multiplied by the
  weight its config gave it (``entropy_weight``, ``kl_weight``, ``commitment_weight``), and
  ``out.loss`` is their sum, so a training objective may add ``out.loss`` or weight the terms;
- ``indices_to_codes(ids) -> codes`` (raises for a quantizer without ids);
- ``codebook_size`` (``None`` without ids) and ``bits_per_token``;
- ``usage(ids)`` / ``usage_tensors(ids)``: usage statistics that never build a V-sized tensor
  when V > :data:`DENSE_USAGE_MAX`;
- ``step_hook(latents, ids, **settings)``: called by a trainer after each optimizer step
  (VQ revives dead codes there); a no-op by default, and ``uses_step_hook(**settings)`` says
  whether it does anything, so a trainer gathers the step's latents across ranks only then;
- ``frozen``: set by a trainer whose stage holds the quantizer fixed; a quantizer that updates
  itself in a training-mode forward (EMA codebook, k-means init) must not do so while frozen;
- ``stochastic``: True for a quantizer whose forward takes ``sample=`` (a Gaussian bottleneck:
  a draw in training mode, the mean in eval mode, unless ``sample`` says otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

# Above this many codes, usage statistics come from bit statistics or hashing, not per-code counts.
DENSE_USAGE_MAX = 2**20
# Buckets of the hashed usage estimate for huge codebooks whose size is not a power of two.
HASH_BUCKETS = 2**16
# Largest number of bits an id may have: int64 ids stay non-negative, with room for special tokens.
MAX_ID_BITS = 62


@dataclass
class QuantizerOutput:
    """What a quantizer returns.

    Attributes:
        latents: (B, K, C) float32 the inputs as quantized (L2-normalised / bounded where the
            quantizer does that; the Gaussian mean for KL).
        codes: (B, K, C) what the decoder gets, with straight-through gradients to the input.
        indices: (B, K) int64 code ids in [0, V), or None for a continuous bottleneck.
        loss: the sum of ``losses`` (scalar).
        commitment_loss: the weighted commitment term, zero when the quantizer has none (scalar).
        codebook_loss: the codebook term of VQ, zero for other quantizers (scalar).
        losses: every weighted loss term by name ("commitment", "codebook", "entropy", "kl", ...).
    """

    latents: torch.Tensor
    codes: torch.Tensor
    indices: torch.Tensor | None
    loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


def make_output(
    latents: torch.Tensor, codes: torch.Tensor, indices: torch.Tensor | None, losses: dict[str, torch.Tensor]
) -> QuantizerOutput:
    """A :class:`QuantizerOutput` whose ``loss`` is the sum of ``losses`` (zero when empty)."""
    zero = latents.new_zeros((), dtype=torch.float32)
    total = sum(losses.values(), zero)
    return QuantizerOutput(
        latents, codes, indices, total, losses.get("commitment", zero), losses.get("codebook", zero), losses
    )


class Quantizer(nn.Module):
    """Base class of the quantizers; subclasses set ``code_dim`` and ``codebook_size``.

    Attributes:
        code_dim: C, the channels of a code.
        codebook_size: V, or None for a continuous bottleneck (no ids).
    """

    code_dim: int
    codebook_size: int | None
    frozen: bool = False  # the training stage holds this quantizer fixed (no self-updates)
    stochastic: bool = False  # forward takes sample= (see the module docstring)

    @property
    def input_dim(self) -> int:
        """Channels the encoder must emit per token (2C for a Gaussian: mean and log-variance)."""
        return self.code_dim

    @property
    def has_ids(self) -> bool:
        """Whether forward returns integer ids."""
        return self.codebook_size is not None

    @property
    def bits_per_token(self) -> float | None:
        """log2(V), or None without ids."""
        return None if self.codebook_size is None else math.log2(self.codebook_size)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, K) int64 ids -> (B, K, C) float32 codes, equal to ``forward(...).codes``."""
        raise NotImplementedError(f"{type(self).__name__} has no ids to turn into codes")

    def uses_step_hook(self, **settings: float) -> bool:
        """Whether :meth:`step_hook` does anything under these settings (never, here)."""
        return False

    def step_hook(self, latents: torch.Tensor, indices: torch.Tensor | None, **settings: float) -> dict:
        """Called after an optimizer step with the step's (gathered) latents and ids; no-op here.

        Returns named 0-d tensors to log (empty here).
        """
        return {}

    @torch.no_grad()
    def usage_tensors(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Usage statistics of a batch of ids as 0-d tensors (no host sync); see :func:`usage_tensors`."""
        if self.codebook_size is None:
            raise ValueError(f"{type(self).__name__} is continuous: it has no ids, so no codebook usage")
        return usage_tensors(indices, self.codebook_size)

    @torch.no_grad()
    def usage(self, indices: torch.Tensor) -> dict[str, float | str]:
        """Usage statistics of a batch of ids as Python numbers; see :func:`usage_statistics`."""
        if self.codebook_size is None:
            raise ValueError(f"{type(self).__name__} is continuous: it has no ids, so no codebook usage")
        return usage_statistics(indices, self.codebook_size)


def _entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -torch.special.xlogy(probs, probs).sum(dim)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@torch.no_grad()
def usage_tensors(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Codebook usage of ids as 0-d float64 tensors, without waiting for the device.

    V <= :data:`DENSE_USAGE_MAX`: exact per-code counts: ``usage`` (fraction of codes used) and
    ``perplexity`` (exp of the entropy of the empirical code distribution).
    Larger V never gets a V-sized tensor. A power of two (bit ids, LFQ/BSQ): per-bit statistics:
    ``bit_usage`` (fraction of bits seen with both values) and ``perplexity_bits`` =
    exp(sum of per-bit entropies), the perplexity if the bits were independent (an upper bound on
    the true perplexity). Otherwise ids are hashed into :data:`HASH_BUCKETS` buckets and
    ``perplexity_hashed`` (a lower bound, collisions merge codes) is reported.
    """
    flat = indices.reshape(-1).long()
    if codebook_size <= DENSE_USAGE_MAX:
        counts = torch.zeros(codebook_size, device=flat.device, dtype=torch.float64)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        probs = counts / counts.sum().clamp_min(1)
        return {"usage": (counts > 0).double().mean(), "perplexity": _entropy(probs).exp()}
    if _is_power_of_two(codebook_size):
        bits = codebook_size.bit_length() - 1
        ones = ((flat[:, None] >> torch.arange(bits, device=flat.device)) & 1).double().mean(0)  # (bits,)
        both = (ones > 0) & (ones < 1)
        bit_entropy = _entropy(torch.stack([ones, 1 - ones], dim=-1)).sum()
        return {"bit_usage": both.double().mean(), "perplexity_bits": bit_entropy.exp()}
    # multiplicative (Fibonacci) hash: neighbouring ids land in different buckets
    hashed = (flat * 0x9E3779B1) % HASH_BUCKETS
    counts = torch.zeros(HASH_BUCKETS, device=flat.device, dtype=torch.float64)
    counts.index_add_(0, hashed, torch.ones_like(hashed, dtype=torch.float64))
    probs = counts / counts.sum().clamp_min(1)
    return {"perplexity_hashed": _entropy(probs).exp()}


@torch.no_grad()
def usage_statistics(indices: torch.Tensor, codebook_size: int) -> dict[str, float | str]:
    """:func:`usage_tensors` as floats, plus, for huge V, exact statistics of this batch.

    ``method`` says how they were computed: "counts" (exact per-code counts), "bits" or "hashed"
    (see :func:`usage_tensors`). For V > :data:`DENSE_USAGE_MAX` also ``distinct_ids`` and
    ``batch_perplexity``, exact for this batch from its distinct ids (N-sized, not V-sized), and
    ``usage`` = distinct ids / V (a lower bound on the usage over more data).
    """
    stats: dict[str, float | str] = {k: float(v) for k, v in usage_tensors(indices, codebook_size).items()}
    if codebook_size <= DENSE_USAGE_MAX:
        stats["method"] = "counts"
        return stats
    stats["method"] = "bits" if _is_power_of_two(codebook_size) else "hashed"
    _, counts = torch.unique(indices.reshape(-1), return_counts=True)
    probs = counts.double() / counts.sum()
    stats["distinct_ids"] = float(counts.numel())
    stats["batch_perplexity"] = float(_entropy(probs).exp())
    stats["usage"] = counts.numel() / codebook_size
    return stats


def check_ids(indices: torch.Tensor, codebook_size: int, name: str = "ids") -> None:
    """Raise a clear ValueError unless ``indices`` are integers in [0, codebook_size)."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(
            f"{name} must lie in [0, {codebook_size}), got values in [{int(indices.min())}, {int(indices.max())}]"
        )
