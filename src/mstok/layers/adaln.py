"""Conditioning layers of a diffusion transformer: timestep and class embeddings, and
adaLN-Zero blocks (DiT, Peebles & Xie 2023).

A DiT does not feed its condition in as tokens. A vector ``c = t_emb + y_emb`` (B, D), the sum
of a timestep and a class embedding, is mapped per block to a shift, scale and gate for each
of its two sub-layers::

    x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

with LayerNorms that have no affine parameters of their own (the modulation replaces them).
The map ``c -> 6 D`` (SiLU then Linear) starts at zero, so every gate starts at zero and each
block starts as the identity; the final layer's projection starts at zero too, so an untrained
DiT predicts exactly zero. DiT found this "-Zero" start clearly better than cross-attention or
in-context conditioning at the same cost. Zero starts are marked with ``zero_init = True`` on
the Linear, which :func:`~mstok.layers.init_weights` honours after its other rules.

The class table has one extra row, the "null" label ``num_classes`` of classifier-free guidance:
training replaces a random fraction of labels by it (:class:`LabelEmbedding`), so one model
learns both the conditional and the unconditional prediction.

Glossary: B batch, N tokens, D width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mstok.layers.attention import SelfAttention
from mstok.layers.blocks import MLP


def frequency_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (N, dim) of N scalars ``values`` (N,): ``[cos(v w_i), sin(v w_i)]`` at
    dim/2 frequencies ``w_i = max_period ** (-i / (dim/2))``, from 1 down to ~1/max_period
    (the cos-then-sin layout of DiT's timestep embedder, which also serves 1-D positions)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"a sinusoidal embedding needs an even width >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs  # (N, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def zero_init(module: nn.Module) -> nn.Module:
    """Flag ``module`` for a zero start (:func:`~mstok.layers.init_weights`) and return it."""
    module.zero_init = True
    return module


class TimestepEmbedding(nn.Module):
    """Diffusion time t (B,) in [0, 1000) -> (B, D): sinusoidal features of t, then
    Linear -> SiLU -> Linear.

    Args:
        dim: output width D.
        frequency_dim: number of sinusoidal features (DiT: 256).
        max_period: the slowest frequency's period (10000, so t in [0, 1000) never wraps it).
    """

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        if frequency_dim < 2 or frequency_dim % 2:
            raise ValueError(f"frequency_dim must be an even number >= 2, got {frequency_dim}")
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, frequency_dim), the fixed part of the embedding."""
        return frequency_embedding(t, self.frequency_dim, self.max_period)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) float times -> (B, D)"""
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """Class labels (B,) in [0, num_classes] -> (B, D), with label dropout for guidance.

    Row ``num_classes`` of the table is the null label. In training mode each label is
    replaced by it with probability ``dropout`` (drawn from ``generator`` when one is given,
    so a run can replay its drops); in eval mode labels pass unchanged. An explicit
    ``drop_mask`` replaces exactly the marked labels, in either mode.

    The table is a free parameter rather than an ``nn.Embedding``: ``init_weights`` starts
    free tables with unit-norm rows (std D^-0.5, about DiT's 0.02 at its widths), where its
    ``nn.Embedding`` rule (uniform in [-1/V, 1/V], for codebooks) would start every class
    embedding near zero beside the timestep embedding it is added to.

    ``gain`` multiplies the output: a larger start and, under Adam, a proportionally faster
    learning rate of the rows in the output's units. Each row is trained only by its own
    class's samples (about 1/V of a batch), while the timestep embedding it is added to is
    trained by every sample and grows several-fold (a tiny DiT: from norm ~3 to 15-20 in
    2,000 steps); with gain 1 the class rows stay near their start and hardly modulate.

    Args:
        num_classes: number of real classes (the table has ``num_classes + 1`` rows).
        dim: width D.
        dropout: probability of replacing a label by the null label during training.
        gain: output multiplier (1: the plain table).
    """

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.0, gain: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"label dropout must be a probability in [0, 1], got {dropout}")
        if not gain > 0:
            raise ValueError(f"label embedding gain must be > 0, got {gain}")
        self.num_classes = num_classes
        self.dropout = dropout
        self.gain = gain
        self.table = nn.Parameter(torch.empty(num_classes + 1, dim))

    def drop(
        self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The labels after dropout: ``drop_mask`` (B,) bool if given, else random drops in
        training mode, else unchanged."""
        if drop_mask is None:
            if not self.training or self.dropout == 0.0:
                return labels
            drop_mask = torch.rand(labels.shape, generator=generator, device=labels.device) < self.dropout
        elif drop_mask.shape != labels.shape or drop_mask.dtype != torch.bool:
            raise ValueError(
                f"drop_mask must be a bool tensor of the labels' shape {tuple(labels.shape)}, "
                f"got {drop_mask.dtype} {tuple(drop_mask.shape)}"
            )
        return torch.where(drop_mask, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """labels: (B,) integer ids -> (B, D)"""
        return F.embedding(self.drop(labels, drop_mask, generator), self.table) * self.gain


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``: x (B, N, D), shift and scale (B, 1, D)."""
    return x * (1 + scale) + shift


class AdaLNZeroBlock(nn.Module):
    """Pre-LN self-attention + MLP block modulated by a condition vector c (module docstring).

    Args:
        dim: width D.
        num_heads: heads H.
        mlp_ratio: MLP hidden size as a multiple of D.
        qk_norm: LayerNorm on queries and keys per head.
        norm_eps: epsilon of the affine-free LayerNorms (DiT: 1e-6).
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 6 * dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) tokens, c: (B, D) condition -> (B, N, D)"""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Affine-free LayerNorm modulated by c (shift, scale), then a linear map D -> out_dim.
    Both the modulation and the projection start at zero, so the output starts at zero.

    Args:
        dim: width D.
        out_dim: output channels per token.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 2 * dim)))
        self.proj = zero_init(nn.Linear(dim, out_dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D), c: (B, D) -> (B, N, out_dim)"""
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))
