"""Transformer blocks: MLP, self-attention block, cross-attention block, and a stack.

Every block is residual and pre-normalised (``x + f(LN(x))``), GELU MLP with ratio 4 by
default, matching the ViT blocks TiTok and MsTok are built from. The self-attention block
can also be post-normalised (``LN(x + f(x))``, the original Transformer and BERT layout
that the official TiTok generators use) and take dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mstok.layers.attention import CrossAttention, SelfAttention


class MLP(nn.Module):
    """Two-layer GELU MLP: D -> hidden -> D (dropout on the output when training)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SelfAttentionBlock(nn.Module):
    """Pre-LN ``x = x + Attn(LN(x)); x = x + MLP(LN(x))``, or post-LN
    ``x = LN(x + Attn(x)); x = LN(x + MLP(x))`` with ``norm_first=False``.

    Args:
        dim: width D.
        num_heads: heads H.
        mlp_ratio: MLP hidden size as a multiple of D.
        qkv_bias: bias on the fused qkv projection.
        dropout: attention and residual-branch dropout (training only).
        norm_first: pre-LN (True) or post-LN (False).
        norm_eps: LayerNorm epsilon (BERT uses 1e-12).
        qk_norm: LayerNorm on queries and keys per head (:class:`~mstok.layers.attention.QKNorm`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        norm_first: bool = True,
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, dropout=dropout, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D)"""
        if not self.norm_first:
            x = self.norm1(x + self.attn(x, attn_mask=attn_mask))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Queries attend to a context, then (optionally) to each other, then an MLP.

    ``x = x + XAttn(LN(x), LN_ctx(ctx)); [x = x + Attn(LN(x))]; x = x + MLP(LN(x))``.

    Args:
        dim: query width D.
        num_heads: heads H.
        mlp_ratio: MLP hidden size as a multiple of D.
        self_attention: add a self-attention sub-layer among the queries.
        context_dim: context width (defaults to D).
        qk_norm: LayerNorm on queries and keys per head, in both attentions.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        self_attention: bool = False,
        context_dim: int | None = None,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim or dim)
        self.cross_attn = CrossAttention(dim, num_heads, context_dim, qk_norm=qk_norm)
        if self_attention:
            self.norm_self = nn.LayerNorm(dim)
            self.self_attn = SelfAttention(dim, num_heads, qk_norm=qk_norm)
        else:
            self.norm_self = self.self_attn = None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) queries; context: (B, M, Dc). -> (B, N, D)"""
        x = x + self.cross_attn(self.norm_q(x), self.norm_context(context))
        if self.self_attn is not None:
            x = x + self.self_attn(self.norm_self(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of :class:`SelfAttentionBlock` that can also return intermediate layers."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(dim, num_heads, mlp_ratio, qk_norm=qk_norm) for _ in range(depth)
        )

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        return_layers: Sequence[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run every block.

        Args:
            x: (B, N, D) input tokens.
            attn_mask: optional mask passed to every block.
            return_layers: 1-based block indices whose outputs to return (in this order).

        Returns:
            The final output (B, N, D) and the list of requested intermediate outputs.
        """
        depth = len(self.blocks)
        bad = [layer for layer in return_layers if not 1 <= layer <= depth]
        if bad:
            raise ValueError(f"return_layers {bad} out of range: blocks are numbered 1..{depth}")
        wanted = set(return_layers)
        taps: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks, start=1):
            x = block(x, attn_mask=attn_mask)
            if index in wanted:
                taps[index] = x
        return x, [taps[layer] for layer in return_layers]
