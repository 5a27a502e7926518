"""Diagonal Gaussian latents: the continuous ("VAE") alternative to vector quantization.

Glossary: B batch, K latent tokens, C code dim.

The encoder emits 2C numbers per token: the first C are the mean, the last C the log-variance
of an independent Gaussian per channel. Decoding takes either the mean (deterministic, what
:meth:`mstok.TiTok.encode` returns by default) or a sample ``mean + std * eps`` (what training
feeds the decoder). The KL divergence to a unit Gaussian regularises the latent space; it is
summed over the K x C latent numbers of an image and averaged over the batch, the scale the
official TiTok VAE releases were trained with (there ``kl_weight`` is 1e-6).

The log-variance is clamped to [-30, 20] before use, so a wild encoder output can neither
overflow ``exp`` nor make the KL infinite; the released TiTok VAE checkpoints were trained
with the same clamp, so reproducing their outputs needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class GaussianOutput:
    """What :class:`DiagonalGaussianQuantizer` returns.

    Attributes:
        mean: (B, K, C) float32 means.
        logvar: (B, K, C) float32 clamped log-variances.
        latents: (B, K, C) what the decoder gets: a sample, or the mean when not sampling.
        kl: KL(q || N(0, I)) summed over K and C, averaged over B (scalar).
    """

    mean: torch.Tensor
    logvar: torch.Tensor
    latents: torch.Tensor
    kl: torch.Tensor


class DiagonalGaussianQuantizer(nn.Module):
    """Splits encoder outputs (B, K, 2C) into a diagonal Gaussian per token; no parameters.

    Args:
        code_dim: C, the dimension of each latent token (the encoder emits 2C).
    """

    def __init__(self, code_dim: int) -> None:
        super().__init__()
        self.code_dim = code_dim

    def forward(self, z: torch.Tensor, sample: bool = True) -> GaussianOutput:
        """z: (B, K, 2C) encoder outputs -> :class:`GaussianOutput`.

        ``sample=True`` draws ``mean + std * eps`` (reparameterised, so gradients reach the
        encoder); ``sample=False`` passes the mean through.
        """
        if z.shape[-1] != 2 * self.code_dim:
            raise ValueError(f"expected (B, K, {2 * self.code_dim}) mean and log-variance, got {tuple(z.shape)}")
        # float32 like the VQ search: exp() of a bf16 log-variance loses most of its precision
        with torch.autocast(device_type=z.device.type, enabled=False):
            mean, logvar = z.float().chunk(2, dim=-1)  # (B, K, C) each
            logvar = logvar.clamp(*LOGVAR_RANGE)
            latents = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
            kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2)).mean()
        return GaussianOutput(mean=mean, logvar=logvar, latents=latents, kl=kl)
