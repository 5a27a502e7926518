"""Frozen first-stage latent spaces: the space a latent tokenizer (SemTok) tokenizes instead of pixels.

SemTok (section 3.1 and appendix A.1) does not patchify RGB: it first maps images through the
frozen VAE of SD3.5 (f = 8, 16 channels), patchifies those latents 2 x 2, and decodes its
predicted latents back to pixels through the same VAE. This module is that first stage, made
pluggable so the tokenizer holds any of:

* :class:`PixelSpace`: RGB itself (mapped to [-1, 1]), for tiny CPU runs without a VAE;
* :class:`DiffusersVAESpace`: a ``diffusers.AutoencoderKL`` (SD3.5's VAE in the paper), with
  the normalisation its pipelines apply, ``(z - shift_factor) * scaling_factor``;
* :class:`TokenizerSpace`: an mstok tokenizer whose continuous latents form a spatial grid
  (a conv autoencoder, a HieraTok with ``pyramid="decoder"``).

Every space maps images (B, 3, H, W) in [0, 1] to latents (B, C, h, w) with h = H / f and back,
under ``no_grad``, with every parameter frozen and the module kept in eval mode: the first stage
is a fixed coordinate system, never trained by the tokenizer's losses.

The SD3.5 numbers (from the VAE's ``config.json`` in ``stabilityai/stable-diffusion-3.5-large``,
``vae/``, as diffusers reads it): ``latent_channels`` 16, four blocks (f = 2^3 = 8),
``scaling_factor`` 1.5305, ``shift_factor`` 0.0609. A loaded VAE's are read from its config;
they are written out only in :data:`SD35_VAE_ARCHITECTURE`, the random-weights stand-in that
times the first stage without the gated weights. The paper itself names only f = 8.

Glossary: B batch, C latent channels, f downsampling factor, h x w the latent grid.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from mstok.storage.layout import CONFIG_FILE
from mstok.storage.locate import is_hub_id, locate_model
from mstok.storage.saved import read_saved_config, split_saved_config
from mstok.storage.weights import MissingWeightsError
from mstok.tokenizers.base import Tokenizer
from mstok.tokenizers.contract import _check_finite
from mstok.tokenizers.convae import ConvAE
from mstok.tokenizers.hieratok import HieraTok

INSTALL_HINT = 'pip install "mstok[semtok]"'
SD35_VAE_REPO = "stabilityai/stable-diffusion-3.5-large"
SD35_VAE_SUBFOLDER = "vae"
VAE_CONFIG_FILE = "config.json"
VAE_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_VAE_WEIGHTS_FALLBACK = "diffusion_pytorch_model.bin"  # older diffusers folders; from_pretrained reads both
# SD3.5's VAE as its vae/config.json builds it (83.8M parameters), for DiffusersVAESpace.random:
# the real VAE's compute without its gated weights
SD35_VAE_ARCHITECTURE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


class LatentSpace(nn.Module):
    """A frozen map between images and a latent grid: the interface a latent tokenizer holds.

    Subclasses implement :meth:`_encode` and :meth:`_decode`; the public methods check input,
    run without gradients (under bf16 autocast on CUDA when ``bf16`` is set) and return float32.

    Attributes:
        channels: C, latent channels.
        downsample: f, pixels per latent cell along each side.
        bf16: run the first stage under bf16 autocast on CUDA (ignored on other devices).
    """

    def __init__(self, channels: int, downsample: int, bf16: bool = False) -> None:
        super().__init__()
        self.channels, self.downsample, self.bf16 = channels, downsample, bf16

    def freeze(self) -> None:
        """Eval mode and ``requires_grad=False`` on every parameter (subclasses call it once built)."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LatentSpace:
        """Ignore ``mode``: a first stage is fixed, so it stays in eval mode (as LPIPS does)."""
        return super().train(False)

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of images of side ``image_size`` (an int or (H, W)).

        Raises:
            ValueError: a side is not a positive multiple of ``downsample``.
        """
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
            raise TypeError(f"image_size must be an int or a pair (H, W), got {image_size!r}")
        height, width = image_size
        for side in (height, width):
            if isinstance(side, bool) or not isinstance(side, int) or side <= 0 or side % self.downsample:
                raise ValueError(
                    f"{type(self).__name__}: image sides must be positive multiples of the downsampling factor "
                    f"f={self.downsample}, got {height}x{width}"
                )
        return self.channels, height // self.downsample, width // self.downsample

    @torch.no_grad()
    def encode(self, images: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] -> float32 latents (B, C, H/f, W/f).

        ``check_values=False`` skips the range and NaN checks, which wait for the device (a
        training forward that checked its batch already passes it)."""
        images = self._check_input(images, "images", 3)
        self.latent_shape((images.shape[2], images.shape[3]))
        if images.numel() and check_values:
            _check_finite(images)
            if images.min() < -1e-3 or images.max() > 1 + 1e-3:
                raise ValueError(
                    f"images must be in [0, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]"
                )
        with self._autocast(images.device):
            return self._encode(images).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> float32 images (B, 3, h*f, w*f) clamped to [0, 1]."""
        latents = self._check_input(latents, "latents", self.channels)
        if latents.numel() and not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or infinite values")
        with self._autocast(latents.device):
            return self._decode(latents).float().clamp(0.0, 1.0)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> float32 images (B, 3, h*f, w*f), unclamped, differentiable in
        ``latents``: the weights stay frozen, but gradients flow through them to the input, so
        pixel losses (MSE, LPIPS, GAN) can train whatever produced the latents (SemTok's stage II).
        Shape and dtype checks only (no value check: it would wait for the device every step)."""
        latents = self._check_input(latents, "latents", self.channels)
        with self._autocast(latents.device):
            return self._decode(latents).float()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Checked images (B, 3, H, W) in [0, 1] -> latents (B, C, h, w)."""
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Checked latents (B, C, h, w) -> images (B, 3, H, W), roughly in [0, 1] (clamped by the
        caller); differentiable in the latents (:meth:`decode` runs it under ``no_grad``)."""
        raise NotImplementedError

    def _check_input(self, x: Any, name: str, channels: int) -> torch.Tensor:
        """A float (B, channels, h, w) tensor on this space's device, converted to its dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            hint = " (for uint8 images divide by 255: images.float() / 255)" if name == "images" else ""
            raise ValueError(f"{name} must be a float tensor, got dtype {x.dtype}{hint}")
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must have shape (B, {channels}, h, w), got {tuple(x.shape)}")
        param = next(self.parameters(), None)
        if param is None:
            return x
        if x.device != param.device:
            raise ValueError(
                f"{name} are on {x.device} but {type(self).__name__} is on {param.device}: "
                "move one of them (.to(device))"
            )
        return x.to(param.dtype)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        if self.bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, downsample={self.downsample}, bf16={self.bf16}"


class PixelSpace(LatentSpace):
    """RGB as the latent: x -> 2x - 1 (C = 3, f = 1), for tiny CPU runs without a VAE.

    ``patch > 1`` folds each p x p block of pixels into the channels (C = 3p^2, f = p), an
    invertible stand-in for a VAE's downsampling when a run wants a small latent grid; the
    default ``patch=1`` leaves all patchifying to the tokenizer.
    """

    def __init__(self, patch: int = 1, bf16: bool = False) -> None:
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"PixelSpace: patch must be a positive integer, got {patch!r}")
        super().__init__(channels=3 * patch * patch, downsample=patch, bf16=bf16)
        self.freeze()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        p = self.downsample
        return rearrange(images * 2 - 1, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=p, pw=p)  # (B, C, h, w)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = self.downsample
        return (rearrange(latents, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=p, pw=p) + 1) / 2


def _autoencoder_kl() -> type:
    """``diffusers.AutoencoderKL``, imported on first use: diffusers is the optional ``semtok`` extra."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError(f"DiffusersVAESpace needs the diffusers package: {INSTALL_HINT}") from err
    return AutoencoderKL


class DiffusersVAESpace(LatentSpace):
    """A frozen ``diffusers.AutoencoderKL`` (SD3.5's VAE for SemTok) as the latent space.

    ``encode``: x in [0, 1] -> the posterior mean (or a sample, ``sample=True``) of
    ``vae.encode(2x - 1)``, then ``(z - shift_factor) * scaling_factor``; ``decode`` inverts the
    normalisation and maps ``vae.decode`` from [-1, 1] to [0, 1]. The factors come from the VAE's
    config (a missing ``shift_factor``, as in SD1/SDXL VAEs, means 0) unless overridden.
    f = 2^(number of blocks - 1), the factor diffusers' pipelines use.
    """

    def __init__(
        self,
        vae: nn.Module,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample: bool = False,
        bf16: bool = False,
    ) -> None:
        config = vae.config
        super().__init__(config.latent_channels, 2 ** (len(config.block_out_channels) - 1), bf16)
        self.vae = vae
        self.scaling_factor = float(config.scaling_factor if scaling_factor is None else scaling_factor)
        if shift_factor is None:
            shift_factor = getattr(config, "shift_factor", None) or 0.0  # SD1/SDXL VAEs have none
        self.shift_factor = float(shift_factor)
        if not math.isfinite(self.scaling_factor) or self.scaling_factor == 0:
            raise ValueError(
                f"DiffusersVAESpace: scaling_factor must be finite and non-zero, got {self.scaling_factor}"
            )
        if not math.isfinite(self.shift_factor):
            raise ValueError(f"DiffusersVAESpace: shift_factor must be finite, got {self.shift_factor}")
        self.sample = sample
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        subfolder: str | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample: bool = False,
        bf16: bool = False,
        download: bool = True,
    ) -> DiffusersVAESpace:
        """Load an ``AutoencoderKL`` from a local folder or the Hugging Face hub.

        Args:
            path: a folder holding ``config.json`` and ``diffusion_pytorch_model.safetensors``
                (``subfolder`` inside it, when given), or a hub id. ``None``: SD3.5-large's VAE
                (``stabilityai/stable-diffusion-3.5-large``, subfolder ``vae``).
            subfolder: the VAE's folder inside ``path`` (``"vae"`` in a full pipeline repository).
            scaling_factor, shift_factor: override the config's values.
            sample: encode to a posterior sample instead of its mean.
            bf16: bf16 autocast on CUDA.
            download: allow fetching a hub id (else only the hub cache is read).

        Raises:
            MissingWeightsError: the files are absent; the message names them and where to put them.
            ImportError: diffusers is not installed.
        """
        if path is None or str(path) == "":
            path, subfolder = SD35_VAE_REPO, subfolder or SD35_VAE_SUBFOLDER
        local = Path(path).expanduser()
        options = {"scaling_factor": scaling_factor, "shift_factor": shift_factor, "sample": sample, "bf16": bf16}
        if local.exists():
            return cls(_load_local_vae(local / subfolder if subfolder else local), **options)

        if not is_hub_id(str(path)):
            raise MissingWeightsError(f"VAE folder {local} does not exist.\n{_how_to_get_vae(local)}")
        return cls(_load_hub_vae(str(path), subfolder, download), **options)

    @classmethod
    def random(cls, architecture: dict[str, Any] | None = None, seed: int = 0, **options: Any) -> DiffusersVAESpace:
        """An ``AutoencoderKL`` of ``architecture`` (default :data:`SD35_VAE_ARCHITECTURE`) with
        random weights drawn from ``seed``: the real VAE's compute and shapes, so timings and FLOPs
        hold, but latents that mean nothing. For benchmarks and tests without the weights, never
        for training a tokenizer. ``options``: as :meth:`from_pretrained` (``bf16``, ``sample``)."""
        autoencoder_kl = _autoencoder_kl()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = autoencoder_kl(**(SD35_VAE_ARCHITECTURE if architecture is None else architecture))
        return cls(vae, **options)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images * 2 - 1).latent_dist
        z = posterior.sample() if self.sample else posterior.mean  # (B, C, h, w)
        return (z - self.shift_factor) * self.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return (self.vae.decode(z).sample + 1) / 2

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, scaling_factor={self.scaling_factor}, shift_factor={self.shift_factor}, "
            f"sample={self.sample}"
        )


def _how_to_get_vae(folder: Path) -> str:
    return (
        f"  A diffusers AutoencoderKL folder holds {VAE_CONFIG_FILE} and {VAE_WEIGHTS_FILE}.\n"
        f"  To fix for SemTok's VAE (SD3.5): download both from https://huggingface.co/{SD35_VAE_REPO}/tree/main/"
        f"{SD35_VAE_SUBFOLDER} (a gated repository: accept its licence on the hub and log in first), e.g.\n"
        f'      hf download {SD35_VAE_REPO} --include "{SD35_VAE_SUBFOLDER}/*" --local-dir DIR\n'
        f"  and put them in {folder}, or pass path=DIR with subfolder={SD35_VAE_SUBFOLDER!r}."
    )


def _load_local_vae(folder: Path) -> nn.Module:
    """``AutoencoderKL.from_pretrained`` on a local folder, after checking its files are there."""
    missing = [name for name in (VAE_CONFIG_FILE, VAE_WEIGHTS_FILE) if not (folder / name).is_file()]
    if VAE_WEIGHTS_FILE in missing and (folder / _VAE_WEIGHTS_FALLBACK).is_file():
        missing.remove(VAE_WEIGHTS_FILE)
    if missing:
        where = f"{folder} is not a folder" if not folder.is_dir() else f"{folder} lacks {' and '.join(missing)}"
        raise MissingWeightsError(f"VAE weights not found: {where}.\n{_how_to_get_vae(folder)}")
    try:
        meta = json.loads((folder / VAE_CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {folder / VAE_CONFIG_FILE}: {err}") from err
    found = None
    if not isinstance(meta, dict):
        found = f"a {type(meta).__name__}"
    elif "family" in meta:
        found = "a saved mstok tokenizer (use type 'tokenizer')"
    elif meta.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        found = f"a {meta['_class_name']}"
    if found:
        raise ValueError(f"{folder / VAE_CONFIG_FILE} is not a diffusers AutoencoderKL config: it is {found}")
    autoencoder_kl = _autoencoder_kl()
    try:
        # low_cpu_mem_usage=False: the default wants the accelerate package and warns without it
        return autoencoder_kl.from_pretrained(str(folder), low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:  # a truncated file, mismatched shapes, a bad config
        raise ValueError(f"cannot load the AutoencoderKL in {folder}: {err}") from err


def _load_hub_vae(repo_id: str, subfolder: str | None, download: bool) -> nn.Module:
    """``AutoencoderKL.from_pretrained`` on a hub id (the hub cache first; downloading if allowed)."""
    autoencoder_kl = _autoencoder_kl()  # an ImportError must not read as missing weights
    try:
        return autoencoder_kl.from_pretrained(
            repo_id, subfolder=subfolder, local_files_only=not download, low_cpu_mem_usage=False
        )
    except (OSError, ValueError) as err:  # diffusers reports absent, gated or unreachable files as OSError
        inside = f"{repo_id}/{subfolder}" if subfolder else repo_id
        reason = "downloading is disabled (download=False) and they are not in the hub cache" if not download else err
        raise MissingWeightsError(
            f"cannot load the VAE {inside} ({VAE_CONFIG_FILE}, {VAE_WEIGHTS_FILE}) from the hub: {reason}\n"
            f"{_how_to_get_vae(Path('DIR') / (subfolder or ''))}"
        ) from err


def token_grid_side(tokenizer: Tokenizer) -> int:
    """The side g of the g x g grid a tokenizer's K latents form in raster order.

    Raises:
        ValueError: the tokens are a 1D sequence (TiTok, MsTok, a HieraTok with its pyramid in
            the encoder), or discrete ids rather than continuous latents.
    """
    config, name = tokenizer.config, type(tokenizer).__name__
    family, count = getattr(config, "family", ""), getattr(config, "num_latent_tokens", "its")
    grid = family == "convae" or (family == "hieratok" and getattr(config, "pyramid", "") == "decoder")
    if not grid:
        detail = f"pyramid={config.pyramid!r}: K = sum(s^2) coarse-to-fine codes" if family == "hieratok" else "1D"
        raise ValueError(
            f"TokenizerSpace needs a tokenizer whose latents form a spatial grid (family 'convae', or 'hieratok' with "
            f"pyramid='decoder'); this {name} has {count} {detail} tokens, not a square grid"
        )
    if tokenizer.vocab_size is not None:
        raise ValueError(
            f"TokenizerSpace needs continuous latents (quantizer 'none' or 'vae'); this {name} emits ids from a "
            f"codebook of {tokenizer.vocab_size}"
        )
    return config.grid_size


# the families whose continuous latents can form a spatial grid (token_grid_side says which configs do)
GRID_FAMILIES: dict[str, type[Tokenizer]] = {"convae": ConvAE, "hieratok": HieraTok}


def load_grid_tokenizer(path: str | Path, weights: str | None = None) -> Tokenizer:
    """A saved tokenizer of a family in :data:`GRID_FAMILIES`, in eval mode, found by the loading rule
    of :func:`mstok.load_tokenizer` (:func:`~mstok.storage.locate.locate_model`).

    Only those families can be a latent space, so only they are loaded here (which keeps the
    family registry, which imports SemTok and so this module, out of it).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no model.
        ValueError: the folder holds another family, or a config or weights that do not fit.
    """
    folder, weights = locate_model(path, weights, "tokenizer")
    family, fields = split_saved_config(read_saved_config(folder, "tokenizer"), folder, "tokenizer")
    if family not in GRID_FAMILIES:
        raise ValueError(
            f"TokenizerSpace needs a tokenizer whose latents form a spatial grid (family 'convae', or 'hieratok' with "
            f"pyramid='decoder'); {folder} holds a {family!r} model"
        )
    family_class = GRID_FAMILIES[family]
    try:
        config = family_class.config_class.from_dict(fields)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{folder / CONFIG_FILE}: {err}") from err
    model = family_class(config)
    model.load_weights(folder / weights)
    return model.eval()


class TokenizerSpace(LatentSpace):
    """An mstok tokenizer with continuous grid latents as the latent space: its (B, K, C)
    latents reshaped to (B, C, g, g) (C = code_dim, f = patch_size, K = g^2).

    The tokenizer is frozen in place. A VAE tokenizer encodes to its posterior mean unless ``sample``.
    """

    def __init__(self, tokenizer: Tokenizer, sample: bool = False, bf16: bool = False) -> None:
        grid = token_grid_side(tokenizer)
        if sample and not tokenizer.is_vae:
            raise ValueError(
                "TokenizerSpace: sample=True needs a VAE tokenizer (quantizer 'vae'); this one has no posterior"
            )
        config = tokenizer.config
        super().__init__(config.code_dim, config.patch_size, bf16)
        self.tokenizer, self.sample, self.grid = tokenizer, sample, grid
        self.freeze()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, weights: str | None = None, sample: bool = False, bf16: bool = False
    ) -> TokenizerSpace:
        """Load a saved tokenizer of a grid family (:func:`load_grid_tokenizer`: the loading rule of
        :func:`mstok.load_tokenizer`, ``weights`` as there) and wrap it."""
        return cls(load_grid_tokenizer(path, weights), sample=sample, bf16=bf16)

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(C, g, g); the tokenizer takes images of its own size only (ValueError for any other)."""
        shape = super().latent_shape(image_size)
        if shape[1:] != (self.grid, self.grid):
            side = self.grid * self.downsample
            raise ValueError(
                f"TokenizerSpace: this tokenizer takes {side}x{side} images, got "
                f"{shape[1] * self.downsample}x{shape[2] * self.downsample}"
            )
        return shape

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.tokenizer.encode(images, sample=self.sample) if self.sample else self.tokenizer.encode(images)
        return rearrange(latents, "b (h w) c -> b c h w", h=self.grid)  # (B, C, g, g)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if tuple(latents.shape[2:]) != (self.grid, self.grid):
            raise ValueError(
                f"latents must have shape (B, {self.channels}, {self.grid}, {self.grid}), got {tuple(latents.shape)}"
            )
        # the tokenizer's differentiable decode (its decode() runs without gradients and clamps)
        tokenizer = self.tokenizer
        out = tokenizer.decode_codes(tokenizer.tokens_to_codes(rearrange(latents, "b c h w -> b (h w) c")))
        return out if tokenizer.pixel_decoder is None else tokenizer.pixel_decoder(out)


# spec "type" -> the builder its other keys are passed to
LATENT_SPACES: dict[str, Callable[..., LatentSpace]] = {
    "pixels": PixelSpace,
    "vae": DiffusersVAESpace.from_pretrained,
    "tokenizer": TokenizerSpace.from_pretrained,
}


def build_latent_space(spec: str | dict[str, Any] | LatentSpace) -> LatentSpace:
    """A latent space from a spec: ``"pixels"`` (or another type name alone), a table such as
    ``{"type": "vae", "path": "sd35", "subfolder": "vae"}`` or ``{"type": "tokenizer", "path": ...}``
    (its other keys are the builder's arguments), or a built :class:`LatentSpace` (returned as is).

    Raises:
        ValueError: an unknown type or key, naming the known ones.
        TypeError: a spec that is none of the above.
    """
    if isinstance(spec, LatentSpace):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise TypeError(
            f"a latent space spec is a type name or a table with a 'type' ({', '.join(LATENT_SPACES)}), got {spec!r}"
        )
    settings = dict(spec)
    kind = settings.pop("type", None)
    if kind not in LATENT_SPACES:
        raise ValueError(f"unknown latent space type {kind!r}; known types: {', '.join(LATENT_SPACES)}")
    builder = LATENT_SPACES[kind]
    allowed = list(inspect.signature(builder).parameters)  # the builder's keyword arguments
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for latent space type {kind!r}; valid: {', '.join(allowed)}")
    return builder(**settings)
