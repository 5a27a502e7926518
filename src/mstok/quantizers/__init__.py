"""Quantizers mapping continuous latents to discrete ids (or, for a VAE, to Gaussian latents).

Every quantizer keeps the :class:`Quantizer` contract (``base.py``); :func:`build_quantizer`
makes one from config data.
"""

from mstok.quantizers.base import Quantizer, QuantizerOutput, usage_statistics, usage_tensors
from mstok.quantizers.bsq import BinarySphericalQuantizer
from mstok.quantizers.fsq import FiniteScalarQuantizer
from mstok.quantizers.gaussian import DiagonalGaussianQuantizer, GaussianOutput
from mstok.quantizers.identity import IdentityQuantizer
from mstok.quantizers.kl import KLQuantizer
from mstok.quantizers.lfq import LookupFreeQuantizer
from mstok.quantizers.registry import build_quantizer
from mstok.quantizers.vq import VectorQuantizer

__all__ = [
    "BinarySphericalQuantizer",
    "DiagonalGaussianQuantizer",
    "FiniteScalarQuantizer",
    "GaussianOutput",
    "IdentityQuantizer",
    "KLQuantizer",
    "LookupFreeQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "build_quantizer",
    "usage_statistics",
    "usage_tensors",
]
