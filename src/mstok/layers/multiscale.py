"""Token pyramids: one square token map turned into coarse-to-fine maps, and the attention
masks that let scales see each other (HieraTok, :mod:`mstok.tokenizers.hieratok`).

A pyramid over ``scales = (s_1, ..., s_n)`` (side lengths, strictly increasing, the last one
the map's own side g) is the concatenation, low to high, of the map resized to each side:
``sum(s^2)`` tokens, each scale's tokens in raster order. Two ways down:

* ``area``: ``F.interpolate(mode="area")`` (average pooling, any ratio), no parameters;
* ``conv``: a learnable module per scale (:class:`ConvDownsample`), three kernels as in
  ViTDet's simple feature pyramid, which HieraTok cites: a per-channel strided convolution
  that starts as area pooling, then a 1x1 and a 3x3 convolution that mix channels.

The finest scale is the map itself in both modes, so a one-scale pyramid is the identity.

Glossary: B batch, D width, g side of the full map, s side of one scale, K = sum(s^2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mstok.layers.embeddings import set_init_table

DOWNSAMPLES = ("conv", "area")
SCALE_ATTENTIONS = ("scale_causal", "scale_independent", "full")


def scale_offsets(scales: Sequence[int]) -> list[int]:
    """Where each scale's tokens start in the pyramid, plus the total: ``[0, s1^2, s1^2 + s2^2, ..., K]``."""
    offsets = [0]
    for side in scales:
        offsets.append(offsets[-1] + side * side)
    return offsets


def scale_index(scales: Sequence[int]) -> torch.Tensor:
    """(K,) long: the scale number (0 = coarsest) of every token of the pyramid (on the CPU,
    also under a ``torch.device("meta")`` context: masks are built from it once, as buffers)."""
    return torch.tensor([i for i, side in enumerate(scales) for _ in range(side * side)], device="cpu")


def scale_attention_mask(scales: Sequence[int], kind: str) -> torch.Tensor:
    """(K, K) bool, True where query token i may attend to key token j (SDPA's convention).

    ``scale_causal`` (HieraTok eq. 7): a token of scale a sees every token of the scales
    b <= a. ``scale_independent`` (eq. 6): only its own scale (block diagonal). ``full``:
    everything.
    """
    if kind not in SCALE_ATTENTIONS:
        raise ValueError(f"attention must be one of {SCALE_ATTENTIONS}, got {kind!r}")
    index = scale_index(scales)
    query, key = index[:, None], index[None, :]
    if kind == "scale_causal":
        return query >= key
    if kind == "scale_independent":
        return query == key
    return torch.ones(len(index), len(index), dtype=torch.bool, device="cpu")


def resize_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """Area-resize a square token map: (B, g*g, D) -> (B, side*side, D), raster order kept."""
    grid = round(tokens.shape[1] ** 0.5)
    fmap = rearrange(tokens, "b (h w) d -> b d h w", h=grid)
    return rearrange(F.interpolate(fmap, size=(side, side), mode="area"), "b d h w -> b (h w) d")


class ConvDownsample(nn.Module):
    """A learnable g x g -> s x s downsampling of a (B, D, g, g) map: three kernels.

    1. ``pool``: a per-channel (depthwise) convolution of kernel = stride = r, the largest
       divisor of g with g / r >= s; it starts as area pooling (every weight 1 / r^2) and
       learns its own weighting. Depthwise, because a dense r x r kernel would cost
       r^2 D^2 parameters (151M for 16 -> 1 at D = 768); where g / r is still not s
       (e.g. 16 -> 12) an area resize follows.
    2. a 1x1 convolution, GELU, 3. a 3x3 convolution: channel mixing and a little context,
       as after the resampling of ViTDet's feature pyramid.

    About 10 D^2 parameters per scale.
    """

    def __init__(self, dim: int, grid: int, side: int) -> None:
        super().__init__()
        if not 1 <= side < grid:
            raise ValueError(f"a downsampled side must lie in [1, {grid}), got {side}")
        self.side = side
        self.stride = max(r for r in range(1, grid + 1) if grid % r == 0 and grid // r >= side)
        self.pool = nn.Parameter(torch.empty(dim, 1, self.stride, self.stride))  # (D, 1, r, r) depthwise
        set_init_table(self, "pool", torch.full((dim, 1, self.stride, self.stride), self.stride**-2))
        self.mix = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.context = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, D, g, g) -> (B, D, s, s)"""
        x = F.conv2d(fmap, self.pool, stride=self.stride, groups=fmap.shape[1])  # (B, D, g/r, g/r)
        if x.shape[-1] != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="area")
        return self.context(self.act(self.mix(x)))


class ScalePyramid(nn.Module):
    """A token map (B, g*g, D) -> its pyramid (B, K, D), coarse to fine (module docstring).

    Args:
        dim: width D.
        grid: side g of the input map.
        scales: the sides, strictly increasing, the last equal to ``grid``.
        mode: ``conv`` or ``area``.
    """

    def __init__(self, dim: int, grid: int, scales: Sequence[int], mode: str) -> None:
        super().__init__()
        if mode not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {mode!r}")
        if not scales or list(scales) != sorted(set(scales)) or scales[0] < 1 or scales[-1] != grid:
            raise ValueError(f"scales must increase strictly from >= 1 to the map side {grid}, got {list(scales)}")
        self.grid, self.scales, self.mode = grid, tuple(scales), mode
        self.levels = None
        if mode == "conv":  # one module per scale but the finest
            self.levels = nn.ModuleList(ConvDownsample(dim, grid, side) for side in self.scales[:-1])

    def forward(self, tokens: torch.Tensor, num_scales: int | None = None) -> torch.Tensor:
        """(B, g*g, D) -> (B, K_n, D): the first ``num_scales`` scales (all by default)."""
        n = len(self.scales) if num_scales is None else num_scales
        fmap = rearrange(tokens, "b (h w) d -> b d h w", h=self.grid)
        levels = []
        for i, side in enumerate(self.scales[:n]):
            if side == self.grid:
                level = fmap
            elif self.levels is not None:
                level = self.levels[i](fmap)
            else:
                level = F.interpolate(fmap, size=(side, side), mode="area")
            levels.append(rearrange(level, "b d h w -> b (h w) d"))
        return torch.cat(levels, dim=1)
