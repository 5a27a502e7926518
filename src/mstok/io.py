"""Weight files: atomic safetensors writes and loads that fail with a readable message.

Weights are only ever read through safetensors (no pickle), so a checkpoint from an
untrusted source cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path, mode: int = 0o666) -> None:
    """Give a file written through a private temporary (``tempfile.mkstemp``, safetensors: both
    0600) the mode an ordinary ``open`` would, ``mode & ~umask``, so colleagues sharing the
    folder can read it. Writers of weights, checkpoints and data files call it."""
    os.chmod(path, mode & ~current_umask())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write ``tensors`` to ``path`` via a temporary file and a rename, so a crash never
    leaves a half-written file under the final name; the file's mode follows the umask."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    apply_umask(tmp)  # safetensors creates its files 0600
    os.replace(tmp, path)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a missing or corrupt file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read weights file {path}: it is not a valid safetensors file ({err})") from err


def load_state_dict_checked(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module`` strictly, reporting every mismatch at once.

    Raises:
        ValueError: naming missing keys, unexpected keys and shape mismatches (first few of each).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"weights in {source} do not match the model:\n  " + "\n  ".join(problems))
    # No mstok model keeps a NaN or infinity in its weights or buffers: such a file is broken
    # (a diverged run, a bad conversion), and loading it would make every output NaN, silently.
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        shown = ", ".join(broken[:8]) + (f", ... ({len(broken)} in all)" if len(broken) > 8 else "")
        raise ValueError(f"weights in {source} hold NaN or infinite values (a diverged or broken file): {shown}")
    module.load_state_dict(state_dict, strict=True)
