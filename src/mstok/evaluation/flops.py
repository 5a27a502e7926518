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

What a tokenizer's encoder and decoder are called with is the family's business: its
``flops_calls(batch_size)`` method (:data:`FlopsCalls`; :meth:`Tokenizer.flops_calls` calls the
encoder on images (B, 3, H, W) and the decoder on codes (B, K, C), and a family whose networks
take something else overrides it: SemTok's take first-stage latents in, codes plus a noisy
latent and a flow time out).

Glossary: B batch, K latent tokens, C code dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mstok.tokenizers.base import Tokenizer

# part name ("encoder", "decoder") -> (the callable whose forward is counted, its positional inputs)
FlopsCalls = dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]


def _count(call: Callable[..., Any], params: Iterable[nn.Parameter], inputs: tuple[Any, ...]) -> int:
    """Forward FLOPs of ``call(*inputs)`` with ``params`` (the weights it uses) frozen meanwhile."""
    # FlopCounterMode's module tracker hooks every module input that requires grad; under
    # no_grad a view of a parameter (e.g. ``query_tokens.expand(B, -1, -1)``) still requires
    # grad but has no grad_fn, and the hook raises "Expected gradient function to be set".
    # Counting needs no autograd, so switch it off for the parameters and detach the inputs.
    inputs = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)
    params = [p for p in params if p.requires_grad]
    counter = FlopCounterMode(display=False)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            call(*inputs)
    finally:
        for p in params:
            p.requires_grad_(True)
    return int(counter.get_total_flops())


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Forward FLOPs of ``module(*inputs)`` (2 per multiply-add), counted without gradients.

    Attention is forced onto the math SDPA backend so its matmuls are counted (see the
    module docstring).
    """
    return _count(module, module.parameters(), inputs)


def tokenizer_flops(tokenizer: Tokenizer, batch_size: int = 1) -> dict[str, int]:
    """Forward FLOPs of a tokenizer's encoder and decoder for one batch.

    The calls come from the tokenizer's ``flops_calls(batch_size)`` (by default the encoder on
    images, the decoder on codes). The quantizer (a
    nearest-code lookup, ~2*K*C*V FLOPs) is not included, nor is a frozen first stage (SemTok's
    VAE): the counts are the tokenizer's own networks. A flow decoder (SemTok stage I) counts
    ONE decoder call, i.e. one velocity evaluation = one Euler step; a decode of n Euler steps
    costs n times that (Heun: 2n), which callers multiply in (:func:`decoder_calls`).
    Counts depend only on shapes, so a tokenizer built under ``torch.device("meta")`` gives
    the same numbers without any compute.

    Returns:
        ``{"encoder": flops, "decoder": flops}``.

    Raises:
        ValueError: ``batch_size`` is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    calls = tokenizer.flops_calls(batch_size)
    return {part: _count(call, tokenizer.parameters(), inputs) for part, (call, inputs) in calls.items()}


def decoder_calls(tokenizer: Tokenizer, steps: int | None = None, sampler: str | None = None) -> int:
    """How many decoder calls one ``tokenizer.decode`` makes: 1 for a one-pass decoder; a flow
    decoder's ``decoder_calls(steps, sampler)`` (``steps``/``sampler`` None: its defaults).
    ``tokenizer_flops(...)["decoder"] * decoder_calls(...)`` is then the cost of a decode."""
    return tokenizer.decoder_calls(steps, sampler)
