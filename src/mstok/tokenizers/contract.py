"""What goes into a tokenizer and what comes out: input checks and :class:`TokenizerOutput`.

Every model that takes images or token ids (the 1D tokenizers and the 2D proxy VQGAN) checks
them here, so all of them reject bad input with the same messages; nothing here depends on a
family, which keeps the import graph a tree (``base`` -> ``pixel_decoder`` -> ``vqgan`` ->
``contract``).

Glossary: B batch, P patches, K latent tokens, C code dim, V codebook size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TokenizerOutput:
    """The training forward pass of a tokenizer.

    Attributes:
        reconstruction: (B, 3, H, W) unclamped pixels for the ``pixels`` head or through the
            pixel decoder of a two-stage tokenizer, else None.
        logits: (B, P, V_proxy) proxy-code logits for the ``proxy_codes`` head, else None.
        indices: (B, K) code ids, or None for a continuous bottleneck.
        latents: (B, K, C) float32 encoder outputs as the quantizer searched them.
        quantizer_loss: the quantizer's weighted loss terms summed (scalar).
        commitment_loss: the commitment part (scalar).
        codebook_loss: the codebook part (scalar).
        quantizer_losses: every weighted term of the quantizer by name ("commitment",
            "codebook", "entropy", "kl", ...), summing to ``quantizer_loss``.
        scale_reconstructions: a multi-scale decoder's (HieraTok's) unclamped image of every
            scale, coarse to fine, each (B, 3, s*p, s*p); the last is ``reconstruction``.
            None for single-scale families. The multi-scale RGB loss reads it.
        flow_prediction: a flow-matching decoder's (SemTok stage I) prediction at the noisy
            latent it was given, e.g. (B, C, h, w): the velocity, or the clean latent when the
            model measures its flow loss there (SemTok's ``flow_loss = "x0"``); None for every
            other decoder.
        flow_target: what it should predict there (``noise - x0``, or ``x0``), same shape. A
            model draws its own noise and time in the training forward (torch's global RNG,
            as a VAE draws its sample), so the target comes out with the prediction.
        semantic_losses: unweighted semantic alignment terms by name (``"distill"``,
            ``"contrastive"``), computed when the training forward was given the teacher's
            features (SemTok); the loss weights them. Empty otherwise.
    """

    reconstruction: torch.Tensor | None
    logits: torch.Tensor | None
    indices: torch.Tensor | None
    latents: torch.Tensor
    quantizer_loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor
    quantizer_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    scale_reconstructions: list[torch.Tensor] | None = None
    flow_prediction: torch.Tensor | None = None
    flow_target: torch.Tensor | None = None
    semantic_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_quantizer(cls, quant: Any, **outputs: Any) -> TokenizerOutput:
        """The output of a forward whose bottleneck returned ``quant`` (a
        :class:`~mstok.quantizers.base.QuantizerOutput`: ids, latents and loss terms copied from
        it); ``outputs`` are the decoder's fields (``reconstruction``, ``logits``, ...)."""
        outputs.setdefault("reconstruction", None)
        outputs.setdefault("logits", None)
        return cls(
            indices=quant.indices,
            latents=quant.latents,
            quantizer_loss=quant.loss,
            commitment_loss=quant.commitment_loss,
            codebook_loss=quant.codebook_loss,
            quantizer_losses=quant.losses,
            **outputs,
        )


def _check_finite(images: torch.Tensor) -> None:
    """Raise naming how many values are NaN or infinite and where the first one is."""
    bad = ~torch.isfinite(images)
    if bad.any():
        b, c, y, x = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"images contain NaN or infinite values: {int(bad.sum())} of {images.numel()}, the first "
            f"{images[b, c, y, x].item()} at image {b}, channel {c}, pixel (y={y}, x={x})"
        )


def check_images(
    images: Any, image_size: int | None, check_values: bool = True, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Validate a batch of images: float (B, 3, image_size, image_size) in [0, 1] (any H, W when
    ``image_size`` is None).

    Shared by every model that takes images (tokenizers and the proxy VQGAN), so they all
    reject bad input with the same messages. Integer images (uint8 ...) are refused rather
    than guessed at: 0-255 and 0-65535 data both exist. Float images of another precision
    (float64, float16, bfloat16) are converted to ``dtype`` (the model's) when it is given.
    ``check_values=False`` skips the range check, and on accelerators the NaN check too: both
    reduce over the batch and force a device sync. On the CPU the NaN check costs no sync and
    always runs.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor in [0, 1], got dtype {images.dtype}: scale them to [0, 1] floats "
            "first (for uint8 images divide by 255: images.float() / 255)"
        )
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]} in shape {tuple(images.shape)}")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise ValueError(
            f"this tokenizer takes {image_size}x{image_size} images, got "
            f"{images.shape[2]}x{images.shape[3]}; resize or crop first"
        )
    if images.numel() and (check_values or images.device.type == "cpu"):
        _check_finite(images)
    if check_values and images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"images must be in [0, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]"
        )
    # after the checks, so that their messages report the values as given
    return images if dtype is None or images.dtype == dtype else images.to(dtype)


def check_tokens(tokens: Any, num_tokens: int, codebook_size: int) -> torch.Tensor:
    """Validate token ids: integer (B, num_tokens) with every id in [0, codebook_size); returns them as long."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[1] != num_tokens:
        raise ValueError(f"tokens must have shape (B, {num_tokens}), got {tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= codebook_size):
        raise ValueError(
            f"token ids must be in [0, {codebook_size}), got values in [{tokens.min().item()}, {tokens.max().item()}]"
        )
    return tokens.long()


def check_latents(latents: Any, num_tokens: int, code_dim: int, kind: str = "VAE") -> torch.Tensor:
    """Validate continuous latents (a VAE's or an unquantized bottleneck's, named by ``kind``):
    finite float (B, K, C)."""
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        got = f"dtype {latents.dtype}" if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(
            f"this tokenizer has continuous ({kind}) latents: decode() takes a float tensor (B, {num_tokens}, "
            f"{code_dim}) from encode(), got {got}"
        )
    if latents.dim() != 3 or tuple(latents.shape[1:]) != (num_tokens, code_dim):
        raise ValueError(f"latents must have shape (B, {num_tokens}, {code_dim}), got {tuple(latents.shape)}")
    if latents.numel() and not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinite values")
    return latents
