"""Forward FLOP counting for modules and tokenizers.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which sees the
matrix multiplications (linear layers, convolutions, attention matmuls) and counts a
multiply-add as 2 FLOPs. Element-wise work (LayerNorm, GELU, softmax, residual adds) is
not counted; in a ViT it is a few percent of the total.

Attention runs under the math SDPA backend here. ``F.scaled_dot_product_attention`` on
CPU otherwise dispatches to a fused flash kernel (``_scaled_dot_product_flash_attention_for_cpu``)
that the counter has no formula for, so the ``Q K^T`` and ``A V`` matmuls - the part of the
cost that is quadratic in sequence length, i.e. exactly what the TiTok-vs-MsTok comparison
is about - would silently count as zero. The math backend decomposes attention into plain
batched matmuls, which the counter sees on every device; it computes the same attention
(up to rounding).

Glossary: B batch, K latent tokens, C code dim.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mstok.tokenizers.base import Tokenizer


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Forward FLOPs of ``module(*inputs)`` (2 per multiply-add), counted without gradients.

    Attention is forced onto the math SDPA backend so its matmuls are counted (see the
    module docstring).
    """
    # FlopCounterMode's module tracker hooks every module input that requires grad; under
    # no_grad a view of a parameter (e.g. ``query_tokens.expand(B, -1, -1)``) still requires
    # grad but has no grad_fn, and the hook raises "Expected gradient function to be set".
    # Counting needs no autograd, so switch it off for the parameters and detach the inputs.
    inputs = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)
    params = [p for p in module.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            module(*inputs)
    finally:
        for p in params:
            p.requires_grad_(True)
    return int(counter.get_total_flops())


def tokenizer_flops(tokenizer: Tokenizer, batch_size: int = 1) -> dict[str, int]:
    """Forward FLOPs of a tokenizer's encoder and decoder for one batch.

        The encoder runs on random images (B, 3, H, W) at the config resolution, the decoder
        on random codes (B, K, C), on the tokenizer's device and dtype. The quantizer (a
    nearest-code lookup, ~2*K*C*V FLOPs) is not included. Counts depend only on shapes, so a
    tokenizer built under ``torch.device("meta")`` gives the same numbers without any compute.

        Returns:
            ``{"encoder": flops, "decoder": flops}``.
    """
    cfg = tokenizer.config
    param = next(tokenizer.parameters())
    images = torch.rand(batch_size, 3, cfg.image_size, cfg.image_size, device=param.device, dtype=param.dtype)
    codes = torch.randn(batch_size, cfg.num_latent_tokens, cfg.code_dim, device=param.device, dtype=param.dtype)
    return {
        "encoder": count_flops(tokenizer.encoder, images),
        "decoder": count_flops(tokenizer.decoder, codes),
    }
