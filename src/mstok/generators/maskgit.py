"""The MaskGIT generator over 1D tokens (TiTok 3.2 and appendix A, MsTok 4.1).

A bidirectional transformer reads ``[class token; K token slots]`` where each slot holds a
code id or the mask id, and predicts a distribution over the V codes at every slot.
Training masks a random fraction of the slots (see :mod:`mstok.losses.masked`); sampling
starts from all masks and reveals tokens over a few steps (see
:mod:`mstok.generators.maskgit_sampling`).

One embedding table holds every input symbol, in the official TiTok layout so its
generators load without remapping::

    [0, V)               the V image codes
    V                    the mask id
    V + 1 + c            class c, for c in [0, num_classes)
    V + 1 + num_classes  the "null" class of classifier-free guidance

With ``end_token`` (ragged token data, :mod:`mstok.data.ragged`) id V is the *end* id, a
(V+1)-th output that fills every slot past an image's length, and the rest moves up by one:
mask V + 1, class c at V + 2 + c. The sampler then returns the end id past each sample's length.

Two architectures: ``vit`` (a plain stack; pre-LN by default, or post-LN with an embedding
LayerNorm as in BERT, which the official TiTok generators are) and ``uvit`` (U-ViT: depth//2
in-blocks, a middle block, depth//2 out-blocks, each out-block first fusing the matching
in-block's output through a linear layer on the concatenation: long skip connections).

Glossary: B batch, K tokens, D width, V codebook size.
"""

from __future__ import annotations

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
    one_of,
    positive,
)
from mstok.generators.common import check_class_labels
from mstok.layers import init_weights
from mstok.layers.blocks import SelfAttentionBlock
from mstok.storage.saved import SavedModel

ARCHITECTURES = ("vit", "uvit")


@dataclass
class GeneratorConfig(ConfigDict):
    """MaskGIT generator hyper-parameters.

    Attributes:
        num_tokens: K, the tokenizer's number of latent tokens.
        codebook_size: V, the tokenizer's codebook size.
        num_classes: number of class labels (ImageNet: 1000).
        width, depth, num_heads, mlp_ratio: transformer size (MaskGIT-ViT: 768, 24, 16, 4).
        architecture: ``vit`` or ``uvit`` (module docstring).
        norm_first: pre-LN blocks with a final LayerNorm (True) or post-LN blocks (False, BERT).
        embed_norm: LayerNorm (and dropout) on the summed embeddings (BERT).
        qkv_bias: bias on the qkv projection (U-ViT has none).
        norm_eps: LayerNorm epsilon (BERT: 1e-12).
        dropout: attention and residual dropout during training (official recipe: 0.1).
        end_token: an end id V after the codes (module docstring): the generator learns
            variable lengths from ragged tokens (``pretokenize --target-psnr``); the trainer sets
            it from the data. Saved in ``config.json`` only when on.
    """

    num_tokens: int = 64
    codebook_size: int = 4096
    num_classes: int = 1000
    width: int = 768
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    architecture: str = "vit"
    norm_first: bool = True
    embed_norm: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    dropout: float = 0.1
    end_token: bool = False

    family: ClassVar[str] = "maskgit"
    field_rules: ClassVar[dict[str, Rule]] = {
        "num_tokens": positive(MAX_TOKENS),
        "codebook_size": positive(MAX_CODEBOOK, "the embedding table and logits have a row per code"),
        "num_classes": positive(MAX_CODEBOOK, "the embedding table has a row per class"),
        "width": positive(MAX_WIDTH),
        "depth": positive(MAX_DEPTH),
        "num_heads": positive(MAX_WIDTH),
        "mlp_ratio": Rule(gt=0, cap=64),
        "architecture": one_of(ARCHITECTURES),
        "norm_eps": STRICTLY_POSITIVE,
        "dropout": FRACTION,
    }

    def __post_init__(self) -> None:
        super().__post_init__()  # the schema (field_rules); cross-field checks follow
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.architecture == "uvit" and not self.norm_first:
            raise ValueError("the uvit architecture is pre-LN: set norm_first = true")

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        if not self.end_token:  # a field added later: configs saved before (and their hashes) stay as they were
            del values["end_token"]
        return values

    @property
    def num_outputs(self) -> int:
        """Ids the head predicts: the V codes, and the end id with ``end_token``."""
        return self.codebook_size + int(self.end_token)

    @property
    def end_id(self) -> int | None:
        """The end id (V) with ``end_token``, else None."""
        return self.codebook_size if self.end_token else None

    @property
    def mask_id(self) -> int:
        return self.num_outputs

    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.num_classes

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table: codes (and the end id), mask, classes, null class."""
        return self.num_outputs + self.num_classes + 2


class MaskGITGenerator(SavedModel, nn.Module):
    """Class-conditional masked-token transformer: (tokens, labels) -> logits over the V codes."""

    config_class: ClassVar[type[GeneratorConfig]] = GeneratorConfig

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.width
        # a free parameter, not nn.Embedding: init_weights gives free tables unit-norm rows
        self.token_embed = nn.Parameter(torch.empty(cfg.vocab_size, d))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_tokens + 1, d))  # class slot first
        self.embed_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.embed_norm else None
        self.embed_drop = nn.Dropout(cfg.dropout)

        def block() -> SelfAttentionBlock:
            return SelfAttentionBlock(
                d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.dropout, cfg.norm_first, cfg.norm_eps
            )

        if cfg.architecture == "vit":
            self.blocks = nn.ModuleList(block() for _ in range(cfg.depth))
        else:
            half = cfg.depth // 2
            self.in_blocks = nn.ModuleList(block() for _ in range(half))
            self.mid_block = block()
            self.out_blocks = nn.ModuleList(block() for _ in range(half))
            self.skips = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(half))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.norm_first else None
        self.head = nn.Linear(d, cfg.num_outputs)
        init_weights(self)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits over the codes (and the end id) at every slot.

        Args:
            tokens: (B, K) ids in [0, mask_id] (V, or V + 1 with an end token, is the mask id).
            labels: (B,) class ids in [0, num_classes], ``num_classes`` = null class.

        Returns:
            (B, K, V) logits ((B, K, V + 1) with an end token). Shapes and dtypes are checked;
            values are not (a device sync).
        """
        cfg = self.config
        if tokens.dim() != 2 or tokens.shape[1] != cfg.num_tokens or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be integer ids of shape (B, {cfg.num_tokens}), got {tuple(tokens.shape)}")
        if labels.shape != (tokens.shape[0],) or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be integer ids of shape ({tokens.shape[0]},), got {tuple(labels.shape)}")
        ids = torch.cat([labels[:, None] + cfg.mask_id + 1, tokens], dim=1)  # (B, 1 + K)
        x = F.embedding(ids, self.token_embed) + self.pos_embed  # (B, 1 + K, D)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.embed_drop(x)
        if cfg.architecture == "vit":
            for blk in self.blocks:
                x = blk(x)
        else:
            skips = []
            for blk in self.in_blocks:
                x = blk(x)
                skips.append(x)
            x = self.mid_block(x)
            for blk, fuse in zip(self.out_blocks, self.skips, strict=True):
                x = blk(fuse(torch.cat([x, skips.pop()], dim=-1)))
        if self.norm is not None:
            x = self.norm(x)
        return self.head(x[:, 1:])  # (B, K, V): the class slot predicts nothing

    def check_labels(self, labels: Any, allow_null: bool = True) -> torch.Tensor:
        """Validate class ids: integers (B,) in [0, num_classes) (or the null class)."""
        return check_class_labels(labels, self.config.num_classes, allow_null)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters: embeddings, transformer blocks, head, total."""
        embed = self.token_embed.numel() + self.pos_embed.numel()
        head = sum(p.numel() for p in self.head.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"embeddings": embed, "transformer": total - embed - head, "head": head, "total": total}

    @classmethod
    def from_pretrained(cls, path: str | Path, weights: str | None = None) -> MaskGITGenerator:
        """Load a MaskGIT generator saved by ``save_pretrained`` (or a checkpoint or run folder, by the
        rule of :func:`mstok.storage.locate.locate_model`), in eval mode."""
        return cls.load_saved(path, weights, GeneratorConfig, "MaskGIT generator", what="generator")
