"""Importers for checkpoints released by other code bases (one module per family).

:mod:`mstok.persistence.convert.titok` maps the official TiTok tokenizers (bytedance/1d-tokenizer) onto
:class:`mstok.TiTok`, :mod:`mstok.persistence.convert.generator` the official TiTok generators onto
:class:`mstok.MaskGITGenerator`, and :mod:`mstok.persistence.convert.vqgan` reads the official
MaskGIT-VQGAN; :mod:`mstok.persistence.hub` fetches releases from the Hugging Face hub.
"""

from mstok.persistence.convert.titok import (
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
