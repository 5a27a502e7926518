"""The pixel decoder of a two-stage tokenizer: proxy-code logits -> pixels.

A two-stage TiTok/MsTok decoder predicts, for each of the P cells of a 2D grid, logits over
the V codes of a frozen MaskGIT-VQGAN (the proxy). To get pixels, the softmax of those
logits mixes the proxy's codebook into one code vector per cell, and the proxy's conv
decoder turns the grid into an image, exactly as the TiTok authors decode (TiTok 3.3).
Stage 2 fine-tunes this path, so it lives inside the tokenizer and is saved with it.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from mstok.tokenizers.vqgan import MaskGITVQGAN, VQGANConfig, VQGANDecoder


class ProxyPixelDecoder(nn.Module):
    """Proxy codebook (V, C) + MaskGIT-VQGAN conv decoder.

    Args:
        config: the proxy tokenizer's config (its codebook size, code dim and decoder).
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.codebook = nn.Parameter(torch.empty(config.codebook_size, config.z_channels))  # (V, C)
        self.decoder = VQGANDecoder(config)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ProxyPixelDecoder:
        return cls(VQGANConfig.from_dict(values))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """Proxy-code logits (B, P, V) -> unclamped images (B, 3, H, W), differentiably."""
        probs = logits.float().softmax(-1)
        codes = probs.to(self.codebook.dtype) @ self.codebook  # (B, P, C)
        grid = rearrange(codes, "b (h w) c -> b c h w", h=self.config.grid_size)
        return self.decoder(grid)

    @torch.no_grad()
    def load_from_vqgan(self, vqgan: MaskGITVQGAN) -> None:
        """Copy the codebook and decoder weights of a proxy tokenizer with the same config."""
        if vqgan.config.to_dict() != self.config.to_dict():
            raise ValueError(
                f"the proxy tokenizer's config {vqgan.config.to_dict()} differs from this pixel decoder's "
                f"{self.config.to_dict()}"
            )
        self.codebook.copy_(vqgan.quantizer.embedding.weight)
        self.decoder.load_state_dict(vqgan.decoder.state_dict())


def check_pixel_decoder_fits(
    values: dict[str, Any], image_size: int, grid_size: int, proxy_codebook_size: int, head: str
) -> None:
    """Validate a tokenizer's ``pixel_decoder`` config against the tokenizer's own fields."""
    if head != "proxy_codes":
        raise ValueError("pixel_decoder is only for head='proxy_codes' (a pixels head decodes directly)")
    config = VQGANConfig.from_dict(values)
    if config.image_size != image_size or config.grid_size != grid_size:
        raise ValueError(
            f"pixel_decoder decodes {config.grid_size}x{config.grid_size} grids to {config.image_size}px but the "
            f"tokenizer has a {grid_size}x{grid_size} patch grid at {image_size}px"
        )
    if config.codebook_size != proxy_codebook_size:
        raise ValueError(
            f"pixel_decoder has {config.codebook_size} codes but proxy_codebook_size is {proxy_codebook_size}"
        )
