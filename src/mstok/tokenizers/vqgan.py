"""MaskGIT-VQGAN: the 2D convolutional VQ tokenizer that two-stage TiTok/MsTok uses as a proxy.

Stage 1 of two-stage training teaches a 1D tokenizer to predict the codes this frozen model
gives an image; stage 2 feeds ``softmax(logits)`` through :meth:`MaskGITVQGAN.decode_probabilities`
to get pixels. The architecture and the state-dict key layout follow the public
``maskgit-vqgan-imagenet-f16-256.bin`` (a PyTorch port of the JAX MaskGIT VQGAN), so that file
loads strictly with :func:`mstok.persistence.convert.vqgan.load_official_vqgan`:

* encoder: 3x3 ``conv_in`` (no bias), one level per ``channel_mult`` entry with
  ``num_res_blocks`` ResNet blocks (GroupNorm + SiLU + 3x3 conv, twice, convs without bias)
  and a 2x2 average pool after every level but the last (no parameters), ``mid`` ResNet
  blocks without attention, then GroupNorm + SiLU + 1x1 ``conv_out`` to ``z_channels``;
* no pre-/post-quantization convs: the quantizer searches the encoder output directly, by
  plain Euclidean nearest neighbour (no L2 normalisation);
* decoder: 3x3 ``conv_in``, ``mid`` blocks, levels from the deepest up, each ending with a
  nearest 2x upsample and a 3x3 ``upsample_conv`` (except level 0), GroupNorm + SiLU + 3x3
  ``conv_out`` to RGB.

Images go in as [0, 1] (no rescaling to [-1, 1]); :meth:`MaskGITVQGAN.decode` clamps to [0, 1].
Training uses mstok's :class:`VectorQuantizer` losses, with beta on the commitment term as in
VQ-VAE (the official port weighs the codebook term by beta instead); the released weights are
frozen for stage 1, and official stage 2 fine-tunes the decoder (and codebook) from them.

Glossary: B batch, C ``z_channels`` (the code dim), V codebook size, h x w latent grid,
N = h*w tokens in raster order (row by row).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mstok.config_schema import (
    FRACTION,
    MAX_CODEBOOK,
    MAX_IMAGE_SIZE,
    MAX_WIDTH,
    NON_NEGATIVE,
    ConfigDict,
    Rule,
    positive,
)
from mstok.layers import init_weights
from mstok.quantizers import VectorQuantizer
from mstok.storage.saved import SavedModel
from mstok.tokenizers.contract import TokenizerOutput, check_images, check_tokens

USAGE_KEY = "quantize.usage_ema"


@dataclass
class VQGANConfig(ConfigDict):
    """Hyper-parameters of a MaskGIT-VQGAN; the defaults are the official ImageNet 256px f16 model."""

    image_size: int = 256
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 1024
    commitment_weight: float = 0.25
    norm_groups: int = 32
    dropout: float = 0.0

    family: ClassVar[str] = "maskgit_vqgan"
    field_rules: ClassVar[dict[str, Rule]] = {
        "image_size": positive(MAX_IMAGE_SIZE),
        "channels": positive(MAX_WIDTH),
        # each entry halves the resolution once more (2 ** 14 = MAX_IMAGE_SIZE)
        "channel_mult": Rule(min_len=1, item=positive(64)),
        "num_res_blocks": positive(64),
        "z_channels": positive(MAX_WIDTH),
        "codebook_size": positive(MAX_CODEBOOK, "the codebook is allocated up front"),
        "commitment_weight": NON_NEGATIVE,
        "norm_groups": positive(MAX_WIDTH),
        "dropout": FRACTION,
    }

    def __post_init__(self) -> None:
        super().__post_init__()  # the schema (field_rules); cross-field checks follow
        mult = self.channel_mult
        if len(mult) > 15:
            raise ValueError(f"channel_mult has {len(mult)} levels: at most 15 (each halves the resolution)")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the downsample factor {self.downsample_factor} "
                f"(2 ** (len(channel_mult) - 1) with channel_mult {mult})"
            )
        for width in {self.channels * m for m in mult}:
            if width % self.norm_groups:
                raise ValueError(
                    f"every level width (channels * channel_mult) must be a multiple of norm_groups "
                    f"{self.norm_groups}, got {width}"
                )

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side: one 2x pool per level but the last."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Latent cells per side (h = w)."""
        return self.image_size // self.downsample_factor

    @property
    def num_tokens(self) -> int:
        """N = h * w, the number of codes per image."""
        return self.grid_size**2

    @property
    def num_latent_tokens(self) -> int:
        """Alias of :attr:`num_tokens`, so code written for :class:`TokenizerConfig` works unchanged."""
        return self.num_tokens

    @property
    def code_dim(self) -> int:
        """Alias of ``z_channels``, the dimension of each code (as in :class:`TokenizerConfig`)."""
        return self.z_channels


def _conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool) -> nn.Conv2d:
    # Stride-1 "same" padding; equals the official Conv2dSame for odd kernels.
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice, (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = _conv(in_channels, out_channels, 3, bias=False)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(out_channels, out_channels, 3, bias=False)
        self.nin_shortcut = _conv(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is None:
            return x + h
        # Where the width changes, MaskGIT's block adds a 1x1 projection of its *own output*
        # instead of a projected input (hence the (out, out) kernel). The released weights
        # were trained that way, so reproducing it is what makes them decode correctly.
        return h + self.nin_shortcut(h)


class DownLevel(nn.Module):
    """One encoder resolution: ResNet blocks, then a 2x2 average pool unless it is the deepest level."""

    def __init__(self, in_channels: int, out_channels: int, config: VQGANConfig, downsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * config.num_res_blocks
        self.block = nn.ModuleList(
            ResnetBlock(widths[i], widths[i + 1], config.norm_groups, config.dropout)
            for i in range(config.num_res_blocks)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpLevel(nn.Module):
    """One decoder resolution: ResNet blocks, then nearest 2x upsampling and a 3x3 conv unless it is level 0."""

    def __init__(self, in_channels: int, out_channels: int, config: VQGANConfig, upsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * config.num_res_blocks
        self.block = nn.ModuleList(
            ResnetBlock(widths[i], widths[i + 1], config.norm_groups, config.dropout)
            for i in range(config.num_res_blocks)
        )
        self.upsample_conv = _conv(out_channels, out_channels, 3, bias=True) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


def _mid_blocks(width: int, config: VQGANConfig) -> nn.ModuleList:
    return nn.ModuleList(
        ResnetBlock(width, width, config.norm_groups, config.dropout) for _ in range(config.num_res_blocks)
    )


class VQGANEncoder(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> latent maps (B, C, h, w)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.channels * m for m in config.channel_mult]
        inputs = [config.channels, *widths[:-1]]  # level i takes the width of level i - 1
        self.conv_in = _conv(3, config.channels, 3, bias=False)
        self.down = nn.ModuleList(
            DownLevel(inputs[i], widths[i], config, downsample=i != len(widths) - 1) for i in range(len(widths))
        )
        self.mid = _mid_blocks(widths[-1], config)
        self.norm_out = _norm(widths[-1], config.norm_groups)
        self.conv_out = _conv(widths[-1], config.z_channels, 1, bias=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images)
        for level in self.down:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VQGANDecoder(nn.Module):
    """Latent maps (B, C, h, w) -> unclamped images (B, 3, H, W).

    ``up[i]`` is resolution level i (0 = full resolution), as in the official key layout;
    the forward pass runs them from the deepest level up.
    """

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        widths = [config.channels * m for m in config.channel_mult]
        self.conv_in = _conv(config.z_channels, widths[-1], 3, bias=True)
        self.mid = _mid_blocks(widths[-1], config)
        # level i takes the width of level i + 1 (the deepest level keeps its own)
        inputs = [*widths[1:], widths[-1]]
        self.up = nn.ModuleList(UpLevel(inputs[i], widths[i], config, upsample=i != 0) for i in range(len(widths)))
        self.norm_out = _norm(widths[0], config.norm_groups)
        self.conv_out = _conv(widths[0], 3, 3, bias=True)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(codes)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class MaskGITVQGAN(SavedModel, nn.Module):
    """MaskGIT-VQGAN with the same public API as :class:`mstok.tokenizers.Tokenizer`.

    Submodules ``encoder``, ``quantize`` and ``decoder`` carry the official key names;
    :attr:`quantizer` is ``quantize`` under the name the trainer uses.
    """

    config_class: ClassVar[type[VQGANConfig]] = VQGANConfig
    decodes_in_steps: ClassVar[bool] = False  # one conv pass (Tokenizer.decodes_in_steps)

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.encoder = VQGANEncoder(config)
        self.quantize = VectorQuantizer(
            config.codebook_size, config.z_channels, use_l2_norm=False, commitment_weight=config.commitment_weight
        )
        self.decoder = VQGANDecoder(config)
        init_weights(self)

    @property
    def quantizer(self) -> VectorQuantizer:
        """The vector quantizer (``quantize`` in the official key layout)."""
        return self.quantize

    @property
    def vocab_size(self) -> int:
        """V, the number of distinct token ids (as :attr:`Tokenizer.vocab_size`)."""
        return self.quantize.codebook_size

    # ----------------------------------------------------------------- compute
    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        """Training forward: encode, quantize (straight-through), decode.

        Returns a :class:`TokenizerOutput` with an unclamped (B, 3, H, W) reconstruction, ids
        (B, N) and latents (B, N, C). Checks shape and dtype only; ``encode`` also checks values.
        """
        images = check_images(images, self.config.image_size, check_values=False)
        quant = self.quantize(self._tokens(images))
        return TokenizerOutput.from_quantizer(quant, reconstruction=self.decode_codes(quant.codes))

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> encoder outputs as raster-order tokens (B, N, C)."""
        return rearrange(self.encoder(images), "b c h w -> b (h w) c")

    @torch.no_grad()
    def encode(self, images: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] -> code ids (B, N) in [0, V), raster order.

        ``check_values=False`` skips the range/NaN checks, which wait for the device (the
        trainer computes proxy codes every step on images it produced itself)."""
        images = check_images(images, self.config.image_size, check_values=check_values)
        return self.quantize(self._tokens(images)).indices

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code ids (B, N) -> images (B, 3, H, W) clamped to [0, 1]."""
        tokens = check_tokens(tokens, self.config.num_tokens, self.config.codebook_size)
        return self.decode_codes(self.quantize.indices_to_codes(tokens)).clamp(0.0, 1.0)

    def decode_probabilities(self, probs: torch.Tensor) -> torch.Tensor:
        """Distributions over codes (B, N, V) -> unclamped images (B, 3, H, W), differentiably.

        Each cell's code vector is the probability-weighted mix of the codebook
        (``probs @ codebook``), exactly how two-stage TiTok decodes its proxy-code logits:
        pass ``logits.softmax(-1)``. One-hot rows reproduce :meth:`decode` before clamping.
        """
        cfg = self.config
        expected = (cfg.num_tokens, cfg.codebook_size)
        if not isinstance(probs, torch.Tensor):
            raise ValueError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
        if not probs.is_floating_point():
            raise ValueError(f"probs must be a float tensor, got dtype {probs.dtype}")
        if probs.dim() != 3 or tuple(probs.shape[1:]) != expected:
            raise ValueError(f"probs must have shape (B, {expected[0]}, {expected[1]}), got {tuple(probs.shape)}")
        codebook = self.quantize.embedding.weight  # (V, C)
        return self.decode_codes(probs.to(codebook.dtype) @ codebook)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, N, C) in raster order -> unclamped images (B, 3, H, W) (differentiable)."""
        grid = rearrange(codes, "b (h w) c -> b c h w", h=self.config.grid_size)  # (B, C, h, w)
        return self.decoder(grid.to(self.quantize.embedding.weight.dtype))

    # ----------------------------------------------------------------- bookkeeping
    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: encoder, decoder, quantizer and total."""
        counts = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (("encoder", self.encoder), ("decoder", self.decoder), ("quantizer", self.quantize))
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


def __getattr__(name: str) -> Any:
    """Deprecation shim: ``load_official_vqgan`` moved up to :mod:`mstok.persistence.convert.vqgan`
    (reading a released file is persistence's job; the model layer may not import it)."""
    if name == "load_official_vqgan":
        from mstok.persistence.convert import vqgan  # deprecation shim: the one allowed upward import

        warnings.warn(
            "mstok.tokenizers.vqgan.load_official_vqgan moved to mstok.persistence.convert.vqgan.load_official_vqgan",
            DeprecationWarning,
            stacklevel=2,
        )
        return vqgan.load_official_vqgan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
