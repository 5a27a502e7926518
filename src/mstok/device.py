"""Which torch device a setting names: ``"auto"`` or a device string, checked to exist here."""

from __future__ import annotations

import torch


def resolve_device(device: str, what: str = "device") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``
    and must be available here. Errors are ValueErrors naming ``what`` (the config key
    ``device`` by default), not torch's RuntimeError from deep inside the first ``.to()``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{what} = {device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:<index>'") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} = {device!r}, but CUDA is not available on this machine: use 'auto' or 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{what} = {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what} = {device!r}, but MPS is not available on this machine: use 'auto' or 'cpu'")
    return resolved
