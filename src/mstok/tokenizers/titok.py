"""TiTok: an image is worth 32 tokens (Yu et al., 2024), the baseline mstok builds on.

Encoder: K learnable latent tokens are concatenated *after* the P patch tokens (and a
class token) and the whole sequence runs through one ViT; only the K latent outputs are
kept, normalised and projected to the code dim C. Decoder: the K quantized tokens are
projected back to width D and concatenated after P copies of a mask token (plus a class
token); a ViT fills in the P patch tokens, which a head turns into pixels or proxy codes.

Because the latents share the encoder's self-attention with the patches, encoder cost
grows with (P + K)^2: that is the scalability bottleneck MsTok removes.

Glossary: B batch, P patches, K latent tokens, D width, C code dim, V codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mstok.layers import PatchTokens, Transformer, build_head
from mstok.tokenizers.base import Tokenizer, TokenizerConfig


@dataclass
class TiTokConfig(TokenizerConfig):
    """TiTok hyper-parameters; every field is in :class:`TokenizerConfig`."""

    family: ClassVar[str] = "titok"


class TiTokEncoder(nn.Module):
    """(B, 3, H, W) -> latents (B, K, C) through a ViT over [class; patches; latents]."""

    def __init__(self, cfg: TiTokConfig) -> None:
        super().__init__()
        d, k = cfg.width, cfg.num_latent_tokens
        self.num_latent_tokens = k
        self.patch_tokens = PatchTokens(cfg.image_size, cfg.patch_size, d)
        self.latent_tokens = nn.Parameter(torch.empty(k, d))
        self.latent_pos_embed = nn.Parameter(torch.empty(k, d))
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.code_dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised latent tokens (B, K, D)."""
        x = self.patch_tokens(images)  # (B, 1+P, D)
        latents = (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)  # (B, K, D)
        x = self.ln_pre(torch.cat([x, latents], dim=1))  # (B, 1+P+K, D)
        x, _ = self.transformer(x)
        return self.ln_post(x[:, -self.num_latent_tokens :])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images))  # (B, K, C)


class TiTokDecoder(nn.Module):
    """Codes (B, K, C) -> pixels (B, 3, H, W) or proxy logits (B, P, V_proxy)."""

    def __init__(self, cfg: TiTokConfig) -> None:
        super().__init__()
        d = cfg.width
        self.num_patches = cfg.num_patches
        self.embed = nn.Linear(cfg.code_dim, d)
        self.latent_pos_embed = nn.Parameter(torch.empty(cfg.num_latent_tokens, d))
        self.class_token = nn.Parameter(torch.empty(1, d))
        self.mask_token = nn.Parameter(torch.empty(1, d))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_patches + 1, d))
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(d)
        self.head = build_head(cfg.head, d, cfg.patch_size, cfg.grid_size, cfg.proxy_codebook_size)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b = codes.shape[0]
        latents = self.embed(codes) + self.latent_pos_embed  # (B, K, D)
        slots = torch.cat([self.class_token, self.mask_token.expand(self.num_patches, -1)]) + self.pos_embed
        x = self.ln_pre(torch.cat([slots.expand(b, -1, -1), latents], dim=1))  # (B, 1+P+K, D)
        x, _ = self.transformer(x)
        return self.head(self.ln_post(x[:, 1 : 1 + self.num_patches]))


class TiTok(Tokenizer):
    """The TiTok 1D tokenizer."""

    config_class = TiTokConfig

    def build(self, config: TokenizerConfig) -> tuple[nn.Module, nn.Module]:
        return TiTokEncoder(config), TiTokDecoder(config)
