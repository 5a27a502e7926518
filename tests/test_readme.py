"""The README and the docs pages as a newcomer reads them: README.md first, then the pages of
``docs/`` in the order ``docs/README.md`` (the index) links them. Their tables list every preset,
config key and command, every shell block is valid bash and every ``mstok`` command in it parses,
every path a command reads was written by an earlier command (in reading order) or ships with the
clone, every relative link and ``#anchor`` points at an existing file and heading, README.md stays
under 250 lines, and the CPU sequences (training, evaluation, generation) run as written, in
order, in a fresh copy of the configs beside small stand-ins for ``../shared/datasets/tiny-imagenet-64``
and ``tiny-imagenet-64-train``.

Commands that need what a clone does not have (ImageNet under ``/data``, GPUs via ``torchrun``,
hub downloads, ``UPPERCASE`` placeholders) and ``mstok app`` (a server) are only parsed. The run
appends tiny-budget flags (``--set steps=2 ...``) to each command; it never changes the paths the
pages use."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
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
DOCS = REPO / "docs"
INDEX = DOCS / "README.md"  # the docs index: its links to pages set the reading order
README_MAX_LINES = 250
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
LISTED = re.compile(r"^ *\d+\. \[[^\]]*\]\(([^)#\s]+)[^)]*\)", re.M)  # "3. [Presets](presets.md): ..."
HEADING = re.compile(r"^(#{1,6}) +(.+?) *#*$", re.M)
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # DIR, FILE, SRC
# the arguments a command reads / writes (paths relative to the clone)
READS = ("--config", "--checkpoint", "--data", "--generator", "--tokenizer", "--reference", "--generated", "--train")
READS += ("--model", "--val-data", "--feature-net")  # mstok reference train/eval, mstok eval --feature-net
WRITES = ("--out", "--out-dir")
# config keys that name inputs, and the key of the run folder
CONFIG_READS = (("data", "path"), ("data", "val_path"), ("proxy", "checkpoint"), ("model", "init_from"), ("tokenizer",))


# ------------------------------------------------------------------ the pages, in reading order
def _name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def relative_links(text: str) -> list[str]:
    """The link targets of a markdown text outside code, in order, without web or mail addresses."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return [target for target in LINK.findall(prose) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def listed_pages(index: Path) -> list[Path]:
    """The pages a markdown file lists in its numbered list (``1. [Title](page.md): ...``), in order."""
    return [(index.parent / target).resolve() for target in LISTED.findall(index.read_text())]


def reading_order() -> list[Path]:
    """README.md, the docs index, then the pages in the order of the index's numbered list."""
    return [REPO / "README.md", INDEX, *listed_pages(INDEX)]


PAGES = reading_order()
TEXTS = {_name(page): page.read_text() for page in PAGES}  # in reading order
README = TEXTS["README.md"]


def headings(text: str) -> list[tuple[int, str, int]]:
    """(level, title, offset) of every heading outside fenced code (a bash comment is no heading)."""
    blanked = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return [(len(m.group(1)), m.group(2), m.start()) for m in HEADING.finditer(blanked)]


def section(title: str, pages: dict[str, str] | None = None) -> tuple[str, str]:
    """(page, text) under the heading ``title`` (any level), up to the next heading of the same or a
    higher level; exactly one page may hold it."""
    found = []
    for name, text in (TEXTS if pages is None else pages).items():
        marks = headings(text)
        for i, (level, heading, start) in enumerate(marks):
            if heading == title:
                end = next((s for lv, _, s in marks[i + 1 :] if lv <= level), len(text))
                found.append((name, text[start:end]))
    assert len(found) == 1, f"the heading {title!r} is in {len(found)} pages ({[n for n, _ in found]}), not one"
    return found[0]


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text (GitHub numbers repeated ones: -1, -2, ...)."""
    found, counts = set(), {}
    for _, title, _ in headings(text):
        base = slug(title)
        found.add(f"{base}-{counts[base]}" if base in counts else base)
        counts[base] = counts.get(base, 0) + 1
    return found


def broken_links(path: Path, text: str) -> list[str]:
    """The relative links of one page whose file (or, into a markdown file, heading) does not exist."""
    broken = []
    for target in relative_links(text):
        file, _, anchor = target.partition("#")
        goal = (path.parent / file).resolve() if file else path
        if not goal.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and goal.suffix == ".md":
            goal_text = text if goal == path else goal.read_text()
            if anchor not in anchors(goal_text):
                broken.append(f"{target} (no heading #{anchor} in {goal.name})")
    return broken


def shell_blocks(pages: dict[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """The ``bash`` blocks of the pages in reading order, each (page, commands): continuations
    joined, comments dropped."""
    blocks = []
    for name, text in (TEXTS if pages is None else pages).items():
        for kind, body in BLOCK.findall(text):
            if kind == "bash":
                joined = body.replace("\\\n", " ")
                lines = [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
                blocks.append((name, lines))
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
    if any(line.startswith("hf ") for line in block) or argv[0] in ("convert", "bench", "demo", "app"):
        return True  # a block that starts with hub downloads works on what they fetch; `app` serves until stopped
    return any(word.startswith("/") or PLACEHOLDER.match(word) or word.endswith(".bin") for word in argv)


def all_commands(pages: dict[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """(page, argv) of every ``mstok`` command of the pages' bash blocks, in reading order."""
    return [
        (name, argv) for name, block in shell_blocks(pages) for line in block if (argv := mstok_argv(line)) is not None
    ]


def unparsable(pages: dict[str, str] | None = None) -> list[str]:
    """The commands that ``mstok``'s parser refuses, each named with its page."""
    parser, bad = cli.build_parser(), []
    for name, argv in all_commands(pages):
        try:
            parser.parse_args(argv)
        except SystemExit:
            bad.append(f"{name}: mstok {shlex.join(argv)}")
    return bad


def runnable_commands(pages: dict[str, str] | None = None) -> list[list[str]]:
    """Every command of the pages that a fresh clone can run on a CPU, in reading order."""
    found = []
    for _, block in shell_blocks(pages):
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
    """(paths the command reads, paths it creates) as the pages write them."""
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


def unwritten_reads(pages: dict[str, str] | None = None) -> list[str]:
    """The paths a runnable command reads that no earlier command (in reading order) writes."""
    written: list[str] = []
    missing = []
    for argv in runnable_commands(pages):
        reads, writes = reads_and_writes(argv)
        missing += [f"mstok {shlex.join(argv)} reads {path}" for path in reads if not _created(path, written)]
        written += writes
    return missing


# ------------------------------------------------------------------ the reading order
def test_the_index_lists_every_docs_page_and_the_readme_follows_its_order() -> None:
    every = {path.resolve() for path in DOCS.rglob("*.md")}
    assert len(set(PAGES)) == len(PAGES), "the docs index lists a page twice"
    assert set(PAGES[1:]) == every, f"pages the docs index does not list: {sorted(map(_name, every - set(PAGES)))}"
    assert listed_pages(REPO / "README.md") == PAGES[2:], "README's list of pages differs from docs/README.md's"


def test_every_page_says_what_it_covers_and_links_back_to_the_readme() -> None:
    for page in PAGES[1:]:
        text = TEXTS[_name(page)]
        assert text.startswith("# "), f"{_name(page)} does not start with its title"
        statement = text.split("\n\n", 2)[1]  # the paragraph under the title
        back = [(page.parent / t.split("#", 1)[0]).resolve() for t in relative_links(statement)]
        assert REPO / "README.md" in back, f"{_name(page)}: the first paragraph does not link back to the README"


def test_readme_is_short() -> None:
    lines = len(README.splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move text into docs/ (limit {README_MAX_LINES})"


def test_readme_test_command_is_the_one_ci_runs() -> None:
    ci = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    setup = [line.split("#")[0].strip() for _, block in shell_blocks({"README.md": README}) for line in block]
    # before it, .ci/install-browser installs the browser of the app's end-to-end test (when root)
    assert ci == [".ci/install-browser", "make test"] and "make test" in setup, (
        f".ci/run runs {ci}; README's set-up block has {setup}"
    )


# ------------------------------------------------------------------ links
def test_every_relative_link_points_to_a_file_and_heading() -> None:
    pages = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
    broken = {_name(page): found for page in pages if (found := broken_links(page, page.read_text()))}
    assert not broken, f"broken links: {broken}"


def test_the_link_check_catches_a_missing_file_and_a_missing_heading() -> None:
    page = DOCS / "training.md"
    text = "# T\n\n## Real heading\n\n[a](../README.md) [b](nope.md) [c](evaluation.md#no-such-heading)\n"
    text += "[d](#real-heading) [e](#gone) [f](https://example.org/x.md) `[g](not-a-link.md)`\n"
    assert broken_links(page, text) == [
        "nope.md (no such file)",
        "evaluation.md#no-such-heading (no heading #no-such-heading in evaluation.md)",
        "#gone (no heading #gone in training.md)",
    ]
    assert slug("Sampling + decoding throughput") == "sampling--decoding-throughput"
    assert (
        slug("Binary quantizers that keep their codes: diagnosis")
        == "binary-quantizers-that-keep-their-codes-diagnosis"
    )
    assert slug("`mstok eval`") == "mstok-eval"
    assert anchors("# A\n## A\n```bash\n# not a heading\n```\n") == {"a", "a-1"}


# ------------------------------------------------------------------ tables
def test_presets_table_lists_every_preset() -> None:
    _, text = section("Presets")
    listed = re.findall(r"^\| `(\w+)` \|", text, re.M)
    assert sorted(listed) == sorted(mstok.list_presets())


def test_config_table_lists_every_training_key() -> None:
    page, text = section("Configs")
    rows = dict(re.findall(r"^\| (top level|`\[\w+\]`) \| (.*) \|$", text, re.M))
    hints = typing.get_type_hints(TrainConfig)
    missing = []
    for field in dataclasses.fields(TrainConfig):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            row = rows.get(f"`[{field.name}]`", "")
            missing += [f"{field.name}.{f.name}" for f in dataclasses.fields(kind) if f"`{f.name}`" not in row]
        elif f"`{field.name}`" not in rows.get("top level", ""):
            missing.append(field.name)
    assert not missing, f"the config table of {page} lacks {missing}"


def _leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[str]:
    subs = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not subs:
        return [" ".join(prefix)]
    return [
        name for action in subs for word, sub in action.choices.items() for name in _leaf_commands(sub, (*prefix, word))
    ]


def test_readme_command_table_lists_every_command_once() -> None:
    _, text = section("Command line", {"README.md": README})
    listed = re.findall(r"^\| `mstok ([a-z][a-z -]*?)` \|", text, re.M)
    assert sorted(listed) == sorted(_leaf_commands(cli.build_parser()))


# ------------------------------------------------------------------ commands
def test_every_shell_block_is_valid_bash() -> None:
    for name, text in TEXTS.items():
        for kind, body in BLOCK.findall(text):
            if kind == "bash":
                done = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
                assert done.returncode == 0, f"{name}: a bash block does not parse: {done.stderr}\n{body}"


def test_every_python_block_compiles() -> None:
    for name, text in TEXTS.items():
        for kind, body in BLOCK.findall(text):
            if kind == "python":
                compile(body, name, "exec")  # a SyntaxError names the page


def test_every_command_of_every_page_parses() -> None:
    assert len(all_commands()) >= 15
    assert {name for name, _ in all_commands()} >= {"docs/training.md", "docs/evaluation.md", "docs/generation.md"}
    bad = unparsable()
    assert not bad, f"commands that do not parse: {bad}"


def test_a_docs_page_with_a_broken_command_fails() -> None:
    pages = {
        **TEXTS,
        "docs/extra.md": "# Extra\n\n```bash\nmstok train --config configs/mstok_tiny.toml --no-such-flag\n```\n",
    }
    assert unparsable(pages) == [
        *unparsable(),
        "docs/extra.md: mstok train --config configs/mstok_tiny.toml --no-such-flag",
    ]


def test_every_path_a_command_reads_was_written_before() -> None:
    commands = runnable_commands()
    # the reading order: SemTok's page (its reference network, two stages, eval), then the training page
    assert [argv[0] for argv in commands][:6] == ["reference", "train", "train", "eval", "train", "train"]
    missing = unwritten_reads()
    assert not missing, f"paths no earlier command (in reading order) creates: {missing}"


def test_the_path_check_catches_a_path_nobody_wrote() -> None:
    reads, _ = reads_and_writes(["sample", "--generator", "runs/maskgit_tiny", "--tokenizer", "runs/titok_tiny"])
    written = ["runs/mstok_tiny", "runs/maskgit_tiny"]
    assert [path for path in reads if not _created(path, written)] == ["runs/titok_tiny"]


def test_the_path_check_follows_the_reading_order() -> None:
    """A page that reads what only a later page writes is caught; in the other order it passes."""
    reader = "# R\n\n```bash\nmstok eval --checkpoint runs/later --data ../shared/datasets/tiny-imagenet-64\n```\n"
    writer = "# W\n\n```bash\nmstok train --config configs/mstok_tiny.toml --set out_dir=runs/later\n```\n"
    assert unwritten_reads({"docs/a.md": reader, "docs/b.md": writer}) == [
        "mstok eval --checkpoint runs/later --data ../shared/datasets/tiny-imagenet-64 reads runs/later"
    ]
    assert unwritten_reads({"docs/a.md": writer, "docs/b.md": reader}) == []


# ------------------------------------------------------------------ the CPU sequences, run
TINY = {
    "train": ["--no-progress", "--set", "steps=2", "batch_size=2", "val_images=2", "data.num_workers=0"],
    "train-proxy": ["--no-progress", "--set", "steps=2", "batch_size=2", "val_images=2", "data.num_workers=0"],
    "train-generator": ["--no-progress", "--set", "steps=2", "batch_size=2", "data.num_workers=0"],
    # eigh: the same FID as sqrtm to 1e-13, seconds instead of a minute for 2048x2048 on one core
    "eval": ["--no-progress", "--no-download", "--num-workers", "0", "--fid-method", "eigh"],
    "pretokenize": ["--no-progress", "--workers", "0", "--device", "cpu"],
    "tokenize": ["--no-progress", "--workers", "0", "--device", "cpu"],
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
def test_the_pages_sequences_run_in_reading_order_on_a_fresh_clone(tmp_path: Path, monkeypatch) -> None:
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "configs", clone / "configs")
    _stand_in_dataset(
        tmp_path / "shared" / "datasets" / "tiny-imagenet-64", per_class=2
    )  # 6 images: each eval runs Inception on them
    # the training split as a folder: the configs read shards or a folder alike (open_image_dataset)
    _stand_in_dataset(tmp_path / "shared" / "datasets" / "tiny-imagenet-64-train")
    _random_inception_cache(tmp_path / "cache")
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(clone)
    for argv in runnable_commands():
        flags = TINY.get(" ".join(argv[:2]), TINY.get(argv[0], []))  # "reference train" has its own
        code = cli.main([*argv, *flags])
        assert code == 0, f"command failed: mstok {shlex.join(argv)}"
    # the Python snippet of docs/generation.md runs on what the commands made
    page, snippet = next(
        (name, body) for name, text in TEXTS.items() for kind, body in BLOCK.findall(text)
        if kind == "python" and "runs/maskgit_tiny" in body
    )  # fmt: skip
    scope: dict = {}
    exec(compile(snippet, page, "exec"), scope)
    assert scope["images"].shape == (2, 3, 64, 64)
    assert (clone / "runs" / "eval" / "reference_stats.npz").is_file()
    assert not list(clone.glob("*.png")) and not list(clone.glob("*.json"))  # nothing written into the clone's root
