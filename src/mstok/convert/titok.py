"""Deprecated alias of :mod:`mstok.persistence.convert.titok` (it moved there): importing this module warns once and
gives that module itself, so every name (and monkeypatching) works as before."""

import sys
import warnings

from mstok.persistence.convert import titok

warnings.warn("mstok.convert.titok moved to mstok.persistence.convert.titok", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = titok
