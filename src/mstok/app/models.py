"""What the app's model pickers name, turned into models: a cached loader, on the GPU when there is
one and in float32 on the CPU.

A picker names a run folder (its newest checkpoint), a checkpoint or saved-model folder, a
weights file in one, a Hugging Face hub id, or ``official:<release>`` (an official TiTok,
:func:`mstok.demo_official.load_official`). A preset name is refused: its weights are random, so
its reconstructions and samples would be noise.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mstok.demo_official import load_official
from mstok.device import resolve_device
from mstok.generators import FAMILIES as GENERATOR_FAMILIES
from mstok.generators import GENERATOR_PRESETS
from mstok.persistence import load_generator, load_tokenizer
from mstok.persistence.convert.generator import GENERATOR_RELEASES
from mstok.persistence.convert.titok import RELEASES
from mstok.storage.layout import CONFIG_FILE
from mstok.storage.locate import is_hub_id, locate_model
from mstok.storage.saved import read_saved_config
from mstok.tokenizers.registry import FAMILIES as TOKENIZER_FAMILIES
from mstok.tokenizers.registry import PRESETS

OFFICIAL = "official:"
CACHE_SIZE = 4  # models kept loaded: two per tab of the Compare and Generate tabs


@dataclass(frozen=True)
class Runtime:
    """Where the app runs its models: ``dtype`` is the autocast type on a GPU (``--half``), float32 elsewhere."""

    device: torch.device
    dtype: torch.dtype = torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        return f"{self.device}" + ("" if self.dtype == torch.float32 else f", {str(self.dtype).split('.')[-1]}")


def choose_runtime(device: str = "auto", half: bool = False) -> Runtime:
    """The GPU when there is one (``device="auto"``), bfloat16 autocast there with ``half``; the
    CPU always computes in float32 (half precision is slow there and lowers PSNR for nothing)."""
    resolved = resolve_device(device, "--device")
    if half and resolved.type == "cuda" and torch.cuda.is_bf16_supported():
        return Runtime(resolved, torch.bfloat16)
    return Runtime(resolved)


@dataclass(frozen=True)
class Loaded:
    """A model the cache holds, with the words the page shows for it and its folder (None for a hub id)."""

    model: torch.nn.Module
    label: str
    folder: Path | None


def refuse_preset(spec: str, kind: str) -> None:
    """A ValueError when ``spec`` names a preset rather than trained weights."""
    presets = PRESETS if kind == "tokenizer" else GENERATOR_PRESETS
    if spec in presets and not Path(spec).exists():
        official = RELEASES if kind == "tokenizer" else GENERATOR_RELEASES
        hint = f"; the released weights of this size are {OFFICIAL}{spec}" if spec in official else ""
        output = "reconstructions" if kind == "tokenizer" else "samples"
        raise ValueError(
            f"{spec} is a preset, whose weights are random: its {output} would be noise. Pick a run folder, "
            f"a saved model or an official checkpoint{hint}"
        )


def _cache_key(spec: str, kind: str) -> tuple:
    """What identifies the weights ``spec`` names now: a folder's newest checkpoint and its file's
    modification time (a run that saved a newer checkpoint loads again), else the name."""
    if spec.startswith(OFFICIAL) or (not Path(spec).expanduser().exists() and is_hub_id(spec)):
        return (kind, spec)
    folder, weights = locate_model(spec, None, kind)
    try:
        changed = (folder / weights).stat().st_mtime_ns
    except OSError:
        changed = None  # no weights file: loading says so, in its own words
    return (kind, str(folder.resolve()), weights, changed)


def _load(spec: str, kind: str) -> Loaded:
    if spec.startswith(OFFICIAL):
        model, label = load_official(spec.removeprefix(OFFICIAL), kind)
        return Loaded(model, label, None)
    if not Path(spec).expanduser().exists() and is_hub_id(spec):
        return Loaded((load_tokenizer if kind == "tokenizer" else load_generator)(spec), f"{spec} (hub)", None)
    folder, weights = locate_model(spec, None, kind)
    model = load_tokenizer(folder, weights) if kind == "tokenizer" else load_generator(folder, weights)
    family = getattr(model.config, "family", type(model).__name__)
    step = f"{folder.name}, " if folder.name != Path(spec).name else ""  # a run's newest checkpoint
    return Loaded(model, f"{spec} ({family}, {step}{weights})", folder)


class ModelCache:
    """Loaded models by what their picker named, the last :data:`CACHE_SIZE` kept (thread-safe:
    the page runs handlers in worker threads)."""

    def __init__(self, runtime: Runtime | None = None, size: int = CACHE_SIZE) -> None:
        self.runtime = runtime or choose_runtime()
        self.size = size
        self._models: OrderedDict[tuple, Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: str | None, kind: str = "tokenizer") -> Loaded:
        """The ``kind`` (tokenizer or generator) that ``spec`` names, loaded once and moved to the device."""
        spec = (spec or "").strip()
        if not spec:
            raise ValueError(f"pick a {kind} first: a run folder, a saved model or {OFFICIAL}<release>")
        refuse_preset(spec, kind)
        key = _cache_key(spec, kind)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = _load(spec, kind)
            loaded = Loaded(loaded.model.to(self.runtime.device).eval(), loaded.label, loaded.folder)
            self._models[key] = loaded
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return loaded


def _family(folder: Path) -> str | None:
    """The family named by a model folder's config.json, None when it names none."""
    try:
        meta = read_saved_config(folder, "model")
    except (OSError, ValueError):
        return None
    return meta.get("family") if isinstance(meta, dict) else None


def _candidates(root: Path, depth: int) -> Iterator[Path]:
    """``root`` and its sub-folders down to ``depth`` levels, skipping checkpoint folders' insides."""
    yield root
    if depth == 0:
        return
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return
    for child in children:
        if child.name != "checkpoints" and not child.name.startswith("step_"):
            yield from _candidates(child, depth - 1)


def find_models(roots: Sequence[str | Path], kind: str = "tokenizer", depth: int = 2) -> list[str]:
    """Run folders and saved models under ``roots`` (``depth`` levels down) holding a ``kind``."""
    found = []
    for root in roots:
        for folder in _candidates(Path(root), depth) if Path(root).is_dir() else []:
            try:
                model_folder, _ = locate_model(folder, None, kind)
            except (OSError, ValueError):
                continue
            if model_folder != folder and (folder / CONFIG_FILE).is_file():
                continue
            family = _family(model_folder)
            if family in (TOKENIZER_FAMILIES if kind == "tokenizer" else GENERATOR_FAMILIES):
                found.append(str(folder))
    return found


def official_choices(kind: str = "tokenizer") -> list[str]:
    """``official:<release>`` for every official TiTok ``kind`` the app can fetch."""
    return [OFFICIAL + name for name in (RELEASES if kind == "tokenizer" else GENERATOR_RELEASES)]
