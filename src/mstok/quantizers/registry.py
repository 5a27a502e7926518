"""Quantizers as config data: one spec dataclass per type, checked by the shared config schema.

A spec is a table with a ``type`` and that type's settings, e.g. ``{"type": "fsq", "levels":
[8, 5, 5, 5]}``, ``{"type": "bsq"}``, ``{"type": "lfq", "entropy_weight": 0.1}``, ``{"type":
"vq", "codebook_size": 1024, "ema": true}`` or ``{"type": "kl", "kl_weight": 1e-6}``. In a
tokenizer config it is the ``quantizer`` field (``[model.overrides.quantizer]`` in TOML). The
code dim comes from the model (for LFQ and BSQ it is the number of bits, so ``code_dim = 32``
is a 2^32 codebook; for FSQ it must equal the number of levels).

Each type's settings are a :class:`~mstok.config_schema.ConfigDict` dataclass below, so their types
and ranges are checked by :mod:`mstok.config_schema` like every other config, and a typo in a
TOML file fails at construction with the key's dotted name (``quantizer.levels``), not as a
torch error deep in the first training step. A setting left out (``None``) takes the
quantizer class's own default, stated in that class's docstring.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from mstok.config_schema import (
    MAX_CODEBOOK,
    NON_NEGATIVE,
    POSITIVE,
    STRICTLY_POSITIVE,
    ConfigDict,
    ConfigError,
    Rule,
    positive,
)
from mstok.quantizers.base import MAX_ID_BITS, Quantizer
from mstok.quantizers.bsq import BinarySphericalQuantizer
from mstok.quantizers.fsq import FiniteScalarQuantizer
from mstok.quantizers.identity import IdentityQuantizer
from mstok.quantizers.kl import KLQuantizer
from mstok.quantizers.lfq import LookupFreeQuantizer
from mstok.quantizers.vq import VectorQuantizer


@dataclass
class QuantizerSpec(ConfigDict):
    """Settings of one quantizer type; a subclass per type, registered in :data:`SPECS`."""

    kind: ClassVar[str] = ""
    quantizer_class: ClassVar[type[Quantizer]]
    # settings without a default: name -> what the error says when a table leaves it out
    required: ClassVar[dict[str, str]] = {}

    def settings(self) -> dict[str, Any]:
        """The settings given (``None`` = the quantizer's default, left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def check_code_dim(self, code_dim: int) -> None:
        """Raise a :class:`ConfigError` when ``code_dim`` cannot go with these settings."""

    def vocab_size(self, code_dim: int) -> int | None:
        """V, the number of distinct ids (None for a continuous bottleneck)."""
        raise NotImplementedError

    def input_dim(self, code_dim: int) -> int:
        """Channels the encoder must emit per token for ``code_dim`` code channels."""
        return code_dim

    @classmethod
    def implied_code_dim(cls, settings: dict[str, Any]) -> int | None:
        """The code dim these (unchecked) settings fix, or None when any code dim goes with them."""
        return None

    def build(self, code_dim: int) -> Quantizer:
        """The quantizer for ``code_dim`` channels."""
        self.check_code_dim(code_dim)
        return self.quantizer_class(code_dim=code_dim, **self.settings())


@dataclass
class VQSpec(QuantizerSpec):
    """Nearest-neighbour vector quantization (:class:`~mstok.quantizers.VectorQuantizer`)."""

    codebook_size: int  # a tokenizer fills it from its own field
    use_l2_norm: bool | None = None
    commitment_weight: float | None = None
    ema: bool | None = None
    ema_decay: float | None = None
    ema_eps: float | None = None
    kmeans_init: bool | None = None
    kmeans_iters: int | None = None

    kind = "vq"
    quantizer_class = VectorQuantizer
    required: ClassVar[dict[str, str]] = {"codebook_size": "is required for a 'vq' quantizer"}
    field_rules: ClassVar[dict[str, Rule]] = {
        "codebook_size": Rule(ge=2, cap=MAX_CODEBOOK, why="the codebook is allocated up front"),
        "commitment_weight": NON_NEGATIVE,
        "ema_decay": Rule(gt=0, lt=1),
        "ema_eps": STRICTLY_POSITIVE,
        "kmeans_iters": POSITIVE,
    }

    def vocab_size(self, code_dim: int) -> int | None:
        return self.codebook_size


@dataclass
class FSQSpec(QuantizerSpec):
    """Finite scalar quantization (:class:`~mstok.quantizers.FiniteScalarQuantizer`)."""

    levels: tuple[int, ...]
    l2_norm_scale: float | None = None

    kind = "fsq"
    quantizer_class = FiniteScalarQuantizer
    required: ClassVar[dict[str, str]] = {"levels": "is required for an 'fsq' quantizer, e.g. levels = [8, 5, 5, 5]"}
    field_rules: ClassVar[dict[str, Rule]] = {
        # a channel with one level carries no information
        "levels": Rule(min_len=1, item=Rule(ge=2, cap=2**16)),
        "l2_norm_scale": STRICTLY_POSITIVE,
    }

    def check_code_dim(self, code_dim: int) -> None:
        if code_dim != len(self.levels):
            raise ConfigError(
                "levels",
                f"has {len(self.levels)} values but the model's code_dim is {code_dim}: "
                f"give one level per code channel (or set code_dim = {len(self.levels)})",
            )
        if math.prod(self.levels) > 2**MAX_ID_BITS:
            raise ConfigError("levels", f"give {math.prod(self.levels)} codes, more than int64 ids allow")

    def vocab_size(self, code_dim: int) -> int | None:
        return math.prod(self.levels)

    @classmethod
    def implied_code_dim(cls, settings: dict[str, Any]) -> int | None:
        levels = settings.get("levels")
        return len(levels) if isinstance(levels, (list, tuple)) and levels else None

    def build(self, code_dim: int) -> Quantizer:
        self.check_code_dim(code_dim)
        return FiniteScalarQuantizer(list(self.levels), code_dim=code_dim, l2_norm_scale=self.l2_norm_scale)


@dataclass
class SignSpec(QuantizerSpec):
    """What LFQ and BSQ share: C bits per token (:class:`~mstok.quantizers.binary.SignQuantizer`)."""

    entropy_weight: float | None = None
    diversity_gamma: float | None = None
    inverse_temperature: float | None = None
    commitment_weight: float | None = None
    exact_max_bits: int | None = None
    group_bits: int | None = None
    entropy_per_position: bool | None = None

    field_rules: ClassVar[dict[str, Rule]] = {
        "entropy_weight": NON_NEGATIVE,
        "diversity_gamma": NON_NEGATIVE,
        "inverse_temperature": STRICTLY_POSITIVE,
        "commitment_weight": NON_NEGATIVE,
        "exact_max_bits": positive(MAX_ID_BITS),
        "group_bits": positive(MAX_ID_BITS),
    }

    def check_code_dim(self, code_dim: int) -> None:
        if code_dim > MAX_ID_BITS:
            raise ConfigError(
                "", f"{self.kind!r} with code_dim={code_dim} bits gives ids beyond int64; at most {MAX_ID_BITS}"
            )

    def vocab_size(self, code_dim: int) -> int | None:
        return 2**code_dim


@dataclass
class LFQSpec(SignSpec):
    """Lookup-free quantization, C bits per token (:class:`~mstok.quantizers.LookupFreeQuantizer`)."""

    layer_norm: bool | None = None

    kind = "lfq"
    quantizer_class = LookupFreeQuantizer


@dataclass
class BSQSpec(SignSpec):
    """Binary spherical quantization (:class:`~mstok.quantizers.BinarySphericalQuantizer`)."""

    kind = "bsq"
    quantizer_class = BinarySphericalQuantizer


@dataclass
class KLSpec(QuantizerSpec):
    """A diagonal Gaussian bottleneck with a KL term, no ids (:class:`~mstok.quantizers.KLQuantizer`)."""

    kl_weight: float | None = None

    kind = "kl"
    quantizer_class = KLQuantizer
    field_rules: ClassVar[dict[str, Rule]] = {"kl_weight": NON_NEGATIVE}

    def vocab_size(self, code_dim: int) -> int | None:
        return None

    def input_dim(self, code_dim: int) -> int:
        return 2 * code_dim  # a mean and a log-variance per channel


@dataclass
class IdentitySpec(QuantizerSpec):
    """No quantization: continuous latents (:class:`~mstok.quantizers.IdentityQuantizer`)."""

    use_l2_norm: bool | None = None

    kind = "identity"
    quantizer_class = IdentityQuantizer

    def vocab_size(self, code_dim: int) -> int | None:
        return None


SPECS: dict[str, type[QuantizerSpec]] = {s.kind: s for s in (VQSpec, FSQSpec, LFQSpec, BSQSpec, KLSpec, IdentitySpec)}


def implied_code_dim(spec: Any) -> int | None:
    """The code dim a quantizer table fixes by its own settings (FSQ: one channel per level), or
    None (a name, an unknown type, or a type that goes with any code dim). Unchecked: a bad
    table still fails later, in :func:`parse_spec`, with its own message."""
    if not isinstance(spec, dict) or spec.get("type") not in SPECS:
        return None
    return SPECS[spec["type"]].implied_code_dim(spec)


def parse_spec(spec: Any) -> QuantizerSpec:
    """The checked spec object of a table ``{"type": ..., settings...}``.

    Raises:
        ConfigError: not a table, no or unknown ``type`` (the message lists the known ones), an
            unknown key (lists the allowed ones), a value of the wrong type or range; the key
            is named relative to the table (``levels``, ``type``).
    """
    if not isinstance(spec, dict):
        raise ConfigError("", f"must be a table like {{'type': 'fsq', 'levels': [8, 5, 5, 5]}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in SPECS:
        raise ConfigError("type", f"must be one of {', '.join(map(repr, SPECS))}, got {kind!r}")
    cls = SPECS[kind]
    settings = {k: v for k, v in spec.items() if k != "type"}
    allowed = cls.field_names()
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        hint = " (a continuous bottleneck has no ids, so no codebook)" if "codebook_size" in unknown else ""
        raise ConfigError(unknown[0], f"is not a setting of a {kind!r} quantizer{hint}; allowed: {', '.join(allowed)}")
    missing = next((key for key in cls.required if key not in settings), None)
    if missing is not None:
        raise ConfigError(missing, cls.required[missing])
    return cls(**settings)


def build_quantizer(spec: dict[str, Any], code_dim: int) -> Quantizer:
    """A quantizer from ``spec`` (a table with ``type`` and settings) for ``code_dim`` channels.

    Raises:
        ValueError (a :class:`ConfigError`): see :func:`parse_spec`; also FSQ levels that do not
            match ``code_dim``, a VQ spec without ``codebook_size``, or more than 62 bits of
            LFQ/BSQ ids. The message names the key as ``quantizer.<key>``.
    """
    if isinstance(code_dim, bool) or not isinstance(code_dim, int) or code_dim < 1:
        raise ConfigError("code_dim", f"must be a positive integer, got {code_dim!r}")
    try:
        return parse_spec(spec).build(code_dim)
    except ConfigError as err:
        raise err.under("quantizer") from None
