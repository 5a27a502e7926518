"""Tokenizer families (one file each) and the preset registry.

Models only: loading a saved tokenizer of any family is :func:`mstok.load_tokenizer`
(:mod:`mstok.persistence`).
"""

import warnings
from typing import Any

from mstok.tokenizers.base import Tokenizer, TokenizerConfig
from mstok.tokenizers.contract import TokenizerOutput
from mstok.tokenizers.hieratok import HieraTok, HieraTokConfig
from mstok.tokenizers.mstok import MsTok, MsTokConfig
from mstok.tokenizers.registry import (
    PRESETS,
    SIZES,
    build_tokenizer,
    create_tokenizer,
    list_presets,
    preset_config,
    tokenizer_from_config,
)
from mstok.tokenizers.semtok import SemTok, SemTokConfig
from mstok.tokenizers.titok import TiTok, TiTokConfig
from mstok.tokenizers.vqgan import MaskGITVQGAN, VQGANConfig

__all__ = [
    "PRESETS",
    "SIZES",
    "HieraTok",
    "HieraTokConfig",
    "MaskGITVQGAN",
    "MsTok",
    "MsTokConfig",
    "SemTok",
    "SemTokConfig",
    "TiTok",
    "TiTokConfig",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerOutput",
    "VQGANConfig",
    "build_tokenizer",
    "create_tokenizer",
    "list_presets",
    "preset_config",
    "tokenizer_from_config",
]


# names that moved up to mstok.persistence (the model layer may not import it); they still resolve here
_MOVED = {"load_tokenizer": "mstok.persistence", "load_official_vqgan": "mstok.persistence"}


def __getattr__(name: str) -> Any:
    """Deprecation shim: a name in ``_MOVED`` resolves from its new home, with a DeprecationWarning."""
    if name in _MOVED:
        from mstok import persistence  # deprecation shim: the one allowed upward import

        warnings.warn(f"{__name__}.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(persistence, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
