"""SemTok's two MMDiT networks (Chen et al., "SemTok", section 3.1 and appendix A.1).

Both are dual-stream joint transformers (:class:`~mstok.layers.joint.JointTransformer`) over
a 2-D stream of latent patches and a 1-D stream of K tokens, with 2-D RoPE on the patches and
1-D RoPE on the tokens (``RotaryTables(d, [Grid2D(g, g), Line1D(K)])``):

* :class:`SemTokEncoder`: patchified latents (Linear) and K learnable tokens, no modulation;
  the token stream's outputs -> LayerNorm -> Linear are the quantizer's input, the patch
  stream's outputs -> LayerNorm are the features the distillation loss aligns to the teacher.
* :class:`SemTokDecoder`: the patch stream carries whatever the caller embeds (the noisy latent
  of stage I, learnable mask tokens of stage II, :mod:`mstok.tokenizers.semtok`), the token
  stream the embedded codes; both streams are modulated by the timestep embedding (adaLN-Zero,
  as in SD3, whose MMDiT the paper's decoder starts from), and a modulated final layer maps the
  patch stream to latent patches.

A stream whose last-block output nobody reads (the decoder's token stream; the encoder's patch
stream when no distillation reads it) keeps only what the other stream's attention needs from
it in the last block, like SD3's "pre-only" context block (:func:`prune_last_stream`): the
parameters it would otherwise leave without gradients, which data-parallel training refuses,
are not built at all.

Glossary: B batch, P patches (g x g), K latent tokens, D width, C code dim, c_in = latent
channels x p x p values per patch.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mstok.layers.adaln import FinalLayer, TimestepEmbedding
from mstok.layers.joint import JointBlock, JointTransformer
from mstok.layers.rope import Grid2D, Line1D, RotaryTables


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, P, C * p * p) patches in raster order."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch)


def unpatchify(patches: torch.Tensor, patch: int, grid: int) -> torch.Tensor:
    """(B, P, C * p * p) patches of a g x g grid -> (B, C, g * p, g * p) latents."""
    return rearrange(patches, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=grid, ph=patch, pw=patch)


def prune_last_stream(block: JointBlock, stream: str) -> None:
    """Drop what ``stream`` ("x" or "z") computes after the joint attention in ``block``.

    Its keys and values still enter the other stream's attention; its own attention output
    projection, query norm, second LayerNorm and MLP become identities: their results would
    never be read. The block still runs unchanged (the stream's output is garbage, unused).
    """
    attention = getattr(block.attn, f"{stream}_attn")
    layers = getattr(block, f"{stream}_stream")
    attention.proj = nn.Identity()
    attention.qk_norm.q_norm = nn.Identity()
    layers.norm2 = nn.Identity()
    layers.mlp = nn.Identity()


class SemTokEncoder(nn.Module):
    """Latents (B, C_lat, h, w) -> (patch features (B, P, D) or None, quantizer input (B, K, C_q)).

    Args:
        in_dim: c_in, values per latent patch.
        grid: g, latent patches per side.
        num_tokens: K.
        dim, depth, num_heads, mlp_ratio, qk_norm: the joint transformer.
        out_dim: the quantizer's input width (C, or 2C for a Gaussian bottleneck).
        patch_features: expose the patch stream (for distillation); False prunes it in the last block.
        patch: p, the latent patch side.
        rope_theta: RoPE base.
    """

    def __init__(
        self,
        in_dim: int,
        grid: int,
        num_tokens: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        out_dim: int,
        patch_features: bool,
        patch: int,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Linear(in_dim, dim)
        self.latent_tokens = nn.Parameter(torch.empty(num_tokens, dim))  # z_m of eq. 1
        self.transformer = JointTransformer(dim, depth, num_heads, mlp_ratio, qk_norm=qk_norm)
        self.rope = RotaryTables(dim // num_heads, [Grid2D(grid, grid), Line1D(num_tokens)], theta=rope_theta)
        self.patch_norm = nn.LayerNorm(dim) if patch_features else None
        if not patch_features:
            prune_last_stream(self.transformer.blocks[-1], "x")
        self.ln_post = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def streams(self, latents: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Latents -> (normalised patch features (B, P, D) or None, normalised token features (B, K, D))."""
        x = self.patch_embed(patchify(latents, self.patch))  # (B, P, D)
        z = self.latent_tokens.expand(x.shape[0], -1, -1)  # (B, K, D)
        x, z = self.transformer(x, z, rope=self.rope(x.shape[1], z.shape[1]))
        return (None if self.patch_norm is None else self.patch_norm(x)), self.ln_post(z)

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> the token features (B, K, D) before the projection (linear probing reads them)."""
        return self.streams(latents)[1]

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        features, tokens = self.streams(latents)
        return features, self.proj(tokens)


class SemTokDecoder(nn.Module):
    """(patch-stream tokens (B, P, D), codes (B, K, C), model time (B,)) -> latent patches (B, P, c_in).

    Args:
        code_dim: C, the width of the quantized codes.
        out_dim: c_in, values per latent patch.
        grid: g, latent patches per side.
        num_tokens: K.
        dim, depth, num_heads, mlp_ratio, qk_norm: the joint transformer.
        rope_theta: RoPE base.
    """

    def __init__(
        self,
        code_dim: int,
        out_dim: int,
        grid: int,
        num_tokens: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        self.code_embed = nn.Linear(code_dim, dim)
        self.time_embed = TimestepEmbedding(dim)
        self.transformer = JointTransformer(
            dim, depth, num_heads, mlp_ratio, qk_norm=qk_norm, modulate_x=True, modulate_z=True
        )
        prune_last_stream(self.transformer.blocks[-1], "z")  # the output is read from the patch stream only
        self.rope = RotaryTables(dim // num_heads, [Grid2D(grid, grid), Line1D(num_tokens)], theta=rope_theta)
        self.final = FinalLayer(dim, out_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.code_embed.weight.dtype

    def forward(self, tokens: torch.Tensor, codes: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """tokens: (B, P, D) the patch stream's input; codes: (B, K, C); time: (B,) model time
        (1000 t) -> (B, P, c_in)."""
        c = self.time_embed(time)  # (B, D)
        z = self.code_embed(codes.to(self.dtype))  # (B, K, D)
        x, _ = self.transformer(tokens, z, c, rope=self.rope(tokens.shape[1], z.shape[1]))
        return self.final(x, c)
