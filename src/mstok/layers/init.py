"""The one place where mstok models get their initial weights.

:func:`init_weights` walks a model once and applies these rules:

* ``nn.Linear`` and ``nn.Conv2d`` weights: truncated normal, std 0.02 (ViT/TiTok practice),
  biases zero. Small weights keep the residual stream near identity at the start.
* ``nn.LayerNorm``: weight one, bias zero.
* ``nn.Embedding`` (the VQ codebook): uniform in ``[-1/V, 1/V]``, the classic VQ-VAE choice;
  with L2-normalised codes only the directions matter, and those are uniform either way.
* Free parameters registered directly on a module (class token, positional embeddings,
  latent/query/mask tokens, scale embeddings) with a last dimension D: normal with std
  ``D ** -0.5``, so each token starts with unit expected norm like a LayerNorm output.
* Free 1-D parameters (e.g. the level weights of weighted-add aggregation): zero, so a
  softmax over them starts uniform.
"""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Initialise every parameter of ``model`` in place by the rules in this module's docstring."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            bound = 1.0 / module.num_embeddings
            nn.init.uniform_(module.weight, -bound, bound)
        else:
            for param in module.parameters(recurse=False):
                if param.dim() >= 2:
                    nn.init.normal_(param, std=param.shape[-1] ** -0.5)
                else:
                    nn.init.zeros_(param)
