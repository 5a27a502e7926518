"""Importers for checkpoints released by other code bases (one module per family).

:mod:`mstok.convert.titok` maps the official TiTok tokenizers (bytedance/1d-tokenizer) onto
:class:`mstok.TiTok`; :mod:`mstok.convert.hub` fetches them from the Hugging Face hub.
"""

from mstok.convert.titok import (
    RELEASES,
    ConversionError,
    convert_titok,
    convert_titok_state_dict,
    load_official_titok,
    release_config,
    titok_config_from_official,
)

__all__ = [
    "RELEASES",
    "ConversionError",
    "convert_titok",
    "convert_titok_state_dict",
    "load_official_titok",
    "release_config",
    "titok_config_from_official",
]
