"""Deprecated alias of :mod:`mstok.persistence.convert.generator` (it moved there): importing this module warns once and
gives that module itself, so every name (and monkeypatching) works as before."""

import sys
import warnings

from mstok.persistence.convert import generator

warnings.warn("mstok.convert.generator moved to mstok.persistence.convert.generator", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = generator
