"""The Generate tab's handlers: a generator and its tokenizer, a class, guidance and steps -> samples.

Sampling goes through :func:`mstok.generators.generate_images`, as ``mstok sample`` does; the
settings start from the generator's ``sampling.json`` (an official release's own settings),
else its family's defaults, and the page's guidance and steps replace those two fields.

Classes are listed with names: a generator trained by mstok knows its classes from its token
shards (``index.json``: the class folders' names, such as Tiny ImageNet's wnids), and a
``manifest.csv`` beside the images those tokens came from (as in ``../shared/datasets``) turns
wnids into words; ``mstok app --class-names FILE`` gives names for any generator, e.g. the
ImageNet ones for an official TiTok generator.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mstok.app.handlers import enlarged, to_uint8
from mstok.app.models import OFFICIAL, Loaded, ModelCache
from mstok.cli_generation import check_generator_tokens
from mstok.generators import check_tokenizer, family_of, generate_images
from mstok.persistence.convert.generator import (
    SAMPLING_FILE,
    generator_release_config,
    generator_release_key,
    sampling_from_official,
)
from mstok.storage.layout import TRAIN_CONFIG_FILE

MAX_SAMPLES = 16  # samples per click: a CPU draws a tiny model's 16 in seconds, a large one's in minutes


def read_class_names(path: str | Path) -> dict[str, str]:
    """Names by class id or folder name from ``path``: a CSV with a ``class_name`` column and
    ``class_idx`` and/or ``label`` columns (a ``manifest.csv``), or a text file of one name per line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    first = text.splitlines()[0] if text else ""
    if "class_name" not in first.split(","):
        return {str(i): line.strip() for i, line in enumerate(text.splitlines()) if line.strip()}
    names: dict[str, str] = {}
    for row in csv.DictReader(text.splitlines()):
        for key in ("class_idx", "label"):
            if row.get(key):
                names[row[key]] = row["class_name"]
    return names


def _manifest_beside_tokens(folder: Path) -> Path | None:
    """The ``manifest.csv`` of the images a generator's token shards were made from, when reachable."""
    try:
        data = Path(json.loads((folder / TRAIN_CONFIG_FILE).read_text())["data"]["path"])
        source = Path(json.loads((data / "index.json").read_text())["source"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    manifest = source / "manifest.csv"
    return manifest if manifest.is_file() else None


def class_labels(
    num_classes: int, folder: Path | None, tokenizer: torch.nn.Module, names_file: str | Path | None = None
) -> list[str]:
    """``"<id> <name>"`` for every class of a generator (``"<id>"`` where no name is known).

    Refuses (ValueError) a tokenizer other than the one the generator's tokens came from, when
    its training data is reachable (:func:`mstok.cli_generation.check_generator_tokens`)."""
    folders = check_generator_tokens(folder, tokenizer) if folder is not None else []
    names: dict[str, str] = {}
    manifest = _manifest_beside_tokens(folder) if folder is not None else None
    for source in (manifest, names_file):
        if source is not None:
            names |= read_class_names(source)
    labels = []
    for c in range(num_classes):
        folder_name = folders[c] if c < len(folders) else None
        name = names.get(str(c)) or (names.get(folder_name) if folder_name else None) or folder_name
        labels.append(f"{c} {name}" if name else str(c))
    return labels


def parse_class(choice: str | int | None, num_classes: int) -> int:
    """The class id a choice names: ``"207 golden retriever"``, ``"207"`` or 207."""
    text = str(choice if choice is not None else "").strip()
    head = text.split(" ", 1)[0]
    if not head.isdigit():
        raise ValueError(f"pick a class from the list or type its number (0 to {num_classes - 1}), got {text!r}")
    if not 0 <= int(head) < num_classes:
        raise ValueError(f"class {head}: this generator has {num_classes} classes, numbered 0 to {num_classes - 1}")
    return int(head)


@dataclass
class GeneratorSettings:
    """What the page shows once a generator and tokenizer are picked."""

    classes: list[str]
    guidance: float
    steps: int
    note: str


def sampling_defaults(loaded: Loaded, spec: str) -> dict[str, Any]:
    """The generator's own sampling settings: its folder's ``sampling.json``, an official release's
    settings, else none (its family's defaults)."""
    if loaded.folder is not None and (loaded.folder / SAMPLING_FILE).is_file():
        try:
            values = json.loads((loaded.folder / SAMPLING_FILE).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{loaded.folder / SAMPLING_FILE} is not valid JSON ({err})") from err
        if not isinstance(values, dict):
            raise ValueError(f"{loaded.folder / SAMPLING_FILE} must hold a JSON object of sampling settings")
        return values
    if spec.startswith(OFFICIAL) and not Path(spec.removeprefix(OFFICIAL)).exists():
        official = sampling_from_official(generator_release_config(generator_release_key(spec.removeprefix(OFFICIAL))))
        return official.to_dict() if official is not None else {}
    return {}


def _pair(cache: ModelCache, generator_spec: str | None, tokenizer_spec: str | None) -> tuple[Loaded, Loaded]:
    generator = cache.get(generator_spec, "generator")
    tokenizer = cache.get(tokenizer_spec, "tokenizer")
    check_tokenizer(generator.model, tokenizer.model)  # ids of the same K and V, or latents of the same K and C
    if generator.folder is not None:  # its training tokens, when reachable, name the tokenizer they came from
        check_generator_tokens(generator.folder, tokenizer.model)
    return generator, tokenizer


def generator_settings(
    cache: ModelCache, generator_spec: str | None, tokenizer_spec: str | None, names_file: str | Path | None = None
) -> GeneratorSettings:
    """The class list (``"<id> <name>"``) and the guidance and steps to start from."""
    generator, tokenizer = _pair(cache, generator_spec, tokenizer_spec)
    family = family_of(generator.model)
    config = family.sampling_class.from_dict(sampling_defaults(generator, generator_spec.strip()))
    classes = class_labels(generator.model.config.num_classes, generator.folder, tokenizer.model, names_file)
    note = (
        f"{generator.label}: a {family.title} generator of {len(classes)} classes; {tokenizer.label} decodes its tokens"
    )
    return GeneratorSettings(classes, float(config.guidance_scale), int(config.steps), note)


def generate(
    cache: ModelCache,
    generator_spec: str | None,
    tokenizer_spec: str | None,
    choice: str | int | None,
    guidance: float,
    steps: int,
    samples: int = 4,
    seed: int = 0,
) -> tuple[list[np.ndarray], str]:
    """Draw ``samples`` images of the class ``choice`` names; returns them and a caption."""
    generator, tokenizer = _pair(cache, generator_spec, tokenizer_spec)
    model = generator.model
    label = parse_class(choice, model.config.num_classes)
    samples = int(samples)
    if not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be 1 to {MAX_SAMPLES}, got {samples}")
    family = family_of(model)
    fields = sampling_defaults(generator, generator_spec.strip()) | {
        "guidance_scale": float(guidance),
        "steps": int(steps),
    }
    config = family.sampling_class.from_dict(fields)
    started = time.perf_counter()
    with cache.runtime.autocast():
        images, _ = generate_images(
            model, tokenizer.model, [label] * samples, config, seed=int(seed), batch_size=samples
        )
    seconds = time.perf_counter() - started
    caption = (
        f"{samples} samples of class {label} in {seconds:.1f} s on {cache.runtime.describe()} "
        f"(guidance {config.guidance_scale:g}, {config.steps} steps, seed {int(seed)})"
    )
    return [enlarged(to_uint8(image)) for image in images], caption
