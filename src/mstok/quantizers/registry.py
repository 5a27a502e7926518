"""``build_quantizer``: a quantizer from config data, with errors that name the bad setting.

A spec is a table with a ``type`` and that type's settings, e.g. ``{"type": "fsq", "levels":
[8, 5, 5, 5]}``, ``{"type": "bsq"}``, ``{"type": "lfq", "entropy_weight": 0.1}``, ``{"type":
"vq", "codebook_size": 1024, "ema": true}`` or ``{"type": "kl", "kl_weight": 1e-6}``. The code
dim comes from the model (for LFQ and BSQ it is the number of bits, so ``code_dim = 32`` is a
2^32 codebook). Values are checked for type and range here so that a typo in a TOML file fails
at construction with the key's name, not as a torch error deep in the first training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mstok.quantizers.base import MAX_ID_BITS, Quantizer
from mstok.quantizers.bsq import BinarySphericalQuantizer
from mstok.quantizers.fsq import FiniteScalarQuantizer
from mstok.quantizers.identity import IdentityQuantizer
from mstok.quantizers.kl import KLQuantizer
from mstok.quantizers.lfq import LookupFreeQuantizer
from mstok.quantizers.vq import VectorQuantizer

# (kind, check) per setting: kind is the Python type; check returns an error text or None.
_Check = Callable[[Any], "str | None"]


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _open_unit(v: float) -> str | None:
    return None if 0 < v < 1 else "must lie in (0, 1)"


def _at_least(n: int) -> _Check:
    return lambda v: None if v >= n else f"must be >= {n}"


def _levels(v: list) -> str | None:
    if not v or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
        return "must be a non-empty list of integers"
    if any(x < 2 for x in v):
        return "every level must be >= 2 (a channel with one level carries no information)"
    return None


_ENTROPY = {
    "entropy_weight": (float, _non_negative),
    "diversity_gamma": (float, _non_negative),
    "inverse_temperature": (float, _positive),
    "commitment_weight": (float, _non_negative),
    "exact_max_bits": (int, _at_least(1)),
    "group_bits": (int, _at_least(1)),
}
SCHEMAS: dict[str, dict[str, tuple[type, _Check | None]]] = {
    "vq": {
        "codebook_size": (int, _at_least(2)),
        "use_l2_norm": (bool, None),
        "commitment_weight": (float, _non_negative),
        "ema": (bool, None),
        "ema_decay": (float, _open_unit),
        "ema_eps": (float, _positive),
        "kmeans_init": (bool, None),
        "kmeans_iters": (int, _at_least(1)),
    },
    "fsq": {"levels": (list, _levels)},
    "lfq": _ENTROPY,
    "bsq": _ENTROPY,
    "kl": {"kl_weight": (float, _non_negative)},
    "identity": {"use_l2_norm": (bool, None)},
}
REQUIRED = {"vq": ("codebook_size",), "fsq": ("levels",)}


def _check_value(kind: str, key: str, value: Any, expected: type, check: _Check | None) -> Any:
    where = f"quantizer {kind!r}: {key}"
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list:
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        wanted = "finite number" if expected is float else expected.__name__
        raise ValueError(f"{where} must be a {wanted}, got {value!r}")
    problem = check(value) if check else None
    if problem:
        raise ValueError(f"{where} {problem}, got {value!r}")
    return value


def build_quantizer(spec: dict[str, Any], code_dim: int) -> Quantizer:
    """A quantizer from ``spec`` (a mapping with ``type`` and settings) for ``code_dim`` channels.

    Raises:
        ValueError: not a mapping, no or unknown ``type`` (the message lists the known ones), an
            unknown key (lists the allowed ones), a value of the wrong type or range, FSQ levels
            that do not match ``code_dim``, or more than 62 bits for LFQ/BSQ ids.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"quantizer spec must be a table like {{'type': 'fsq', ...}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in SCHEMAS:
        raise ValueError(f"quantizer type must be one of {sorted(SCHEMAS)}, got {kind!r}")
    if isinstance(code_dim, bool) or not isinstance(code_dim, int) or code_dim < 1:
        raise ValueError(f"quantizer {kind!r}: code_dim must be a positive integer, got {code_dim!r}")
    schema = SCHEMAS[kind]
    settings = {k: v for k, v in spec.items() if k != "type"}
    unknown = sorted(set(settings) - set(schema))
    if unknown:
        hint = " (a KL bottleneck has no ids, so no codebook)" if kind == "kl" and "codebook_size" in unknown else ""
        raise ValueError(f"quantizer {kind!r}: unknown key(s) {unknown}{hint}; allowed: {sorted(schema)}")
    missing = [k for k in REQUIRED.get(kind, ()) if k not in settings]
    if missing:
        raise ValueError(f"quantizer {kind!r}: missing required key(s) {missing}")
    settings = {k: _check_value(kind, k, v, *schema[k]) for k, v in settings.items()}
    if kind in ("lfq", "bsq") and code_dim > MAX_ID_BITS:
        raise ValueError(
            f"quantizer {kind!r}: code_dim={code_dim} bits gives ids beyond int64; at most {MAX_ID_BITS} bits"
        )
    if kind == "vq":
        return VectorQuantizer(code_dim=code_dim, **settings)
    if kind == "fsq":
        return FiniteScalarQuantizer(settings["levels"], code_dim=code_dim)
    if kind == "lfq":
        return LookupFreeQuantizer(code_dim, **settings)
    if kind == "bsq":
        return BinarySphericalQuantizer(code_dim, **settings)
    if kind == "kl":
        return KLQuantizer(code_dim, **settings)
    return IdentityQuantizer(code_dim, **settings)
