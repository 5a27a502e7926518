"""Persistence: every way a model of a family is found and loaded from a path or a hub id.

* :mod:`~mstok.persistence.loading`: :func:`load_tokenizer`, :func:`load_generator`,
  :func:`load_reference_net` (a folder of any family, by the loading rule) and
  :func:`load_tokenizer_folder`;
* :mod:`~mstok.persistence.hub`: official releases from the Hugging Face hub;
* :mod:`~mstok.persistence.convert`: the official TiTok tokenizers and generators, and the
  MaskGIT-VQGAN file, as mstok models.

It sits above the models (it needs their classes and registries). What needs no family (file
names and folder layout, the loading rule, the saved-model format, pretrained weight files) is
:mod:`mstok.storage`, below the models, so a model class can save and load itself.
"""

from mstok.persistence.convert.vqgan import load_official_vqgan
from mstok.persistence.loading import load_generator, load_reference_net, load_tokenizer, load_tokenizer_folder

__all__ = ["load_generator", "load_official_vqgan", "load_reference_net", "load_tokenizer", "load_tokenizer_folder"]
