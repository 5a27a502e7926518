"""The README as a newcomer reads it: its tables list every preset and config key, every shell
command parses, every path a command reads was written by an earlier command (or ships with the
clone), and the CPU sequences (training, evaluation, generation) run as written, in order, in a
fresh copy of the configs beside small stand-ins for ``../shared/datasets/tiny-imagenet-64`` and
``tiny-imagenet-64-train``.

Commands that need what a clone does not have (ImageNet under ``/data``, GPUs via ``torchrun``,
hub downloads, ``UPPERCASE`` placeholders) are only parsed. The run appends tiny-budget flags
(``--set steps=2 ...``) to each command; it never changes the paths the README uses."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image

import mstok
from mstok import cli
from mstok.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # DIR, FILE, SRC
# the arguments a command reads / writes (paths relative to the clone)
READS = ("--config", "--checkpoint", "--data", "--generator", "--tokenizer", "--reference", "--generated", "--train")
READS += ("--model", "--val-data", "--feature-net")  # mstok reference train/eval, mstok eval --feature-net
WRITES = ("--out", "--out-dir")
# config keys that name inputs, and the key of the run folder
CONFIG_READS = (("data", "path"), ("data", "val_path"), ("proxy", "checkpoint"), ("model", "init_from"), ("tokenizer",))


def shell_blocks() -> list[list[str]]:
    """The README's ``bash`` blocks, each a list of commands (continuations joined, comments dropped)."""
    blocks = []
    for kind, body in BLOCK.findall(README):
        if kind == "bash":
            joined = body.replace("\\\n", " ")
            blocks.append([line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")])
    return blocks


def mstok_argv(command: str) -> list[str] | None:
    """The ``mstok`` arguments of a command line (also under ``torchrun -m mstok.cli``), else None."""
    words = shlex.split(command, comments=True)
    if words[:1] == ["mstok"]:
        return words[1:]
    if words[:1] == ["torchrun"] and "mstok.cli" in words:
        return words[words.index("mstok.cli") + 1 :]
    return None


def needs_outside(block: list[str], argv: list[str]) -> bool:
    """Whether a command needs what a fresh clone lacks: downloads, /data, GPUs, placeholders."""
    if any(line.startswith("hf ") for line in block) or argv[0] in ("convert", "bench", "demo"):
        return True  # a block that starts with hub downloads works on what they fetch
    return any(word.startswith("/") or PLACEHOLDER.match(word) or word.endswith(".bin") for word in argv)


def runnable_commands() -> list[list[str]]:
    """Every README command a fresh clone can run on a CPU, in README order."""
    found = []
    for block in shell_blocks():
        for line in block:
            argv = mstok_argv(line)
            if argv is not None and not line.startswith("torchrun ") and not needs_outside(block, argv):
                found.append(argv)
    return found


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _settings(argv: list[str]) -> dict[str, str]:
    """``--set key=value`` pairs of a command (values unparsed, quotes dropped)."""
    pairs, taking = {}, False
    for word in argv:
        if word.startswith("--"):
            taking = word == "--set"
        elif taking and "=" in word:
            key, value = word.split("=", 1)
            pairs[key] = value.strip("'\"")
    return pairs


def reads_and_writes(argv: list[str]) -> tuple[list[str], list[str]]:
    """(paths the command reads, paths it creates) as the README writes them."""
    reads = [value for name in READS if (value := _option(argv, name))]
    writes = [value for name in WRITES if (value := _option(argv, name))]
    if argv[0] == "eval":  # eval writes grid.png and reference_stats.npz beside its --out file
        writes = [str(Path(value).parent) for value in writes]
    config_path = _option(argv, "--config")
    if config_path:
        config, settings = tomllib.loads((REPO / config_path).read_text()), _settings(argv)
        for keys in CONFIG_READS:
            value = settings.get(".".join(keys), _lookup(config, keys))
            if value:
                reads.append(value)
        writes.append(settings.get("out_dir", config.get("out_dir", "runs/train")))
    return reads, writes


def _lookup(config: dict, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, str) else None


def _created(path: str, written: list[str]) -> bool:
    """Whether ``path`` lies in (or is) a folder an earlier command wrote, or ships with the clone."""
    clean = Path(path.rstrip("/"))
    if str(clean).startswith("../shared/") or ((REPO / clean).exists() and not str(clean).startswith("runs")):
        return True
    return any(clean == Path(w) or Path(w) in clean.parents or clean in Path(w).parents for w in written)


# ------------------------------------------------------------------ tables
def test_presets_table_lists_every_preset() -> None:
    section = README.split("## Presets", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert sorted(listed) == sorted(mstok.list_presets())


def test_config_table_lists_every_training_key() -> None:
    section = README.split("### Configs", 1)[1].split("\n### ", 1)[0]
    rows = dict(re.findall(r"^\| (top level|`\[\w+\]`) \| (.*) \|$", section, re.M))
    hints = typing.get_type_hints(TrainConfig)
    missing = []
    for field in dataclasses.fields(TrainConfig):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            row = rows.get(f"`[{field.name}]`", "")
            missing += [f"{field.name}.{f.name}" for f in dataclasses.fields(kind) if f"`{f.name}`" not in row]
        elif f"`{field.name}`" not in rows.get("top level", ""):
            missing.append(field.name)
    assert not missing, f"README's config table lacks {missing}"


# ------------------------------------------------------------------ commands
def test_every_readme_command_parses() -> None:
    parser = cli.build_parser()
    commands = [argv for block in shell_blocks() for line in block if (argv := mstok_argv(line)) is not None]
    assert len(commands) >= 15
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: mstok {shlex.join(argv)}")


def test_every_path_a_readme_command_reads_was_written_before() -> None:
    written: list[str] = []
    commands = runnable_commands()
    assert [argv[0] for argv in commands][:4] == ["train", "train", "train", "train-proxy"]
    for argv in commands:
        reads, writes = reads_and_writes(argv)
        for path in reads:
            assert _created(path, written), f"mstok {shlex.join(argv)} reads {path}, which no earlier command creates"
        written += writes


def test_the_path_check_catches_a_path_nobody_wrote() -> None:
    reads, _ = reads_and_writes(["sample", "--generator", "runs/maskgit_tiny", "--tokenizer", "runs/titok_tiny"])
    written = ["runs/mstok_tiny", "runs/maskgit_tiny"]
    assert [path for path in reads if not _created(path, written)] == ["runs/titok_tiny"]


# ------------------------------------------------------------------ the CPU sequences, run
TINY = {
    "train": ["--no-progress", "--set", "steps=2", "batch_size=2", "val_images=2", "data.num_workers=0"],
    "train-proxy": ["--no-progress", "--set", "steps=2", "batch_size=2", "val_images=2", "data.num_workers=0"],
    "train-generator": ["--no-progress", "--set", "steps=2", "batch_size=2", "data.num_workers=0"],
    # eigh: the same FID as sqrtm to 1e-13, seconds instead of a minute for 2048x2048 on one core
    "eval": ["--no-progress", "--no-download", "--num-workers", "0", "--fid-method", "eigh"],
    "pretokenize": ["--no-progress", "--workers", "0", "--device", "cpu"],
    "sample": ["--no-progress", "--device", "cpu"],
    "reference train": ["--no-progress", "--steps", "2", "--batch-size", "2", "--threads", "1"],
    "reference eval": ["--no-progress"],
}


def _stand_in_dataset(root: Path, classes: int = 3, per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"n0000000{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")


def _random_inception_cache(folder: Path) -> None:
    """A weights cache with random FID-Inception weights under the official name (for rFID and the statistics)."""
    from mstok.evaluation.inception import FID_WEIGHTS_FILENAME, FIDInceptionV3

    folder.mkdir()
    torch.manual_seed(1)
    torch.save(FIDInceptionV3().state_dict(), folder / FID_WEIGHTS_FILENAME)


@pytest.mark.slow
def test_readme_sequences_run_in_order_on_a_fresh_clone(tmp_path: Path, monkeypatch) -> None:
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "configs", clone / "configs")
    _stand_in_dataset(tmp_path / "shared" / "datasets" / "tiny-imagenet-64")
    # the training split as a folder: the configs read shards or a folder alike (open_image_dataset)
    _stand_in_dataset(tmp_path / "shared" / "datasets" / "tiny-imagenet-64-train")
    _random_inception_cache(tmp_path / "cache")
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(clone)
    for argv in runnable_commands():
        flags = TINY.get(" ".join(argv[:2]), TINY.get(argv[0], []))  # "reference train" has its own
        code = cli.main([*argv, *flags])
        assert code == 0, f"README command failed: mstok {shlex.join(argv)}"
    # the Python snippet of "Generation" runs on what the commands made
    snippet = next(body for kind, body in BLOCK.findall(README) if kind == "python" and "runs/maskgit_tiny" in body)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["images"].shape == (2, 3, 64, 64)
    assert (clone / "runs" / "eval" / "reference_stats.npz").is_file()
    assert not list(clone.glob("*.png")) and not list(clone.glob("*.json"))  # nothing written into the clone's root
