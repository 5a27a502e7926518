"""SemTok: a semantic 1D tokenizer over a frozen latent space, trained in two stages (Chen et
al., "SemTok", sections 3-4 and appendix A).

Images go through a frozen first stage (SD3.5's VAE in the paper, f = 8, 16 channels;
:mod:`mstok.tokenizers.latent_space`), whose latents are patchified p x p (p = 2) and
compressed by an MMDiT encoder into K tokens, quantized by BSQ (2^18 or 2^32 codes).
A larger MMDiT decoder (:mod:`mstok.tokenizers.semtok_layers`) maps the codes back to a latent,
which the first stage decodes to pixels.

The decoder works in one of two modes, ``decoder_mode``:

* ``flow`` (stage I, generative pre-training, eq. 5): the patch stream carries the noisy latent
  ``x_t = (1 - t) x0 + t eps`` (``flow_input``, a Linear) and the decoder predicts the
  velocity ``eps - x0`` under adaLN timestep conditioning (:meth:`SemTok.decode_velocity`);
  decoding samples the flow ODE from noise (:mod:`mstok.diffusion.flow`; the paper: 25 steps).
  With ``flow_prediction = "x0"`` (not the paper's; the tiny preset's) the network outputs the
  clean latent and the velocity is derived from it, ``(x_t - x0_hat) / t``: a patch of 8 x 8
  RGB pixels has 192 values, more than a 128-wide decoder can carry, and Gaussian noise has no
  low-dimensional structure to compress, so predicting ``eps - x0`` is out of reach at that
  width while the clean patch lies near a low-dimensional set of images (Li and He, "Back to
  Basics: Let Denoising Generative Models Denoise", 2025). Measured: a velocity-predicting
  ``semtok_tiny`` ended 3000 steps with a one-step reconstruction below painting each image in
  its mean colour (benchmarks/history/semtok.md, "SemTok at tiny scale (2026-12-02 18:23 UTC)").
  Two more settings decide whether the tokens matter (benchmarks/history/semtok.md, "SemTok that
  reconstructs: what the flow decoder needs").
  ``flow_loss = "x0"`` measures the MSE on the clean estimate instead of the velocity (the
  velocity MSE is the x0 MSE times 1/t^2, so it is dominated by small t, where ``x_t`` already
  shows the image and the decoder learns to ignore the tokens); ``time_shift`` s > 1 moves the
  training times toward noise (SD3's shift), where only the tokens tell the image, and where a
  one-step decode starts. ``semtok_tiny`` uses both (s = 30): its one-step decode beat mean
  colour by 2.6 dB after 600 steps, where the velocity loss at uniform t stayed below it.
* ``refine`` (stage II, refinement fine-tuning, eq. 7): the patch stream carries learnable
  mask tokens (``mask_tokens``) and the decoder predicts the clean latent in one pass
  (:meth:`SemTok.decode_refine`), trained by pixel losses through the frozen first stage.
  The timestep input is fixed at t = 1, the pure-noise end the mask tokens replace.
  With ``refine_input = "one_step"`` (the tiny preset's) the patch stream is ``flow_input`` applied to
  the noise's mean (zero) plus ``mask_tokens``, which start at zero: stage II then starts from
  stage I's one-step decode (measured within 0.2 dB of decoding from a noise draw) instead of
  from random tokens the decoder has never seen, which cost 1-2 dB it did not win back in 1000
  steps (benchmarks/history/semtok.md, "SemTok's refiner: where stage II starts and what the GAN
  costs"). ``"mask"`` (older files) uses the mask tokens alone, randomly initialised, as the paper
  describes (the default).

The mode is a field of the model's config, not a flag of a training step: it says what the
released model *is* (an ODE sampler or a one-step refiner), so ``decode`` and every saved
config agree with the weights, and a stage-II run sets ``model.overrides.decoder_mode =
"refine"``. Both inputs (``flow_input`` and ``mask_tokens``) always exist, so one state-dict
layout serves both stages and stage II starts from stage I's file; a stage trains only the
input it uses (configs/semtok_*_stage*.toml).

The semantic alignment of eq. 2 (distillation on the encoder's patch stream, InfoNCE on the
quantized tokens; :mod:`mstok.tokenizers.semtok_semantic`) needs the projections ``w_x``, ``w_z``, which
are trained with the model: they live in the model as ``semantic`` when ``teacher_dim > 0``,
and the training forward computes the terms when it is given the teacher's features (the
loss runs the frozen teacher, :meth:`mstok.losses.TokenizerLoss.model_inputs`).

The first stage is not part of the tokenizer's state dict: a VAE is large, frozen and has its
own files, so the config stores its spec (``latent_space``) and the model builds it on first
use (then moves it along with ``.to()``). ``latent_channels`` and ``latent_downsample`` size
the model without loading it; building checks them.

Not reproduced: the decoder is not initialised from SD3.5's weights (its MMDiT-X layout
differs from mstok's joint blocks), and the ResNet term of the perceptual loss is left out.

Glossary: B batch, P latent patches (g x g), K latent tokens, D width, C code dim, V codebook size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mstok.config_schema import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_WIDTH, Rule, one_of, positive
from mstok.diffusion.flow import MAX_STEPS, SAMPLERS, TIME_SAMPLINGS, RectifiedFlow
from mstok.layers.embeddings import set_init_table
from mstok.tokenizers.base import Tokenizer, TokenizerConfig
from mstok.tokenizers.contract import TokenizerOutput
from mstok.tokenizers.latent_space import LATENT_SPACES, LatentSpace, build_latent_space
from mstok.tokenizers.semtok_layers import SemTokDecoder, SemTokEncoder, patchify, unpatchify
from mstok.tokenizers.semtok_semantic import SemanticLoss

DECODER_MODES = ("flow", "refine")
REFINE_INPUTS = ("one_step", "mask")
FLOW_PREDICTIONS = ("velocity", "x0")
FLOW_LOSSES = ("velocity", "x0")
# x0 prediction divides by t: below this time the division uses it (bounded loss weight 1/t^2)
X0_MIN_TIME = 0.05
SEMANTIC_TERMS = ("distill", "contrastive")
REFINE_TIME = 1.0  # the flow time the refiner's timestep input is fixed at (pure noise)


def _bsq_paper() -> dict[str, Any]:
    return {"type": "bsq", "entropy_weight": 0.0025}  # lambda_q of eq. 6


@dataclass
class SemTokConfig(TokenizerConfig):
    """SemTok hyper-parameters on top of :class:`TokenizerConfig`.

    ``patch_size`` is the patch side over the latent grid (the paper: 2 over SD3.5's f = 8
    latents); ``width``, ``depth``, ``num_heads`` size the encoder.

    Attributes:
        latent_space: the frozen first stage's spec (:func:`build_latent_space`): ``"pixels"``
            (RGB, for CPU runs) or a table, e.g. ``{"type": "vae"}`` (SD3.5's VAE from the hub)
            or ``{"type": "vae", "path": DIR, "subfolder": "vae", "bf16": true}``.
        latent_channels, latent_downsample: C_lat and f of that space; None derives them for
            ``pixels`` (3 x patch^2 and its patch), other types need them (SD3.5: 16 and 8).
        decoder_width, decoder_depth, decoder_num_heads: the decoder MMDiT (None: the encoder's).
        decoder_mode: ``flow`` (stage I) or ``refine`` (stage II); module docstring.
        refine_input: the refiner's patch stream: ``one_step`` (the flow input of the noise's
            mean plus zero-initialised mask tokens) or ``mask`` (the paper's mask tokens alone).
        time_sampling: how stage I draws t (``uniform``: the paper; ``logit_normal``: SD3's).
        time_shift: SD3's shift of the drawn t toward noise (1: none, the paper).
        flow_prediction: what stage I's network outputs: ``velocity`` (the paper) or ``x0``
            (the clean latent, turned into a velocity; module docstring).
        flow_loss: where stage I's MSE is measured: ``velocity`` (the paper, eq. 5) or ``x0``
            (the clean latent; module docstring).
        sample_steps, sampler: the flow decode's default ODE steps and sampler (paper: 25, Euler).
        teacher_dim: D_t of the semantic teacher; 0 builds no semantic projections.
        semantic_terms: which terms of eq. 2 get projections (Table 4 ablates them).
        contrastive_temperature: 1 / t of the InfoNCE term.
        rope_theta: the RoPE base of both networks.
    """

    patch_size: int = 16
    code_dim: int = 18
    quantizer: str | dict[str, Any] = dataclasses.field(default_factory=_bsq_paper)
    latent_space: str | dict[str, Any] = "pixels"
    latent_channels: int | None = None
    latent_downsample: int | None = None
    decoder_width: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    decoder_mode: str = "flow"
    refine_input: str = "mask"
    time_sampling: str = "uniform"
    time_shift: float = 1.0
    flow_prediction: str = "velocity"
    flow_loss: str = "velocity"
    sample_steps: int = 25
    sampler: str = "euler"
    teacher_dim: int = 0
    semantic_terms: tuple[str, ...] = SEMANTIC_TERMS
    contrastive_temperature: float = 0.07
    rope_theta: float = 10000.0

    family: ClassVar[str] = "semtok"
    field_rules: ClassVar[dict[str, Rule]] = {
        "latent_channels": positive(MAX_WIDTH),
        "latent_downsample": positive(MAX_IMAGE_SIZE),
        "decoder_width": positive(MAX_WIDTH),
        "decoder_depth": positive(MAX_DEPTH),
        "decoder_num_heads": positive(MAX_WIDTH),
        "decoder_mode": one_of(DECODER_MODES),
        "refine_input": one_of(REFINE_INPUTS),
        "time_sampling": one_of(TIME_SAMPLINGS),
        "flow_prediction": one_of(FLOW_PREDICTIONS),
        "flow_loss": one_of(FLOW_LOSSES),
        "time_shift": Rule(gt=0, cap=1000),
        "sample_steps": positive(MAX_STEPS),
        "sampler": one_of(SAMPLERS),
        "teacher_dim": Rule(ge=0, cap=MAX_WIDTH),
        "semantic_terms": Rule(item=one_of(SEMANTIC_TERMS)),
        "contrastive_temperature": Rule(gt=0, cap=100),
        "rope_theta": Rule(gt=1),
    }
    # fields added after the family's first release, with the value that keeps older files' meaning
    optional_defaults: ClassVar[dict[str, Any]] = {
        "flow_prediction": "velocity",
        "flow_loss": "velocity",
        "time_shift": 1.0,
        "refine_input": "mask",
        "nested": False,
    }

    def __post_init__(self) -> None:
        self._derive_latent_shape()
        super().__post_init__()
        for name, value, allowed in (
            ("head", self.head, "pixels"),
            ("pixel_head", self.pixel_head, "linear"),
            ("latent_init", self.latent_init, "random"),
            ("position_embedding", self.position_embedding, "learned"),
        ):
            if value != allowed:
                raise ValueError(
                    f"SemTok decodes latents through its first stage and places tokens by RoPE: {name} must be "
                    f"{allowed!r}, got {value!r}"
                )
        if self.pixel_decoder:
            raise ValueError("SemTok decodes through its latent space: pixel_decoder must be empty")
        if self.image_size % (self.latent_downsample * self.patch_size):
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of latent_downsample x patch_size = "
                f"{self.latent_downsample} x {self.patch_size}"
            )
        for name, (width, heads) in (("", (self.width, self.num_heads)), ("decoder ", self.decoder_dims[::2])):
            if (width // heads) % 4:
                raise ValueError(f"2-D RoPE needs a {name}head dim divisible by 4, got {width} / {heads}")
        width, _, heads = self.decoder_dims
        if width % heads:
            raise ValueError(f"decoder width {width} is not a multiple of decoder num_heads {heads}")
        if len(set(self.semantic_terms)) != len(self.semantic_terms):
            raise ValueError(f"semantic_terms lists a term twice: {self.semantic_terms}")

    def _derive_latent_shape(self) -> None:
        """Check the latent space's type and fill (C_lat, f) for ``pixels`` (before the schema runs)."""
        spec = self.latent_space
        table = {"type": spec} if isinstance(spec, str) else spec
        kind = table.get("type") if isinstance(table, dict) else None
        if kind not in LATENT_SPACES:
            raise ValueError(
                f"latent_space: unknown latent space {spec!r}; a type name or a table with a 'type' among "
                f"{', '.join(LATENT_SPACES)}"
            )
        if kind == "pixels":
            patch = table.get("patch", 1)
            if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
                raise ValueError(f"latent_space.patch must be a positive integer, got {patch!r}")
            derived = {"latent_channels": 3 * patch * patch, "latent_downsample": patch}
            for name, value in derived.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
                elif getattr(self, name) != value:
                    raise ValueError(f"{name} = {getattr(self, name)} contradicts the pixel space, which has {value}")
        elif self.latent_channels is None or self.latent_downsample is None:
            raise ValueError(
                f"latent space type {kind!r} needs latent_channels and latent_downsample (SD3.5's VAE: 16 and 8): "
                "they size the model before the first stage is loaded"
            )

    @property
    def grid_size(self) -> int:
        """g, latent patches per side: image_size / (f * p)."""
        return self.image_size // (self.latent_downsample * self.patch_size)

    @property
    def patch_dim(self) -> int:
        """Values per latent patch: C_lat * p * p."""
        return self.latent_channels * self.patch_size**2


class _Shared:
    """Holds a module outside the model's module tree and is shared, not copied, by ``deepcopy``:
    the frozen first stage stays out of state dicts, parameters and the EMA copy."""

    def __init__(self) -> None:
        self.module: LatentSpace | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


class SemTok(Tokenizer):
    """The SemTok tokenizer (BSQ by default; any quantizer of the zoo works)."""

    config_class = SemTokConfig
    config: SemTokConfig

    def build(self, config: TokenizerConfig) -> tuple[nn.Module, nn.Module]:
        cfg = config
        d_width, d_depth, d_heads = cfg.decoder_dims
        distill = cfg.teacher_dim > 0 and "distill" in cfg.semantic_terms
        grid, k = cfg.grid_size, cfg.num_latent_tokens
        encoder = SemTokEncoder(
            cfg.patch_dim, grid, k, cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm,
            cfg.quantizer_input_dim, distill, cfg.patch_size, cfg.rope_theta,
        )  # fmt: skip
        decoder = SemTokDecoder(
            cfg.code_dim, cfg.patch_dim, grid, k, d_width, d_depth, d_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.rope_theta
        )
        # the decoder's two patch-stream inputs (module docstring): stage I's and stage II's
        self.flow_input = nn.Linear(cfg.patch_dim, d_width)
        self.mask_tokens = nn.Parameter(torch.empty(cfg.num_patches, d_width))
        if cfg.refine_input == "one_step":  # an offset on the flow input: zero, so stage II starts at stage I
            set_init_table(self, "mask_tokens", torch.zeros(cfg.num_patches, d_width))
        self.semantic = None
        if cfg.teacher_dim > 0 and cfg.semantic_terms:
            weights = {f"{term}_weight": float(term in cfg.semantic_terms) for term in SEMANTIC_TERMS}
            self.semantic = SemanticLoss(
                cfg.width, cfg.code_dim, cfg.teacher_dim, temperature=cfg.contrastive_temperature, **weights
            )
        self.flow = RectifiedFlow(cfg.time_sampling, time_shift=cfg.time_shift)
        self._space = _Shared()
        return encoder, decoder

    # ----------------------------------------------------------------- the first stage
    @property
    def latent_space(self) -> LatentSpace:
        """The frozen first stage, built from ``config.latent_space`` on first use (module docstring)."""
        if self._space.module is None:
            self.attach_latent_space(build_latent_space(self.config.latent_space))
        return self._space.module

    def attach_latent_space(self, space: LatentSpace) -> None:
        """Use a built latent space (e.g. a VAE already in memory); it must have the config's C_lat and f."""
        if not isinstance(space, LatentSpace):
            raise TypeError(f"attach_latent_space needs a LatentSpace, got {type(space).__name__}")
        cfg = self.config
        if (space.channels, space.downsample) != (cfg.latent_channels, cfg.latent_downsample):
            raise ValueError(
                f"the latent space has {space.channels} channels at f={space.downsample}, but the model was built for "
                f"latent_channels={cfg.latent_channels}, latent_downsample={cfg.latent_downsample}"
            )
        param = next(self.parameters())
        if param.device.type != "meta":
            space.to(param.device)
        self._space.module = space

    def _apply(self, fn: Any, recurse: bool = True) -> SemTok:
        """``.to()``, ``.cuda()``, ``.half()``... move the first stage too, though it is not a submodule."""
        super()._apply(fn, recurse)
        if self._space.module is not None:
            self._space.module._apply(fn, recurse)
        return self

    def to_latents(self, images: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> first-stage latents (B, C_lat, h, w) in the model's dtype."""
        images = self.check_images(images, check_values)
        return self.latent_space.encode(images, check_values=False).to(self.decoder.dtype)

    # ----------------------------------------------------------------- the decoder's two modes
    def _flow_output(
        self, codes: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow network's raw output (B, C_lat, h, w) at ``x_t`` and time ``t`` (a number or (B,)):
        a velocity or the clean latent, as ``flow_prediction`` says; returned with t as (B,) float32."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        tokens = self.flow_input(patchify(x_t.to(self.decoder.dtype), self.config.patch_size))  # (B, P, D)
        patches = self.decoder(tokens, codes, RectifiedFlow.model_time(t))
        return unpatchify(patches, self.config.patch_size, self.config.grid_size), t  # (B, C_lat, h, w), (B,)

    def decode_velocity(self, codes: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Stage I's prediction: the velocity (B, C_lat, h, w) at the noisy latent ``x_t`` (B, C_lat, h, w)
        and flow time ``t`` in [0, 1] ((B,) or a number), given code vectors (B, K, C). Differentiable.

        The network's output is that velocity, or (``flow_prediction = "x0"``) the clean latent
        x0_hat, whose velocity is ``(x_t - x0_hat) / max(t, X0_MIN_TIME)``."""
        out, t = self._flow_output(codes, x_t, t)
        if self.config.flow_prediction == "x0":
            return (x_t - out) / t.clamp(min=X0_MIN_TIME).view(-1, 1, 1, 1).to(out.dtype)
        return out

    def decode_clean(self, codes: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Stage I's estimate of the clean latent (B, C_lat, h, w) at ``x_t`` and time ``t``: the
        network's output (``flow_prediction = "x0"``) or ``x_t - t v_hat``. Differentiable."""
        out, t = self._flow_output(codes, x_t, t)
        if self.config.flow_prediction == "x0":
            return out
        return x_t - t.view(-1, 1, 1, 1).to(out.dtype) * out

    def decode_refine(self, codes: torch.Tensor) -> torch.Tensor:
        """Stage II's prediction: the clean latent (B, C_lat, h, w) from code vectors (B, K, C), one pass."""
        batch = codes.shape[0]
        tokens = self.mask_tokens
        if self.config.refine_input == "one_step":
            tokens = tokens + self.flow_input.bias  # flow_input of the zero latent, the noise's mean
        tokens = tokens.expand(batch, -1, -1)  # (B, P, D)
        time = RectifiedFlow.model_time(torch.full((batch,), REFINE_TIME, device=codes.device))
        return unpatchify(self.decoder(tokens, codes, time), self.config.patch_size, self.config.grid_size)

    # ----------------------------------------------------------------- training
    def forward(
        self, images: torch.Tensor, teacher_features: torch.Tensor | None = None, lengths: torch.Tensor | None = None
    ) -> TokenizerOutput:
        """Training forward: latents, encode, quantize (straight-through), then by ``decoder_mode``:

        * ``flow``: draw t (``time_sampling``) and noise with torch's global RNG, as a VAE draws
          its sample (shifted by ``time_shift``); ``flow_prediction`` is the velocity at x_t and
          ``flow_target`` ``noise - x0``, or (``flow_loss = "x0"``) the clean estimate and x0.
        * ``refine``: ``reconstruction`` is the refined latent decoded to pixels, differentiably.

        ``teacher_features`` (B, D_t, h_t, w_t), when given, adds the semantic terms of the
        projections this model has (``semantic_losses``).
        """
        x0 = self.to_latents(images, check_values=False)  # (B, C_lat, h, w), no gradient
        features, z = self.encoder(x0)
        quant = self.quantizer(z)
        codes = self.mask_codes(quant.codes, lengths)  # (B, K, C)
        reconstruction = prediction = target = None
        if self.config.decoder_mode == "flow":
            t = self.flow.sample_time(x0.shape[0], device=x0.device)  # (B,)
            noise = torch.randn_like(x0)
            x_t = self.flow.interpolate(x0, noise, t)
            if self.config.flow_loss == "x0":
                prediction, target = self.decode_clean(codes, x_t, t), x0
            else:
                prediction = self.decode_velocity(codes, x_t, t)
                target = self.flow.velocity_target(x0, noise)
        else:
            reconstruction = self.latent_space.decode_with_grad(self.decode_refine(codes))
        return TokenizerOutput.from_quantizer(
            quant,
            reconstruction=reconstruction,
            flow_prediction=prediction,
            flow_target=target,
            semantic_losses=self.semantic_losses(teacher_features, features, quant.codes),
        )

    @property
    def semantic_terms(self) -> tuple[str, ...]:
        """The semantic terms this model has projections for (empty without a teacher dim)."""
        return () if self.semantic is None else tuple(t for t in SEMANTIC_TERMS if t in self.config.semantic_terms)

    def semantic_losses(
        self, teacher_features: torch.Tensor | None, features: torch.Tensor | None, codes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Eq. 2's unweighted terms by name: distillation of the patch features (B, P, D),
        InfoNCE of the quantized codes (B, K, C); empty without teacher features."""
        if teacher_features is None or self.semantic is None:
            return {}
        terms = {}
        if self.semantic.distill is not None:
            grid = (self.config.grid_size, self.config.grid_size)
            terms["distill"] = self.semantic.distill(features, teacher_features, grid)
        if self.semantic.contrastive is not None:
            terms["contrastive"] = self.semantic.contrastive(codes, teacher_features)
        return terms

    # ----------------------------------------------------------------- public API
    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, num_tokens: int | None = None) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] -> token ids (B, K) int64 in [0, V) (float latents
        (B, K, C) for a continuous bottleneck); ``num_tokens=k`` (nested models): the first k."""
        if sample and not self.is_vae:
            raise ValueError("sample=True is for VAE tokenizers (quantizer='vae'); this one has no posterior to sample")
        k = self.check_num_tokens(num_tokens)
        _, z = self.encoder(self.to_latents(images))
        quant = self.quantizer(z, sample=sample) if self.is_vae else self.quantizer(z)
        return (quant.codes if quant.indices is None else quant.indices)[:, :k]

    @torch.no_grad()
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's token features before the projection to C, after LayerNorm: (B, K, D)."""
        return self.encoder.features(self.to_latents(images))

    @torch.no_grad()
    def decode_latents(
        self,
        tokens: torch.Tensor,
        steps: int | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, K) (or a prefix, :meth:`decode`) -> first-stage latents (B, C_lat, h, w):
        the one-step refiner, or the flow ODE from seeded noise (:meth:`decode`)."""
        codes = self.prefix_codes(tokens, lengths).to(self.decoder.dtype)  # (B, K, C)
        if self.config.decoder_mode == "refine":
            if steps not in (None, 1):
                raise ValueError(
                    f"a refining decoder (decoder_mode='refine') decodes in one pass: steps must be None, got {steps!r}"
                )
            return self.decode_refine(codes).float()
        steps = self.config.sample_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(
                f"a flow decoder (decoder_mode='flow') integrates its ODE in steps: steps must be an integer in "
                f"[1, {MAX_STEPS}], got {steps!r}"
            )
        sampler = self.config.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        cfg = self.config
        generator = None if seed is None else torch.Generator(codes.device).manual_seed(seed)
        shape = (codes.shape[0], cfg.latent_channels, cfg.grid_size * cfg.patch_size, cfg.grid_size * cfg.patch_size)
        noise = torch.randn(shape, generator=generator, device=codes.device, dtype=self.decoder.dtype)

        def velocity(x: torch.Tensor, time: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
            return self.decode_velocity(codes, x, time / 1000.0)  # the sampler passes model time 1000 t

        labels = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)  # unconditional: unused
        return self.flow.sample(velocity, noise, labels, steps=steps, sampler=sampler).float()

    @torch.no_grad()
    def decode(
        self,
        tokens: torch.Tensor,
        steps: int | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, K) -> images (B, 3, H, W) clamped to [0, 1]. A nested model also takes a
        prefix (B, k) and ragged ``lengths`` (B,), as :meth:`Tokenizer.decode` does.

        A refiner (``decoder_mode="refine"``) predicts the latent in one pass (``steps`` must be
        None). A flow decoder integrates the ODE from noise in ``steps`` steps (default
        ``config.sample_steps``) with ``sampler`` (default ``config.sampler``; ``euler`` or
        ``heun``); the noise comes from ``seed`` (on the model's device), else torch's global
        RNG. Either way the latent is decoded to pixels by the frozen first stage.
        """
        return self.latent_space.decode(self.decode_latents(tokens, steps, seed, sampler, lengths))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Not defined for SemTok: a flow decoder needs noise and steps; use :meth:`decode`."""
        raise NotImplementedError("SemTok decodes tokens with decode(tokens, steps=..., seed=...)")

    # ----------------------------------------------------------------- bookkeeping
    def flops_calls(self, batch_size: int = 1) -> dict[str, tuple[Any, tuple[torch.Tensor, ...]]]:
        """What :func:`mstok.evaluation.flops.tokenizer_flops` counts: the encoder on random
        latents (B, C_lat, h, w) (the first stage is not counted: it is not part of the model),
        and ONE decoder call on random codes (B, K, C): a velocity evaluation at x_t and t = 0.5
        (one Euler step) in ``flow`` mode, the one-pass refiner in ``refine`` mode."""
        cfg = self.config
        param = next(self.parameters())
        side = cfg.grid_size * cfg.patch_size
        options = {"device": param.device, "dtype": param.dtype}
        latents = torch.randn(batch_size, cfg.latent_channels, side, side, **options)
        codes = torch.randn(batch_size, cfg.num_latent_tokens, cfg.code_dim, **options)
        if cfg.decoder_mode == "refine":
            decoder: tuple[Any, tuple[torch.Tensor, ...]] = (self.decode_refine, (codes,))
        else:
            time = torch.full((batch_size,), 0.5, device=param.device)
            decoder = (self.decode_velocity, (codes, latents, time))
        return {"encoder": (self.encoder, (latents,)), "decoder": decoder}

    @property
    def decodes_in_steps(self) -> bool:
        """True for a flow decoder (``decode(tokens, steps=n)``), False for the one-pass refiner."""
        return self.config.decoder_mode == "flow"

    def decoder_calls(self, steps: int | None = None, sampler: str | None = None) -> int:
        """Decoder calls one :meth:`decode` makes: 1 for a refiner; for a flow decoder ``steps``
        (Euler) or ``2 * steps`` (Heun: two slopes a step); None takes the config's
        ``sample_steps`` / ``sampler``."""
        if self.config.decoder_mode == "refine":
            return 1
        steps = self.config.sample_steps if steps is None else steps
        sampler = self.config.sampler if sampler is None else sampler
        return steps if sampler == "euler" else 2 * steps

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: encoder, decoder (with both patch-stream inputs), quantizer,
        semantic (the projections), total. The first stage is not counted: it is not part of the model."""

        def count(*modules: nn.Module | nn.Parameter | None) -> int:
            params: list[nn.Parameter] = []
            for module in modules:
                if isinstance(module, nn.Parameter):
                    params.append(module)
                elif module is not None:
                    params.extend(module.parameters())
            return sum(p.numel() for p in params)

        counts = {
            "encoder": count(self.encoder),
            "decoder": count(self.decoder, self.flow_input, self.mask_tokens),
            "quantizer": count(self.quantizer),
            "semantic": count(self.semantic),
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts
