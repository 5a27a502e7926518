"""Vector quantizer with a straight-through estimator.

Glossary: B batch, K latent tokens, C code dim, V codebook size.

Losses follow VQ-VAE: ``codebook = mean((sg[z] - q)^2)`` moves codes towards encoder
outputs, ``commitment = beta * mean((z - sg[q])^2)`` keeps the encoder near its codes. With
``use_l2_norm`` both inputs and codes are projected to the unit sphere first (as TiTok
does), which makes nearest-neighbour search a cosine-similarity search and keeps the
codebook from collapsing into a few large-norm codes. Everything is computed in float32,
even under autocast: distances between nearly equal unit vectors lose the argmin in bf16.

Two opt-in options (off by default; the default path and its state_dict are unchanged):
``ema=True`` learns the codebook by exponential moving averages of the latents assigned to each
code (VQ-VAE appendix; Razavi et al. 2019) instead of by gradients: per-code counts N and sums m
decay by ``ema_decay``, counts are Laplace-smoothed, ``(N + eps) / (n + V eps) * n`` with
``n = sum N``, so a code without latents is never divided by zero, and a code is ``m / N``; the
codebook loss is then left out. ``kmeans_init=True`` replaces the random codebook, on the first
training batch, by ``kmeans_iters`` rounds of k-means over that batch's latents (spherical
k-means with ``use_l2_norm``). Under DDP the EMA statistics are summed over ranks and the
k-means result is broadcast from rank 0, so every rank keeps the same codebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mstok.quantizers.base import Quantizer, QuantizerOutput

__all__ = ["QuantizerOutput", "VectorQuantizer"]  # QuantizerOutput lived here; kept importable


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(Quantizer):
    """Nearest-neighbour vector quantizer.

    Args:
        codebook_size: number of codes V.
        code_dim: dimension C of each code.
        use_l2_norm: L2-normalise inputs and codes before the search.
        commitment_weight: beta, the weight of the commitment term.
        ema: learn the codebook by EMA updates instead of gradients (see the module docstring).
        ema_decay: decay of the EMA counts and sums, in (0, 1).
        ema_eps: Laplace smoothing of the EMA counts, > 0.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: k-means rounds of that initialisation.
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        use_l2_norm: bool = True,
        commitment_weight: float = 0.25,
        ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.use_l2_norm = use_l2_norm
        self.commitment_weight = commitment_weight
        self.embedding = nn.Embedding(codebook_size, code_dim)
        # Running (EMA) count of how often each code is picked; drives dead-code revival.
        self.register_buffer("usage_ema", torch.zeros(codebook_size))
        self.ema, self.ema_decay, self.ema_eps = ema, ema_decay, ema_eps
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        # option buffers exist only when the option is on: default state_dicts keep their keys
        if ema:
            self.embedding.weight.requires_grad_(False)  # learnt by EMA, not by the optimizer
            self.embedding.weight.updated_by_hook = True  # stages must not hand it to the optimizer
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if kmeans_init:
            self.register_buffer("kmeans_done", torch.tensor(False))

    def _codebook(self) -> torch.Tensor:
        weight = self.embedding.weight.float()  # (V, C)
        return F.normalize(weight, dim=-1) if self.use_l2_norm else weight

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, K, C) encoder outputs -> :class:`QuantizerOutput`.

        ``losses`` has "commitment" and "codebook" (the latter left out with ``ema``); with
        ``ema`` a training-mode call also updates the codebook from this batch.
        """
        if self.ema or self.kmeans_init:
            return self._forward_options(z)
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
        losses = {"commitment": commitment, "codebook": codebook_loss}
        return QuantizerOutput(z, codes, indices, commitment + codebook_loss, commitment, codebook_loss, losses)

    def _forward_options(self, z: torch.Tensor) -> QuantizerOutput:
        """forward with ``ema`` and/or ``kmeans_init``: k-means first, then search, then EMA."""
        # a copy of the search above rather than a shared helper: the default path stays verbatim,
        # so its outputs are bit-identical to releases before the options existed (tested)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.use_l2_norm:
                z = F.normalize(z, dim=-1)
            flat = z.reshape(-1, self.code_dim)
            updating = self.training and not self.frozen
            if self.kmeans_init and updating and not bool(self.kmeans_done):
                self._kmeans(flat.detach())
            codebook = self._codebook()
            distances = codebook.square().sum(dim=1) - 2.0 * flat @ codebook.t()  # (N, V)
            indices = distances.argmin(dim=1).view(z.shape[:-1])
            quantized = F.embedding(indices, codebook)
            losses = {"commitment": self.commitment_weight * F.mse_loss(z, quantized.detach())}
            if self.ema:
                if updating:
                    self._ema_update(flat.detach(), indices.reshape(-1))
            else:
                losses["codebook"] = F.mse_loss(quantized, z.detach())
            codes = z + (quantized - z).detach()
        zero = z.new_zeros(())
        total = sum(losses.values(), zero)
        return QuantizerOutput(z, codes, indices, total, losses["commitment"], losses.get("codebook", zero), losses)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step of counts and sums from this batch (summed over DDP ranks)."""
        counts = self._counts(indices)  # (V,)
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat)  # (V, C)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
        self._ema_write_codebook()

    @torch.no_grad()
    def _ema_write_codebook(self) -> None:
        n = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
        self.embedding.weight.copy_(self.ema_embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _kmeans(self, flat: torch.Tensor) -> None:
        """Codebook := k-means centres of ``flat`` (N, C); seeds drawn with replacement if N < V."""
        centres = flat[torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)]
        for _ in range(self.kmeans_iters):
            assign = (centres.square().sum(1) - 2.0 * flat @ centres.t()).argmin(dim=1)
            counts = self._counts(assign)
            sums = torch.zeros_like(centres).index_add_(0, assign, flat)
            means = sums / counts.clamp_min(1)[:, None]
            if self.use_l2_norm:
                means = F.normalize(means, dim=-1)
            centres = torch.where(counts[:, None] > 0, means, centres)  # an empty cluster keeps its seed
        if _distributed():
            dist.broadcast(centres, src=0)
        self.embedding.weight.copy_(centres.to(self.embedding.weight.dtype))
        if self.ema:
            self.ema_cluster_size.fill_(1.0)
            self.ema_embed_sum.copy_(centres)
        self.kmeans_done.fill_(True)

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
        return self._revive(latents, indices, decay, threshold).sum()

    @torch.no_grad()
    def _revive(self, latents: torch.Tensor, indices: torch.Tensor, decay: float, threshold: float) -> torch.Tensor:
        """:meth:`revive_dead_codes`, returning the (V,) mask of revived codes."""
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
        return dead

    def uses_step_hook(self, dead_code_threshold: float = 0.0, **settings: float) -> bool:
        """True when dead codes are revived (``dead_code_threshold > 0``)."""
        return dead_code_threshold > 0

    @torch.no_grad()
    def step_hook(
        self, latents: torch.Tensor, indices: torch.Tensor | None, dead_code_threshold: float = 0.0, **settings: float
    ) -> dict[str, torch.Tensor]:
        """After an optimizer step: revive dead codes when ``dead_code_threshold > 0``.

        ``latents``/``indices``: the step's (gathered over ranks) ``QuantizerOutput`` fields. With
        ``ema`` a revived code's EMA sum restarts at its new vector (count 1), so the next EMA
        step does not pull it back. Returns {"revived_codes": float 0-d tensor} when reviving.
        """
        if dead_code_threshold <= 0 or indices is None:
            return {}
        dead = self._revive(latents, indices, decay=settings.get("decay", 0.9), threshold=dead_code_threshold)
        if self.ema:
            self.ema_cluster_size.copy_(torch.where(dead, 1.0, self.ema_cluster_size))
            self.ema_embed_sum.copy_(torch.where(dead[:, None], self.embedding.weight, self.ema_embed_sum))
        return {"revived_codes": dead.sum().float()}

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
