"""mstok: compact 1D image tokenization (MsTok, TiTok) in PyTorch.

>>> import mstok
>>> tok = mstok.create_tokenizer("mstok_tiny")
>>> tokens = tok.encode(images)      # (B, 3, H, W) in [0, 1] -> (B, K) ids
>>> recon = tok.decode(tokens)       # -> (B, 3, H, W) in [0, 1]
>>> gen = mstok.create_generator("maskgit_tiny")
>>> ids = mstok.sample(gen, labels)  # MaskGIT decoding -> (B, K) ids for tok.decode
>>> tok = mstok.load_tokenizer("runs/mstok_tiny")  # a run, checkpoint or model folder, or a weights file

``load_tokenizer`` and ``load_generator`` follow the CLI's loading rule (``mstok.storage.locate.locate_model``):
a run folder means its newest checkpoint, and a checkpoint folder its EMA weights when present.
"""

from mstok.generators import (
    GeneratorConfig,
    MaskGITGenerator,
    SamplingConfig,
    create_generator,
    generate_images,
    sample,
)
from mstok.persistence import load_generator, load_tokenizer
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
)

__version__ = "0.1.0"

__all__ = [
    "GeneratorConfig",
    "MaskGITGenerator",
    "MsTok",
    "MsTokConfig",
    "SamplingConfig",
    "TiTok",
    "TiTokConfig",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerOutput",
    "__version__",
    "create_generator",
    "create_tokenizer",
    "generate_images",
    "list_presets",
    "load_generator",
    "load_tokenizer",
    "sample",
]
