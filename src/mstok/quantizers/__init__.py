"""Quantizers mapping continuous latents to discrete ids."""

from mstok.quantizers.vq import QuantizerOutput, VectorQuantizer

__all__ = ["QuantizerOutput", "VectorQuantizer"]
