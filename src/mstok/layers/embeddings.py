"""Patch embedding, positional embeddings and the output heads that turn P patch tokens
back into an image.

Positional embeddings of a patch grid come in three kinds (``POSITION_EMBEDDINGS``):
``learned`` (a parameter with a random start, the ViT/TiTok layout), ``sincos`` (the same
parameter, started from the fixed 2D sine-cosine table of MAE, so that neighbouring patches
start with similar embeddings and attention can tell positions apart from step one), and
``fixed_sincos`` (that table as a non-trainable buffer under the same state-dict key).

The same table, evaluated at the centres of a coarse grid (:func:`latent_grid`), is the
"grid" start of a 1D tokenizer's latent tokens (``latent_init = "grid"``): latent k starts
with the position of one region of the image, so it can attend to that region from the
first step instead of waiting for the encoder and decoder to agree who carries what.

Glossary: B batch, P patches (= grid * grid), D width, p patch size.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

POSITION_EMBEDDINGS = ("learned", "sincos", "fixed_sincos")


def sincos_at(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """2D sine-cosine embeddings (N, D) of N (row, col) positions ``coords`` (N, 2), which may
    lie between grid points.

    Half of the channels encode the row, half the column; each half is sines and cosines
    of the coordinate at D/4 frequencies from 1 down to 1/10000.
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos positional embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.double().reshape(-1, 1) * omega  # (N, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, D/2)

    return torch.cat([encode(coords[:, 0]), encode(coords[:, 1])], dim=1).float()


def sincos_2d(grid_size: int, dim: int, leading: int = 0) -> torch.Tensor:
    """The 2D sine-cosine table (leading + grid^2, D) of a patch grid, rows in raster order;
    ``leading`` extra rows of zeros come first (class-token slots carry no position)."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    table = sincos_at(torch.stack([rows.flatten(), cols.flatten()], dim=1), dim)  # (P, D)
    return torch.cat([table.new_zeros(leading, dim), table])


def latent_grid(num_tokens: int, grid_size: int) -> torch.Tensor:
    """(K, 2) positions, in patch-grid coordinates, of K latent tokens laid out as an
    ``h x w`` grid (the factorisation of K closest to a square, h <= w) over the image:
    each is the centre of its cell, e.g. K = 32 on an 8 x 8 patch grid is 4 x 8 cells of
    2 x 1 patches."""
    h = math.isqrt(num_tokens)
    while num_tokens % h:
        h -= 1
    w = num_tokens // h
    rows = (torch.arange(h, dtype=torch.float64) + 0.5) * grid_size / h - 0.5
    cols = (torch.arange(w, dtype=torch.float64) + 0.5) * grid_size / w - 0.5
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], dim=1)


def spread_order(points: torch.Tensor) -> torch.Tensor:
    """(K,) an order of K points (K, 2) in which every prefix covers all of them well: greedily, each
    next point is the one that most lowers the mean distance from every point to its nearest point
    taken (the first is the most central). Nested tokens start from it, so a short prefix of grid
    latents begins as a coarse grid over the whole image rather than as its top rows."""
    distance = torch.cdist(points, points)  # (K, K)
    nearest = torch.full((len(points),), torch.inf, dtype=points.dtype)
    taken: list[int] = []
    for _ in range(len(points)):
        cost = torch.minimum(nearest[None, :], distance).mean(1)  # (K,) the mean distance after taking each
        cost[taken] = torch.inf
        taken.append(int(cost.argmin()))
        nearest = torch.minimum(nearest, distance[taken[-1]])
    return torch.tensor(taken)


def set_init_table(module: nn.Module, name: str, table: torch.Tensor) -> None:
    """Ask :func:`~mstok.layers.init.init_weights` to start ``module.<name>`` from ``table``
    instead of its random rule (the table is kept as a plain attribute, not in the state dict)."""
    tables = dict(getattr(module, "init_tables", {}))
    tables[name] = table
    module.init_tables = tables


def add_grid_position_embedding(
    module: nn.Module, name: str, grid_size: int, dim: int, kind: str = "learned", leading: int = 0
) -> None:
    """Register ``module.<name>``, a (leading + grid^2, D) positional embedding of the given kind.

    ``learned`` and ``sincos`` register a parameter (``init_weights`` fills it: randomly, or
    from :func:`sincos_2d` through :func:`set_init_table`); ``fixed_sincos`` registers the
    table as a buffer, which keeps the state-dict key.
    """
    if kind not in POSITION_EMBEDDINGS:
        raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {kind!r}")
    if kind == "fixed_sincos":
        module.register_buffer(name, sincos_2d(grid_size, dim, leading))
        return
    module.register_parameter(name, nn.Parameter(torch.empty(leading + grid_size**2, dim)))
    if kind == "sincos":
        set_init_table(module, name, sincos_2d(grid_size, dim, leading))


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding: (B, 3, H, W) -> (B, P, D)."""

    def __init__(self, patch_size: int, dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(images), "b d h w -> b (h w) d")


class PatchTokens(nn.Module):
    """Patch embedding + an optional class token + positional embeddings.

    (B, 3, H, W) -> (B, 1 + P, D) with the class token first, or (B, P, D) without it.
    ``position_embedding`` is one of ``POSITION_EMBEDDINGS`` (module docstring).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        class_token: bool = True,
        position_embedding: str = "learned",
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.class_token = nn.Parameter(torch.empty(1, dim)) if class_token else None
        grid = image_size // patch_size
        add_grid_position_embedding(self, "pos_embed", grid, dim, position_embedding, leading=int(class_token))

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


class ConvPixelHead(nn.Module):
    """Patch tokens to pixels through a small convolutional decoder at full resolution.

    A per-patch linear map to ``channels`` feature maps (unpatchified to (B, c, H, W)),
    ``num_blocks`` residual blocks ``x + conv(GELU(conv(GELU(x))))`` of 3x3 convs, and a
    3x3 conv to RGB. A linear head must paint every pixel of a patch from one token, which
    leaves blocky seams and makes the transformer learn pixel-level detail it is slow at;
    the convs share texture and edges across patch borders. Cost grows with H*W*c^2, so c
    stays small (32 by default).
    """

    def __init__(
        self, dim: int, patch_size: int, grid_size: int, channels: int = 32, num_blocks: int = 2, out_channels: int = 3
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = grid_size
        self.proj = nn.Linear(dim, patch_size * patch_size * channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.GELU(),
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                nn.GELU(),
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            )
            for _ in range(num_blocks)
        )
        self.out = nn.Sequential(nn.GELU(), nn.Conv2d(channels, out_channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, P, D) -> (B, 3, H, W)"""
        features = rearrange(
            self.proj(x),
            "b (gh gw) (ph pw c) -> b c (gh ph) (gw pw)",
            gh=self.grid_size,
            ph=self.patch_size,
            pw=self.patch_size,
        )  # (B, c, H, W)
        for block in self.blocks:
            features = features + block(features)
        return self.out(features)


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


def build_head(
    kind: str, dim: int, patch_size: int, grid_size: int, proxy_codebook_size: int, pixel_head: str = "linear"
) -> nn.Module:
    """Build the decoder head named by a config's ``head`` field (``pixels`` or ``proxy_codes``);
    ``pixel_head`` picks the pixel head's kind (``linear`` or ``conv``)."""
    if kind == "pixels":
        if pixel_head == "conv":
            return ConvPixelHead(dim, patch_size, grid_size)
        if pixel_head != "linear":
            raise ValueError(f"unknown pixel_head {pixel_head!r}; expected 'linear' or 'conv'")
        return PixelHead(dim, patch_size, grid_size)
    if kind == "proxy_codes":
        return ProxyCodeHead(dim, proxy_codebook_size)
    raise ValueError(f"unknown head {kind!r}; expected 'pixels' or 'proxy_codes'")
