"""Adversarial loss for single-stage / stage-2 tokenizer training: PatchGAN, hinge loss, LeCam.

Pieces, smallest first:

* :class:`PatchDiscriminator`: a PatchGAN (Isola et al. 2017, as in taming-transformers'
  NLayerDiscriminator) that scores overlapping patches, so it judges local texture and
  sharpness, which is what the pixel and perceptual losses leave blurry.
* :func:`hinge_d_loss`, :func:`hinge_g_loss`: the hinge GAN objective.
* :class:`LeCamEMA` and :func:`lecam_loss`: the LeCam regulariser (Tseng et al. 2021),
  which anchors the discriminator's logits to moving averages of its own past logits and
  keeps it from running away when it wins easily (small data, strong decoder).
* :class:`AdversarialLoss`: the discriminator, the EMA and the weights, with one method for
  the discriminator step and one for the generator step.

Design notes, measured against the official TiTok code (bytedance/1d-tokenizer):

* TiTok's discriminator is a different, heavier network: a 5x5 stem, 3x3 convolutions each
  followed by a fixed [1, 3, 3, 1] blur-and-subsample (anti-aliased downsampling), GroupNorm
  with 32 groups, LeakyReLU(0.1), 128 -> 1024 channels, and an adaptive max-pool to a fixed
  16x16 logit map before two "same" convolutions. It also scores images in [0, 1] as given.
  Here the network is the plain PatchGAN with learned 4x4 stride-2 convolutions: a learned
  4x4 kernel can become a low-pass filter by itself (the blur matters most for 3x3 strided or
  pooled downsampling), the logit map scales with the input so 32x32 and 64x64 training crops
  work without a 16x16 pool that would be larger than the feature map, and it is several times
  cheaper. We keep TiTok's GroupNorm in place of taming's BatchNorm, and map inputs to
  [-1, 1] so the first layer sees zero-centred values.
* LeCam: the official TiTok code regularises the batch-*mean* logits,
  ``relu(mean(real) - ema_fake)^2``; the LeCam paper's code (google/lecam-gan) and this module
  apply it per logit, ``mean(relu(real - ema_fake)^2)``, which also penalises single patches
  that run away while the mean stays put (by Jensen it is never smaller).
* EMA start: TiTok starts both EMAs at zero and blends from there, so for the first
  ~1/(1-decay) = 1000 steps the anchor is pulled towards 0; google/lecam-gan starts at 1000
  and copies the current value (decay 0) until a start step. Here the first update copies the
  observed means and later ones blend, i.e. the lecam-gan behaviour with a start step of one.
  Before any update there is no anchor and the regulariser is zero.
* Order: like TiTok, the regulariser of a step uses the EMA *before* that step's update;
  lecam-gan updates first, so its anchor already contains the current batch.
* TiTok's hinge and generator losses are the ones here (with the 0.5 in the D loss;
  lecam-gan sums the two hinge terms); its LeCam weight 0.001 is our default.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from mstok.layers import init_weights


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` dividing ``channels`` (32 for the usual widths)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: images in [0, 1] -> one logit per overlapping patch.

    ``num_layers`` stride-2 4x4 convolutions (channels ``base_channels * 2**i``, capped at
    ``8 * base_channels``) are followed by one stride-1 4x4 convolution and a stride-1 4x4
    convolution to a single channel. With ``num_layers=3`` a logit sees a 70x70 patch and an
    HxW input gives an ``(H/8 - 2) x (W/8 - 2)`` map (30x30 at 256, 2x2 at 32).

    Normalisation is GroupNorm rather than BatchNorm: batch statistics would make a sample's
    logit depend on the other samples of its batch (real and fake batches are scored
    separately, so BatchNorm also leaks which of the two a batch is) and would need
    SyncBatchNorm under DDP. GroupNorm has no running statistics, so train and eval agree.

    Weights come from :func:`mstok.layers.init_weights` (LeCun-normal convolutions, zero
    biases, GroupNorm scale one and shift zero); GroupNorm after each hidden convolution
    keeps activations at unit scale regardless.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = base_channels
        for i in range(1, num_layers + 1):
            out = base_channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1  # the last hidden layer widens the receptive field only
            layers += [
                # no bias: GroupNorm's shift right after it would cancel it
                nn.Conv2d(channels, out, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(_num_groups(out), out),
                nn.LeakyReLU(0.2),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Score ``images`` (B, C, H, W) in [0, 1]; returns patch logits (B, 1, h, w)."""
        return self.layers(images * 2.0 - 1.0)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))`` (0-d)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss ``-mean(fake)`` (0-d): push the fakes' logits up."""
    return -fake_logits.mean()


class LeCamEMA(nn.Module):
    """Exponential moving averages of the discriminator's mean real and mean fake logits.

    Buffers (all in ``state_dict``, so a resumed run continues the same averages):
    ``ema_real`` and ``ema_fake`` (0-d float32) and ``initialized`` (0-d bool). The first
    :meth:`update` copies the observed means; later ones blend with ``decay``. Starting from
    zeros instead would drag the anchor towards 0 for ~1/(1-decay) steps (see module notes).
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_fake", torch.zeros((), dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> None:
        """Fold in one step's mean real and fake logits (scalars, already averaged over ranks).

        Written with ``torch.where`` on the ``initialized`` buffer rather than a Python branch,
        so the update never waits for the device.
        """
        for ema, value in ((self.ema_real, real_mean), (self.ema_fake, fake_mean)):
            value = value.detach().to(ema)
            blended = self.decay * ema + (1.0 - self.decay) * value
            ema.copy_(torch.where(self.initialized, blended, value))
        self.initialized.fill_(True)


def lecam_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, ema: LeCamEMA) -> torch.Tensor:
    """LeCam regulariser ``mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)`` (0-d).

    Penalises real logits above the fakes' running mean and fake logits below the reals'
    running mean. Zero until ``ema`` has seen its first update (there is no anchor yet).
    """
    # Copies, because autograd saves the gate for backward and the EMA is updated in place
    # before that backward runs; multiplying by it instead of branching avoids a device sync.
    live = ema.initialized.to(real_logits.dtype)
    ema_real, ema_fake = ema.ema_real.clone(), ema.ema_fake.clone()
    real_term = F.relu(real_logits - ema_fake).pow(2).mean()
    fake_term = F.relu(ema_real - fake_logits).pow(2).mean()
    return (real_term + fake_term) * live


class AdversarialLoss(nn.Module):
    """Discriminator, LeCam EMA and weights for the two halves of a GAN step.

    Who calls what, each training step once the adversarial phase has started:

    1. Generator step (the training objective): ``g_loss, _ = adv.generator_loss(recon)``;
       it adds ``gan_weight * g_loss`` to the tokenizer's loss (the weight lives there, not
       here). Gradients reach the tokenizer through ``recon`` but not the discriminator.
    2. Discriminator step (the trainer), per micro-batch:
       ``d_loss, terms = adv.discriminator_loss(images, recon)`` (``recon`` is detached
       inside), backpropagate ``d_loss``; then step the discriminator's optimiser.
    3. Once per step, after all micro-batches: the trainer averages ``terms["logits_real"]``
       and ``terms["logits_fake"]`` over micro-batches and ranks and calls
       :meth:`update_ema` with them. ``discriminator_loss`` never touches the EMA itself, so
       every micro-batch of a step sees the same anchor and every rank keeps the same one.

    The discriminator's gradients stay local; under DDP the trainer averages them over ranks
    (e.g. an all-reduce of its ``.grad`` before the optimiser step). Terms are detached 0-d
    tensors, not floats, so logging them costs no device sync.

    Everything runs in float32 with autocast off, like TiTok: the hinge margins and the
    LeCam anchor compare logits near +-1 to a running mean, and the discriminator is small
    next to the tokenizer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        lecam_weight: float = 0.001,
        lecam_decay: float = 0.999,
    ) -> None:
        super().__init__()
        self.discriminator = PatchDiscriminator(in_channels, base_channels, num_layers)
        self.lecam_ema = LeCamEMA(lecam_decay)
        self.lecam_weight = lecam_weight

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 patch logits (B, 1, h, w) of ``images`` (B, C, H, W) with autocast off."""
        device_type = images.device.type
        available = torch.amp.is_autocast_available(device_type)
        with torch.autocast(device_type, enabled=False) if available else nullcontext():
            return self.discriminator(images.float()).float()

    def discriminator_loss(
        self, real: torch.Tensor, fake: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge + ``lecam_weight`` * LeCam loss of the discriminator on a real and a fake batch.

        Args:
            real: target images (B, C, H, W) in [0, 1].
            fake: reconstructions (B, C, H, W) in [0, 1]; detached here, so the tokenizer
                gets no gradient from this loss.

        Returns:
            ``(d_loss, terms)`` with 0-d detached terms ``d_loss``, ``d_hinge``, ``d_lecam``
            (unweighted), ``logits_real`` and ``logits_fake`` (batch-mean logits, the
            inputs of :meth:`update_ema`).
        """
        real_logits = self._logits(real.detach())  # (B, 1, h, w)
        fake_logits = self._logits(fake.detach())
        hinge = hinge_d_loss(real_logits, fake_logits)
        lecam = lecam_loss(real_logits, fake_logits, self.lecam_ema)  # the EMA as of before this step
        loss = hinge + self.lecam_weight * lecam
        terms = {
            "d_loss": loss.detach(),
            "d_hinge": hinge.detach(),
            "d_lecam": lecam.detach(),
            "logits_real": real_logits.detach().mean(),
            "logits_fake": fake_logits.detach().mean(),
        }
        return loss, terms

    def update_ema(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> None:
        """Fold one step's mean logits (averaged over micro-batches and ranks) into the LeCam EMA."""
        self.lecam_ema.update(real_mean, fake_mean)

    def generator_loss(self, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge generator loss of the discriminator's logits on ``fake`` (unweighted).

        The discriminator's parameters are switched to ``requires_grad=False`` for the
        forward pass (and restored afterwards), so autograd records no weight gradients at
        all: backward computes only the input gradients the tokenizer needs, and the
        discriminator's ``.grad`` stays untouched without the trainer having to zero it.

        Args:
            fake: reconstructions (B, C, H, W) in [0, 1], attached to the tokenizer's graph.

        Returns:
            ``(g_loss, terms)`` with 0-d detached terms ``g_loss`` and ``logits_fake_g``
            (batch-mean logit of the fakes).
        """
        params = list(self.discriminator.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            fake_logits = self._logits(fake)  # (B, 1, h, w)
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
        loss = hinge_g_loss(fake_logits)
        terms = {"g_loss": loss.detach(), "logits_fake_g": fake_logits.detach().mean()}
        return loss, terms
