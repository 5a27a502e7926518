"""A plain convolutional autoencoder: the calibration every tokenizer result is read against.

Not one of the papers' systems. A transformer tokenizer's PSNR means little alone: on a
CPU budget, is 15 dB good? This model answers by being the simplest thing that could work
with the same bottleneck: stride-2 convs down to a (g x g) grid of C-channel codes, and
nearest-neighbour upsampling + convs back. The g*g grid cells are its K "tokens", so it
plugs into the same quantizer, trainer, evaluation and demo as TiTok and MsTok. At
64 px with ``patch_size=8`` (three stride-2 stages) the grid is 8 x 8:

* ``quantizer="none"``, C = 6: 384 floats, the size of a K=32, C=12 continuous 1D bottleneck;
* ``quantizer="vq"``, V = 32: 64 x 5 = 320 bits, the budget of K=32 tokens from V=1024.

The 1D papers claim a 1D tokenizer spends its bits better than a 2D grid; at equal bits,
this is the 2D grid to beat.

Glossary: B batch, K = g*g grid cells, C code dim, c channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import nn

from mstok.tokenizers.base import Tokenizer, TokenizerConfig


@dataclass
class ConvAEConfig(TokenizerConfig):
    """The conv autoencoder's settings, in :class:`TokenizerConfig`'s fields.

    ``patch_size`` is the downsampling factor (a power of two: one stride-2 conv each),
    ``width`` the channels of the first stage (later stages use twice as many), and
    ``num_latent_tokens`` must equal the grid's cell count ``(image_size / patch_size)^2``.
    ``depth``, ``num_heads`` and ``mlp_ratio`` are unused; the transformer-only switches
    (``position_embedding``, ``qk_norm``, ``pixel_head``) must keep their defaults.
    """

    family: ClassVar[str] = "convae"
    no_nested_reason: ClassVar[str] = "a conv autoencoder's tokens are a 2D grid, not a coarse-to-fine sequence"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size & (self.patch_size - 1) or self.patch_size < 2:
            raise ValueError(
                f"convae: patch_size is the downsampling factor, a power of two >= 2; got {self.patch_size}"
            )
        if self.num_latent_tokens != self.num_patches:
            raise ValueError(
                f"convae: num_latent_tokens must be the grid's cell count {self.num_patches} "
                f"({self.grid_size}x{self.grid_size}), got {self.num_latent_tokens}"
            )
        if self.head != "pixels" or self.pixel_decoder:
            raise ValueError("convae decodes to pixels only (head='pixels', no pixel_decoder)")
        for name, default in self.optional_defaults.items():
            if name != "quantizer" and getattr(self, name) != default:
                raise ValueError(f"convae has no transformer: {name} must stay {default!r}")

    @property
    def stages(self) -> int:
        """Stride-2 stages (log2 of the downsampling factor)."""
        return int(math.log2(self.patch_size))


class ConvEncoder(nn.Module):
    """(B, 3, H, W) -> latents (B, K, C): stride-2 4x4 convs, then a 3x3 conv to C channels."""

    def __init__(self, cfg: ConvAEConfig) -> None:
        super().__init__()
        c = cfg.width
        layers: list[nn.Module] = []
        channels = 3
        for stage in range(cfg.stages):
            out = c if stage == 0 else 2 * c
            layers += [nn.Conv2d(channels, out, kernel_size=4, stride=2, padding=1), nn.GELU()]
            channels = out
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, cfg.code_dim, kernel_size=3, padding=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last feature map as tokens (B, K, 2c)."""
        return rearrange(self.body(images), "b c h w -> b (h w) c")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(self.body(images)), "b c h w -> b (h w) c")  # (B, K, C)


class ConvDecoder(nn.Module):
    """Codes (B, K, C) -> pixels (B, 3, H, W): a 3x3 conv, then (upsample x2, 3x3 conv) per stage."""

    def __init__(self, cfg: ConvAEConfig) -> None:
        super().__init__()
        c = cfg.width
        self.grid_size = cfg.grid_size
        self.embed = nn.Conv2d(cfg.code_dim, 2 * c, kernel_size=3, padding=1)
        layers: list[nn.Module] = []
        channels = 2 * c
        for stage in reversed(range(cfg.stages)):
            out = 3 if stage == 0 else (c if stage == 1 else 2 * c)
            layers += [nn.GELU(), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, out, 3, padding=1)]
            channels = out
        self.body = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        grid = rearrange(codes, "b (h w) c -> b c h w", h=self.grid_size)  # (B, C, g, g)
        return self.body(self.embed(grid))


class ConvAE(Tokenizer):
    """The conv autoencoder calibration (module docstring)."""

    config_class = ConvAEConfig

    def build(self, config: TokenizerConfig) -> tuple[nn.Module, nn.Module]:
        return ConvEncoder(config), ConvDecoder(config)
