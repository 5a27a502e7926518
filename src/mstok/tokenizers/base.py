"""What every mstok tokenizer shares: its config fields, its outputs, its public API.

A tokenizer is three modules, ``encoder`` (images -> continuous latents (B, K, C)),
``quantizer`` (latents -> codes and ids) and ``decoder`` (codes -> pixels or proxy-code
logits). Families (TiTok, MsTok, ...) subclass :class:`Tokenizer` and build the encoder
and decoder in :meth:`Tokenizer.build`; everything else lives here.

Glossary: B batch, P patches, K latent tokens, D width, C code dim, V codebook size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mstok.config_schema import (
    MAX_CODEBOOK,
    MAX_DEPTH,
    MAX_IMAGE_SIZE,
    MAX_TOKENS,
    MAX_WIDTH,
    NON_NEGATIVE,
    ConfigDict,
    ConfigError,
    Rule,
    one_of,
    positive,
)
from mstok.layers import CrossAttention, SelfAttention, init_weights
from mstok.layers.embeddings import POSITION_EMBEDDINGS, latent_grid, sincos_at, spread_order
from mstok.quantizers import Quantizer
from mstok.quantizers.registry import SPECS, QuantizerSpec, parse_spec
from mstok.storage.saved import SavedModel
from mstok.tokenizers.contract import TokenizerOutput, check_images, check_latents, check_tokens
from mstok.tokenizers.nested import (
    AdaptiveTokens,
    check_lengths,
    check_num_tokens,
    check_prefix,
    encode_adaptive,
    fill_tail,
    nested_refusal,
)
from mstok.tokenizers.pixel_decoder import ProxyPixelDecoder, check_pixel_decoder_fits

HEADS = ("pixels", "proxy_codes")
PIXEL_HEADS = ("linear", "conv")
LATENT_INITS = ("random", "grid")
ATTENTION_INITS = ("random", "mimetic")


@dataclass
class TokenizerConfig(ConfigDict):
    """Fields shared by every tokenizer family; a family's config subclasses this.

    The fields after ``pixel_decoder`` are convergence switches (benchmarks/convergence.py
    measures each). Their defaults are the papers' layout, which the released checkpoints
    need; the tiny presets switch them on:

    Attributes:
        position_embedding: patch-grid positional embeddings of the encoder and of the
            decoder's mask tokens: ``learned`` (random start), ``sincos`` (learned, started
            from the 2D sine-cosine table) or ``fixed_sincos`` (the table, frozen). The
            layout (state-dict keys and shapes) is the same for all three.
        quantizer: the bottleneck: a name, or a table with a ``type`` and its settings
            (:mod:`mstok.quantizers.registry`), e.g. ``{"type": "fsq", "levels": [8, 5, 5,
            5]}`` or ``{"type": "bsq"}`` (C bits per token, V = 2^C). Names: ``vq`` (the
            default; vector quantization into ``codebook_size`` ids), ``none`` (a continuous
            bottleneck of K x C floats: ``encode`` returns float latents and ``decode``
            takes them), ``vae`` (diagonal Gaussian latents with a KL term; the encoder
            emits 2C numbers per token), or any spec type without required settings
            (``lfq``, ``bsq``, ``kl``, ``identity``). Settings a ``vq`` or ``none`` table
            leaves out come from this config's ``codebook_size``, ``use_l2_norm`` and
            ``commitment_weight`` (:attr:`spec_defaults`); other types ignore those fields.
        latent_init: how the latent tokens start: ``random`` (the rule of ``init_weights``)
            or ``grid``: the encoder's latent (query) tokens and the decoder's latent
            positional embeddings start as the sin-cos embeddings of the centres of an
            ``h x w`` grid over the image (h * w = K), so latent k begins tied to one region
            (:func:`~mstok.layers.embeddings.latent_grid`). Initialisation only: the layout
            is unchanged. Needs sin-cos patch positions to line up with.
        attention_init: ``random`` or ``mimetic``: every attention's key projection starts as
            a copy of its query projection (:mod:`mstok.layers.init`), so attention starts
            as token similarity. Initialisation only.
        qk_norm: LayerNorm on queries and keys in every attention (adds parameters).
        pixel_head: ``linear`` (per-patch linear map + one 3x3 conv, the ViT/TiTok head) or
            ``conv`` (per-patch linear map to feature channels, then residual 3x3 conv
            blocks at full resolution; :class:`~mstok.layers.embeddings.ConvPixelHead`).
        nested: the decoder gets a learned tail token (``decoder.tail_token``, a code vector
            (1, C)) that stands in for every token past a prefix, so ``decode(tokens[:, :k])``
            takes any prefix, 1 <= k <= K, and ``encode(images, num_tokens=k)`` returns one
            (:mod:`mstok.tokenizers.nested`). Training with the trainer's ``[nested]`` section
            teaches the prefixes to decode; a model without it refuses prefixes. 1D families
            only (a family that cannot says why in ``no_nested_reason``).
    """

    image_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_latent_tokens: int = 64
    codebook_size: int = 4096
    code_dim: int = 12
    use_l2_norm: bool = True
    commitment_weight: float = 0.25
    head: str = "pixels"
    proxy_codebook_size: int = 1024
    pixel_decoder: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantizer: str | dict[str, Any] = "vq"
    position_embedding: str = "learned"
    latent_init: str = "random"
    attention_init: str = "random"
    qk_norm: bool = False
    pixel_head: str = "linear"
    nested: bool = False

    family: ClassVar[str] = ""
    # why a family cannot decode prefixes (set by HieraTok and the conv AE); empty: it can
    no_nested_reason: ClassVar[str] = ""
    # names of the quantizer field -> spec type (a spec type's own name stands for itself)
    quantizer_names: ClassVar[dict[str, str]] = {"vq": "vq", "none": "identity", "vae": "kl"}
    quantizers: ClassVar[tuple[str, ...]] = tuple(dict.fromkeys([*quantizer_names, *SPECS]))
    # spec type -> {setting: the config field that gives it when the spec leaves it out}
    spec_defaults: ClassVar[dict[str, dict[str, str]]] = {
        "vq": {
            "codebook_size": "codebook_size",
            "use_l2_norm": "use_l2_norm",
            "commitment_weight": "commitment_weight",
        },
        "identity": {"use_l2_norm": "use_l2_norm"},
    }
    field_rules: ClassVar[dict[str, Rule]] = {
        "image_size": positive(MAX_IMAGE_SIZE),
        "patch_size": positive(MAX_IMAGE_SIZE),
        "width": positive(MAX_WIDTH),
        "depth": positive(MAX_DEPTH),
        "num_heads": positive(MAX_WIDTH),
        "mlp_ratio": Rule(gt=0, cap=64),
        "num_latent_tokens": positive(MAX_TOKENS),
        "codebook_size": positive(MAX_CODEBOOK, "the codebook is allocated up front"),
        "code_dim": positive(MAX_WIDTH),
        "commitment_weight": NON_NEGATIVE,
        "head": one_of(HEADS),
        "proxy_codebook_size": positive(MAX_CODEBOOK, "the proxy-code logits are allocated up front"),
        "quantizer": one_of(quantizers),
        "position_embedding": one_of(POSITION_EMBEDDINGS),
        "latent_init": one_of(LATENT_INITS),
        "attention_init": one_of(ATTENTION_INITS),
        "pixel_head": one_of(PIXEL_HEADS),
    }
    # Fields added after configs were first saved: to_dict() leaves them out while they hold
    # their default, so a saved config.json (and every hash of it) of a preset stays as it was.
    optional_defaults: ClassVar[dict[str, Any]] = {
        "quantizer": "vq",
        "position_embedding": "learned",
        "latent_init": "random",
        "attention_init": "random",
        "qk_norm": False,
        "pixel_head": "linear",
        "nested": False,
    }

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        for name, default in self.optional_defaults.items():
            if values[name] == default:
                del values[name]
        return values

    def __post_init__(self) -> None:
        super().__post_init__()  # the schema: types, ranges, choices (field_rules)
        if self.nested and self.no_nested_reason:
            raise ValueError(f"nested = true is for 1D token sequences: {self.no_nested_reason}")
        # Cross-field checks the per-field schema cannot express:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.position_embedding != "learned" and self.width % 4:
            raise ValueError(f"position_embedding={self.position_embedding!r} needs a width divisible by 4")
        if self.latent_init == "grid" and self.position_embedding == "learned":
            raise ValueError(
                "latent_init='grid' places latent tokens in the sin-cos position code of the patches: "
                "it needs position_embedding 'sincos' or 'fixed_sincos'"
            )
        spec = self.quantizer_spec()  # a bad table raises here, its key under "quantizer."
        try:
            spec.check_code_dim(self.code_dim)
        except ConfigError as err:
            raise err.under("quantizer") from None
        if self.pixel_decoder:
            try:
                check_pixel_decoder_fits(
                    self.pixel_decoder, self.image_size, self.grid_size, self.proxy_codebook_size, self.head
                )
            except ConfigError as err:  # a bad VQGAN field: name it inside pixel_decoder
                raise err.under("pixel_decoder") from None

    def latent_init_table(self) -> torch.Tensor | None:
        """(K, D) starting embeddings of the latent tokens for ``latent_init="grid"``, else None; with
        nested tokens the cells come coarse to fine (:func:`~mstok.layers.embeddings.spread_order`)."""
        if self.latent_init != "grid":
            return None
        cells = latent_grid(self.num_latent_tokens, self.grid_size)  # (K, 2), raster order
        return sincos_at(cells[spread_order(cells)] if self.nested else cells, self.width)

    def quantizer_spec(self) -> QuantizerSpec:
        """The checked quantizer spec: ``quantizer`` resolved (a name becomes a table) and the
        settings it leaves out filled from this config's fields (:attr:`spec_defaults`).

        Raises:
            ConfigError: a bad table, named as ``quantizer.<key>``.
        """
        table = self.quantizer if isinstance(self.quantizer, dict) else {"type": self.quantizer}
        kind = self.quantizer_names.get(table.get("type"), table.get("type"))
        filled = {k: getattr(self, f) for k, f in self.spec_defaults.get(kind, {}).items() if k not in table}
        try:
            return parse_spec({**table, **filled, "type": kind})
        except ConfigError as err:
            raise err.under("quantizer") from None

    @property
    def vocab_size(self) -> int | None:
        """V, the number of distinct token ids, from the quantizer (None: continuous latents)."""
        return self.quantizer_spec().vocab_size(self.code_dim)

    @property
    def quantizer_input_dim(self) -> int:
        """Channels the encoder emits per latent token (2C for a Gaussian bottleneck, else C)."""
        return self.quantizer_spec().input_dim(self.code_dim)

    @property
    def continuous(self) -> bool:
        """True when tokens are float latents (B, K, C) rather than ids (B, K)."""
        return self.vocab_size is None

    @property
    def decoder_dims(self) -> tuple[int, int, int]:
        """(width, depth, num_heads) of the decoder: a family with separate decoder sizes declares
        ``decoder_width``/``decoder_depth``/``decoder_num_heads`` fields (None: the encoder's);
        the others decode at the encoder's size."""

        def own(name: str, encoder: int) -> int:
            value = getattr(self, f"decoder_{name}", None)
            return encoder if value is None else value

        return own("width", self.width), own("depth", self.depth), own("num_heads", self.num_heads)

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """P, the number of patch tokens."""
        return self.grid_size**2


class Tokenizer(SavedModel, nn.Module):
    """Base class: image <-> K discrete tokens. Subclasses implement :meth:`build`."""

    config_class: ClassVar[type[TokenizerConfig]] = TokenizerConfig

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.encoder, self.decoder = self.build(config)
        self.quantizer = self.build_quantizer(config)
        self.pixel_decoder = None
        if config.pixel_decoder:
            self.pixel_decoder = ProxyPixelDecoder.from_dict(config.pixel_decoder)
        if config.nested:
            # on the decoder: it is one of the decoder's inputs, so a stage that trains the decoder trains it
            self.decoder.register_parameter("tail_token", nn.Parameter(torch.empty(1, config.code_dim)))
        if config.attention_init == "mimetic":
            for part in (self.encoder, self.decoder):
                for module in part.modules():
                    if isinstance(module, (SelfAttention, CrossAttention)):
                        module.mimetic_init = True
        init_weights(self)

    def build(self, config: TokenizerConfig) -> tuple[nn.Module, nn.Module]:
        """Return (encoder, decoder): encoder maps (B,3,H,W) -> (B,K,C) and has
        ``features(images) -> (B,K,D)``; decoder maps codes (B,K,C) -> head output."""
        raise NotImplementedError

    def build_quantizer(self, config: TokenizerConfig) -> Quantizer:
        """The quantizer between encoder and decoder, from :meth:`TokenizerConfig.quantizer_spec`."""
        return config.quantizer_spec().build(config.code_dim)

    @property
    def vocab_size(self) -> int | None:
        """V, the number of distinct token ids (None for a continuous bottleneck)."""
        return self.quantizer.codebook_size

    # ----------------------------------------------------------------- checks
    def check_images(self, images: Any, check_values: bool = True) -> torch.Tensor:
        """Validate a batch of images: float (B, 3, H, W) in [0, 1] at the model's resolution.

        Float images of another dtype (float64, float16, bfloat16) are returned converted to the
        model's parameter dtype; integer images are refused (scale them to [0, 1] floats).
        ``check_values=False`` skips the value checks (range; NaN except on the CPU): they reduce
        over the whole batch and force a device sync, which the training forward should not pay
        every step.
        """
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), None)
        return check_images(images, self.config.image_size, check_values, dtype)

    def check_tokens(self, tokens: Any) -> torch.Tensor:
        """Validate token ids: integer (B, K) with every id in [0, V); or, for a continuous
        bottleneck, finite float latents (B, K, C)."""
        if self.vocab_size is None:
            kind = "VAE" if self.is_vae else "unquantized"
            return check_latents(tokens, self.config.num_latent_tokens, self.config.code_dim, kind)
        return check_tokens(tokens, self.config.num_latent_tokens, self.vocab_size)

    def nested_refusal(self, what: str) -> str:
        """The message of a model without nested tokens asked for a prefix (``what``: the call)."""
        return nested_refusal(self, what)

    def check_prefix(self, tokens: Any, lengths: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate a prefix of tokens and optional lengths (:func:`mstok.tokenizers.nested.check_prefix`)."""
        tokens, lengths, count = check_prefix(self, tokens, lengths)
        if self.vocab_size is None:
            kind = "VAE" if self.is_vae else "unquantized"
            return check_latents(tokens, count, self.config.code_dim, kind), lengths
        return check_tokens(tokens, count, self.vocab_size), lengths

    def prefix_codes(self, tokens: Any, lengths: Any = None) -> torch.Tensor:
        """Tokens (B, k) (checked by :meth:`check_prefix`) -> the decoder's K code slots (B, K, C),
        the tail token past each prefix."""
        tokens, lengths = self.check_prefix(tokens, lengths)
        codes = self.tokens_to_codes(tokens)
        if not self.config.nested:
            return codes
        return fill_tail(codes, self.config.num_latent_tokens, self.decoder.tail_token, lengths)

    def mask_codes(self, codes: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """The training forward's nested dropout: code slots (B, K, C) past each image's length
        (``lengths`` (B,); None keeps all) replaced by the tail token. Shape checks only: a value
        check would sync the device every step."""
        if lengths is None:
            return codes
        if not self.config.nested:
            raise ValueError(self.nested_refusal("forward(lengths=...)"))
        total = self.config.num_latent_tokens
        lengths = check_lengths(lengths, codes.shape[0], total, check_values=False)
        return fill_tail(codes, total, self.decoder.tail_token, lengths)

    # ----------------------------------------------------------------- compute
    def forward(self, images: torch.Tensor, lengths: torch.Tensor | None = None) -> TokenizerOutput:
        """Training forward: encode, quantize (straight-through), decode.

        ``lengths`` (B,) in 1..K (nested models): each image is decoded from its first
        ``lengths[b]`` tokens, the rest replaced by the tail token (nested dropout). Checks shape
        and dtype only; ``encode`` also checks values (range, NaN)."""
        images = self.check_images(images, check_values=False)
        quant = self.quantizer(self.encoder(images))
        out, scale_images = self.decode_codes_at_scales(self.mask_codes(quant.codes, lengths))
        pixels = self.config.head == "pixels"
        reconstruction = out if pixels else None
        if self.pixel_decoder is not None:
            reconstruction = self.pixel_decoder(out)  # two-stage: proxy logits -> pixels
        return TokenizerOutput.from_quantizer(
            quant, reconstruction=reconstruction, logits=None if pixels else out, scale_reconstructions=scale_images
        )

    @property
    def is_vae(self) -> bool:
        """True for a Gaussian bottleneck (``quantizer="vae"`` or a ``kl`` table)."""
        return self.quantizer.stochastic

    def check_num_tokens(self, num_tokens: Any) -> int:
        """The prefix length ``num_tokens`` asked of ``encode`` (None: K), checked: 1..K, and below K
        only for a nested model."""
        total = self.config.num_latent_tokens
        if num_tokens is None:
            return total
        k = check_num_tokens(num_tokens, total)
        if k < total and not self.config.nested:
            raise ValueError(self.nested_refusal(f"encode(num_tokens={k})"))
        return k

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, num_tokens: int | None = None) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] -> token ids (B, K) in [0, V), or float32 latents
        (B, K, C) for a continuous bottleneck: for a VAE the posterior mean, or a sample of it
        with ``sample=True``. ``num_tokens=k`` (nested models) returns the first k: (B, k)."""
        if sample and not self.is_vae:
            raise ValueError("sample=True is for VAE tokenizers (quantizer='vae'); this one has no posterior to sample")
        k = self.check_num_tokens(num_tokens)
        z = self.encoder(self.check_images(images))
        # a VAE: the mean unless sampling, whatever the module's mode
        quant = self.quantizer(z, sample=sample) if self.is_vae else self.quantizer(z)
        return (quant.codes if quant.indices is None else quant.indices)[:, :k]

    def encode_adaptive(
        self, images: torch.Tensor, min_psnr: float, max_tokens: int | None = None, candidates: Any = None, **kw: Any
    ) -> AdaptiveTokens:
        """Per image, the shortest prefix whose decode reaches ``min_psnr`` dB (at most
        ``max_tokens``, default K): ragged ids (B, L) padded with 0, lengths (B,) and the PSNR
        reached (:func:`mstok.tokenizers.nested.encode_adaptive`; ``kw`` go to ``decode``).
        Nested models only."""
        return encode_adaptive(self, images, min_psnr, max_tokens, candidates, **kw)

    @torch.no_grad()
    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous latent tokens before the projection to C, after LayerNorm: (B, K, D).

        This is what linear probing reads (TiTok 4.1, MsTok appendix B)."""
        return self.encoder.features(self.check_images(images))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, K) -> images (B, 3, H, W) clamped to [0, 1].

        A nested model (``config.nested``) also takes a prefix (B, k), 1 <= k <= K, and ragged
        rows: ``lengths`` (B,) in 1..k, each row's ids past its length ignored (padding, or a
        generator's end id). A two-stage tokenizer (``proxy_codes`` head) decodes through its
        pixel decoder."""
        codes = self.prefix_codes(tokens, lengths)
        if self.config.head != "pixels" and self.pixel_decoder is None:
            raise ValueError(
                "this tokenizer predicts proxy codes (head='proxy_codes') and has no pixel decoder; use "
                "decode_logits(), and a proxy tokenizer's decode_probabilities(logits.softmax(-1)) for pixels"
            )
        out = self.decode_codes(codes)
        if self.pixel_decoder is not None:
            out = self.pixel_decoder(out)
        return out.clamp(0.0, 1.0)

    @torch.no_grad()
    def decode_logits(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, K) (a prefix, as :meth:`decode` takes) -> proxy-code logits (B, P, V_proxy)
        (``proxy_codes`` head only)."""
        codes = self.prefix_codes(tokens, lengths)
        if self.config.head != "proxy_codes":
            raise ValueError("decode_logits() needs head='proxy_codes'; this tokenizer decodes to pixels")
        return self.decode_codes(codes)

    def tokens_to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, K), already checked by :meth:`check_tokens` -> the code vectors (B, K, C) the decoder reads."""
        if self.vocab_size is None:
            return tokens.float()  # latents are already the decoder's input
        return self.quantizer.indices_to_codes(tokens)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors (B, K, C) -> the head's raw output (differentiable)."""
        return self.decoder(codes.to(next(self.decoder.parameters()).dtype))

    def decode_codes_at_scales(self, codes: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The training forward's decode: (the head's raw output, every scale's image coarse to
        fine for a multi-scale decoder, else None). Multi-scale families (HieraTok) override
        it to get all scales from one decoder pass."""
        return self.decode_codes(codes), None

    # ----------------------------------------------------------------- bookkeeping
    def flops_calls(self, batch_size: int = 1) -> dict[str, tuple[Any, tuple[torch.Tensor, ...]]]:
        """What :func:`mstok.evaluation.flops.tokenizer_flops` counts, part name -> (callable,
        its inputs): the encoder on random images (B, 3, H, W), the decoder on random codes
        (B, K, C), on the model's device and dtype. Families whose networks take other inputs
        (SemTok: first-stage latents) override it."""
        cfg = self.config
        param = next(self.parameters())
        options = {"device": param.device, "dtype": param.dtype}
        images = torch.rand(batch_size, 3, cfg.image_size, cfg.image_size, **options)
        codes = torch.randn(batch_size, cfg.num_latent_tokens, cfg.code_dim, **options)
        return {"encoder": (self.encoder, (images,)), "decoder": (self.decoder, (codes,))}

    def decoder_calls(self, steps: int | None = None, sampler: str | None = None) -> int:
        """Decoder calls one :meth:`decode` makes: 1 here (one pass); a sampling decoder
        (SemTok's flow) overrides it."""
        return 1

    @property
    def supports_prefix(self) -> bool:
        """Whether :meth:`decode` takes any prefix ``tokens[:, :k]`` (a model built with nested
        tokens, ``config.nested``; docs/nested.md): the web app's prefix slider reads it."""
        return bool(getattr(self.config, "nested", False))

    @property
    def decodes_in_steps(self) -> bool:
        """Whether :meth:`decode` takes ``steps`` (a decoder that integrates an ODE): False here
        (one pass); a sampling decoder (SemTok's flow) overrides it."""
        return False

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: encoder, decoder, quantizer (pixel_decoder when present) and total."""
        counts = {
            name: sum(p.numel() for p in getattr(self, name).parameters())
            for name in ("encoder", "decoder", "quantizer")
        }
        if self.pixel_decoder is not None:
            counts["pixel_decoder"] = sum(p.numel() for p in self.pixel_decoder.parameters())
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts
