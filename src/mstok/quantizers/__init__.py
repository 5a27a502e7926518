"""Quantizers mapping continuous latents to discrete ids (or, for a VAE, to Gaussian latents)."""

from mstok.quantizers.gaussian import DiagonalGaussianQuantizer, GaussianOutput
from mstok.quantizers.identity import IdentityQuantizer
from mstok.quantizers.vq import QuantizerOutput, VectorQuantizer

__all__ = ["DiagonalGaussianQuantizer", "GaussianOutput", "IdentityQuantizer", "QuantizerOutput", "VectorQuantizer"]
