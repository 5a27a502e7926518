"""Dual-stream (MMDiT) transformer layers: two token streams with their own weights that attend
jointly (Esser et al. 2024, SD3; the encoder and decoder of SemTok).

Stream ``x`` is the 2-D branch (image or latent patches, h*w tokens in raster order), stream
``z`` the 1-D branch (K learnable or quantized tokens). Each stream keeps its own LayerNorms,
fused qkv projection, output projection and MLP, but one attention runs over the
concatenation ``[x, z]`` of both streams' queries, keys and values, and its output is split back.
So each stream reads the other in every layer while the two modalities keep separate
parameters, which is how SemTok compresses the image branch into the token branch. Both
streams have the same width D (as in SD3), so their heads line up in the joint attention.

A stream can be conditioned on a vector c (B, D), e.g. the diffusion timestep of SemTok's
decoder on its image branch, by adaLN-Zero modulation (:mod:`mstok.layers.adaln`): its
LayerNorms lose their affine parameters, and a zero-started map ``c -> 6 D`` gives the shift,
scale and gate of each sub-layer::

    x = x + gate_msa * JointAttn(LN(x) * (1 + scale_msa) + shift_msa, ...)
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

Gates start at zero, so a modulated stream starts as the identity in every block. A stream
without conditioning is an ordinary pre-LN stream with affine LayerNorms.

The order ``[x, z]`` fixes the layout of the joint sequence: RoPE tables (for instance
``RotaryTables(d, [Grid2D(h, w), Line1D(K)])`` from :mod:`mstok.layers.rope`) and attention
masks index it with x's tokens first.

Glossary: B batch, N tokens of x (the 2-D stream), K tokens of z (the 1-D stream), L = N + K,
D width, H heads, d = D / H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mstok.layers.adaln import modulate, zero_init
from mstok.layers.attention import SelfAttention
from mstok.layers.blocks import MLP
from mstok.layers.rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]


def _check_streams(x: torch.Tensor, z: torch.Tensor, dim: int) -> None:
    for name, t in (("x", x), ("z", z)):
        if t.dim() != 3 or t.shape[-1] != dim:
            raise ValueError(f"stream {name} must have shape (B, tokens, {dim}), got {tuple(t.shape)}")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"streams x and z must have one batch size, got {x.shape[0]} and {z.shape[0]}")


def _check_condition(c: torch.Tensor | None, conditioned: bool, x: torch.Tensor) -> None:
    if not conditioned:
        if c is not None:
            raise ValueError("a condition c was given, but neither stream is modulated (modulate_x/modulate_z)")
        return
    if c is None:
        raise ValueError("a modulated stream needs a condition c of shape (B, D)")
    if c.dim() != 2 or c.shape[0] != x.shape[0] or c.shape[1] != x.shape[-1]:
        raise ValueError(f"condition c must have shape ({x.shape[0]}, {x.shape[-1]}), got {tuple(c.shape)}")


class JointAttention(nn.Module):
    """One multi-head attention over two streams that keep their own projections.

    Each stream has a :class:`~mstok.layers.attention.SelfAttention` (``x_attn``, ``z_attn``)
    that provides its fused qkv projection, optional qk norm and output projection; the
    attention itself runs once, over the concatenated sequence ``[x, z]``.

    Args:
        dim: width D of both streams.
        num_heads: heads H (D must be divisible by H).
        qkv_bias: give the qkv projections a bias.
        qk_norm: LayerNorm on queries and keys per head, separately per stream.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.x_attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.z_attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)

    def forward(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        rope: Rope | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention of both streams.

        Args:
            x: (B, N, D) first stream.
            z: (B, K, D) second stream.
            rope: (cos, sin) tables (L, d/2) of the joint sequence ``[x, z]`` rotating queries
                and keys (after the qk norm), or None for no positions.
            attn_mask: bool (True = may attend) or additive float mask broadcastable to
                (B, H, L, L), over the joint sequence.

        Returns:
            The attention outputs of x (B, N, D) and of z (B, K, D), each through its own
            output projection.
        """
        _check_streams(x, z, self.dim)
        n, length = x.shape[1], x.shape[1] + z.shape[1]
        if attn_mask is not None and (
            attn_mask.dim() < 2 or attn_mask.shape[-1] != length or attn_mask.shape[-2] not in (1, length)
        ):
            raise ValueError(
                f"attn_mask must be broadcastable to (B, H, {length}, {length}) over the joint sequence "
                f"of {n} + {z.shape[1]} tokens, got shape {tuple(attn_mask.shape)}"
            )
        qx, kx, vx = self.x_attn.heads(x)  # each (B, H, N, d)
        qz, kz, vz = self.z_attn.heads(z)  # each (B, H, K, d)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qx, qz), (kx, kz), (vx, vz)))  # (B, H, L, d)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, d)
        return self.x_attn.merge(out[:, :, :n]), self.z_attn.merge(out[:, :, n:])


class StreamLayers(nn.Module):
    """One stream's share of a :class:`JointBlock`: its two LayerNorms, its MLP and, when
    ``modulated``, its adaLN-Zero map ``c -> (shift, scale, gate) x 2``.

    Args:
        dim: width D.
        mlp_ratio: MLP hidden size as a multiple of D.
        modulated: condition this stream on c (affine-free norms, zero-started modulation).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, modulated: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not modulated, eps=norm_eps)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not modulated, eps=norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 6 * dim))) if modulated else None

    def modulations(self, c: torch.Tensor | None) -> tuple[torch.Tensor, ...] | None:
        """c (B, D) -> shift, scale, gate of attention then of the MLP, each (B, 1, D); None
        for an unmodulated stream."""
        if self.modulation is None:
            return None
        return self.modulation(c)[:, None].chunk(6, dim=-1)

    def attention_input(self, x: torch.Tensor, mods: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """The normalised (and modulated) stream (B, N, D) that enters the joint attention."""
        if mods is None:
            return self.norm1(x)
        return modulate(self.norm1(x), mods[0], mods[1])

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, mods: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """Add the (gated) attention output to the residual stream, then the (gated) MLP."""
        if mods is None:
            x = x + attn_out
            return x + self.mlp(self.norm2(x))
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[2:]  # shift/scale_msa went in before the attention
        x = x + gate_msa * attn_out
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Dual-stream block: per-stream pre-LN, joint attention, per-stream MLP (module docstring).

    Args:
        dim: width D of both streams.
        num_heads: heads H.
        mlp_ratio: MLP hidden size as a multiple of D.
        qkv_bias: bias on the fused qkv projections.
        qk_norm: LayerNorm on queries and keys per head.
        modulate_x: condition stream x on c by adaLN-Zero.
        modulate_z: condition stream z on c by adaLN-Zero.
        norm_eps: LayerNorm epsilon of both streams (DiT/SD3: 1e-6).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        modulate_x: bool = False,
        modulate_z: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.attn = JointAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.x_stream = StreamLayers(dim, mlp_ratio, modulated=modulate_x, norm_eps=norm_eps)
        self.z_stream = StreamLayers(dim, mlp_ratio, modulated=modulate_z, norm_eps=norm_eps)

    @property
    def conditioned(self) -> bool:
        """Whether either stream takes the condition c."""
        return self.x_stream.modulation is not None or self.z_stream.modulation is not None

    def forward(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        rope: Rope | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, D), z: (B, K, D); c: (B, D) condition, required exactly when a stream is
        modulated; rope and attn_mask over the joint sequence ``[x, z]`` (:class:`JointAttention`).
        -> (x, z) with the same shapes."""
        _check_streams(x, z, self.attn.dim)  # before the norms, which would fail less clearly
        _check_condition(c, self.conditioned, x)
        x_mods, z_mods = self.x_stream.modulations(c), self.z_stream.modulations(c)
        x_attn, z_attn = self.attn(
            self.x_stream.attention_input(x, x_mods), self.z_stream.attention_input(z, z_mods), rope, attn_mask
        )
        return self.x_stream.finish(x, x_attn, x_mods), self.z_stream.finish(z, z_attn, z_mods)


class JointTransformer(nn.Module):
    """A stack of :class:`JointBlock` over two streams; returns both.

    Args:
        dim: width D of both streams.
        depth: number of blocks.
        num_heads: heads H.
        mlp_ratio: MLP hidden size as a multiple of D.
        qkv_bias: bias on the fused qkv projections.
        qk_norm: LayerNorm on queries and keys per head.
        modulate_x: condition stream x on c by adaLN-Zero in every block.
        modulate_z: condition stream z on c by adaLN-Zero in every block.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        modulate_x: bool = False,
        modulate_z: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
        self.blocks = nn.ModuleList(
            JointBlock(dim, num_heads, mlp_ratio, qkv_bias, qk_norm, modulate_x, modulate_z, norm_eps)
            for _ in range(depth)
        )
        self.head_dim = dim // num_heads  # for building RoPE tables

    def forward(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        c: torch.Tensor | None = None,
        rope: Rope | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, D), z: (B, K, D), c: (B, D) or None; rope and attn_mask shared by every
        block. -> (x, z) after the last block (no final norm: the caller's heads add theirs)."""
        for block in self.blocks:
            x, z = block(x, z, c, rope=rope, attn_mask=attn_mask)
        return x, z
