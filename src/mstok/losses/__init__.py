"""Training losses (kept outside the models)."""

from mstok.losses.gan import AdversarialLoss, LeCamEMA, PatchDiscriminator, hinge_d_loss, hinge_g_loss, lecam_loss
from mstok.losses.masked import MaskedTokenLoss, MaskedTokens, mask_tokens
from mstok.losses.objective import TokenizerLoss
from mstok.losses.perceptual import LPIPS, VGG16Features, check_lpips_weights

__all__ = [
    "LPIPS",
    "AdversarialLoss",
    "LeCamEMA",
    "MaskedTokenLoss",
    "MaskedTokens",
    "PatchDiscriminator",
    "TokenizerLoss",
    "VGG16Features",
    "check_lpips_weights",
    "hinge_d_loss",
    "hinge_g_loss",
    "lecam_loss",
    "mask_tokens",
]
