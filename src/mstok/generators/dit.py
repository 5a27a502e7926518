"""A class-conditional diffusion transformer (DiT, Peebles & Xie 2023) over continuous tokens.

The denoiser of a latent diffusion model whose latents are the K continuous tokens (K, C) of
a KL tokenizer (HieraTok trains DiT-XL on its tokens as the generation testbed). The
contract with the diffusion objectives (:mod:`mstok.diffusion`) is one call::

    model(x, t, y) -> prediction      x (B, K, C) float, t (B,) in [0, 1000), y (B,) long

with ``y`` in [0, num_classes] and ``num_classes`` the null label of classifier-free
guidance; the prediction (noise, velocity or clean tokens: the objective decides) has x's
shape. Each token is embedded by a Linear C -> D, positions are added, and ``depth``
adaLN-Zero blocks (:mod:`mstok.layers.adaln`) conditioned on ``c = t_emb + y_emb`` lead to a
final layer D -> C. At initialisation every block is the identity and the output is zero.

Positional embeddings (``position_embedding``):

* ``learned``: a (K, D) parameter; for 1D tokens, whose order carries no geometry.
* ``sincos``: the fixed 1-D sinusoidal table of positions 0..K-1.
* ``multiscale``: for tokens that are square grids concatenated from low to high resolution
  (HieraTok: side lengths ``scales = (1, 2, 4, 8)`` give 1 + 4 + 16 + 64 tokens). Every cell
  centre of every grid is placed in one shared image frame and gets the fixed 2-D sin-cos
  embedding of that point, in units of the finest grid's cells (so the finest grid gets
  exactly the usual 2-D table and a coarse cell the position of the block it covers), plus a
  learned embedding of its scale, which tells apart a coarse and a fine cell at one centre.
* ``table``: a fixed (K, D) table handed in by the caller (``DiT(config, positions=...)``),
  for a tokenizer with a layout of its own; it is saved with the weights.

Glossary: B batch, K tokens, C token channels, D width, S scales.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mstok.config_schema import (
    MAX_CODEBOOK,
    MAX_DEPTH,
    MAX_TOKENS,
    MAX_WIDTH,
    PROBABILITY,
    STRICTLY_POSITIVE,
    ConfigDict,
    ConfigError,
    Rule,
    one_of,
    positive,
)
from mstok.diffusion.config import DiffusionConfig
from mstok.layers import init_weights
from mstok.layers.adaln import AdaLNZeroBlock, FinalLayer, LabelEmbedding, TimestepEmbedding, frequency_embedding
from mstok.layers.embeddings import latent_grid, sincos_at
from mstok.storage.saved import SavedModel

POSITION_EMBEDDINGS = ("learned", "sincos", "multiscale", "table")


@dataclass
class DiTConfig(ConfigDict):
    """DiT hyper-parameters.

    Attributes:
        num_tokens: K, the tokenizer's number of tokens.
        token_dim: C, the channels of each token.
        num_classes: number of class labels (ImageNet: 1000); label ``num_classes`` is the null label.
        width, depth, num_heads, mlp_ratio: transformer size (DiT-XL: 1152, 28, 16, 4).
        class_dropout: probability of replacing a label by the null label in training (DiT: 0.1).
        label_gain: multiplier of the class embedding (:class:`~mstok.layers.adaln.LabelEmbedding`;
            DiT: 1). With few steps per class (the tiny preset: 2,000 steps of 64 over 200 classes)
            the class rows hardly train at 1 and the samples ignore their class; see dit_tiny.
        position_embedding: one of ``POSITION_EMBEDDINGS`` (module docstring).
        scales: side lengths of the square token grids, low to high resolution
            (``multiscale`` only; their squares must sum to K).
        qk_norm: LayerNorm on queries and keys per head.
        frequency_dim: sinusoidal features of the timestep embedding (DiT: 256).
        latent_mean, latent_std: per-channel (C each) statistics of the tokenizer's latents the
            model was trained on: it models ``(latent - mean) / std`` and samples are mapped back
            by ``mean + std * x`` before decoding (empty: the latents as they are). The network
            never reads them; the generator trainer and sampler do.
        diffusion: the :class:`~mstok.diffusion.DiffusionConfig` fields of the objective the
            model was trained with, so sampling uses the same process (empty: the default DDPM).
    """

    num_tokens: int = 256
    token_dim: int = 16
    num_classes: int = 1000
    width: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1
    label_gain: float = 1.0
    position_embedding: str = "learned"
    scales: tuple[int, ...] = ()
    qk_norm: bool = False
    frequency_dim: int = 256
    latent_mean: tuple[float, ...] = ()
    latent_std: tuple[float, ...] = ()
    diffusion: dict[str, Any] = field(default_factory=dict)

    family: ClassVar[str] = "dit"
    field_rules: ClassVar[dict[str, Rule]] = {
        "num_tokens": positive(MAX_TOKENS),
        "token_dim": positive(MAX_WIDTH),
        "num_classes": positive(MAX_CODEBOOK, "the label table has a row per class"),
        "width": positive(MAX_WIDTH),
        "depth": positive(MAX_DEPTH),
        "num_heads": positive(MAX_WIDTH),
        "mlp_ratio": Rule(gt=0, cap=64),
        "class_dropout": PROBABILITY,
        "label_gain": Rule(gt=0, cap=10_000),
        "position_embedding": one_of(POSITION_EMBEDDINGS, "a DiT position embedding"),
        "scales": Rule(item=positive(MAX_TOKENS)),
        "frequency_dim": positive(MAX_WIDTH),
        "latent_std": Rule(item=STRICTLY_POSITIVE),
    }

    def __post_init__(self) -> None:
        super().__post_init__()  # the schema (field_rules); cross-field checks follow
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even (cosines and sines), got {self.frequency_dim}")
        if self.position_embedding == "sincos" and self.width % 2:
            raise ValueError(f"position_embedding 'sincos' needs an even width, got {self.width}")
        if (len(self.latent_mean), len(self.latent_std)) not in ((0, 0), (self.token_dim, self.token_dim)):
            raise ValueError(
                f"latent_mean and latent_std must both hold token_dim = {self.token_dim} values (or both be "
                f"empty), got {len(self.latent_mean)} and {len(self.latent_std)}"
            )
        try:
            DiffusionConfig.from_dict(self.diffusion)
        except ConfigError as err:
            raise err.under("diffusion") from None
        except (ValueError, TypeError) as err:  # an unknown field or a cross-field check
            raise ValueError(f"diffusion: {err}") from None
        if self.position_embedding != "multiscale":
            if self.scales:
                raise ValueError(
                    f"scales {list(self.scales)} only apply to position_embedding 'multiscale', "
                    f"not {self.position_embedding!r}"
                )
            return
        if not self.scales:
            raise ValueError("position_embedding 'multiscale' needs scales, the side lengths of the token grids")
        total = sum(s * s for s in self.scales)
        if total != self.num_tokens:
            raise ValueError(
                f"scales {list(self.scales)} hold {total} tokens (the sum of their squares), "
                f"but num_tokens is {self.num_tokens}"
            )
        if self.width % 4:
            raise ValueError(f"position_embedding 'multiscale' needs a width divisible by 4, got {self.width}")

    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.num_classes


def multiscale_positions(scales: tuple[int, ...] | list[int], dim: int) -> torch.Tensor:
    """The fixed part (K, D) of ``multiscale`` positions: for each square grid of side s, low to
    high resolution, the 2-D sin-cos embeddings of its s*s cell centres in raster order.

    A centre at ``(i + 0.5) / s`` of the shared [0, 1) frame sits at ``(i + 0.5) * F / s - 0.5``
    in units of the finest grid (side F), where the finest cells sit at 0, 1, ..., F - 1.
    """
    finest = max(scales)
    return torch.cat([sincos_at(latent_grid(s * s, finest), dim) for s in scales])


def scale_ids(scales: tuple[int, ...] | list[int]) -> torch.Tensor:
    """(K,) the index of each token's grid in ``scales``."""
    return torch.repeat_interleave(torch.arange(len(scales)), torch.tensor([s * s for s in scales]))


class DiT(SavedModel, nn.Module):
    """Class-conditional denoiser over (B, K, C) tokens: ``model(x, t, y)`` (module docstring).

    Args:
        config: the hyper-parameters.
        positions: the (K, D) table of ``position_embedding = "table"`` (required there, refused
            for the other kinds).
    """

    config_class: ClassVar[type[DiTConfig]] = DiTConfig

    def __init__(self, config: DiTConfig, positions: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.width
        self.x_embed = nn.Linear(cfg.token_dim, d)
        self.t_embed = TimestepEmbedding(d, cfg.frequency_dim)
        self.y_embed = LabelEmbedding(cfg.num_classes, d, cfg.class_dropout, cfg.label_gain)
        self._add_positions(positions)
        self.blocks = nn.ModuleList(
            AdaLNZeroBlock(d, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm) for _ in range(cfg.depth)
        )
        self.final = FinalLayer(d, cfg.token_dim)
        init_weights(self)

    def _add_positions(self, positions: torch.Tensor | None) -> None:
        """Register ``pos_embed`` (and ``scale_embed`` for multiscale) by the config's kind."""
        cfg, k, d = self.config, self.config.num_tokens, self.config.width
        kind = cfg.position_embedding
        if (positions is not None) != (kind == "table"):
            raise ValueError(
                "DiT(config, positions=...) takes a (K, D) table exactly when position_embedding is 'table' "
                f"(this config has {kind!r}, positions {'given' if positions is not None else 'missing'})"
            )
        if kind == "learned":
            self.pos_embed = nn.Parameter(torch.empty(k, d))
        elif kind == "sincos":
            self.register_buffer("pos_embed", frequency_embedding(torch.arange(k), d))
        elif kind == "multiscale":
            self.register_buffer("pos_embed", multiscale_positions(cfg.scales, d))
            self.scale_embed = nn.Parameter(torch.empty(len(cfg.scales), d))
            self.register_buffer("scale_ids", scale_ids(cfg.scales), persistent=False)
        else:
            if not isinstance(positions, torch.Tensor) or positions.shape != (k, d):
                got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
                raise ValueError(f"positions must be a tensor of shape (num_tokens, width) = ({k}, {d}), got {got}")
            if not positions.dtype.is_floating_point:
                raise TypeError(f"positions must be a float tensor, got {positions.dtype}")
            self.register_buffer("pos_embed", positions.detach().float().clone())

    def positions(self) -> torch.Tensor:
        """The (K, D) positional embedding added to the embedded tokens."""
        if self.config.position_embedding == "multiscale":
            return self.pos_embed + self.scale_embed[self.scale_ids]
        return self.pos_embed

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        drop_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The prediction for noisy tokens ``x`` at time ``t`` and class ``y``.

        Args:
            x: (B, K, C) float tokens.
            t: (B,) times in [0, 1000) (any real dtype; used as float).
            y: (B,) integer labels in [0, num_classes], ``num_classes`` = null label.
            drop_mask: (B,) bool, labels to replace by the null label (default: random drops
                with probability ``class_dropout`` in training mode, none in eval mode).
            generator: draws the random label drops (for reproducible runs).

        Returns:
            (B, K, C). Shapes and dtypes are checked; values are not (a device sync).
        """
        cfg = self.config
        for name, value in (("x", x), ("t", t), ("y", y)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if x.dim() != 3 or x.shape[1:] != (cfg.num_tokens, cfg.token_dim) or not x.dtype.is_floating_point:
            want = f"(B, {cfg.num_tokens}, {cfg.token_dim})"
            raise ValueError(f"x must be float tokens of shape {want}, got {x.dtype} {tuple(x.shape)}")
        b = x.shape[0]
        if t.shape != (b,) or t.dtype == torch.bool or t.dtype.is_complex:
            raise ValueError(f"t must be a real tensor of shape ({b},), got {t.dtype} {tuple(t.shape)}")
        if y.shape != (b,) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must be integer class ids of shape ({b},), got {y.dtype} {tuple(y.shape)}")
        h = self.x_embed(x) + self.positions()  # (B, K, D)
        c = self.t_embed(t) + self.y_embed(y, drop_mask, generator)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters: embeddings (tokens, positions, time, class), transformer blocks, final layer, total."""
        blocks = sum(p.numel() for p in self.blocks.parameters())
        head = sum(p.numel() for p in self.final.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"embeddings": total - blocks - head, "transformer": blocks, "head": head, "total": total}

    @classmethod
    def from_pretrained(cls, path: str | Path, weights: str | None = None) -> DiT:
        """Load a DiT saved by ``save_pretrained`` (or a checkpoint or run folder, by the rule of
        :func:`mstok.storage.locate.locate_model`), in eval mode."""

        def build(config: DiTConfig) -> DiT:
            # a caller's table is in the weights file: a placeholder of its shape until it loads
            table = config.position_embedding == "table"
            return cls(config, positions=torch.zeros(config.num_tokens, config.width) if table else None)

        return cls.load_saved(path, weights, DiTConfig, "DiT", build=build)


# The DiT paper's sizes (all MLP ratio 4); K, C and the class count come from the tokens a
# model is trained on. The tiny preset is for CPU tests and demos, at the K of the tiny
# tokenizers and the class count of maskgit_tiny. Its label_gain of 32 comes from a sweep on
# HieraTok-tiny latents (600 steps, 1,000 samples at guidance 4, class accuracy of the
# reference network): gain 1 / 4 / 11 / 32 / 100 gave 0.8 / 1.6 / 2.6 / 3.8 / 3.7%, and 5.1%
# with gain 32 at lr 1e-3 (configs/dit_tiny.toml; benchmarks/RESULTS.md, generation).
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "dit_tiny": {"width": 128, "depth": 4, "num_heads": 4, "num_tokens": 32, "num_classes": 200, "label_gain": 32.0},
    "dit_b": {"width": 768, "depth": 12, "num_heads": 12},
    "dit_l": {"width": 1024, "depth": 24, "num_heads": 16},
    "dit_xl": {"width": 1152, "depth": 28, "num_heads": 16},
}


def dit_config(name: str, **overrides: Any) -> DiTConfig:
    """The config of DiT preset ``name`` with ``overrides`` applied (unknown names/fields raise)."""
    if not isinstance(name, str):
        raise TypeError(f"dit_config(name=...): name must be a DiT preset name (e.g. 'dit_b'), got {name!r}")
    if name not in DIT_PRESETS:
        close = difflib.get_close_matches(name, DIT_PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown DiT preset {name!r}{hint}; available: {', '.join(DIT_PRESETS)}")
    return DiTConfig.from_dict({**DIT_PRESETS[name], **overrides})


def create_dit(name: str, positions: torch.Tensor | None = None, **overrides: Any) -> DiT:
    """A freshly initialised DiT, e.g. ``create_dit("dit_xl", num_tokens=256, token_dim=4)``."""
    return DiT(dit_config(name, **overrides), positions=positions)
