"""Attention on top of ``F.scaled_dot_product_attention``.

Two modules: :class:`SelfAttention` with one fused ``qkv`` projection, and
:class:`CrossAttention` where queries come from one sequence and a fused ``kv``
projection reads a context sequence. Both keep a bias on every projection by default so
their parameter layout matches a standard ViT block (and the official TiTok weights);
U-ViT generators drop the qkv bias.

Both can normalise queries and keys per head before the dot product (``qk_norm``, as in
ViT-22B): a LayerNorm over d bounds the attention logits, so a large learning rate cannot
grow them until the softmax saturates. Off by default (the official weights have no such
norms); the tiny recipes switch it on.

:class:`SelfAttention` can also rotate queries and keys by rotary position embeddings
(``rope=(cos, sin)``, :mod:`mstok.layers.rope`), after the qk norm so that the norm does not
undo the rotation's relative-position structure. Its two halves, :meth:`SelfAttention.heads`
and :meth:`SelfAttention.merge`, let :class:`~mstok.layers.joint.JointAttention` run one
attention over two streams that keep their own projections.

Glossary: B batch, N query length, M context length, D width, H heads, d = D / H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mstok.layers.rope import apply_rope


def _check_heads(dim: int, num_heads: int) -> None:
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"width {dim} must be a positive multiple of num_heads {num_heads}")


class QKNorm(nn.Module):
    """LayerNorm of queries and keys over the head dim d (identity when disabled)."""

    def __init__(self, head_dim: int, enabled: bool) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(head_dim) if enabled else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if enabled else nn.Identity()

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B, H, N, d), k: (B, H, M, d) -> both normalised over d."""
        return self.q_norm(q), self.k_norm(k)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Args:
        dim: model width D.
        num_heads: number of heads H (D must be divisible by H).
        qkv_bias: give the qkv projection a bias.
        dropout: dropout on the attention weights and on the output (training only).
        qk_norm: LayerNorm on queries and keys per head.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, dropout: float = 0.0, qk_norm: bool = False
    ) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.qk_norm = QKNorm(dim // num_heads, qk_norm)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def heads(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, N, D) -> q, k, v (B, H, N, d), after the qk norm and, if given, RoPE
        (``rope = (cos, sin)``, tables (N, d/2))."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k = self.qk_norm(q, k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output (B, H, N, d) -> (B, N, D) through the output projection."""
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, N, D); attn_mask: bool/float mask broadcastable to (B, H, N, N); rope: (cos, sin)
        tables (N, d/2) rotating queries and keys. -> (B, N, D)"""
        q, k, v = self.heads(x, rope)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, H, N, d)
        return self.merge(out)


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a context, with a fused kv projection.

    Args:
        dim: width D of the queries and of the output.
        num_heads: number of heads H.
        context_dim: width of the context (defaults to ``dim``).
        qk_norm: LayerNorm on queries and keys per head.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = False) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.qk_norm = QKNorm(dim // num_heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D) queries; context: (B, M, Dc). -> (B, N, D)"""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        q, k = self.qk_norm(q, k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))
