"""Networks that are neither tokenizers nor generators: the reference classifier (SemTok's
teacher and FD-ref's feature network). Models only: their measuring code is in
:mod:`mstok.evaluation`, their training in :mod:`mstok.training`."""

from mstok.networks.reference import ReferenceConfig, ReferenceNet

__all__ = ["ReferenceConfig", "ReferenceNet"]
