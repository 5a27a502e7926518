"""The tokenizer's training objective, composed from weighted terms.

One class covers every recipe of the papers; a stage chooses its terms by their weights:

* single stage (Taming-VQGAN setting, TA-TiTok): L1/L2 + perceptual + GAN + quantizer;
* two-stage, stage 1 (TiTok 3.3, MsTok 3.3): cross-entropy against the proxy tokenizer's
  codes + quantizer;
* two-stage, stage 2: L2 + perceptual + GAN on the pixels decoded through the proxy's
  pixel decoder;
* the proxy tokenizer itself (``mstok train-proxy``): the single-stage terms;
* HieraTok (eq. 8-9): the single-stage terms plus the multi-scale RGB term, the same L1/L2
  mix at every coarser scale of the decoder against the area-downsampled images;
* SemTok stage I (eq. 6): the flow-matching velocity MSE + quantizer (BSQ's entropy term) +
  the semantic alignment terms (eq. 2) against a frozen teacher; stage II (eq. 7): MSE +
  perceptual + GAN on the pixels the refined latent decodes to.

Terms a model computes inside its training forward (the quantizer's, the flow's prediction and
target, the semantic terms) come out in its :class:`TokenizerOutput`; the loss only weights
them. What the forward needs from outside the model (the teacher's features) the loss provides
through :meth:`TokenizerLoss.model_inputs`, so the trainer needs no family-specific code.

Terms are returned as detached 0-d tensors, not Python floats: converting each to a float
would wait for the device every step, so the trainer averages them lazily at log time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mstok.tokenizers.contract import TokenizerOutput


class TokenizerLoss(nn.Module):
    """``l1 * L1 + mse * MSE + perceptual * LPIPS + quantizer * VQ + proxy_ce * CE + gan * G
    + multiscale * MS + flow * FM + distill * L_distill + contrastive * L_contra``.

    Args:
        l1_weight, mse_weight: pixel reconstruction terms (need a reconstruction).
        perceptual_weight: LPIPS term; needs ``perceptual`` (an LPIPS module).
        quantizer_weight: commitment + codebook loss of the quantizer.
        proxy_ce_weight: cross-entropy of the proxy-code logits against proxy codes.
        label_smoothing: label smoothing of that cross-entropy.
        gan_weight: hinge generator loss; needs ``adversarial`` (an AdversarialLoss).
        multiscale_weight: the multi-scale RGB term (:meth:`multiscale_loss`); needs a model
            whose output has ``scale_reconstructions`` (HieraTok) and an L1 or MSE weight.
        flow_weight: the MSE of a flow-matching decoder's ``flow_prediction`` against its
            ``flow_target`` (velocities, or clean latents: the model says which); needs a model
            whose output has both (SemTok stage I).
        distill_weight, contrastive_weight: the semantic terms the model computes from the
            teacher's features (``semantic_losses``); need ``teacher``.
        perceptual: the LPIPS network, or None.
        adversarial: the discriminator loss module, or None.
        teacher: the frozen semantic teacher (:mod:`mstok.losses.teachers`), or None.
        entropy_boost, entropy_boost_steps: a warm start of a bit quantizer's entropy term
            (``quantizer_losses["entropy"]``, already weighted by the quantizer): at step 0 it
            counts ``entropy_boost`` times, falling linearly to once at ``entropy_boost_steps``
            (:meth:`entropy_factor`). 1 / 0: off.
    """

    def __init__(
        self,
        l1_weight: float = 1.0,
        mse_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        quantizer_weight: float = 1.0,
        proxy_ce_weight: float = 0.0,
        label_smoothing: float = 0.0,
        gan_weight: float = 0.0,
        multiscale_weight: float = 0.0,
        perceptual: nn.Module | None = None,
        adversarial: nn.Module | None = None,
        flow_weight: float = 0.0,
        distill_weight: float = 0.0,
        contrastive_weight: float = 0.0,
        teacher: nn.Module | None = None,
        entropy_boost: float = 1.0,
        entropy_boost_steps: int = 0,
    ) -> None:
        super().__init__()
        if entropy_boost < 1:
            raise ValueError(
                f"entropy_boost must be >= 1 (a multiplier of the entropy term early on), got {entropy_boost}"
            )
        if (distill_weight > 0 or contrastive_weight > 0) and teacher is None:
            raise ValueError("distill_weight / contrastive_weight > 0 need a semantic teacher (the [teacher] section)")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS module")
        if gan_weight > 0 and adversarial is None:
            raise ValueError("gan_weight > 0 needs an adversarial loss module")
        if multiscale_weight > 0 and l1_weight <= 0 and mse_weight <= 0:
            raise ValueError(
                "multiscale_weight > 0 applies the l1_weight / mse_weight mix at every coarser scale: "
                "set l1_weight or mse_weight > 0"
            )
        self.l1_weight, self.mse_weight, self.perceptual_weight = l1_weight, mse_weight, perceptual_weight
        self.quantizer_weight, self.proxy_ce_weight, self.label_smoothing = (
            quantizer_weight,
            proxy_ce_weight,
            label_smoothing,
        )
        self.gan_weight = gan_weight
        self.multiscale_weight = multiscale_weight
        self.flow_weight = flow_weight
        self.semantic_weights = {"distill": distill_weight, "contrastive": contrastive_weight}
        self.perceptual = perceptual
        self.teacher = teacher
        self.entropy_boost, self.entropy_boost_steps = float(entropy_boost), int(entropy_boost_steps)
        # not a submodule: the discriminator has its own optimizer and checkpoint entry
        self._adversarial = [adversarial]

    def entropy_factor(self, step: int) -> float:
        """How many times the quantizer's entropy term counts at ``step``: ``entropy_boost`` at
        step 0, linearly down to 1 at ``entropy_boost_steps`` and after.

        Why: a binary quantizer's codes are decided in the first few hundred steps. A large
        entropy weight then spreads the tokens over the codebook (LFQ/BSQ at 0.1 use more codes),
        but kept large it costs reconstruction for the whole run (benchmarks/RESULTS.md,
        "Quantizers at equal bits"); the warm start takes the spread and then gets out of the way.
        """
        if self.entropy_boost_steps <= 0 or step >= self.entropy_boost_steps:
            return 1.0
        return self.entropy_boost + (1.0 - self.entropy_boost) * step / self.entropy_boost_steps

    @property
    def needs_pixels(self) -> bool:
        """Whether any term reads the reconstruction."""
        return any(w > 0 for w in (self.l1_weight, self.mse_weight, self.perceptual_weight, self.gan_weight))

    @property
    def needs_proxy_codes(self) -> bool:
        return self.proxy_ce_weight > 0

    @property
    def needs_flow(self) -> bool:
        """Whether a term reads a flow decoder's prediction and target."""
        return self.flow_weight > 0

    @property
    def semantic_terms(self) -> tuple[str, ...]:
        """The semantic terms (``distill``, ``contrastive``) with a weight > 0."""
        return tuple(name for name, weight in self.semantic_weights.items() if weight > 0)

    @torch.no_grad()
    def model_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments the training forward needs from outside the model: the teacher's
        features (B, D_t, h, w) when a semantic term is on, else nothing."""
        if not self.semantic_terms:
            return {}
        return {"teacher_features": self.teacher(images)}

    @property
    def needs_scales(self) -> bool:
        """Whether a term reads every scale's image (``scale_reconstructions``)."""
        return self.multiscale_weight > 0

    def multiscale_loss(self, scale_images: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """HieraTok's multi-scale RGB supervision (eq. 9): for every scale but the finest (the
        full-resolution image has its own terms), ``l1_weight * L1 + mse_weight * MSE`` of that
        scale's image against ``images`` area-downsampled to its size, summed over the scales,
        so each scale counts as much as the full-resolution reconstruction.

        Args:
            scale_images: each scale's (B, 3, h, w) image, coarse to fine.
            images: (B, 3, H, W) targets in [0, 1].
        """
        total = images.new_zeros((), dtype=torch.float32)
        for recon in scale_images[:-1]:
            target = F.interpolate(images.float(), size=recon.shape[-2:], mode="area")  # D_s(X)
            recon = recon.float()
            if self.l1_weight > 0:
                total = total + self.l1_weight * F.l1_loss(recon, target)
            if self.mse_weight > 0:
                total = total + self.mse_weight * F.mse_loss(recon, target)
        return total

    def forward(
        self,
        output: TokenizerOutput,
        images: torch.Tensor,
        proxy_codes: torch.Tensor | None = None,
        gan_active: bool = False,
        step: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its terms.

        Args:
            output: the model's training forward.
            images: (B, 3, H, W) targets in [0, 1].
            proxy_codes: (B, P) proxy tokenizer ids, needed when ``proxy_ce_weight > 0``.
            gan_active: whether the generator's adversarial term applies at this step.
            step: the optimisation step (the entropy warm start reads it).
        """
        terms: dict[str, torch.Tensor] = {}
        total = images.new_zeros(())
        if self.needs_pixels:
            if output.reconstruction is None:
                raise ValueError(
                    "the loss has pixel terms but the model produced no reconstruction "
                    "(a proxy_codes head needs a pixel decoder for them)"
                )
            recon = output.reconstruction.float()  # pixel terms in fp32: bf16 rounds away small errors
            if self.l1_weight > 0:
                terms["l1"] = F.l1_loss(recon, images)
                total = total + self.l1_weight * terms["l1"]
            if self.mse_weight > 0:
                terms["mse"] = F.mse_loss(recon, images)
                total = total + self.mse_weight * terms["mse"]
            if self.perceptual_weight > 0:
                terms["perceptual"] = self.perceptual(recon, images).mean()
                total = total + self.perceptual_weight * terms["perceptual"]
            if self.gan_weight > 0 and gan_active:
                gan_loss, _ = self._adversarial[0].generator_loss(recon)
                terms["gan_g"] = gan_loss
                total = total + self.gan_weight * gan_loss
        if self.proxy_ce_weight > 0:
            if proxy_codes is None or output.logits is None:
                raise ValueError("proxy_ce_weight > 0 needs a proxy_codes head and the proxy tokenizer's codes")
            logits = output.logits.float()  # (B, P, V_proxy)
            if logits.shape[:2] != proxy_codes.shape:
                raise ValueError(
                    f"proxy logits cover {tuple(logits.shape[:2])} positions but the proxy gave codes of "
                    f"shape {tuple(proxy_codes.shape)}: the tokenizer's patch grid must match the proxy's grid"
                )
            terms["proxy_ce"] = F.cross_entropy(
                logits.flatten(0, 1), proxy_codes.flatten(), label_smoothing=self.label_smoothing
            )
            total = total + self.proxy_ce_weight * terms["proxy_ce"]
        if self.multiscale_weight > 0:
            if output.scale_reconstructions is None:
                raise ValueError(
                    "multiscale_weight > 0 needs a multi-scale tokenizer (family 'hieratok'), whose output has "
                    "scale_reconstructions; this model gave none: set the multi-scale weight to 0"
                )
            terms["multiscale"] = self.multiscale_loss(output.scale_reconstructions, images)
            total = total + self.multiscale_weight * terms["multiscale"]
        if self.flow_weight > 0:
            if output.flow_prediction is None or output.flow_target is None:
                raise ValueError(
                    "flow_weight > 0 needs a flow-matching decoder (SemTok with decoder_mode='flow'), whose output "
                    "has flow_prediction and flow_target; this model gave none: set the flow weight to 0"
                )
            terms["flow"] = F.mse_loss(output.flow_prediction.float(), output.flow_target.float())
            total = total + self.flow_weight * terms["flow"]
        for name in self.semantic_terms:
            if name not in output.semantic_losses:
                raise ValueError(
                    f"{name}_weight > 0 but the model computed no {name!r} term: it needs a model with that "
                    "semantic projection (SemTok with teacher_dim > 0) and the teacher's features (model_inputs)"
                )
            terms[name] = output.semantic_losses[name]
            total = total + self.semantic_weights[name] * terms[name]
        if self.quantizer_weight > 0:
            total = total + self.quantizer_weight * output.quantizer_loss
            boost = self.entropy_factor(step) - 1.0
            if boost > 0 and "entropy" in output.quantizer_losses:
                total = total + self.quantizer_weight * boost * output.quantizer_losses["entropy"]
        terms["quantizer"] = output.quantizer_loss
        terms["commitment"] = output.commitment_loss
        terms["codebook"] = output.codebook_loss
        terms.update(output.quantizer_losses)  # entropy, kl, ... under their own names
        terms["loss"] = total
        return total, {k: v.detach() for k, v in terms.items()}
