"""Patch embedding and the output heads that turn P patch tokens back into an image.

Glossary: B batch, P patches (= grid * grid), D width, p patch size.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding: (B, 3, H, W) -> (B, P, D)."""

    def __init__(self, patch_size: int, dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(images), "b d h w -> b (h w) d")


class PatchTokens(nn.Module):
    """Patch embedding + an optional class token + learned positional embeddings.

    (B, 3, H, W) -> (B, 1 + P, D) with the class token first, or (B, P, D) without it.
    """

    def __init__(self, image_size: int, patch_size: int, dim: int, class_token: bool = True) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.class_token = nn.Parameter(torch.empty(1, dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.empty(num_patches + int(class_token), dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, P, D)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1+P, D)
        return x + self.pos_embed


class PixelHead(nn.Module):
    """Patch tokens to pixels: linear to p*p*3 per patch, unpatchify, then a 3x3 conv.

    The 3x3 conv lets neighbouring patches exchange a little information, softening the
    patch seams a purely per-patch projection leaves.
    """

    def __init__(self, dim: int, patch_size: int, grid_size: int, channels: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = grid_size
        self.proj = nn.Linear(dim, patch_size * patch_size * channels)
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, P, D) -> (B, 3, H, W)"""
        patches = self.proj(x)  # (B, P, p*p*3)
        image = rearrange(
            patches,
            "b (gh gw) (ph pw c) -> b c (gh ph) (gw pw)",
            gh=self.grid_size,
            ph=self.patch_size,
            pw=self.patch_size,
        )
        return self.conv(image)


class ProxyCodeHead(nn.Module):
    """Per-patch logits over a 2D proxy tokenizer's codebook (TiTok's stage-1 target).

    D -> 2D -> tanh -> V_proxy, applied to each of the P patch tokens.
    """

    def __init__(self, dim: int, proxy_codebook_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(2 * dim, proxy_codebook_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, P, D) -> logits (B, P, V_proxy)"""
        return self.fc2(self.act(self.fc1(x)))


def build_head(kind: str, dim: int, patch_size: int, grid_size: int, proxy_codebook_size: int) -> nn.Module:
    """Build the decoder head named by a config's ``head`` field (``pixels`` or ``proxy_codes``)."""
    if kind == "pixels":
        return PixelHead(dim, patch_size, grid_size)
    if kind == "proxy_codes":
        return ProxyCodeHead(dim, proxy_codebook_size)
    raise ValueError(f"unknown head {kind!r}; expected 'pixels' or 'proxy_codes'")
