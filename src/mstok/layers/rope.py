"""Rotary position embeddings (RoPE, Su et al. 2024) for 1-D token sequences and 2-D patch grids.

RoPE gives attention positions without adding anything to the tokens: each query and key is
rotated, channel pair by channel pair, by an angle proportional to its position, so that the
logit ``q_m . k_n`` depends on the positions m and n only through their offset ``m - n``.
Norms are unchanged (every step is a rotation), and nothing is learned.

Pair convention (the only one used in mstok): adjacent channels. In a head of width d, channels
``(2i, 2i + 1)`` form pair i, and a token at position p rotates it by the angle ``p * w_i``::

    out[2i]     = x[2i] * cos(p w_i) - x[2i + 1] * sin(p w_i)
    out[2i + 1] = x[2i] * sin(p w_i) + x[2i + 1] * cos(p w_i)

This is RoFormer's layout (and Flux's). The "rotate-half" layout of GPT-NeoX/LLaMA pairs
channel i with i + d/2 instead; weights trained under one layout need their q/k rows permuted
to run under the other.

* 1-D: d/2 pairs at frequencies ``w_i = theta ** (-2i / d)``, i = 0 .. d/2 - 1, from 1 down to
  about 1/theta, at positions ``start .. start + n - 1``.
* 2-D: a grid of h x w tokens in raster order (token ``r * w + c``, the order of
  :class:`~mstok.layers.embeddings.PatchEmbed`). Channels ``0 .. d/2 - 1`` (the first d/4 pairs)
  are a 1-D RoPE of width d/2 over the row r, channels ``d/2 .. d - 1`` (the last d/4 pairs) one
  over the column c, each at ``w_i = theta ** (-2i / (d/2))``. Needs d divisible by 4. The logit
  of two grid tokens then depends only on their row offset and their column offset.

Tables hold one entry per pair: ``cos`` and ``sin`` of shape (N, d/2). They are computed in
float64 (a position times a frequency loses digits in float32 at large positions) and stored in
float32 unless asked otherwise.

A joint (MMDiT) sequence is a concatenation of segments, each with its own layout:
:class:`RotaryTables` builds the tables of, e.g., ``[Grid2D(h, w), Line1D(K)]`` once, as
non-persistent buffers (they follow the model's device and dtype but stay out of state dicts),
and checks on each use that the streams have the lengths the layout was built for.
:class:`NoRotation` marks tokens without a position (cos 1, sin 0).

SemTok (Appendix A.1) uses 2-D RoPE on the image branch and 1-D RoPE on the token branch, in
the encoder and the decoder alike: ``RotaryTables(d, [Grid2D(h, w), Line1D(K)])``. Each segment
counts from zero, so within each stream logits depend on offsets; between the two streams the
angles come from different frequency sets (a grid token's row and column versus a token's
index), which gives no meaningful relative position across the streams. Tokens can still tell
image patches apart (each patch keeps a distinct rotation), and the streams are told apart by
their own projections. ``NoRotation(K)`` is the alternative of Flux's text tokens.

Glossary: B batch, H heads, N sequence length, d head dim, h x w grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def _check_even(head_dim: int, divisor: int = 2, what: str = "RoPE") -> None:
    if head_dim < divisor or head_dim % divisor:
        raise ValueError(f"{what} needs a head dim that is a positive multiple of {divisor}, got {head_dim}")


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def rope_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The dim/2 pair frequencies ``theta ** (-2i / dim)`` (dim/2,), float64."""
    _check_even(dim)
    if theta <= 1.0:
        raise ValueError(f"RoPE base theta must be > 1, got {theta}")
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_angles_1d(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles (N, d/2), float64, of a 1-D RoPE at N positions ``positions`` (N,)."""
    return positions.double()[:, None] * rope_frequencies(head_dim, theta)


def rope_angles_2d(height: int, width: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles (h * w, d/2), float64, of a 2-D RoPE on an h x w grid in raster order: the first
    d/4 pairs follow the row, the last d/4 the column (module docstring)."""
    _check_even(head_dim, 4, "2-D RoPE")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    half = head_dim // 2
    row_angles = rope_angles_1d(rows.flatten(), half, theta)  # (h*w, d/4)
    col_angles = rope_angles_1d(cols.flatten(), half, theta)  # (h*w, d/4)
    return torch.cat([row_angles, col_angles], dim=1)


def _tables(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if not dtype.is_floating_point:
        raise TypeError(f"RoPE tables need a floating dtype, got {dtype}")
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_1d(
    length: int, head_dim: int, theta: float = 10000.0, start: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (N, d/2) of a 1-D RoPE at positions ``start .. start + N - 1``."""
    return _tables(rope_angles_1d(torch.arange(start, start + length), head_dim, theta), dtype)


def rope_2d(
    height: int, width: int, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (h * w, d/2) of a 2-D RoPE on an h x w grid in raster order."""
    return _tables(rope_angles_2d(height, width, head_dim, theta), dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the adjacent channel pairs of ``x`` by the angles whose cos and sin are given.

    Args:
        x: (B, H, N, d) queries or keys (any leading dims; the last two are N and d).
        cos: (N, d/2) table, or any shape broadcastable to x's (..., N, d/2).
        sin: same shape as ``cos``.

    Returns:
        x rotated, same shape and dtype. The arithmetic runs in at least float32, so half
        precision inputs are rounded once, at the end.
    """
    if cos.shape != sin.shape:
        raise ValueError(f"RoPE cos and sin tables must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if x.dim() < 2 or x.shape[-1] % 2:
        raise ValueError(f"RoPE rotates channel pairs: x needs an even last dim, got shape {tuple(x.shape)}")
    if cos.dim() < 2 or cos.shape[-1] * 2 != x.shape[-1] or cos.shape[-2] not in (1, x.shape[-2]):
        raise ValueError(
            f"RoPE tables of shape {tuple(cos.shape)} do not fit x of shape {tuple(x.shape)}: "
            f"they must be (N, d/2) = ({x.shape[-2]}, {x.shape[-1] // 2})"
        )
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(dtype), sin.to(dtype)
    x1, x2 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)  # each (..., N, d/2): even and odd channels
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., N, d/2, 2)
    return rotated.flatten(-2).to(x.dtype)


@dataclass(frozen=True)
class Line1D:
    """``length`` tokens at positions ``start .. start + length - 1``, rotated by a 1-D RoPE."""

    length: int
    start: int = 0

    def __post_init__(self) -> None:
        _check_count("Line1D length", self.length)
        _check_count("Line1D start", self.start, minimum=0)

    def angles(self, head_dim: int, theta: float) -> torch.Tensor:
        """(length, d/2) float64."""
        return rope_angles_1d(torch.arange(self.start, self.start + self.length), head_dim, theta)


@dataclass(frozen=True)
class Grid2D:
    """``height * width`` tokens of a grid in raster order, rotated by a 2-D RoPE."""

    height: int
    width: int

    def __post_init__(self) -> None:
        _check_count("Grid2D height", self.height)
        _check_count("Grid2D width", self.width)

    @property
    def length(self) -> int:
        return self.height * self.width

    def angles(self, head_dim: int, theta: float) -> torch.Tensor:
        """(h * w, d/2) float64."""
        return rope_angles_2d(self.height, self.width, head_dim, theta)


@dataclass(frozen=True)
class NoRotation:
    """``length`` tokens left as they are (angle zero: cos 1, sin 0)."""

    length: int

    def __post_init__(self) -> None:
        _check_count("NoRotation length", self.length)

    def angles(self, head_dim: int, theta: float) -> torch.Tensor:
        """(length, d/2) zeros, float64."""
        _check_even(head_dim)
        return torch.zeros(self.length, head_dim // 2, dtype=torch.float64)


Segment = Line1D | Grid2D | NoRotation


class RotaryTables(nn.Module):
    """The RoPE tables of a sequence made of segments, built once.

    ``RotaryTables(d, [Grid2D(h, w), Line1D(K)])`` holds ``cos`` and ``sin`` (h*w + K, d/2) for
    a sequence of h*w grid tokens followed by K 1-D tokens; calling it with the lengths of the
    streams returns them, after checking that those lengths are the segments' lengths.

    Args:
        head_dim: per-head width d (even; divisible by 4 when a segment is a grid).
        segments: the layout, in sequence order.
        theta: the RoPE base (the slowest frequency is about 1/theta).
        dtype: dtype of the stored tables (float64 for exact references; the tables are
            computed in float64 whatever this is).
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self, head_dim: int, segments: Sequence[Segment], theta: float = 10000.0, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        _check_even(head_dim)
        segments = tuple(segments)
        if not segments:
            raise ValueError("RotaryTables needs at least one segment")
        bad = [s for s in segments if not isinstance(s, (Line1D, Grid2D, NoRotation))]
        if bad:
            raise TypeError(f"RoPE segments must be Line1D, Grid2D or NoRotation, got {bad!r}")
        self.head_dim = head_dim
        self.theta = theta
        self.segments = segments
        angles = torch.cat([s.angles(head_dim, theta) for s in segments])  # (N, d/2)
        cos, sin = _tables(angles, dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @property
    def lengths(self) -> tuple[int, ...]:
        """The number of tokens of each segment."""
        return tuple(s.length for s in self.segments)

    def forward(self, *lengths: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) tables (N, d/2) for streams of the given lengths, one per segment
        (e.g. ``tables(x.shape[1], z.shape[1])``); raises if a length is not its segment's."""
        if tuple(lengths) != self.lengths:
            described = ", ".join(repr(s) for s in self.segments)
            raise ValueError(
                f"RoPE layout [{described}] has segment lengths {self.lengths}, "
                f"but the sequence has streams of lengths {tuple(lengths)}"
            )
        return self.cos, self.sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, segments={list(self.segments)}"
