"""Finite scalar quantization (FSQ, Mentzer et al. 2023).

Glossary: B batch, K latent tokens, C code dim = the number of levels given, L_d levels of
channel d, V = prod(L_d) codes.

Each channel is bounded to L_d integer values and rounded with a straight-through gradient:
``bounded = tanh(z + shift) * h - offset`` with ``h = (L - 1)(1 + eps) / 2``; for an even L the
grid is shifted by ``offset = 1/2`` (and ``shift = atanh(offset / h)`` keeps z = 0 at the grid
point 0), so rounding gives the L integers ``-(L // 2) .. L - 1 - L // 2``; ``eps`` keeps the
end points reachable. Codes are those integers divided by ``L // 2``, in [-1, 1]. The id is
the mixed-radix number of the digits ``integer + L // 2`` with channel 0 least significant.
There is no loss: the bounded grid cannot collapse the way a learned codebook can. It can
still saturate: at tiny scale the early "mean image" phase drives the encoder's outputs out to
where tanh is flat, and no gradient brings them back (benchmarks/quantizers.py). The option
``l2_norm_scale`` (off by default: the paper's FSQ) L2-normalises each latent and scales it to
that norm before the bound, so every channel stays within the scale and keeps a gradient.

Written here rather than wrapping vector-quantize-pytorch's ``FSQ``: the definition is a few
lines and that class needs three further packages (einx, loguru, torch-einops-utils). The tests
check codes and ids against it (the same definition, same channel order, same eps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mstok.quantizers.base import MAX_ID_BITS, Quantizer, QuantizerOutput, check_ids, make_output
from mstok.quantizers.binary import straight_through

EPS = 1e-3


class FiniteScalarQuantizer(Quantizer):
    """FSQ over per-channel ``levels``; ``code_dim`` must equal ``len(levels)``.

    Args:
        levels: L_d for each channel, each at least 2.
        code_dim: C, checked against ``len(levels)`` (no projection: the encoder emits C channels).
        l2_norm_scale: when set, latents are L2-normalised and multiplied by it before the
            bound (``None``: raw latents, as in the paper).
    """

    def __init__(
        self, levels: list[int] | tuple[int, ...], code_dim: int | None = None, l2_norm_scale: float | None = None
    ) -> None:
        super().__init__()
        levels = list(levels)
        if not levels or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in levels):
            raise ValueError(f"fsq: levels must be a non-empty list of integers >= 2, got {levels!r}")
        if code_dim is not None and code_dim != len(levels):
            raise ValueError(
                f"fsq: code_dim={code_dim} but levels {levels} give {len(levels)} channels; "
                f"set code_dim={len(levels)} or give {code_dim} levels"
            )
        if math.prod(levels) > 2**MAX_ID_BITS:
            raise ValueError(f"fsq: levels {levels} give {math.prod(levels)} codes, more than int64 ids allow")
        self.levels = levels
        self.l2_norm_scale = l2_norm_scale
        self.code_dim = len(levels)
        self.codebook_size = math.prod(levels)
        # non-persistent: derived from the config, so old/new state_dicts need not carry them
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        radix = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_radix", torch.tensor(radix, dtype=torch.int64), persistent=False)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        half = (self._levels - 1) * (1 + EPS) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, K, C) -> codes in [-1, 1] (straight-through), int64 ids, no losses.

        ``latents`` of the output is the bounded, unrounded input divided like the codes.
        """
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"fsq: expected latents with {self.code_dim} channels, got shape {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if self.l2_norm_scale is not None:
                z = F.normalize(z, dim=-1) * self.l2_norm_scale
            bounded = self._bound(z)
            rounded = straight_through(bounded.round(), bounded)
            half_width = torch.div(self._levels, 2, rounding_mode="floor")
            codes = rounded / half_width
            digits = bounded.detach().round().long() + half_width.long()
            ids = (digits * self._radix).sum(-1)
        return make_output(bounded / half_width, codes, ids, {})

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, K) int64 ids -> (B, K, C) float32 codes, exactly those forward returns."""
        check_ids(indices, self.codebook_size, "fsq ids")
        levels = self._levels.long()
        digits = torch.div(indices.long()[..., None], self._radix, rounding_mode="floor") % levels
        half_width = torch.div(levels, 2, rounding_mode="floor")
        return ((digits - half_width).float()) / half_width.float()
