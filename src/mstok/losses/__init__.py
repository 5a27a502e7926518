"""Training losses (kept outside the models)."""

from mstok.losses.reconstruction import ReconstructionLoss

__all__ = ["ReconstructionLoss"]
