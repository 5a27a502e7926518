"""Pixel reconstruction loss for single-stage training: weighted L1 + MSE + quantizer loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mstok.tokenizers.base import TokenizerOutput


class ReconstructionLoss(nn.Module):
    """``l1_weight * L1 + mse_weight * MSE + quantizer_weight * (commitment + codebook)``.

    Returns the total and a dict of float terms for logging. Pixel terms are computed in
    float32 so bf16 autocast does not round away small reconstruction errors.
    """

    def __init__(self, l1_weight: float = 1.0, mse_weight: float = 1.0, quantizer_weight: float = 1.0) -> None:
        super().__init__()
        self.l1_weight, self.mse_weight, self.quantizer_weight = l1_weight, mse_weight, quantizer_weight

    def forward(self, output: TokenizerOutput, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if output.reconstruction is None:
            raise ValueError("ReconstructionLoss needs a tokenizer with head='pixels'")
        recon = output.reconstruction.float()
        l1 = F.l1_loss(recon, target)
        mse = F.mse_loss(recon, target)
        total = self.l1_weight * l1 + self.mse_weight * mse + self.quantizer_weight * output.quantizer_loss
        terms = {
            "loss": total.item(),
            "l1": l1.item(),
            "mse": mse.item(),
            "quantizer": output.quantizer_loss.item(),
            "commitment": output.commitment_loss.item(),
            "codebook": output.codebook_loss.item(),
        }
        return total, terms
