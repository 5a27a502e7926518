"""BitMAR: SemTok's masked autoregressive generator over the bits of BSQ tokens (SemTok 3.3, A.2).

A SemTok tokenizer quantizes each of its K tokens with BSQ into one of V = 2^C codes, with C =
18 or 32: far too many for the V-way embedding table and softmax of a MaskGIT generator. The
generator therefore never looks a code up. Its input at a known position is the token's C
bits as signs, ``2 bit_i - 1`` (the BSQ code ``+-1/sqrt(C)`` times ``sqrt(C)``; bit i is bit i
of the id ``sum_i bit_i 2^i``), through one Linear C -> D; a masked position holds a learned
mask embedding instead. Its output at every position is a bitwise classifier (the "Infinite
Vocabulary Classifier" of Infinity, Han et al. 2025): C independent sigmoid logits, one per
bit. ``group_bits = g > 1`` splits the C bits into C/g groups of g and predicts each group with
a softmax over its 2^g values instead (the paper's Table 13 compares 18 groups of 1 bit, its
choice, with 2 groups of 9 at C = 18); g = 1 is the bitwise head. Either way the head has
O(C D) or O(C/g 2^g D) weights, never O(2^C D).

The network follows LlamaGen (Sun et al. 2024) with bidirectional attention, as the paper
does: pre-norm blocks with RMSNorm, a SwiGLU MLP (hidden width ``2/3 mlp_ratio D`` rounded up
to a multiple of 256, LlamaGen's rule), no biases in the qkv projection, QK normalisation
(Dehghani et al. 2023) and 1-D RoPE (:mod:`mstok.layers.rope`) over the K token positions.
The class is both a token and a condition, as the paper says: its embedding (a table of
``num_classes + 1`` rows, the last the null class of classifier-free guidance) is prepended to
the sequence (unrotated, as LlamaGen's class token) and also modulates every block through
adaLN. Which adaLN the paper uses is not stated; its parameter counts (318M at L, 746M at XL,
1.2B at XXL) are those of LlamaGen's blocks alone, which a DiT-style per-block map c -> 6D
(151M more at L) would contradict, so this is adaLN-single (PixArt-alpha, Chen et al. 2023):
one shared map c -> 6D (shift, scale, gate of both sub-layers), plus a learned (6, D) offset
per block. Both start at zero, as does the head, so every block starts as the identity and an
untrained model predicts fair coins (uniform groups): its samples are uniform over the codes.

Glossary: B batch, K tokens, D width, C bits per token (V = 2^C), g bits per group, G = C/g groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mstok.config_schema import (
    FRACTION,
    MAX_CODEBOOK,
    MAX_DEPTH,
    MAX_TOKENS,
    MAX_WIDTH,
    STRICTLY_POSITIVE,
    ConfigDict,
    Rule,
    positive,
)
from mstok.layers import init_weights
from mstok.layers.adaln import modulate, zero_init
from mstok.layers.attention import SelfAttention
from mstok.layers.embeddings import set_init_table
from mstok.layers.rope import Line1D, NoRotation, RotaryTables
from mstok.quantizers.base import MAX_ID_BITS
from mstok.quantizers.binary import ids_to_bits
from mstok.storage.saved import SavedModel

MAX_GROUP_BITS = 16  # a group's softmax has 2^g logits per position


@dataclass
class BitMARConfig(ConfigDict):
    """BitMAR hyper-parameters (module docstring).

    Attributes:
        num_tokens: K, the tokenizer's number of tokens.
        codebook_size: V = 2^C, the tokenizer's codebook size (a power of two: C is the bit count).
        num_classes: number of class labels (ImageNet: 1000); label ``num_classes`` is the null class.
        width, depth, num_heads: transformer size (SemTok-AR-L: 1024, 24, 16).
        mlp_ratio: the SwiGLU hidden width is ``2/3 mlp_ratio D`` rounded up to a multiple of 256.
        group_bits: g, bits predicted jointly by one softmax over 2^g values (1: independent
            bits, the paper's bitwise classifier); must divide C.
        qk_norm: LayerNorm on queries and keys per head (the paper uses QK normalisation).
        rope_theta: base of the 1-D RoPE over the K positions.
        norm_eps: RMSNorm epsilon.
        dropout: attention and residual dropout during training (LlamaGen: 0.1).
    """

    num_tokens: int = 256
    codebook_size: int = 2**18
    num_classes: int = 1000
    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    group_bits: int = 1
    qk_norm: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.1

    family: ClassVar[str] = "bitmar"
    field_rules: ClassVar[dict[str, Rule]] = {
        "num_tokens": positive(MAX_TOKENS),
        "codebook_size": Rule(ge=2, cap=2**MAX_ID_BITS, why="ids are int64"),
        "num_classes": positive(MAX_CODEBOOK, "the class table has a row per class"),
        "width": positive(MAX_WIDTH),
        "depth": positive(MAX_DEPTH),
        "num_heads": positive(MAX_WIDTH),
        "mlp_ratio": Rule(gt=0, cap=64),
        "group_bits": positive(MAX_GROUP_BITS, "a group's softmax has 2^group_bits logits"),
        "rope_theta": Rule(gt=1),
        "norm_eps": STRICTLY_POSITIVE,
        "dropout": FRACTION,
    }

    def __post_init__(self) -> None:
        super().__post_init__()  # the schema (field_rules); cross-field checks follow
        v = self.codebook_size
        if v & (v - 1):
            raise ValueError(
                f"codebook_size {v} is not a power of two: a bitwise generator models the C = log2 V bits "
                "of each id, so it needs the tokens of a BSQ/LFQ tokenizer (V = 2^C)"
            )
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(
                f"width {self.width} must be num_heads {self.num_heads} times an even head dim (RoPE rotates pairs)"
            )
        if self.num_bits % self.group_bits:
            raise ValueError(f"group_bits {self.group_bits} must divide the C = {self.num_bits} bits of a token")

    @property
    def num_bits(self) -> int:
        """C = log2 V."""
        return self.codebook_size.bit_length() - 1

    @property
    def num_groups(self) -> int:
        """G = C / g, the categorical predictions per token."""
        return self.num_bits // self.group_bits

    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.num_classes

    @property
    def mlp_hidden(self) -> int:
        """The SwiGLU hidden width: ``2/3 mlp_ratio D`` rounded up to a multiple of 256 (LlamaGen)."""
        return 256 * math.ceil(2 * self.mlp_ratio * self.width / 3 / 256)


class SwiGLU(nn.Module):
    """``W2 (silu(W1 x) * W3 x)``, no biases (LlamaGen's feed-forward), dropout on the output."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class BitMARBlock(nn.Module):
    """Pre-norm RMSNorm attention + SwiGLU block, modulated by adaLN-single (module docstring).

    ``x = x + gate1 * Attn(RMS(x) (1 + scale1) + shift1)``, the same with the MLP, where the six
    (B, D) vectors are the shared ``c -> 6D`` map plus this block's own (6, D) offsets.
    """

    def __init__(self, config: BitMARConfig) -> None:
        super().__init__()
        d = config.width
        self.norm1 = nn.RMSNorm(d, eps=config.norm_eps, elementwise_affine=False)
        self.attn = SelfAttention(d, config.num_heads, qkv_bias=False, dropout=config.dropout, qk_norm=config.qk_norm)
        self.norm2 = nn.RMSNorm(d, eps=config.norm_eps, elementwise_affine=False)
        self.mlp = SwiGLU(d, config.mlp_hidden, config.dropout)
        self.modulation = nn.Parameter(torch.empty(6, d))
        set_init_table(self, "modulation", torch.zeros(6, d))  # identity blocks at the start

    def forward(self, x: torch.Tensor, shared: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B, N, D), shared: (B, 6, D) the shared modulation, rope: (cos, sin) (N, d/2). -> (B, N, D)"""
        shift1, scale1, gate1, shift2, scale2, gate2 = (shared + self.modulation)[:, :, None].unbind(1)  # (B, 1, D)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class BitMAR(SavedModel, nn.Module):
    """Class-conditional bidirectional transformer over bit tokens: ``model(ids, mask, labels)``
    -> per-position logits of the bits (g = 1) or bit groups (module docstring)."""

    config_class: ClassVar[type[BitMARConfig]] = BitMARConfig

    def __init__(self, config: BitMARConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.width
        self.bit_embed = nn.Linear(cfg.num_bits, d)
        self.mask_token = nn.Parameter(torch.empty(1, d))
        # a free table, not nn.Embedding: init_weights gives free tables unit-norm rows
        self.class_embed = nn.Parameter(torch.empty(cfg.num_classes + 1, d))
        self.rope = RotaryTables(d // cfg.num_heads, [NoRotation(1), Line1D(cfg.num_tokens)], cfg.rope_theta)
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(d, 6 * d)))
        self.blocks = nn.ModuleList(BitMARBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.RMSNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.final_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(d, 2 * d)))
        outputs = cfg.num_bits if cfg.group_bits == 1 else cfg.num_groups * 2**cfg.group_bits
        self.head = zero_init(nn.Linear(d, outputs))
        init_weights(self)

    def bit_signs(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, K) int64 ids -> (B, K, C) float32 signs ``2 bit_i - 1`` (= BSQ code x sqrt(C))."""
        return ids_to_bits(ids, self.config.num_bits).float() * 2.0 - 1.0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits at every position.

        Args:
            ids: (B, K) integer ids in [0, V); those at masked positions are ignored.
            mask: (B, K) bool, True where the token is masked (unknown).
            labels: (B,) class ids in [0, num_classes], ``num_classes`` = null class.

        Returns:
            (B, K, C) bit logits (bit i is 1 with probability ``sigmoid``) when ``group_bits``
            is 1, else (B, K, G, 2^g) logits of each group's value ``sum_j bit_{g k + j} 2^j``.
            Shapes and dtypes are checked; values are not (a device sync).
        """
        cfg = self.config
        if ids.dim() != 2 or ids.shape[1] != cfg.num_tokens or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"ids must be integer ids of shape (B, {cfg.num_tokens}), got {ids.dtype} {tuple(ids.shape)}"
            )
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of the ids' shape {tuple(ids.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")  # fmt: skip
        b = ids.shape[0]
        if labels.shape != (b,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be integer class ids of shape ({b},), got {labels.dtype} {tuple(labels.shape)}"
            )
        x = self.bit_embed(self.bit_signs(ids).to(self.bit_embed.weight.dtype))  # (B, K, D)
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        c = F.embedding(labels.long(), self.class_embed)  # (B, D)
        x = torch.cat([c[:, None].to(x.dtype), x], dim=1)  # (B, 1 + K, D): the class token first
        shared = self.modulation(c).unflatten(-1, (6, cfg.width))  # (B, 6, D)
        rope = self.rope(1, cfg.num_tokens)
        for block in self.blocks:
            x = block(x, shared, rope)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        logits = self.head(modulate(self.final_norm(x[:, 1:]), shift, scale))  # the class slot predicts nothing
        if cfg.group_bits == 1:
            return logits  # (B, K, C)
        return logits.unflatten(-1, (cfg.num_groups, 2**cfg.group_bits))  # (B, K, G, 2^g)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters: embeddings (bits, mask, classes), transformer (blocks and the shared
        modulation), head (final modulation and classifier), total."""
        embed = sum(p.numel() for p in self.bit_embed.parameters()) + self.mask_token.numel() + self.class_embed.numel()
        head = sum(p.numel() for m in (self.final_modulation, self.head) for p in m.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"embeddings": embed, "transformer": total - embed - head, "head": head, "total": total}

    @classmethod
    def from_pretrained(cls, path: str | Path, weights: str | None = None) -> BitMAR:
        """Load a BitMAR saved by ``save_pretrained`` (or a checkpoint or run folder, by the rule of
        :func:`mstok.storage.locate.locate_model`), in eval mode."""
        return cls.load_saved(path, weights, BitMARConfig, "BitMAR generator", what="generator")


# The paper's sizes (Table 9: 318M, 746M, 1.2B; with adaLN-single 318M, 746M, 1.27B at K = 256, C = 18);
# K, V and the class count come from the tokens a model is trained on. The tiny preset is for
# CPU tests and demos, at the K and V of the tiny tokenizers with a BSQ bottleneck of C = 10.
BITMAR_PRESETS: dict[str, dict[str, Any]] = {
    "bitmar_tiny": {
        "width": 128, "depth": 4, "num_heads": 4, "num_tokens": 32, "codebook_size": 2**10, "num_classes": 200,
        "dropout": 0.0,
    },
    "bitmar_l": {"width": 1024, "depth": 24, "num_heads": 16},
    "bitmar_xl": {"width": 1280, "depth": 36, "num_heads": 20},
    "bitmar_xxl": {"width": 2048, "depth": 24, "num_heads": 32},
}  # fmt: skip
