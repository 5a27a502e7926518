"""Deprecated alias of :mod:`mstok.persistence.hub` (it moved there): importing this module warns once and
gives that module itself, so every name (and monkeypatching) works as before."""

import sys
import warnings

from mstok.persistence import hub

warnings.warn("mstok.convert.hub moved to mstok.persistence.hub", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = hub
