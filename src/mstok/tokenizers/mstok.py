"""MsTok: query-based multi-scale 1D tokenization (the primary system of this project).

Encoder: a ViT runs over the patches only (plus a class token). The outputs of the blocks
listed in ``memory_layers`` are LayerNorm-ed, tagged with a learnable scale embedding and
concatenated into a memory of m * P tokens. K learnable query tokens then read that memory
through the query attention module QAM_e (cross-attention blocks); the result is
normalised, projected to the code dim C and vector-quantized.

Decoder (symmetric): the quantized tokens, projected to width D with a positional
embedding, are the context; P mask-token queries read them through QAM_d, and a ViT plus a
head turns the P tokens into pixels (or proxy-code logits).

Only QAM touches K, and it does so linearly: K queries over a fixed memory in the
encoder, P queries over K context tokens in the decoder. The backbones never see K.

Ablation switches (paper Table 3): ``memory_layers`` (1 to 4 levels), ``scale_embedding``,
``aggregation`` = concat | weighted_add, ``readout`` = cross_attention | linear (QAM_e only;
the decoder always uses QAM_d).

Glossary: B batch, P patches, K latent tokens, D width, C code dim, V codebook size,
m memory levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import nn

from mstok.config_schema import MAX_DEPTH, Rule, one_of, positive
from mstok.layers import CrossAttentionBlock, PatchTokens, Transformer, build_head
from mstok.layers.embeddings import add_grid_position_embedding, set_init_table
from mstok.tokenizers.base import Tokenizer, TokenizerConfig

AGGREGATIONS = ("concat", "weighted_add")
READOUTS = ("cross_attention", "linear")


@dataclass
class MsTokConfig(TokenizerConfig):
    """MsTok hyper-parameters on top of :class:`TokenizerConfig`.

    Attributes:
        memory_layers: 1-based encoder blocks whose outputs form the memory; the last one
            must be the final block (B: 3,6,9,12; L: 6,12,18,24).
        scale_embedding: add a learnable embedding per memory level.
        aggregation: ``concat`` (m*P memory tokens) or ``weighted_add`` (softmax-weighted
            sum of the levels, P memory tokens).
        readout: how the K latents read the memory: ``cross_attention`` (QAM_e) or
            ``linear`` (each latent is a learned linear combination of memory tokens).
        qam_depth: cross-attention blocks in QAM_e and QAM_d.
        qam_self_attention: add query self-attention inside each QAM block.
    """

    memory_layers: tuple[int, ...] = (3, 6, 9, 12)
    scale_embedding: bool = True
    aggregation: str = "concat"
    readout: str = "cross_attention"
    qam_depth: int = 1
    qam_self_attention: bool = True

    family: ClassVar[str] = "mstok"
    field_rules: ClassVar[dict[str, Rule]] = {
        # the block numbers' range depends on depth: checked in __post_init__
        "memory_layers": Rule(item=Rule(cap=MAX_DEPTH)),
        "aggregation": one_of(AGGREGATIONS),
        "readout": one_of(READOUTS),
        "qam_depth": positive(MAX_DEPTH),
    }

    def __post_init__(self) -> None:
        super().__post_init__()  # the schema (field_rules) made memory_layers a tuple of ints
        layers = self.memory_layers
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"memory_layers must be a non-empty increasing list, got {list(layers)}")
        if layers[0] < 1 or layers[-1] != self.depth:
            raise ValueError(
                f"memory_layers {list(layers)} must lie in 1..depth and end at the last block ({self.depth}); "
                "blocks after the last memory layer would never be used"
            )

    @property
    def memory_length(self) -> int:
        """Tokens in the multi-scale memory."""
        levels = len(self.memory_layers) if self.aggregation == "concat" else 1
        return levels * self.num_patches


class MultiScaleMemory(nn.Module):
    """m feature maps (B, P, D) -> memory (B, m*P, D) (concat) or (B, P, D) (weighted_add).

    Each level gets its own LayerNorm and, optionally, a learnable scale embedding (eq. 6).
    """

    def __init__(self, dim: int, num_levels: int, scale_embedding: bool, aggregation: str) -> None:
        super().__init__()
        self.aggregation = aggregation
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_levels))
        self.scale_embed = nn.Parameter(torch.empty(num_levels, dim)) if scale_embedding else None
        self.level_logits = nn.Parameter(torch.empty(num_levels)) if aggregation == "weighted_add" else None

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        feats = torch.stack([norm(f) for norm, f in zip(self.norms, levels, strict=True)], dim=1)  # (B, m, P, D)
        if self.scale_embed is not None:
            feats = feats + self.scale_embed[None, :, None, :]
        if self.level_logits is not None:
            weights = self.level_logits.softmax(dim=0)
            return torch.einsum("bmpd,m->bpd", feats, weights)  # (B, P, D)
        return rearrange(feats, "b m p d -> b (m p) d")  # (B, m*P, D)


class QueryAttention(nn.Module):
    """QAM: queries (B, N, D) attend to a context (B, M, D) through cross-attention blocks."""

    def __init__(
        self, dim: int, num_heads: int, depth: int, mlp_ratio: float, self_attention: bool, qk_norm: bool = False
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(dim, num_heads, mlp_ratio, self_attention=self_attention, qk_norm=qk_norm)
            for _ in range(depth)
        )

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            queries = block(queries, context)
        return queries


class LinearReadout(nn.Module):
    """The ablation's "linear" querying: each latent is a learned linear mix of memory tokens.

    ``z_k = q_k + sum_j W[k, j] * memory_j`` - the same query tokens serve as a per-latent
    bias, so "unfreeze query tokens" still means something. Cost is linear in K.
    """

    def __init__(self, num_queries: int, memory_length: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_queries, memory_length))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return queries + torch.einsum("km,bmd->bkd", self.weight, context)  # (B, K, D)


class MsTokEncoder(nn.Module):
    """(B, 3, H, W) -> latents (B, K, C): ViT -> multi-scale memory -> QAM_e -> LN -> proj."""

    def __init__(self, cfg: MsTokConfig) -> None:
        super().__init__()
        d = cfg.width
        self.memory_layers = cfg.memory_layers
        self.patch_tokens = PatchTokens(cfg.image_size, cfg.patch_size, d, position_embedding=cfg.position_embedding)
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm)
        self.memory = MultiScaleMemory(d, len(cfg.memory_layers), cfg.scale_embedding, cfg.aggregation)
        self.query_tokens = nn.Parameter(torch.empty(cfg.num_latent_tokens, d))
        grid = cfg.latent_init_table()
        if grid is not None:  # query k starts as "the region at grid cell k"
            set_init_table(self, "query_tokens", grid)
        if cfg.readout == "cross_attention":
            self.qam = QueryAttention(
                d, cfg.num_heads, cfg.qam_depth, cfg.mlp_ratio, cfg.qam_self_attention, qk_norm=cfg.qk_norm
            )
        else:
            self.qam = LinearReadout(cfg.num_latent_tokens, cfg.memory_length)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.quantizer_input_dim)  # C, or 2C for a Gaussian bottleneck

    def build_memory(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> multi-scale memory (B, m*P, D) (or (B, P, D) for weighted_add)."""
        x = self.ln_pre(self.patch_tokens(images))  # (B, 1+P, D)
        _, taps = self.transformer(x, return_layers=self.memory_layers)
        return self.memory([tap[:, 1:] for tap in taps])  # drop the class token: memory is patches only

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised latent tokens (B, K, D)."""
        memory = self.build_memory(images)
        queries = self.query_tokens.expand(images.shape[0], -1, -1)  # (B, K, D)
        return self.ln_post(self.qam(queries, memory))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images))  # (B, K, C)


class MsTokDecoder(nn.Module):
    """Codes (B, K, C) -> pixels (B, 3, H, W) or proxy logits (B, P, V_proxy) via QAM_d + ViT."""

    def __init__(self, cfg: MsTokConfig) -> None:
        super().__init__()
        d = cfg.width
        self.embed = nn.Linear(cfg.code_dim, d)
        self.latent_pos_embed = nn.Parameter(torch.empty(cfg.num_latent_tokens, d))
        grid = cfg.latent_init_table()
        if grid is not None:
            set_init_table(self, "latent_pos_embed", grid)
        self.mask_token = nn.Parameter(torch.empty(1, d))
        add_grid_position_embedding(self, "pos_embed", cfg.grid_size, d, cfg.position_embedding)
        self.qam = QueryAttention(
            d, cfg.num_heads, cfg.qam_depth, cfg.mlp_ratio, cfg.qam_self_attention, qk_norm=cfg.qk_norm
        )
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm)
        self.ln_post = nn.LayerNorm(d)
        self.head = build_head(
            cfg.head, d, cfg.patch_size, cfg.grid_size, cfg.proxy_codebook_size, pixel_head=cfg.pixel_head
        )

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        context = self.embed(codes) + self.latent_pos_embed  # (B, K, D)
        queries = (self.mask_token + self.pos_embed).expand(codes.shape[0], -1, -1)  # (B, P, D)
        x = self.ln_pre(self.qam(queries, context))
        x, _ = self.transformer(x)
        return self.head(self.ln_post(x))


class MsTok(Tokenizer):
    """The MsTok 1D tokenizer."""

    config_class = MsTokConfig

    def build(self, config: TokenizerConfig) -> tuple[nn.Module, nn.Module]:
        return MsTokEncoder(config), MsTokDecoder(config)
