"""HieraTok: a multi-scale ViT tokenizer (Chen et al., "HieraTok", sections 3-4, appendix E).

A plain ViT encodes the g x g patch grid into a token map. That map is resized to every side
in ``scales`` (1, 2, 4, 8, 16 at 256 px / patch 16) by learnable convolutions or area pooling
(:mod:`mstok.layers.multiscale`), and the maps are concatenated coarse to fine: K = sum(s^2)
tokens (341). A ViT decoder reads them under a scale mask (``scale_causal``: a token sees its
own and coarser scales, eq. 7; ``scale_independent``: its own scale, eq. 6; ``full``) and
regresses every token to an RGB patch, so scale s is decoded into an image of side s * p,
which the multi-scale RGB loss (eq. 9, :class:`~mstok.losses.TokenizerLoss`,
``multiscale_weight``) compares with the area-downsampled input.

Where the pyramid is built (``pyramid``):

* ``encoder`` (the default): before the bottleneck. The K = sum(s^2) tokens are the codes,
  a coarse-to-fine 1D sequence; with a scale-causal (or scale-independent) decoder the
  first n scales' tokens alone decode to the image at scale n (:meth:`HieraTok.decode`).
* ``decoder``: after it, as in the paper's appendix C (Table 7: 256 encoder tokens, 341
  decoder tokens; the diffusion model sees the same 16 x 16 latent as the single-scale
  baseline). The codes are the g x g map (K = g^2); the decoder embeds them to its width and
  builds the pyramid there. The paper's presets (``hieratok_f16d16`` ...) use this.

Decoder positions (appendix E): one positional table at the finest grid, area-resized to
each scale, plus a learnable embedding per scale.

Not reproduced: the paper's ViT has no qkv/MLP biases, LayerNorm eps 1e-6 and drop-path 0.1
in the decoder (mstok's blocks keep biases, eps 1e-5, no drop-path); its downsampling
convolutions are described only as "three convolutional kernels per resolution, as in
ViTDet", which :class:`~mstok.layers.multiscale.ConvDownsample` interprets.

Glossary: B batch, P patches (g^2), K latent tokens, D width, C code dim, p patch size.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from mstok.config_schema import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_TOKENS, MAX_WIDTH, NON_NEGATIVE, Rule, one_of, positive
from mstok.layers import PatchTokens, Transformer
from mstok.layers.embeddings import add_grid_position_embedding
from mstok.layers.multiscale import (
    DOWNSAMPLES,
    SCALE_ATTENTIONS,
    ScalePyramid,
    resize_map,
    scale_attention_mask,
    scale_offsets,
)
from mstok.tokenizers.base import Tokenizer, TokenizerConfig
from mstok.tokenizers.contract import check_latents, check_tokens

PYRAMIDS = ("encoder", "decoder")


@dataclass
class HieraTokConfig(TokenizerConfig):
    """HieraTok hyper-parameters on top of :class:`TokenizerConfig`.

    Attributes:
        num_latent_tokens: K; None derives it: ``sum(s^2)`` with ``pyramid="encoder"``,
            ``grid_size^2`` with ``pyramid="decoder"``. A given value must equal that.
        scales: token-map sides, strictly increasing, the last equal to
            ``image_size // patch_size``; ``(grid_size,)`` is the single-scale baseline.
        downsample: ``conv`` (learnable, the paper's choice) or ``area`` (interpolation).
        attention: the decoder's scale mask: ``scale_causal``, ``scale_independent`` or ``full``.
        pyramid: where the pyramid is built, ``encoder`` or ``decoder`` (module docstring).
        decoder_width, decoder_depth, decoder_num_heads: the decoder ViT's size; None uses
            the encoder's (the paper pairs a small encoder with a large decoder).
        kl_weight: weight of the KL term of the default ``vae`` bottleneck (paper: 1e-6).
    """

    num_latent_tokens: int | None = None
    code_dim: int = 16
    quantizer: str | dict[str, Any] = "vae"
    scales: tuple[int, ...] = (1, 2, 4, 8, 16)
    downsample: str = "conv"
    attention: str = "scale_causal"
    pyramid: str = "encoder"
    decoder_width: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    kl_weight: float = 1e-6

    family: ClassVar[str] = "hieratok"
    spec_defaults: ClassVar[dict[str, dict[str, str]]] = {
        **TokenizerConfig.spec_defaults,
        "kl": {"kl_weight": "kl_weight"},
    }
    field_rules: ClassVar[dict[str, Rule]] = {
        "num_latent_tokens": positive(MAX_TOKENS),
        "scales": Rule(item=positive(MAX_IMAGE_SIZE), min_len=1),
        "downsample": one_of(DOWNSAMPLES),
        "attention": one_of(SCALE_ATTENTIONS),
        "pyramid": one_of(PYRAMIDS),
        "decoder_width": positive(MAX_WIDTH),
        "decoder_depth": positive(MAX_DEPTH),
        "decoder_num_heads": positive(MAX_WIDTH),
        "kl_weight": NON_NEGATIVE,
    }
    # a new family has no config.json saved before a field existed: write every field (but nested,
    # which HieraTok refuses: its prefixes are its scales)
    optional_defaults: ClassVar[dict[str, Any]] = {"nested": False}
    no_nested_reason: ClassVar[str] = (
        "HieraTok's prefixes are its scales: decode(tokens, scales=n) decodes the first n scales' tokens"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        scales, grid = list(self.scales), self.grid_size
        if any(b <= a for a, b in itertools.pairwise(scales)):
            raise ValueError(f"scales must be strictly increasing (coarse to fine), got {scales}")
        if scales[-1] != grid:
            raise ValueError(
                f"scales must end at the patch grid's side image_size // patch_size = {grid}, got {scales}"
            )
        expected = self.scale_offsets[-1] if self.pyramid == "encoder" else self.num_patches
        rule = f"sum(s^2) over scales {scales}" if self.pyramid == "encoder" else f"the patch grid {grid}x{grid}"
        if self.num_latent_tokens is None:
            self.num_latent_tokens = expected
        elif self.num_latent_tokens != expected:
            raise ValueError(
                f"num_latent_tokens must be {expected} for pyramid={self.pyramid!r} ({rule}), got "
                f"{self.num_latent_tokens}; leave it unset to derive it"
            )
        for name, value, allowed in (("head", self.head, "pixels"), ("pixel_head", self.pixel_head, "linear")):
            if value != allowed:
                raise ValueError(
                    f"HieraTok decodes every scale to RGB patches: {name} must be {allowed!r}, got {value!r}"
                )
        if self.pixel_decoder:
            raise ValueError("HieraTok decodes to pixels itself: pixel_decoder must be empty")
        if self.latent_init != "random":
            raise ValueError(
                "latent_init='grid' places TiTok/MsTok query tokens on a grid; HieraTok has none (its tokens "
                "are the patch map itself): latent_init must be 'random'"
            )
        width, _, heads = self.decoder_dims
        if width % heads:
            raise ValueError(f"decoder width {width} is not a multiple of decoder num_heads {heads}")
        if self.position_embedding != "learned" and width % 4:
            raise ValueError(f"position_embedding={self.position_embedding!r} needs a decoder width divisible by 4")

    @property
    def scale_offsets(self) -> list[int]:
        """Start of each scale's tokens in the decoder's pyramid, plus its length: [0, 1, 5, ..., 341]."""
        return scale_offsets(self.scales)


class HieraTokEncoder(nn.Module):
    """(B, 3, H, W) -> latents (B, K, C) (or (B, K, 2C) for a VAE): ViT over the patches ->
    [pyramid, coarse to fine] -> LayerNorm -> linear."""

    def __init__(self, cfg: HieraTokConfig) -> None:
        super().__init__()
        d = cfg.width
        self.patch_tokens = PatchTokens(
            cfg.image_size, cfg.patch_size, d, class_token=False, position_embedding=cfg.position_embedding
        )
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm)
        self.pyramid = None
        if cfg.pyramid == "encoder":
            self.pyramid = ScalePyramid(d, cfg.grid_size, cfg.scales, cfg.downsample)
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.quantizer_input_dim)  # C, or 2C for a Gaussian bottleneck

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised latent tokens (B, K, D)."""
        x, _ = self.transformer(self.ln_pre(self.patch_tokens(images)))  # (B, P, D)
        if self.pyramid is not None:
            x = self.pyramid(x)  # (B, K, D), coarse to fine
        return self.ln_post(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images))


class HieraTokDecoder(nn.Module):
    """Codes (B, K, C) -> an RGB image per scale, through a ViT under the scale mask."""

    def __init__(self, cfg: HieraTokConfig) -> None:
        super().__init__()
        d, depth, heads = cfg.decoder_dims
        self.scales, self.patch_size, self.grid = cfg.scales, cfg.patch_size, cfg.grid_size
        self.offsets = cfg.scale_offsets
        self.embed = nn.Linear(cfg.code_dim, d)
        self.pyramid = None
        if cfg.pyramid == "decoder":
            self.pyramid = ScalePyramid(d, cfg.grid_size, cfg.scales, cfg.downsample)
        add_grid_position_embedding(self, "pos_embed", cfg.grid_size, d, cfg.position_embedding)  # (P, D)
        self.scale_embed = nn.Parameter(torch.empty(len(cfg.scales), d))
        mask = scale_attention_mask(cfg.scales, cfg.attention)
        # None where every token sees every other (full attention, one scale): SDPA's fast path
        self.register_buffer("attn_mask", None if bool(mask.all()) else mask, persistent=False)
        self.ln_pre = nn.LayerNorm(d)
        self.transformer = Transformer(d, depth, heads, cfg.mlp_ratio, qk_norm=cfg.qk_norm)
        self.ln_post = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.patch_size**2 * 3)
        # shared by every scale; softens patch seams, as the 3x3 conv of the ViT/TiTok pixel head
        self.conv = nn.Conv2d(3, 3, kernel_size=3, padding=1)

    def positions(self, num_scales: int) -> torch.Tensor:
        """(K_n, D): the positional table area-resized to each of the first n scales, plus its scale embedding."""
        table = self.pos_embed[None]  # (1, P, D)
        rows = [resize_map(table, side)[0] + self.scale_embed[i] for i, side in enumerate(self.scales[:num_scales])]
        return torch.cat(rows)

    def tokens(self, codes: torch.Tensor, num_scales: int) -> torch.Tensor:
        """Codes -> the decoder's output tokens (B, K_n, D) of the first n scales.

        ``codes``: (B, K_n or more, C) pyramid codes (``pyramid="encoder"``), or the (B, P, C) map.
        """
        k = self.offsets[num_scales]
        # (B, K_n, D): the pyramid of the embedded (B, P, C) map, or the embedded pyramid codes
        x = self.pyramid(self.embed(codes), num_scales) if self.pyramid is not None else self.embed(codes[:, :k])
        x = self.ln_pre(x + self.positions(num_scales))
        # a prefix keeps its own block; .to() is a no-op except for a model built on the meta
        # device (FLOP counting), whose mask is kept on the CPU
        mask = None if self.attn_mask is None else self.attn_mask[:k, :k].to(x.device)
        x, _ = self.transformer(x, attn_mask=mask)
        return self.ln_post(x)

    def to_image(self, tokens: torch.Tensor, index: int) -> torch.Tensor:
        """Scale ``index``'s tokens out of (B, K_n, D) -> its image (B, 3, s*p, s*p)."""
        side = self.scales[index]
        patches = self.head(tokens[:, self.offsets[index] : self.offsets[index + 1]])  # (B, s*s, p*p*3)
        p = self.patch_size
        return self.conv(rearrange(patches, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=side, ph=p, pw=p))

    def forward_scales(self, codes: torch.Tensor, num_scales: int | None = None) -> list[torch.Tensor]:
        """Codes -> the images of the first ``num_scales`` scales (all by default), coarse to
        fine: a list of (B, 3, s*p, s*p)."""
        n = len(self.scales) if num_scales is None else num_scales
        tokens = self.tokens(codes, n)
        return [self.to_image(tokens, i) for i in range(n)]

    def forward(self, codes: torch.Tensor, num_scales: int | None = None) -> torch.Tensor:
        """Codes -> the image of scale ``num_scales`` (the full resolution by default)."""
        n = len(self.scales) if num_scales is None else num_scales
        return self.to_image(self.tokens(codes, n), n - 1)


class HieraTok(Tokenizer):
    """The HieraTok multi-scale tokenizer (a KL bottleneck by default; any of the zoo works)."""

    config_class = HieraTokConfig

    def build(self, config: TokenizerConfig) -> tuple[nn.Module, nn.Module]:
        return HieraTokEncoder(config), HieraTokDecoder(config)

    def decode_codes_at_scales(self, codes: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Code vectors -> (full-resolution image, every scale's image coarse to fine), one decoder pass."""
        images = self.decoder.forward_scales(codes.to(next(self.decoder.parameters()).dtype))
        return images[-1], images

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, scales: int | None = None) -> torch.Tensor:
        """Tokens -> the image of scale ``scales`` (a count: 1 = the coarsest; None = all,
        the full resolution), (B, 3, s*p, s*p) clamped to [0, 1].

        With ``pyramid="encoder"``, ``tokens`` may hold only the first n scales' tokens
        (``config.scale_offsets[n]`` of them) or all K (the prefix is used). With a
        scale-causal or scale-independent decoder the result equals scale n of a full
        decode; with ``attention="full"`` coarse tokens attend to finer ones, so only the
        full decode is defined and ``scales < len(config.scales)`` raises.
        """
        n, codes = self._prefix_codes(tokens, scales)
        return self.decoder(codes, n).clamp(0.0, 1.0)

    @torch.no_grad()
    def decode_scales(self, tokens: torch.Tensor, scales: int | None = None) -> list[torch.Tensor]:
        """Like :meth:`decode`, but every scale's image up to ``scales``, coarse to fine."""
        n, codes = self._prefix_codes(tokens, scales)
        return [image.clamp(0.0, 1.0) for image in self.decoder.forward_scales(codes, n)]

    def _prefix_codes(self, tokens: Any, scales: int | None) -> tuple[int, torch.Tensor]:
        """Check ``scales`` and ``tokens``; return (n, the decoder's input codes)."""
        cfg, total = self.config, len(self.config.scales)
        if scales is None:
            scales = total
        if isinstance(scales, bool) or not isinstance(scales, int) or not 1 <= scales <= total:
            raise ValueError(f"scales must be a number of scales in [1, {total}], got {scales!r}")
        if scales < total and cfg.attention == "full":
            raise ValueError(
                "decoding the first scales alone needs attention 'scale_causal' or 'scale_independent': with "
                "'full' attention every scale's image depends on the finer scales' tokens"
            )
        count = cfg.num_latent_tokens
        if cfg.pyramid == "encoder" and isinstance(tokens, torch.Tensor) and tokens.dim() >= 2:
            prefix = cfg.scale_offsets[scales]
            if tokens.shape[1] not in (prefix, count):
                raise ValueError(
                    f"tokens for {scales} of {total} scales must hold the first {prefix} tokens or all {count}, "
                    f"got shape {tuple(tokens.shape)}"
                )
            tokens, count = tokens[:, :prefix], prefix
        if self.vocab_size is None:
            kind = "VAE" if self.is_vae else "unquantized"
            tokens = check_latents(tokens, count, cfg.code_dim, kind)
        else:
            tokens = check_tokens(tokens, count, self.vocab_size)
        codes = self.tokens_to_codes(tokens)
        return scales, codes.to(next(self.decoder.parameters()).dtype)
