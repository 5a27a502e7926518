"""mstok: compact 1D image tokenization (MsTok, TiTok) in PyTorch.

>>> import mstok
>>> tok = mstok.create_tokenizer("mstok_tiny")
>>> tokens = tok.encode(images)      # (B, 3, H, W) in [0, 1] -> (B, K) ids
>>> recon = tok.decode(tokens)       # -> (B, 3, H, W) in [0, 1]
"""

from mstok.tokenizers import (
    MsTok,
    MsTokConfig,
    TiTok,
    TiTokConfig,
    Tokenizer,
    TokenizerConfig,
    TokenizerOutput,
    create_tokenizer,
    list_presets,
    load_tokenizer,
)

__version__ = "0.1.0"

__all__ = [
    "MsTok",
    "MsTokConfig",
    "TiTok",
    "TiTokConfig",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerOutput",
    "__version__",
    "create_tokenizer",
    "list_presets",
    "load_tokenizer",
]
