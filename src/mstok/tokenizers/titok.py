"""TiTok: an image is worth 32 tokens (Yu et al., 2024), the baseline mstok builds on.

Encoder: K learnable latent tokens are concatenated *after* the P patch tokens (and a
class token) and the whole sequence runs through one ViT; only the K latent outputs are
kept, normalised and projected to the code dim C. Decoder: the K quantized tokens are
projected back to width D and concatenated after P copies of a mask token (plus a class
token); a ViT fills in the P patch tokens, which a head turns into pixels or proxy codes.

Because the latents share the encoder's self-attention with the patches, encoder cost
grows with (P + K)^2: that is the scalability bottleneck MsTok removes.

The options beyond :class:`TokenizerConfig` describe the released official checkpoints
(bytedance/1d-tokenizer, imported by :mod:`mstok.persistence.convert.titok`): a decoder of another size
than the encoder ("BL" = Base encoder, Large decoder), the legacy token projection of the
two-stage releases, and Gaussian (VAE) latents instead of a codebook.

Glossary: B batch, P patches, K latent tokens, D width, C code dim, V codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mstok.config_schema import MAX_DEPTH, MAX_WIDTH, NON_NEGATIVE, Rule, one_of, positive
from mstok.layers import PatchTokens, Transformer, build_head
from mstok.layers.embeddings import add_grid_position_embedding, set_init_table
from mstok.tokenizers.base import Tokenizer, TokenizerConfig

TOKEN_PROJECTIONS = ("per_token", "legacy")


@dataclass
class TiTokConfig(TokenizerConfig):
    """TiTok hyper-parameters on top of :class:`TokenizerConfig`.

    Attributes:
        decoder_width: width of the decoder ViT; None uses the encoder's ``width``. The
            official "BL"/"SL" releases pair a Base/Small encoder with a Large decoder.
        decoder_depth: blocks of the decoder ViT; None uses ``depth``.
        decoder_num_heads: attention heads of the decoder ViT; None uses ``num_heads``.
        token_projection: how the encoder maps its K normalised outputs (B, K, D) to codes
            (B, K, C). ``per_token`` (default): one linear map applied to each token.
            ``legacy``: what the official two-stage releases (TiTok-L-32, B-64, S-128) were
            trained with: the (B, K, D) tensor is reshaped to (B, D, K, 1) *without* a
            transpose before a 1x1 conv, so "token" k of the conv input is the k-th column of
            the flat K*D numbers read as a D x K matrix, a mix of several tokens' channels
            (official issues #16 and #98). The newer single-stage and VAE releases fixed it
            (``is_legacy: False``). Only the encoder is affected: the official decoder reshapes
            its (B, C, 1, K) input correctly; its legacy side is the proxy-code head
            (``head="proxy_codes"``: 1x1 conv D -> 2D, tanh, 1x1 conv 2D -> 1024).
        kl_weight: weight of the KL term when ``quantizer="vae"`` (a ``kl`` table that sets
            no ``kl_weight`` of its own); 1e-6 in the official VAE training configs. A VAE's
            encoder emits a mean and a log-variance of C numbers per token; ``encode``
            returns continuous (B, K, C) latents (the mean, or a sample) and ``decode``
            takes them.
    """

    decoder_width: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    token_projection: str = "per_token"
    kl_weight: float = 1e-6

    family: ClassVar[str] = "titok"
    spec_defaults: ClassVar[dict[str, dict[str, str]]] = {
        **TokenizerConfig.spec_defaults,
        "kl": {"kl_weight": "kl_weight"},
    }
    field_rules: ClassVar[dict[str, Rule]] = {
        "decoder_width": positive(MAX_WIDTH),
        "decoder_depth": positive(MAX_DEPTH),
        "decoder_num_heads": positive(MAX_WIDTH),
        "token_projection": one_of(TOKEN_PROJECTIONS),
        "kl_weight": NON_NEGATIVE,
    }
    optional_defaults: ClassVar[dict[str, Any]] = {
        **TokenizerConfig.optional_defaults,
        "decoder_width": None,
        "decoder_depth": None,
        "decoder_num_heads": None,
        "token_projection": "per_token",
        "kl_weight": 1e-6,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        width, _, heads = self.decoder_dims
        if width % heads:
            raise ValueError(f"decoder width {width} is not a multiple of decoder num_heads {heads}")


class TiTokEncoder(nn.Module):
    """(B, 3, H, W) -> latents (B, K, C) (or (B, K, 2C) mean and log-variance for a VAE)
    through a ViT over [class; patches; latents]."""

    def __init__(self, cfg: TiTokConfig) -> None:
        super().__init__()
        d, k = cfg.width, cfg.num_latent_tokens
        self.num_latent_tokens = k
        self.legacy_projection = cfg.token_projection == "legacy"
        self.patch_tokens = PatchTokens(cfg.image_size, cfg.patch_size, d, position_embedding=cfg.position_embedding)
        self.latent_tokens = nn.Parameter(torch.empty(k, d))
        self.latent_pos_embed = nn.Parameter(torch.empty(k, d))
        grid = cfg.latent_init_table()
        if grid is not None:  # latent k starts as "the region at grid cell k"
            set_init_table(self, "latent_tokens", torch.zeros(k, d))
            set_init_table(self, "latent_pos_embed", grid)
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.quantizer_input_dim)  # C, or 2C for a Gaussian bottleneck

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised latent tokens (B, K, D)."""
        x = self.patch_tokens(images)  # (B, 1+P, D)
        latents = (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)  # (B, K, D)
        x = self.ln_pre(torch.cat([x, latents], dim=1))  # (B, 1+P+K, D)
        x, _ = self.transformer(x)
        return self.ln_post(x[:, -self.num_latent_tokens :])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)  # (B, K, D)
        if self.legacy_projection:
            # The official legacy encoder reads the contiguous (B, K, D) memory as (B, D, K):
            # row k of this (B, K, D) view is column k of that matrix, which is what its 1x1
            # conv projected; the released two-stage weights only work with this mixing.
            b, k, d = x.shape
            x = x.reshape(b, d, k).transpose(1, 2)  # (B, K, D), tokens and channels mixed
        return self.proj(x)  # (B, K, C) or (B, K, 2C)


class TiTokDecoder(nn.Module):
    """Codes (B, K, C) -> pixels (B, 3, H, W) or proxy logits (B, P, V_proxy)."""

    def __init__(self, cfg: TiTokConfig) -> None:
        super().__init__()
        d, depth, heads = cfg.decoder_dims
        self.num_patches = cfg.num_patches
        self.embed = nn.Linear(cfg.code_dim, d)
        self.latent_pos_embed = nn.Parameter(torch.empty(cfg.num_latent_tokens, d))
        grid = cfg.latent_init_table()
        if grid is not None and d == cfg.width:  # a decoder of another width keeps the random start
            set_init_table(self, "latent_pos_embed", grid)
        self.class_token = nn.Parameter(torch.empty(1, d))
        self.mask_token = nn.Parameter(torch.empty(1, d))
        add_grid_position_embedding(self, "pos_embed", cfg.grid_size, d, cfg.position_embedding, leading=1)
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, depth, heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm)
        self.ln_post = nn.LayerNorm(d)
        self.head = build_head(
            cfg.head, d, cfg.patch_size, cfg.grid_size, cfg.proxy_codebook_size, pixel_head=cfg.pixel_head
        )

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b = codes.shape[0]
        latents = self.embed(codes) + self.latent_pos_embed  # (B, K, D)
        slots = torch.cat([self.class_token, self.mask_token.expand(self.num_patches, -1)]) + self.pos_embed
        x = self.ln_pre(torch.cat([slots.expand(b, -1, -1), latents], dim=1))  # (B, 1+P+K, D)
        x, _ = self.transformer(x)
        return self.head(self.ln_post(x[:, 1 : 1 + self.num_patches]))


class TiTok(Tokenizer):
    """The TiTok 1D tokenizer (VQ ids by default; any bottleneck of :class:`TokenizerConfig`)."""

    config_class = TiTokConfig

    def build(self, config: TokenizerConfig) -> tuple[nn.Module, nn.Module]:
        return TiTokEncoder(config), TiTokDecoder(config)
