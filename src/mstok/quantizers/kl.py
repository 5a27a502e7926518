"""KL bottleneck: diagonal Gaussian latents behind the :class:`Quantizer` contract (no ids).

Glossary: B batch, K latent tokens, C code dim.

The encoder emits 2C channels per token (``input_dim``): a mean and a log-variance (clamped as
in :mod:`mstok.quantizers.gaussian`, whose arithmetic this reuses). In training mode the codes
are a reparameterised sample ``mean + exp(logvar / 2) * eps`` (gradients reach both halves); in
eval mode they are the mean, so encoding is deterministic. ``losses["kl"]`` is
``kl_weight * KL(q || N(0, I))``, the KL summed over K and C and averaged over B (the scale the
official TiTok VAE used with ``kl_weight = 1e-6``). There are no ids: ``indices`` is None,
``codebook_size`` is None, and ``indices_to_codes`` / usage statistics raise a clear error.
"""

from __future__ import annotations

import torch

from mstok.quantizers.base import Quantizer, QuantizerOutput, make_output
from mstok.quantizers.gaussian import DiagonalGaussianQuantizer


class KLQuantizer(Quantizer):
    """Diagonal Gaussian bottleneck with a weighted KL term; continuous codes, no ids.

    Args:
        code_dim: C; the encoder emits 2C (mean and log-variance).
        kl_weight: weight of the KL term in ``losses["kl"]``.
    """

    stochastic = True  # forward takes sample=

    def __init__(self, code_dim: int, kl_weight: float = 1e-6) -> None:
        super().__init__()
        if isinstance(code_dim, bool) or not isinstance(code_dim, int) or code_dim < 1:
            raise ValueError(f"kl: code_dim must be a positive integer, got {code_dim!r}")
        self.code_dim = code_dim
        self.codebook_size = None
        self.kl_weight = kl_weight
        self.gaussian = DiagonalGaussianQuantizer(code_dim)  # no parameters: state_dict stays empty

    @property
    def input_dim(self) -> int:
        """2C: the mean and the log-variance."""
        return 2 * self.code_dim

    def forward(self, z: torch.Tensor, sample: bool | None = None) -> QuantizerOutput:
        """z: (B, K, 2C) -> codes (B, K, C), ``indices=None``, ``losses={"kl": ...}``.

        ``sample`` overrides the mode's choice (sample in training, mean in eval). ``latents``
        of the output is the mean.
        """
        if z.shape[-1] != self.input_dim:
            raise ValueError(
                f"kl: expected (B, K, {self.input_dim}) mean and log-variance for code_dim={self.code_dim}, "
                f"got shape {tuple(z.shape)}"
            )
        out = self.gaussian(z, sample=self.training if sample is None else sample)
        return make_output(out.mean, out.latents, None, {"kl": self.kl_weight * out.kl})
