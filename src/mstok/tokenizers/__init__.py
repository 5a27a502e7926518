"""Tokenizer families (one file each) and the preset registry."""

from mstok.tokenizers.base import Tokenizer, TokenizerConfig
from mstok.tokenizers.contract import TokenizerOutput
from mstok.tokenizers.hieratok import HieraTok, HieraTokConfig
from mstok.tokenizers.mstok import MsTok, MsTokConfig
from mstok.tokenizers.registry import (
    PRESETS,
    SIZES,
    create_tokenizer,
    list_presets,
    load_tokenizer,
    preset_config,
    tokenizer_from_config,
)
from mstok.tokenizers.semtok import SemTok, SemTokConfig
from mstok.tokenizers.titok import TiTok, TiTokConfig
from mstok.tokenizers.vqgan import MaskGITVQGAN, VQGANConfig, load_official_vqgan

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
    "create_tokenizer",
    "list_presets",
    "load_official_vqgan",
    "load_tokenizer",
    "preset_config",
    "tokenizer_from_config",
]
