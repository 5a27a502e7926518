"""The official MaskGIT-VQGAN release (``maskgit-vqgan-imagenet-f16-256.bin``) as a
:class:`~mstok.tokenizers.vqgan.MaskGITVQGAN`: its keys are the model's own, so this is a strict
load with the official config as default, not a renaming."""

from __future__ import annotations

from pathlib import Path

from mstok.io import load_state_dict_checked
from mstok.storage.weights import load_torch_state_dict
from mstok.tokenizers.vqgan import USAGE_KEY, MaskGITVQGAN, VQGANConfig


def load_official_vqgan(path: str | Path, config: VQGANConfig | None = None) -> MaskGITVQGAN:
    """Load the released ``maskgit-vqgan-imagenet-f16-256.bin`` (or a ``.safetensors`` with the same keys).

    The file must match the architecture of ``config`` (default: the official f16 256px
    config) key for key and shape for shape. Official files lack the codebook-usage buffer
    ``quantize.usage_ema``; it keeps the fresh model's value.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, or missing/unexpected keys and shape mismatches, each named
            with the checkpoint's and the model's shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN weights file not found: {path}")
    state = dict(load_torch_state_dict(path))
    model = MaskGITVQGAN(config if config is not None else VQGANConfig())
    state.setdefault(USAGE_KEY, model.quantize.usage_ema.clone())
    load_state_dict_checked(model, state, str(path))
    return model.eval()
