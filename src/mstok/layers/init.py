"""The one place where mstok models get their initial weights.

:func:`init_weights` walks a model once and applies these rules:

* ``nn.Linear`` and ``nn.Conv2d`` weights: truncated normal with std ``fan_in ** -0.5``
  (LeCun; a conv's fan-in is its kernel size times input channels), biases zero. Unlike
  the fixed std 0.02 of ViT/TiTok, which is tuned for width 768 (where it is close to
  ``768 ** -0.5 = 0.036``), this keeps activations and attention logits at the same scale
  for every width: at width 128 a 0.02 init leaves attention uniform, and tiny models
  spend hundreds of steps before any image information reaches the latent tokens.
* ``nn.LayerNorm`` and ``nn.GroupNorm`` (VQGAN blocks, GAN discriminator): weight one, bias zero.
* ``nn.Embedding`` (the VQ codebook): uniform in ``[-1/V, 1/V]``, the classic VQ-VAE choice;
  with L2-normalised codes only the directions matter, and those are uniform either way.
* Free parameters registered directly on a module (class token, positional embeddings,
  latent/query/mask tokens, scale embeddings) with a last dimension D: normal with std
  ``D ** -0.5``, so each token starts with unit expected norm like a LayerNorm output.
* Free 1-D parameters (e.g. the level weights of weighted-add aggregation): zero, so a
  softmax over them starts uniform.
* Free parameters a module names in its ``init_tables`` dict (``name -> table``, set by
  :func:`~mstok.layers.embeddings.set_init_table`): that table. The tokenizers use it for
  2D sine-cosine starts of positional embeddings (``position_embedding = "sincos"``) and of
  latent tokens (``latent_init = "grid"``).
* Attention modules flagged ``mimetic_init = True`` (the tokenizers' ``attention_init =
  "mimetic"``), after the rules above: the key projection starts as a copy of the query
  projection (the query-key half of Trockman & Kolter's mimetic initialisation, 2023), so
  that ``q_i . k_j`` starts as a similarity of tokens i and j instead of a random bilinear
  form. Tokens then attend to tokens like them from the first step; with sin-cos positions
  that means nearby positions, and with grid latents, latent k reads its own region.
* Modules flagged ``zero_init = True`` (set by :func:`~mstok.layers.adaln.zero_init`), last:
  every parameter in them zero. The adaLN-Zero modulations and the final projection of a DiT
  start there, so each block starts as the identity and the model's output as zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mstok.layers.attention import CrossAttention, SelfAttention


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``tensor`` from N(0, std^2) truncated to [-2 std, 2 std], in place.

    Inverse-CDF sampling: a uniform draw between the CDF values of the bounds, mapped back
    through ``erfinv``. One pass, unlike ``nn.init.trunc_normal_``'s resampling loop, which
    makes building a B/L model on a CPU several times slower.
    """
    bound = math.erf(2 / math.sqrt(2))  # 2 * Phi(2) - 1
    tensor.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2)).clamp_(-2 * std, 2 * std)
    return tensor


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Initialise every parameter of ``model`` in place by the rules in this module's docstring."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            trunc_normal_(module.weight, std=module.weight[0].numel() ** -0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            bound = 1.0 / module.num_embeddings
            nn.init.uniform_(module.weight, -bound, bound)
        else:
            tables = getattr(module, "init_tables", {})
            for name, param in module.named_parameters(recurse=False):
                if name in tables:
                    param.copy_(tables[name])
                elif param.dim() >= 2:
                    nn.init.normal_(param, std=param.shape[-1] ** -0.5)
                else:
                    nn.init.zeros_(param)
    for module in model.modules():  # after every Linear is initialised
        if getattr(module, "mimetic_init", False):
            tie_query_key(module)
    for module in model.modules():  # last: no other rule may overwrite a zero start
        if getattr(module, "zero_init", False):
            for param in module.parameters():
                nn.init.zeros_(param)


@torch.no_grad()
def tie_query_key(module: nn.Module) -> None:
    """Copy the query projection's weights into the key projection (the mimetic rule above)."""
    if isinstance(module, SelfAttention):
        dim = module.qkv.weight.shape[1]
        module.qkv.weight[dim : 2 * dim].copy_(module.qkv.weight[:dim])
    elif isinstance(module, CrossAttention):
        if module.kv.weight.shape[1] != module.q.weight.shape[1]:
            raise ValueError("mimetic initialisation needs queries and context of the same width")
        module.kv.weight[: module.q.weight.shape[0]].copy_(module.q.weight)
    else:
        raise TypeError(f"mimetic initialisation applies to attention modules, not {type(module).__name__}")
