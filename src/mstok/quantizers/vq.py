"""Vector quantizer with a straight-through estimator.

Glossary: B batch, K latent tokens, C code dim, V codebook size.

Losses follow VQ-VAE: ``codebook = mean((sg[z] - q)^2)`` moves codes towards encoder
outputs, ``commitment = beta * mean((z - sg[q])^2)`` keeps the encoder near its codes. With
``use_l2_norm`` both inputs and codes are projected to the unit sphere first (as TiTok
does), which makes nearest-neighbour search a cosine-similarity search and keeps the
codebook from collapsing into a few large-norm codes. Everything is computed in float32,
even under autocast: distances between nearly equal unit vectors lose the argmin in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """What the quantizer returns.

    Attributes:
        latents: (B, K, C) the float32 inputs as searched (L2-normalised when enabled).
        codes: (B, K, C) quantized vectors with straight-through gradients to the input.
        indices: (B, K) long code ids in [0, V), or None for a continuous bottleneck.
        loss: commitment + codebook loss (scalar).
        commitment_loss: beta * ||z - sg[q]||^2 (scalar).
        codebook_loss: ||sg[z] - q||^2 (scalar).
    """

    latents: torch.Tensor
    codes: torch.Tensor
    indices: torch.Tensor | None
    loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer.

    Args:
        codebook_size: number of codes V.
        code_dim: dimension C of each code.
        use_l2_norm: L2-normalise inputs and codes before the search.
        commitment_weight: beta, the weight of the commitment term.
    """

    def __init__(
        self, codebook_size: int, code_dim: int, use_l2_norm: bool = True, commitment_weight: float = 0.25
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.use_l2_norm = use_l2_norm
        self.commitment_weight = commitment_weight
        self.embedding = nn.Embedding(codebook_size, code_dim)
        # Running (EMA) count of how often each code is picked; drives dead-code revival.
        self.register_buffer("usage_ema", torch.zeros(codebook_size))

    def _codebook(self) -> torch.Tensor:
        weight = self.embedding.weight.float()  # (V, C)
        return F.normalize(weight, dim=-1) if self.use_l2_norm else weight

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, K, C) encoder outputs -> :class:`QuantizerOutput`."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.use_l2_norm:
                z = F.normalize(z, dim=-1)
            codebook = self._codebook()
            flat = z.reshape(-1, self.code_dim)  # (B*K, C)
            # ||z||^2 - 2 z.e + ||e||^2; the ||z||^2 term does not change the argmin.
            distances = codebook.square().sum(dim=1) - 2.0 * flat @ codebook.t()  # (B*K, V)
            indices = distances.argmin(dim=1).view(z.shape[:-1])  # (B, K)
            quantized = F.embedding(indices, codebook)  # (B, K, C)
            commitment = self.commitment_weight * F.mse_loss(z, quantized.detach())
            codebook_loss = F.mse_loss(quantized, z.detach())
            codes = z + (quantized - z).detach()  # straight-through estimator
        return QuantizerOutput(z, codes, indices, commitment + codebook_loss, commitment, codebook_loss)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, K) long ids -> (B, K, C) float32 codes (normalised when ``use_l2_norm``)."""
        return F.embedding(indices, self._codebook())

    def _counts(self, indices: torch.Tensor) -> torch.Tensor:
        """Per-code counts (V,) of ``indices``; unlike ``bincount`` the output size is fixed, so
        CUDA never has to read the largest id back to the host."""
        flat = indices.reshape(-1)
        return torch.zeros(self.codebook_size, device=flat.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float)
        )

    @torch.no_grad()
    def revive_dead_codes(
        self, latents: torch.Tensor, indices: torch.Tensor, decay: float = 0.9, threshold: float = 0.01
    ) -> torch.Tensor:
        """Re-seed codes that have fallen out of use with encoder outputs of this batch.

        A code nobody picks gets no gradient and stays dead; early in training most codes
        are far from the small cloud of encoder outputs and the whole image collapses onto
        a handful of codes. Moving dead codes onto randomly chosen current latents puts
        the codebook where the data is; since the counts start at zero, the first call seeds
        the whole codebook from real latents (a data-dependent initialisation). Called by
        the trainer after each step.

        Args:
            latents: (B, K, C) the quantizer's searched inputs (``QuantizerOutput.latents``).
            indices: (B, K) the ids chosen for them.
            decay: EMA decay of the per-code usage counts.
            threshold: a code is dead when its EMA count falls below ``threshold`` times the
                average count per code (B*K/V).

        Returns:
            the number of codes revived, as a 0-d tensor (reading it waits for the device).
        """
        # Written without data-dependent shapes (no nonzero / boolean indexing) so that a
        # training step never waits for the device; the random draw is the same size every
        # call, which keeps the RNG stream and hence resumed runs reproducible.
        counts = self._counts(indices).to(self.usage_ema)
        self.usage_ema.mul_(decay).add_(counts, alpha=1.0 - decay)
        dead = self.usage_ema < threshold * counts.mean()  # (V,)
        flat = latents.reshape(-1, self.code_dim).float()
        pick = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        weight = self.embedding.weight
        weight.data.copy_(torch.where(dead[:, None], flat[pick].to(weight.dtype), weight.data))
        # a revived code gets one batch-average's worth of usage as a grace period
        self.usage_ema.copy_(torch.where(dead, counts.mean(), self.usage_ema))
        return dead.sum()

    @torch.no_grad()
    def usage_tensors(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`usage_statistics` as 0-d tensors, for callers that must not wait for the device."""
        counts = self._counts(indices).double()
        probs = counts / counts.sum().clamp_min(1)
        entropy = -torch.special.xlogy(probs, probs).sum()
        return {"usage": (counts > 0).double().mean(), "perplexity": entropy.exp()}

    @torch.no_grad()
    def usage_statistics(self, indices: torch.Tensor) -> dict[str, float]:
        """Codebook usage of a batch of ids: fraction of codes used and perplexity.

        Perplexity is ``exp(entropy)`` of the empirical code distribution: V when all codes
        are used equally, 1 when a single code is used.
        """
        return {name: float(value) for name, value in self.usage_tensors(indices).items()}
