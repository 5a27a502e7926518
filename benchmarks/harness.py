"""The benchmark harness: everything the scripts of ``benchmarks/`` share, so that each keeps only its own
rows, tables and figures.

A script imports it as ``import harness`` after putting its own folder on ``sys.path`` (one line), so that
it works run as ``python benchmarks/x.py`` and loaded by path (the tests, ``mstok bench``). No script
imports another. What is here:

* **machine and process**: :func:`machine_line`, :func:`command_line`, the load averages of a run
  (:class:`Clock`), :func:`with_threads`, :func:`synchronize`;
* **command line**: ``--out``/``--no-write``/``--section`` (:func:`add_output_arguments`), ``--data``/
  ``--train-data`` (:func:`add_data_arguments`), the run loop's ``--batch-size``/``--seeds``/``--jobs``/
  ``--threads``/``--work-dir``/``--fresh`` (:func:`add_run_arguments`), the reference network
  (:func:`add_feature_net_argument`, :func:`feature_net`), row names (:func:`chosen`);
* **the run loop** of the training studies: a :class:`Row`, trained or reused from
  ``<work-dir>/<row>[_seedN]/result.json`` (:func:`run_row`, :func:`run_dir`, :func:`run_identity`),
  rows x seeds ``--jobs`` at a time (:class:`Study`, :func:`run_pooled`);
* **shipped configs as rows** (:func:`config_row`, :func:`config_steps`) and SemTok's two stages
  (:func:`semtok_stage_rows`, :func:`run_semtok_stages`: semtok.py, generation.py);
* **held-out evaluation** on Tiny ImageNet's validation images (:func:`held_out_images`,
  :func:`held_out_metrics`, :func:`bit_entropies`, the classes' names: :func:`class_names`);
* **generator runs** on the training images' token shards (:func:`pretokenized`, :func:`generator_config`,
  :func:`run_generator_row`), reused like the rows while their preset builds the same model
  (:func:`unrestated`, :func:`generator_changes`);
* **calibration rows**: each image in its mean colour (:func:`mean_colour_floor`, :func:`mean_colour_row`)
  and the conv autoencoder at equal bits (:func:`conv_ae_vq`, :func:`conv_ae_continuous`);
* **timing** (throughput, train_step, sampling, gpu_check): devices, precisions, timed calls, peak memory,
  models built fast (:func:`fast_init`), the stage rows' trainers (:func:`stage_trainer`, :func:`save_proxies`);
* **tables**: :func:`markdown_table`, mean ± half the spread (:func:`cell`) or ± std (:func:`mean_std`);
* **RESULTS.md**: each benchmark owns one section, replaced in place by its newest run, the replaced
  one appended unchanged to ``history/<benchmark>.md`` (:func:`write_section`, :func:`publish`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import numpy as np
import tomllib
import torch

# mstok's data, training and metrics are imported where they are used: the timing scripts and the row
# subprocesses of quantizer_entropy.py (which measure their own peak memory) need none of them.

T = TypeVar("T")
BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = BENCHMARKS / "RESULTS.md"
DATA = ROOT.parent / "shared" / "datasets" / "tiny-imagenet-64"  # the held-out images
TRAIN_DATA = ROOT.parent / "shared" / "datasets" / "tiny-imagenet-64-train"  # the training shards


# -- machine and process -------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``model name``), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_line(device: str = "cpu") -> str:
    """torch / Python versions, CPU model, cores and threads (and the GPU on CUDA)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = (
        f"torch {torch.__version__}, Python {platform.python_version()}, CPU {cpu_name()}, {cores} cores, "
        f"{torch.get_num_threads()} threads"
    )
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return text


def command_line(script: str, argv: list[str] | None) -> str:
    """How a benchmark was invoked: the real command line, or ``python benchmarks/<script>`` with the
    argv given to ``main`` (the tests, ``mstok bench``)."""
    if argv is None:
        return shlex.join(["python", *sys.argv])
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *argv])


def load_1min() -> float:
    """The 1-minute load average (NaN where the OS has none): above the core count, others compete."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def load_summary(loads: list[float]) -> str:
    """``loads[0]`` taken at the start of a run, the rest after each row."""
    seen = [x for x in loads[1:] if not math.isnan(x)] or [math.nan]
    return f"1-min load average {loads[0]:.2f} at the start, {min(seen):.2f}-{max(seen):.2f} after rows"


class Clock:
    """One invocation of a benchmark: when it started and the 1-minute load averages seen (the first at
    the start, then one as each row ends)."""

    def __init__(self) -> None:
        self.loads = [load_1min()]
        self.started = time.perf_counter()

    def seen(self, load: float | None = None) -> float:
        """Record the load as a row ends (``load``, else now); returns it."""
        self.loads.append(load_1min() if load is None else load)
        return self.loads[-1]

    @property
    def minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60

    def summary(self) -> str:
        return load_summary(self.loads)


def with_threads(threads: int | None, run: Callable[[], T]) -> T:
    """Call ``run`` with ``threads`` torch threads (0 or None = unchanged), restoring the caller's count
    after: ``mstok bench`` and the tests run benchmarks in-process."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return run()
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so wall-clock timings cover it (no-op elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- command line --------------------------------------------------------------------------------------


def names(text: str | None, default: Iterable[str] = ()) -> list[str]:
    """Comma-separated names; ``default`` when ``text`` is None (not given), none when it is ''."""
    return list(default) if text is None else [n.strip() for n in text.split(",") if n.strip()]


def chosen(parser: argparse.ArgumentParser, text: str, known: Iterable[str], default: Iterable[str]) -> list[str]:
    """The row names ``text`` lists (comma-separated; ``default`` when it names none); a parser error
    for a name not in ``known``."""
    known = list(known)
    picked = names(text) or list(default)
    unknown = [n for n in picked if n not in known]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; known: {', '.join(known)}")
    return picked


def add_output_arguments(parser: argparse.ArgumentParser, out: Path = RESULTS, also: str = "") -> None:
    """``--out`` (the markdown file; this benchmark's section of it is replaced), ``--no-write`` (alias
    ``--no-append``: print only; nor ``also``, the figures it would draw) and ``--section`` (the section's
    name; another than the benchmark's own keeps a variant of the run beside the default one)."""
    parser.add_argument("--out", type=Path, default=out, help=f"markdown file to write the section to ({out.name})")
    parser.add_argument(
        "--no-write",
        "--no-append",
        dest="no_write",
        action="store_true",
        help=f"print only; write neither --out{also}",
    )
    parser.add_argument(
        "--section", type=section_name, help="the section of --out to replace (default: the benchmark's own)"
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` (the held-out folder) and ``--train-data`` (the training images), shared by the studies."""
    parser.add_argument("--data", default=str(DATA), help="held-out image folder (tiny-imagenet-64: 200 classes x 40)")
    parser.add_argument(
        "--train-data", default=str(TRAIN_DATA), help="training images: shards or a folder (tiny-imagenet-64-train)"
    )


def check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A clear parser error when either data folder is missing."""
    for flag, path in (("--data", args.data), ("--train-data", args.train_data)):
        if not Path(path).is_dir():
            parser.error(f"{flag} {path} not found (both Tiny ImageNet folders ship in ../shared/datasets)")


FEATURE_NET = "runs/reference"  # where `mstok reference train` saves the reference network by default


def add_feature_net_argument(parser: argparse.ArgumentParser, also: str = "") -> None:
    """``--feature-net``: the reference network that scores FD-ref and top-1 (``also``: what else it does)."""
    text = f"the reference network for FD-ref and top-1 (mstok reference train --out DIR){also}"
    parser.add_argument("--feature-net", default=FEATURE_NET, help=text)


def feature_net(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The reference network of ``--feature-net``; a parser error when it is missing or of another kind."""
    from mstok.persistence import load_reference_net

    try:
        return load_reference_net(args.feature_net)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--feature-net: {error} (train one: mstok reference train --data TRAIN_IMAGES --out DIR)")


def add_run_arguments(parser: argparse.ArgumentParser, work_dir: str, seeds: int, unit: str = "runs") -> None:
    """The run loop's flags: ``--batch-size``, ``--seeds``, ``--jobs``, ``--threads``, ``--work-dir``, ``--fresh``."""
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=seeds, help=f"seeds 0..N-1 per row (default {seeds})")
    parser.add_argument("--jobs", type=int, default=2, help=f"{unit} trained at once (one thread each when > 1)")
    parser.add_argument("--threads", type=int, default=0, help=f"threads per {unit[:-1]} with --jobs 1 (0 = auto)")
    parser.add_argument("--work-dir", default=work_dir)
    parser.add_argument("--fresh", action="store_true", help=f"retrain finished {unit}")


# -- the run loop of the training studies -----------------------------------------------------------------


@dataclass
class Row:
    """One training run of a table: a preset, config-field overrides and run settings."""

    group: str
    preset: str
    model: dict[str, Any] = field(default_factory=dict)
    settings: list[str] = field(default_factory=list)


def recipe() -> list[str]:
    """The tiny AdamW recipe's optimiser settings (:func:`mstok.training.recipes.tiny_settings` of
    ``TINY_ADAMW_OPTIM``), as ``key=value``: the recipe the studies' published tables were measured with
    (the shipped titok/mstok tiny configs moved to Muon on 2026-12-07; RESULTS.md, "Time to quality")."""
    from mstok.training.recipes import TINY_ADAMW_OPTIM, tiny_settings

    return tiny_settings(TINY_ADAMW_OPTIM)


def check_rows(parser: argparse.ArgumentParser, args: argparse.Namespace, rows: Iterable[Row]) -> None:
    """Check that the data folders exist and that each row's model builds: every bad input fails here,
    before any training."""
    from mstok.tokenizers import create_tokenizer

    check_data_arguments(parser, args)
    for row in rows:
        create_tokenizer(row.preset, **row.model)


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal for a ``key=value`` override (a dict becomes an inline table)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are written alike in JSON and TOML


def run_dir(args: argparse.Namespace, name: str, seed: int = 0) -> Path:
    """Where :func:`run_row` trains row ``name`` with ``seed``: ``<work-dir>/<name as a slug>[_seed<seed>]``."""
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return Path(args.work_dir) / (slug if seed == 0 else f"{slug}_seed{seed}")


def run_identity(row: Row, args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """The settings a finished run's ``result.json`` must record to be reused."""
    identity = {"preset": row.preset, "model": row.model, "settings": row.settings, "steps": args.steps,
                "batch_size": args.batch_size, "val_every": args.val_every, "val_images": args.val_images,
                "train_data": Path(args.train_data).name, "held_out": Path(args.data).name,
                "final_images": getattr(args, "final_images", 0)}  # fmt: skip
    if seed:
        identity["seed"] = seed  # seed 0 leaves the identity (and finished rows) as before
    return identity


def config_changes(saved: Any, now: Any) -> str:
    """The fields in which two model configs differ, as ``field: saved -> now`` (empty when alike); compared
    as their JSON reads back (a nested tuple and the list it was saved as are alike)."""
    old, new = (json.loads(json.dumps(c.to_dict())) for c in (saved, now))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(new) if old.get(k) != new[k])


def tokenizer_changes(config: Any) -> str:
    """How the tokenizer a finished run of train config ``config`` saved differs from what ``config`` builds
    today (:func:`config_changes`; a message when the model is missing). A run's identity
    (:func:`run_identity`) names its preset, not what the preset holds: an edited preset is caught here."""
    from mstok.persistence import load_tokenizer
    from mstok.training.components import load_proxy
    from mstok.training.trainer import tokenizer_model_config

    try:
        saved = load_tokenizer(config.out_dir).config
    except FileNotFoundError:  # result.json without its checkpoint (deleted by hand)
        return f"no model saved in {config.out_dir}"
    copies = config.stage.pixel_decoder_from_proxy and config.proxy.checkpoint  # the only way a proxy shapes it
    proxy = load_proxy(config.proxy.checkpoint, config.proxy.weights) if copies else None
    return config_changes(saved, tokenizer_model_config(config, proxy))


LOGGED_TERMS = ("l1", "mse", "entropy", "commitment", "codebook", "usage", "perplexity")


def run_row(name: str, row: Row, args: argparse.Namespace, threads: int, seed: int = 0) -> dict[str, Any]:
    """Train ``row`` (named ``name``) with ``seed`` for ``args.steps`` steps, or reuse the finished run in
    :func:`run_dir` (unless ``args.fresh``); return its val history, timings and the held-out metrics of
    its EMA weights on ``args.final_images`` images (the validation images when 0)."""
    from mstok.training import Trainer, load_train_config

    out = run_dir(args, name, seed)
    identity = run_identity(row, args, seed)
    settings = [
        f"model.preset='{row.preset}'",
        f"steps={args.steps}",
        f"batch_size={args.batch_size}",
        f"out_dir='{out}'",
        f"val_every={args.val_every}",
        f"ckpt_every={args.steps}",
        "keep_last=1",
        f"log_every={args.val_every}",
        "tensorboard=false",
        "data.num_workers=0",
        f"threads={threads}",
        f"seed={seed}",
        *row.settings,
        *[f"model.overrides.{k}={toml_value(v)}" for k, v in row.model.items()],
    ]
    config = load_train_config(None, settings)
    saved = saved_run(out / "result.json", identity, args.fresh)
    if saved is not None:
        changed = tokenizer_changes(config)
        if not changed:
            return saved
        print(f"{out}: {changed} (preset {row.preset!r}): training again")
    if out.exists():
        shutil.rmtree(out)  # a stale or unfinished run: the trainer would resume it
    train = training_images(args.train_data)
    val_images = held_out_images(args.data, tuple(held_out_indices(args.data, args.val_images)))
    final_count = getattr(args, "final_images", 0)  # 0: measure the validation images
    measured = (
        held_out_images(args.data, tuple(held_out_indices(args.data, final_count))) if final_count else val_images
    )
    trainer = Trainer(config, dataset=train, val_images=val_images, progress=False)
    started = time.perf_counter()
    history = trainer.fit()
    result = {
        "identity": identity,
        **held_out_metrics(trainer.ema.module, measured),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "val": [{k: v for k, v in r.items() if k != "event"} for r in trainer.val_history],
        "loss": [[h["step"], h["loss"]] for h in history if "loss" in h],
        # the loss terms as logged (reconstruction and the quantizer's own terms), for diagnoses
        "terms": [{k: h[k] for k in ("step", *LOGGED_TERMS) if k in h} for h in history if "loss" in h],
        "seconds_per_step": trainer.train_seconds / args.steps,
        "wall_seconds": time.perf_counter() - started,
    }
    save_result(out, result)
    return result


def saved_run(
    path: Path,
    identity: dict[str, Any],
    fresh: bool,
    key: str = "identity",
    where: Sequence[str] = (),
    same: Callable[[dict[str, Any]], dict[str, Any]] = lambda settings: settings,
) -> dict[str, Any] | None:
    """The result saved at ``path`` by a finished run whose ``key`` records ``identity``; None when there is
    none, it was made with other settings, or ``fresh`` asks to retrain. ``where``: dotted keys of paths that
    say where a run lives, not what it is (the same work dir spelt another way must not retrain it); ``same``
    maps both sides to a form where settings that mean the same compare equal."""

    def what(settings: dict[str, Any]) -> dict[str, Any]:
        settings = copy.deepcopy(settings)
        for dotted in where:
            *parents, last = dotted.split(".")
            functools.reduce(lambda d, k: d.get(k, {}), parents, settings).pop(last, None)
        return same(settings)

    if path.is_file() and not fresh:
        saved = json.loads(path.read_text())
        if what(saved.get(key) or {}) == what(identity):
            return saved
    return None


def save_result(folder: Path, result: dict[str, Any]) -> None:
    """Write a run's ``result.json`` (also after adding an evaluation to it); a write cut off midway leaves
    the previous file whole (written beside it, then renamed over it)."""
    partial = folder / "result.json.partial"
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(folder / "result.json")


def run_pooled(
    jobs: int, tasks: dict[Any, Callable[[], Any]], report: Callable[[Any, Any], str], loads: list[float]
) -> dict[Any, Any]:
    """Run ``tasks`` (picklable zero-argument callables: ``functools.partial`` of a module-level
    function) ``jobs`` at a time in worker processes and return their results by key, in the
    tasks' order. As each result is collected (in that order), ``report(key, result)`` is
    printed and the 1-minute load appended to ``loads`` (for :func:`load_summary`).

    One job runs the tasks in this process: a worker forked after this process ran multithreaded
    torch ops inherits an OpenMP pool whose threads did not survive the fork, and its first
    parallel op with more than one thread waits for them forever (seen: a 2-thread curve run hung
    in its model's constructor). Pooled workers run one thread each (:class:`Study`)."""
    done: dict[Any, Any] = {}

    def collected(key: Any, result: Any) -> None:
        done[key] = result
        loads.append(load_1min())
        print(report(key, result), flush=True)

    if jobs == 1:
        for key, task in tasks.items():
            collected(key, task())
        return done
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {key: pool.submit(task) for key, task in tasks.items()}
        for key, future in futures.items():
            collected(key, future.result())
    return done


def by_row(done: dict[tuple[str, int], Any]) -> dict[str, list[Any]]:
    """``{(row, seed): result}`` -> ``{row: [result of each seed]}``, rows in first-seen order."""
    rows: dict[str, list[Any]] = {}
    for (name, _seed), result in done.items():
        rows.setdefault(name, []).append(result)
    return rows


SEED_TAG = " [seed "


def seeded_name(name: str, seed: int) -> str:
    """A row's table name for ``seed``: the row's own name for seed 0, ``name [seed s]`` otherwise."""
    return name if seed == 0 else f"{name}{SEED_TAG}{seed}]"


class Study(Clock):
    """One invocation of a training benchmark: its clock and loads, and the threads of each run
    (one each when ``--jobs`` > 1, else ``--threads``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.threads = 1 if args.jobs > 1 else args.threads

    def run(self, tasks: dict[Any, Callable[[], Any]], report: Callable[[Any, Any], str]) -> dict[Any, Any]:
        """:func:`run_pooled` ``--jobs`` at a time."""
        return run_pooled(self.args.jobs, tasks, report, self.loads)

    def pace(self, unit: str = "runs") -> str:
        """How the run went, for the notes: jobs and threads, minutes, load averages."""
        return (
            f"{self.args.jobs} {unit} at a time ({self.threads or 'auto'} thread(s) each); {self.minutes:.0f} min "
            f"in all (reused {unit} count 0); {self.summary()}"
        )


# -- shipped configs as rows, and SemTok's two stages (semtok, generation) -------------------------------------

CONFIGS = ROOT / "configs"
# top-level fields run_row sets itself (or that only a CLI run needs), and the tables it replaces
RUN_FIELDS = {"steps", "batch_size", "seed", "out_dir", "log_every", "ckpt_every", "sample_every", "val_every",
              "val_images"}  # fmt: skip
RUN_TABLES = {"data"}


def config_row(path: Path, group: str, extra: Sequence[str] = ()) -> Row:
    """A shipped config as a :class:`Row`: its preset, ``model.overrides`` and every other
    setting as ``key=value`` (``model.init_from`` is left to the caller), then ``extra``."""
    table = tomllib.loads(path.read_text())
    model = table.pop("model")
    settings = []

    def flatten(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and key != "spec":  # teacher.spec may be a table itself
                flatten(f"{prefix}{key}.", value)
            else:
                settings.append(f"{prefix}{key}={toml_value(value)}")

    for key, value in table.items():
        if key in RUN_TABLES or key in RUN_FIELDS:
            continue
        if isinstance(value, dict):
            flatten(f"{key}.", value)
        else:
            settings.append(f"{key}={toml_value(value)}")
    return Row(group, model["preset"], dict(model.get("overrides", {})), [*settings, *extra])


def config_steps(path: Path) -> int:
    """The ``steps`` a shipped config trains for."""
    return int(tomllib.loads(path.read_text())["steps"])


def config_batch_size(path: Path) -> int:
    """The ``batch_size`` a shipped config trains with."""
    return int(tomllib.loads(path.read_text())["batch_size"])


SEMTOK_CONFIGS = (CONFIGS / "semtok_tiny_stage1.toml", CONFIGS / "semtok_tiny_stage2.toml")
# SemTok's lambda_s, the weight of each semantic term a pipeline trains (the shipped config trains
# distillation alone: benchmarks/RESULTS.md, "SemTok at tiny scale")
SEMANTIC_WEIGHT = 0.05
# pipeline name -> the semantic terms its stage I trains (mstok.tokenizers.semtok.SEMANTIC_TERMS and its
# subsets): SemTok Table 4's four lines (names without commas: --rows)
SEMTOK_PIPELINES: dict[str, tuple[str, ...]] = {
    "semantic": ("distill", "contrastive"),
    "no semantic": (),
    "contrastive only": ("contrastive",),
    "distill only": ("distill",),
}


def semtok_stage_one_settings(terms: tuple[str, ...]) -> list[str]:
    """What stage I sets on top of the shipped config for a pipeline with ``terms``: each term's
    weight (``SEMANTIC_WEIGHT`` or 0, whatever the config says); with none, the projections are
    not trained either."""
    both = SEMTOK_PIPELINES["semantic"]
    weights = [f"loss.{term}_weight={SEMANTIC_WEIGHT if term in terms else 0}" for term in both]
    if terms:
        return weights
    stage1 = tomllib.loads(SEMTOK_CONFIGS[0].read_text())
    train = [name for name in stage1["stage"]["train"] if name != "semantic"]
    return [*weights, f"stage.train={toml_value(train)}"]


def semtok_stage_rows(
    name: str, args: argparse.Namespace, seed: int, model: dict[str, Any] | None = None, first_extra: Sequence[str] = ()
) -> dict[str, Row]:
    """The stage-I and stage-II rows of SemTok pipeline ``name`` (stage II starts from stage I's run
    folder). The model is built with the projections of the pipeline's terms (both stages, so stage
    II loads stage I's weights); without terms, with both, left untrained (the paper's ablation).
    ``model``: more model overrides of both stages; ``first_extra``: more settings of stage I."""
    terms = SEMTOK_PIPELINES[name]
    first = f"stage I {name}"
    init = f"model.init_from={toml_value(str(run_dir(args, first, seed)))}"
    rows = {
        first: config_row(SEMTOK_CONFIGS[0], "stage I", [*semtok_stage_one_settings(terms), *first_extra]),
        f"stage II {name}": config_row(SEMTOK_CONFIGS[1], "stage II", [init]),
    }
    for row in rows.values():
        row.model.update(model or {})
        row.model["semantic_terms"] = list(terms or SEMTOK_PIPELINES["semantic"])
    return rows


def stage_args(args: argparse.Namespace, steps: int, fresh: bool = False) -> argparse.Namespace:
    """``args`` for one :func:`run_row` call: ``steps`` steps, validated (and logged) at the end only."""
    return argparse.Namespace(**{**vars(args), "steps": steps, "val_every": steps, "fresh": args.fresh or fresh})


RunFunction = Callable[[str, Row, argparse.Namespace, int, int], dict[str, Any]]


def run_semtok_stages(
    rows: dict[str, Row],
    args: argparse.Namespace,
    threads: int,
    seed: int,
    steps: tuple[int, int],
    run: RunFunction = run_row,
) -> dict[str, dict[str, Any]]:
    """Stage I then stage II (``rows``, :func:`semtok_stage_rows`) for ``steps`` steps each with ``seed``,
    each by ``run`` (:func:`run_row`, or a script's run that evaluates too); returns both results by row
    name. A reused stage II is retrained when the stage I it started from is not the one on disk now (its
    result records which: the stage-I run's identity and wall time)."""
    (first, row1), (second, row2) = rows.items()
    result1 = run(first, row1, stage_args(args, steps[0]), threads, seed)
    stamp = {"identity": result1["identity"], "wall_seconds": result1["wall_seconds"]}
    done2 = run_dir(args, second, seed) / "result.json"
    stale = done2.is_file() and json.loads(done2.read_text()).get("stage1") != stamp
    result2 = run(second, row2, stage_args(args, steps[1], fresh=stale), threads, seed)
    if result2.get("stage1") != stamp:
        result2["stage1"] = stamp
        save_result(done2.parent, result2)
    return {first: result1, second: result2}


# -- held-out evaluation -------------------------------------------------------------------------------------


@functools.cache  # a worker process trains several rows: list the folder once
def folder_labels(data: str) -> tuple[int, ...]:
    """The class index (sorted class folders) of every image of the held-out folder, in its order."""
    from mstok.data import ImageFolder, center_crop_transform

    return tuple(label for _, label in ImageFolder(data, center_crop_transform(64)).samples)


@functools.cache
def class_names(data: str) -> tuple[str, ...]:
    """The name of each class of the held-out folder, by class index (its sorted class folders): the
    ``class_name`` of its ``manifest.csv`` where it has one (Tiny ImageNet's words), else the folder's name."""
    import csv

    folders = sorted(p.name for p in Path(data).iterdir() if p.is_dir())
    manifest = Path(data) / "manifest.csv"
    if not manifest.is_file():
        return tuple(folders)
    with manifest.open(newline="") as file:
        named = {int(r["class_idx"]): r["class_name"] for r in csv.DictReader(file) if r.get("class_name")}
    return tuple(named.get(i, folder) for i, folder in enumerate(folders))


def held_out_indices(data: str, val_count: int) -> list[int]:
    """``val_count`` indices of the held-out folder, spread over the classes: the first image of
    every class, then the second of every class, and so on."""
    labels = folder_labels(data)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    rounds = max(len(members) for members in by_class.values())
    spread = [i for r in range(rounds) for members in by_class.values() for i in members[r : r + 1]]
    if val_count > len(spread):
        raise ValueError(f"--val-images {val_count}: {data} has only {len(spread)} images")
    return spread[:val_count]


def training_images(train_data: str, transform: Any = None) -> Any:
    """The training images (shards or a folder) with the studies' augmentation (random crops of
    80-100% of the area and flips) unless ``transform`` is given."""
    from mstok.data import RandomResizedCropFlip, open_image_dataset

    return open_image_dataset(train_data, transform or RandomResizedCropFlip(64, (0.8, 1.0)))


@functools.cache
def held_out_images(data: str, indices: tuple[int, ...]) -> torch.Tensor:
    """The held-out images, center-cropped: (N, 3, 64, 64) in [0, 1]."""
    from mstok.data import ImageFolder, center_crop_transform

    fixed = ImageFolder(data, center_crop_transform(64))
    return torch.stack([fixed[(i, 0)][0] for i in indices])


def held_out_labels(data: str, indices: tuple[int, ...]) -> torch.Tensor:
    """The class index of each of :func:`held_out_images`' images: (N,) int64."""
    labels = folder_labels(data)
    return torch.tensor([labels[i] for i in indices], dtype=torch.long)


def held_out(data: str, count: int) -> torch.Tensor:
    """The first ``count`` held-out images of :func:`held_out_indices` (one per class first)."""
    return held_out_images(data, tuple(held_out_indices(data, count)))


def bit_entropies(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, ...) int64 bit ids (LFQ, BSQ) -> (..., C) the binary entropy of each bit over the N ids,
    in bits: 1 = a fair coin, 0 = the same value for every id."""
    p = ((ids[..., None] >> torch.arange(bits)) & 1).double().mean(0)  # share of ones
    return (-torch.special.xlogy(p, p) - torch.special.xlogy(1 - p, 1 - p)) / math.log(2)


@torch.no_grad()
def reference_scores(net: Any, real: torch.Tensor, recon: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """FD-ref between real images and their reconstructions (B, 3, H, W) in the reference network's
    feature space, and its top-1 on each (:class:`ReferenceMeter`, the meter of ``mstok eval``)."""
    from mstok.evaluation.reference import ReferenceMeter

    meter = ReferenceMeter(net)
    for a, b, y in zip(real.split(500), recon.split(500), labels.split(500), strict=True):
        meter.update(a, b, y)
    return meter.results()


@torch.no_grad()
def held_out_metrics(model: torch.nn.Module, images: torch.Tensor, batch: int = 250) -> dict[str, float]:
    """PSNR and SSIM of ``model``'s reconstructions of ``images`` and, for a tokenizer with ids,
    the quantizer's usage statistics of them (the fraction of the codebook used, the code
    perplexity) and for bit ids (LFQ, BSQ) the mean and least binary entropy of a bit."""
    from mstok.evaluation.metrics import psnr, ssim

    model.eval()
    ids, scores = [], {"psnr": [], "ssim": []}
    for chunk in images.split(batch):
        out = model(chunk)
        if out.reconstruction is not None:  # None: a flow decoder (SemTok stage I) or a proxy-code head
            scores["psnr"].append(psnr(chunk, out.reconstruction))
            scores["ssim"].append(ssim(chunk, out.reconstruction))
        if out.indices is not None:
            ids.append(out.indices)
    metrics = {f"final_{k}": float(np.mean([x for part in v for x in part])) for k, v in scores.items() if v}
    metrics["final_images"] = len(images)
    if model.vocab_size is None or not ids:
        return metrics
    flat = torch.cat(ids).reshape(-1)
    stats = model.quantizer.usage(flat)  # exact counts up to 2^20 codes; distinct ids / V above
    metrics["usage"] = float(stats["usage"])
    metrics["perplexity"] = float(stats.get("perplexity", stats.get("batch_perplexity")))
    if model.config.quantizer_spec().kind in ("lfq", "bsq"):  # bit ids (a VQ id's bits mean nothing)
        entropies = bit_entropies(flat, model.config.code_dim)
        metrics["bit_entropy"], metrics["bit_entropy_min"] = float(entropies.mean()), float(entropies.min())
    return metrics


# -- generator runs: token shards and generators on them, reused like the rows (generation) ---------------------


def pretokenized(
    tokenizer: torch.nn.Module, folder: Path, train_data: str, out: Path, count: int = 0, fresh: bool = False
) -> Path:
    """``out`` holding the tokens of the first ``count`` training images (0: all) and of their flips by
    ``tokenizer`` (from run ``folder``): reused when they are that tokenizer's of as many images, else written
    again (:func:`mstok.data.tokens.pretokenize`, as ``mstok pretokenize --flip``)."""
    from mstok.data import IndexSubset, center_crop_transform
    from mstok.data.tokens import identity_differences, pretokenize, tokenizer_identity

    images = training_images(train_data, center_crop_transform(tokenizer.config.image_size))
    count = min(count or len(images), len(images))
    index = out / "index.json"
    if index.is_file() and not fresh:
        saved = json.loads(index.read_text())
        same = not identity_differences(saved["tokenizer"], tokenizer_identity(tokenizer))
        if same and saved["num_images"] == count and saved["views"] == 2:
            return out
    shutil.rmtree(out, ignore_errors=True)
    images = IndexSubset(images, list(range(count))) if count < len(images) else images
    pretokenize(tokenizer, images, out, flip=True, progress=False, source=train_data, checkpoint=str(folder))
    return out


def generator_config(
    path: Path, tokens: Path, out: Path, steps: int, seed: int, threads: int, extra: Sequence[str] = ()
) -> Any:
    """The shipped generator config ``path`` on the token shards ``tokens``, trained into ``out`` for ``steps``
    steps with ``seed`` and ``threads`` threads, one checkpoint at the end and no sample grids, then ``extra``."""
    from mstok.training import load_train_config
    from mstok.training.config import GeneratorTrainConfig

    settings = [
        f"data.path={toml_value(str(tokens))}", f"out_dir={toml_value(str(out))}", f"steps={steps}", f"seed={seed}",
        f"ckpt_every={steps}", "keep_last=1", "sample_every=0", "tokenizer=''", "tensorboard=false",
        f"threads={threads}", "data.num_workers=0", *extra,
    ]  # fmt: skip
    return load_train_config(path, settings, kind=GeneratorTrainConfig)


def unrestated(identity: dict[str, Any]) -> dict[str, Any]:
    """A generator run's identity less the ``model.overrides`` that restate what its preset holds today: a
    config that spells a preset value out and one that leaves it to the preset train the same model (a
    preset edited since is :func:`generator_changes`'s to catch)."""
    from mstok.generators.registry import preset_family

    model = identity.get("model") or {}
    preset = model.get("preset")
    if not isinstance(preset, str) or not isinstance(model.get("overrides"), dict):
        return identity
    try:
        held = preset_family(preset).presets[preset]
    except (KeyError, ValueError):  # a preset that no longer exists: nothing restates it
        return identity
    as_saved = json.loads(json.dumps(held))  # tuples as lists, as a result.json reads back
    overrides = {k: v for k, v in model["overrides"].items() if k not in as_saved or as_saved[k] != v}
    return {**identity, "model": {**model, "overrides": overrides}}


def generator_changes(config: Any) -> str:
    """How the model a finished generator run of ``config`` saved differs from what ``config`` builds today,
    as ``field: saved -> now`` (empty when alike; a message when the model is missing). The identity of
    :func:`run_generator_row` is the train config, which names a preset but not what the preset holds: an
    edited preset is caught here, and runs whose preset is unchanged stay reusable."""
    from mstok.data.tokens import TokenDataset
    from mstok.persistence import load_generator
    from mstok.training.generator_trainer import generator_model_config

    try:
        saved = load_generator(config.out_dir).config
    except FileNotFoundError:  # result.json without its model (deleted by hand): nothing to sample from
        return f"no model saved in {config.out_dir}"
    return config_changes(saved, generator_model_config(config, TokenDataset(config.data.path)))


def run_generator_row(config: Any, fresh: bool = False) -> dict[str, Any]:
    """Train the generator of ``config`` (:func:`generator_config`) into its ``out_dir``, or reuse the finished
    run whose ``result.json`` beside it records the same config and tokens (unless ``fresh``); returns that
    result: identity, parameters, loss curve, seconds per step."""
    from mstok.training.generator_trainer import GeneratorTrainer

    folder = Path(config.out_dir).parent
    index = json.loads((Path(config.data.path) / "index.json").read_text())
    # the config as result.json reads it back (tuples as lists), less the threads, and the tokens it trains on
    identity = {**json.loads(config.to_json()), "threads": None, "images": index["num_images"],
                "tokens": index["tokenizer"]["weights_sha256"]}  # fmt: skip
    saved = saved_run(folder / "result.json", identity, fresh, where=("out_dir", "data.path"), same=unrestated)
    if saved is not None:
        changed = generator_changes(config)
        if not changed:
            return saved
        print(f"{folder}: {changed} (preset {config.model.preset!r}): training again")
    shutil.rmtree(folder, ignore_errors=True)  # a stale or unfinished run: the trainer would resume it
    trainer = GeneratorTrainer(config, progress=False)
    history = trainer.fit()
    result = {
        "identity": identity,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "loss": [[h["step"], h["loss"]] for h in history if "loss" in h],
        "seconds_per_step": trainer.train_seconds / config.steps,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_result(folder, result)
    return result


# -- calibration rows ------------------------------------------------------------------------------------------

MEAN_COLOUR = "each image in its mean colour"


def mean_colour_floor(data: str, val_images: int) -> tuple[float, float]:
    """(PSNR, SSIM) of painting each held-out image in its own mean colour: the floor every row is read against."""
    from mstok.evaluation.metrics import mean_colour, psnr, ssim

    images = held_out(data, val_images)
    flat = mean_colour(images)
    return float(np.mean(psnr(images, flat))), float(np.mean(ssim(images, flat)))


def mean_colour_row(width: int, cells: dict[int, str]) -> list[str]:
    """The mean-colour calibration as a table row of ``width`` cells: ``cells`` by column, '-' elsewhere."""
    return [MEAN_COLOUR, *(cells.get(i, "-") for i in range(1, width))]


def conv_ae_vq() -> tuple[str, Row]:
    """The conv autoencoder with a discrete bottleneck at equal bits (64 codes of V = 32 = 320 bits)."""
    return "conv AE VQ 8x8 V=32 (320 bits)", Row("calibration", "convae_tiny", {}, recipe())


def conv_ae_continuous() -> tuple[str, Row]:
    """The conv autoencoder with a continuous 8 x 8 x 6 bottleneck (384 floats)."""
    return "conv AE continuous 8x8x6", Row(
        "calibration", "convae_tiny", {"quantizer": "none", "use_l2_norm": False}, recipe()
    )


# The papers' settings of the bit quantizers, before this project's defaults: the codebook entropy
# over the whole batch, MAGVIT-v2's LFQ (inverse temperature 100, commitment 0.25, no normalisation)
# and BSQ-ViT's BSQ (inverse temperature 1). Measured in RESULTS.md ("Binary quantizers that keep
# their codes: diagnosis"): at this scale every token position settles on one code whatever the image
# (LFQ: all latents +1).
MAGVIT_LFQ = {"type": "lfq", "entropy_weight": 0.1, "entropy_per_position": False, "inverse_temperature": 100.0,
              "commitment_weight": 0.25, "layer_norm": False}  # fmt: skip
BSQ_VIT = {"type": "bsq", "entropy_weight": 0.1, "entropy_per_position": False, "inverse_temperature": 1.0}


# -- timing ------------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the proxy whose code grid matches the patch grid of the presets at that resolution
PROXY_FOR_SIZE = {256: "maskgit_vqgan_f16", 64: "vqgan_tiny"}


def timing_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """The command line the timing benchmarks share: the output flags (:func:`add_output_arguments`),
    ``--quick`` (help ``quick``), ``--device`` (auto, cpu, cuda) and ``--threads`` (torch intra-op threads)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_output_arguments(parser)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    return parser


def list_help(what: str, default: Iterable[str], quick: Iterable[str]) -> str:
    """Help for a comma-separated list whose default depends on ``--quick``."""
    return f"comma-separated {what} (default: {','.join(default)}; --quick: {','.join(quick)}; '' for none)"


def add_repeat_arguments(
    parser: argparse.ArgumentParser, count: str, unit: str, most: str, budget: str, warmup: str
) -> None:
    """How often a row is timed: ``count`` (``--reps``, ``--steps``: the most timed ``unit``s per row, by
    default ``most``), ``--budget`` (seconds of them, by default ``budget``) and ``--warmup`` (help ``warmup``)."""
    parser.add_argument(count, type=int, help=f"most timed {unit}s per row (default {most})")
    parser.add_argument(
        "--budget", type=float, help=f"seconds of timed {unit}s per row before stopping (default {budget})"
    )
    parser.add_argument("--warmup", type=int, default=1, help=warmup)


def resolve_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Set ``args.device`` (auto: CUDA when there is one); a parser error for CUDA without one. True on CUDA."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return args.device == "cuda"


def check_timing(parser: argparse.ArgumentParser, args: argparse.Namespace, count: str, modes: str) -> None:
    """Parser errors for what the timing benchmarks share: fewer than one timed call per row (``count``:
    ``--reps`` or ``--steps``), a negative ``--warmup`` or ``--budget``, no mode or a mode that is not
    ``PRECISION[+compile]`` in ``modes`` (the flag: ``--modes``, ``--precisions``)."""
    if getattr(args, count[2:]) < 1 or args.warmup < 0 or args.budget < 0:
        parser.error(f"{count} must be >= 1; --warmup and --budget >= 0")
    chosen_modes = getattr(args, modes[2:])
    if not chosen_modes:
        parser.error(f"{modes} names no precision")
    for mode in chosen_modes:
        precision, _, extra = mode.partition("+")
        if precision not in DTYPES or extra not in ("", "compile"):
            parser.error(f"{modes}: {mode!r} is not PRECISION[+compile] with PRECISION fp32, bf16 or fp16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (nothing for fp32)."""
    return torch.autocast(device.type, dtype=DTYPES[precision]) if precision != "fp32" else contextlib.nullcontext()


def timed(device: torch.device | str, call: Callable[[], T]) -> tuple[T, float]:
    """``call()`` and its wall-clock seconds, CUDA synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = call()
    synchronize(device)
    return out, time.perf_counter() - start


def time_calls(call: Callable[[], Sequence[float]], warmup: int, reps: int, budget: float) -> list[Sequence[float]]:
    """``warmup`` untimed calls, then timed calls until ``reps`` are done or ``budget`` seconds of them
    have passed (at least one). ``call`` returns the seconds it measured (one part or several); the
    timed calls' are returned."""
    times: list[Sequence[float]] = []
    for i in range(warmup + reps):
        if i >= warmup and times and sum(sum(t) for t in times) >= budget:
            break
        seconds = call()
        if i >= warmup:
            times.append(seconds)
    return times


def reset_peak(device: torch.device | str) -> None:
    """Start counting peak memory (CUDA; nothing elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device | str) -> int | None:
    """Peak allocated memory since :func:`reset_peak` (CUDA; None elsewhere)."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def failure(err: Exception) -> str:
    """Print the traceback of a row that failed; its error in one short line, for the table."""
    traceback.print_exc()
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def release(device: torch.device | str, compiled: bool = False) -> None:
    """Free what a finished model held: garbage, the CUDA cache, torch.compile's caches."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()


@contextlib.contextmanager
def compiled_parts(owner: Any, parts: Iterable[str], enabled: bool) -> Iterator[None]:
    """Swap ``owner``'s networks ``parts`` (those it has) for ``torch.compile`` versions while the block runs."""
    present = [n for n in parts if getattr(owner, n, None) is not None]
    originals = {n: getattr(owner, n) for n in present}
    try:
        if enabled:
            for n in present:
                setattr(owner, n, torch.compile(originals[n]))
        yield
    finally:
        for n, module in originals.items():
            setattr(owner, n, module)
        if enabled:
            torch._dynamo.reset()


@contextlib.contextmanager
def fast_init() -> Iterator[None]:
    """Build models with a clamped normal in place of ``torch.nn.init.trunc_normal_``.

    torch's truncated normal resamples by rejection, so initialising a B-size model takes ~40 s
    on 2 cores (L several times more); the weight values do not change the cost of any op here.
    """

    def trunc_normal(
        tensor: torch.Tensor,
        mean: float = 0.0,
        std: float = 1.0,
        a: float = -2.0,
        b: float = 2.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            return tensor.normal_(mean, std, generator=generator).clamp_(a, b)

    with mock.patch.object(torch.nn.init, "trunc_normal_", trunc_normal):
        yield


# -- the stage rows of the training-step benchmarks (train_step, gpu_check) -----------------------------------

STAGE_TEXT = {"single": "single (L1+MSE+VQ)", "stage1": "stage 1 (proxy CE+VQ)", "stage2": "stage 2 (MSE+GAN)"}


def stage_overrides(stage: str, proxy_dir: Path | None) -> list[str]:
    """Config overrides of a stage (``single``, ``stage1``, ``stage2``), as the two-stage recipes in
    ``configs/`` set them: stage 1 trains the proxy-code cross-entropy + VQ, stage 2 the decoder and the
    proxy's pixel decoder on MSE + PatchGAN (weight 0.01, from step 0, so the discriminator step runs)."""
    if stage == "single":
        return []
    common = ["model.overrides.head='proxy_codes'", f"proxy.checkpoint='{proxy_dir}'"]
    if stage == "stage1":
        return [*common, "loss.l1_weight=0", "loss.mse_weight=0", "loss.proxy_ce_weight=1"]
    return [
        *common,
        "stage.pixel_decoder_from_proxy=true",
        "stage.train=['decoder', 'pixel_decoder']",
        "loss.l1_weight=0",
        "loss.mse_weight=1",
        "loss.gan_weight=0.01",
        "loss.gan_start_step=0",
    ]


def save_proxies(presets: Iterable[str], tmp: Path, quick_init: bool = False) -> dict[int, Path]:
    """A randomly initialised proxy folder (:data:`PROXY_FOR_SIZE`) per image size of ``presets``, saved
    under ``tmp``: the frozen MaskGIT-VQGAN whose codes the stage rows train against (``quick_init``:
    built with :func:`fast_init`)."""
    from mstok.tokenizers import create_tokenizer
    from mstok.tokenizers.registry import preset_config

    proxies = {}
    for size in sorted({preset_config(name).image_size for name in presets}):
        torch.manual_seed(0)
        with fast_init() if quick_init else contextlib.nullcontext():
            proxies[size] = create_tokenizer(PROXY_FOR_SIZE[size]).save_pretrained(tmp / f"proxy_{size}")
    return proxies


def stage_trainer(
    preset: str,
    stage: str,
    mode: str,
    device: str,
    batch_size: int,
    steps: int,
    proxies: dict[int, Path],
    tmp: Path,
    quick_init: bool = False,
) -> Any:
    """The project's :class:`~mstok.training.Trainer` for ``preset`` trained in ``stage`` (``single``,
    ``stage1``, ``stage2``: :func:`stage_overrides`, with the proxy of its image size from ``proxies``) in
    ``mode`` (``PRECISION[+compile]``), with a schedule of ``steps`` steps, writing (nothing, unless a
    step saves) under ``tmp``; fed by a one-image in-memory dataset, never read while timing.
    ``quick_init``: build the model with :func:`fast_init` (same compute, faster to build)."""
    from PIL import Image

    from mstok.data import InMemoryImages, center_crop_transform
    from mstok.tokenizers.registry import preset_config
    from mstok.training import Trainer, load_train_config

    precision, _, extra = mode.partition("+")
    image_size = preset_config(preset).image_size
    proxy_dir = proxies.get(image_size) if stage != "single" else None
    config = load_train_config(
        None,
        [
            f"model.preset='{preset}'",
            f"batch_size={batch_size}",
            f"precision='{precision}'",
            f"compile={'true' if extra == 'compile' else 'false'}",
            f"device='{device}'",
            f"steps={steps}",
            "tensorboard=false",
            "data.num_workers=0",
            f"threads={torch.get_num_threads()}",  # keep --threads (the engine would pick its own)
            f"out_dir='{tmp / 'run'}'",
            *stage_overrides(stage, proxy_dir),
        ],
    )
    dataset = InMemoryImages([Image.new("RGB", (image_size, image_size))], center_crop_transform(image_size))
    with fast_init() if quick_init else contextlib.nullcontext():
        return Trainer(config, dataset=dataset, progress=False)


@dataclass(kw_only=True)
class Timed:
    """What every timed row records besides its times: peak memory (CUDA), the 1-minute load average as it
    ended, and its error when it failed (its times then empty)."""

    peak_mem_bytes: int | None = None
    load_after: float = math.nan
    error: str | None = None


def per_second(count: int, times: Sequence[float]) -> float:
    """``count`` items over the median of ``times`` (NaN when there is none)."""
    return count / median(times) if times else math.nan


def median(times: Sequence[float]) -> float:
    """The median (NaN when there is none)."""
    return statistics.median(times) if times else math.nan


def gib(nbytes: int | None) -> str:
    """Bytes as GiB with two decimals; '-' when not measured."""
    return f"{nbytes / 2**30:.2f}" if nbytes is not None else "-"


def measured_notes(device: str, synchronised: str, peak_over: str, warmed_on_cpu: str = "") -> tuple[str, str, str]:
    """The notes' words on CUDA synchronisation (``synchronised``: around what), on the peak memory column
    (``peak_over``: over what it is taken) and on when rows are warmed up (on CUDA before each row, on CPU
    ``warmed_on_cpu``); on CPU, there is no synchronisation nor peak memory."""
    if device != "cuda":
        return "", "no peak memory on CPU", warmed_on_cpu
    peak = f"peak mem is `torch.cuda.max_memory_allocated` over {peak_over}"
    return f"CUDA synchronised {synchronised}; ", peak, "before each row"


def load_note(clock: Clock, effect: str) -> str:
    """The notes' line on the machine's load during the run; ``effect``: what a high load does to the rows."""
    return (
        f"- {clock.summary()}; `load 1m` is the 1-minute load average as each row ended. Other processes may share "
        f"this machine: {effect}. Whole run {clock.minutes:.1f} min."
    )


def print_outcome(clock: Clock, blocks: list[str], results: Iterable[Timed], label: Callable[[Any], str]) -> list[str]:
    """Print the tables, a line per failed row (``label(row)``: error) and the run's time and load; returns
    the failed rows as notes."""
    failed = [f"{label(r)}: {r.error}" for r in results if r.error]
    print()
    print("\n\n".join(blocks))
    for label in failed:
        print(f"FAILED {label}")
    print(f"\nTotal {clock.minutes:.1f} min; {clock.summary()}")
    return [f"- FAILED {label}" for label in failed]


# -- tables ------------------------------------------------------------------------------------------------------


def table_line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]], left: int | Iterable[int] = 1) -> str:
    """A markdown table; ``left``: how many leading columns are left-aligned (the rest right-aligned), or
    the indices of the left-aligned ones."""
    lefts = set(range(left)) if isinstance(left, int) else set(left)
    rule = "|" + "|".join("---" if i in lefts else "---:" for i in range(len(head))) + "|"
    return "\n".join([table_line(head), rule, *(table_line(row) for row in rows)])


def cell(values: Iterable[float | None], digits: int) -> str:
    """``mean ± spread/2`` of the seeds (just the value for one seed); '-' when missing."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def pooled(items: Sequence[dict[str, Any]], *columns: tuple[str, int]) -> list[str]:
    """One :func:`cell` per ``(key, digits)`` column, pooling ``item[key]`` over ``items`` (the seeds of a row)."""
    return [cell([item.get(key) for item in items], digits) for key, digits in columns]


def mean_std(values: Sequence[float], digits: int) -> str:
    """``mean ± standard deviation`` over seeds (± 0 for one)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


# -- RESULTS.md: one section per benchmark, replaced in place --------------------------------------------------

# A benchmark's section runs from its start marker to its end marker (both included); the heading
# follows the start marker, the reading (kept from run to run unless a script writes one) sits
# between the reading markers at its end.
SECTION_NAME = r"[A-Za-z0-9_.-]+"
MARKER = re.compile(rf"<!--\s*(end\s+)?benchmark:\s*({SECTION_NAME})\s*-->")
LOOKS_LIKE_MARKER = re.compile(r"<!--\s*(end\s+)?benchmark\b", re.IGNORECASE)
READING, END_READING = "<!-- reading -->", "<!-- end reading -->"
NO_READING = (
    "Reading: not written yet (what these numbers say is added by hand; it is kept when the section is rewritten)."
)


def section_name(name: str) -> str:
    """``name`` if it can name a section (letters, digits, ``_ . -``), else a ValueError."""
    if not re.fullmatch(SECTION_NAME, name):
        raise ValueError(f"section name {name!r}: letters, digits, '_', '.' and '-' only")
    return name


def start_marker(name: str) -> str:
    return f"<!-- benchmark: {name} -->"


def end_marker(name: str) -> str:
    return f"<!-- end benchmark: {name} -->"


def find_sections(text: str, path: Path | str = "RESULTS.md") -> dict[str, tuple[int, int]]:
    """Every benchmark section of ``text``: name -> (start line, end line), 0-based, markers included.
    A ValueError, with the file and line, for a malformed marker, a section that never ends, an end
    without its start, a section inside another, or two sections of one benchmark."""
    sections: dict[str, tuple[int, int]] = {}
    open_name, open_line = None, 0
    for number, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if not LOOKS_LIKE_MARKER.match(stripped):
            continue
        where = f"{path}:{number + 1}"
        match = MARKER.fullmatch(stripped)
        if match is None:
            raise ValueError(
                f"{where}: malformed benchmark marker {stripped!r}; expected '<!-- benchmark: NAME -->' or "
                "'<!-- end benchmark: NAME -->' on a line of its own"
            )
        is_end, name = bool(match[1]), match[2]
        if not is_end:
            if open_name is not None:
                raise ValueError(f"{where}: section {name!r} starts inside section {open_name!r} "
                                 f"(line {open_line + 1}), which has no end marker before it")  # fmt: skip
            if name in sections:
                raise ValueError(f"{where}: a second section {name!r} (the first at line {sections[name][0] + 1})")
            open_name, open_line = name, number
        elif open_name != name:
            inside = f" inside section {open_name!r}" if open_name else ""
            raise ValueError(f"{where}: end of section {name!r} without its start marker{inside}")
        else:
            sections[name], open_name = (open_line, number), None
    if open_name is not None:
        raise ValueError(f"{path}:{open_line + 1}: section {open_name!r} has no end marker {end_marker(open_name)!r}")
    return sections


def section_reading(lines: list[str], path: Path | str, first: int) -> str | None:
    """The reading between the reading markers of a section's ``lines`` (None without one); a ValueError
    when only one of the markers is there. ``first``: the section's line in the file, for the message."""
    marks = [i for i, line in enumerate(lines) if line.strip() in (READING, END_READING)]
    if not marks:
        return None
    kinds = [lines[i].strip() for i in marks]
    if kinds != [READING, END_READING]:
        raise ValueError(f"{path}:{first + marks[0] + 1}: the section's reading needs one {READING!r} and then one "
                         f"{END_READING!r}, found {kinds}")  # fmt: skip
    return "\n".join(lines[marks[0] + 1 : marks[1]]).strip("\n")


def write_section(
    out: Path | str, name: str, title: str, text: str, reading: str | None = None, history: Path | None = None
) -> Path | None:
    """Put benchmark ``name``'s newest run in ``out``, in place of its section (or at the end when it has
    none yet; ``out`` is created when missing). The section: start marker, ``## title``, ``text`` (what
    :func:`run_text` writes), the reading, end marker. The reading is ``reading`` when given, else the one of
    the section replaced, else a placeholder. The replaced section is appended unchanged to ``history``
    (default ``history/<name>.md`` beside ``out``), whose path is returned (None when nothing was replaced).
    Other sections and text are left as they are; a malformed marker is a ValueError before anything is
    written."""
    out = Path(out)
    history = history or out.parent / "history" / f"{section_name(name)}.md"
    existing = out.read_text() if out.exists() else "# Benchmark results\n"
    lines = existing.splitlines()
    sections = find_sections(existing, out)
    old = lines[sections[name][0] : sections[name][1] + 1] if name in sections else None
    kept = section_reading(old, out, sections[name][0]) if old is not None else None
    reading = (reading if reading is not None else kept) or NO_READING
    earlier = f" Earlier runs: `{os.path.relpath(history, out.parent)}`." if old is not None or history.exists() else ""
    new = [start_marker(name), f"## {title}", "", text.strip("\n") + earlier, "", READING, reading, END_READING,
           end_marker(name)]  # fmt: skip
    if old is None:
        result = existing.rstrip("\n") + "\n\n" + "\n".join(new) + "\n"
    else:
        start, end = sections[name]
        result = "\n".join([*lines[:start], *new, *lines[end + 1 :]]) + "\n"
        history.parent.mkdir(parents=True, exist_ok=True)
        before = history.read_text() if history.exists() else (
            f"# {name}: earlier runs\n\nSections of `benchmarks/{out.name}` that a newer run of this benchmark "
            "replaced, oldest first, as they were.\n"
        )  # fmt: skip
        history.write_text(before.rstrip("\n") + "\n\n" + "\n".join(old) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(result)
    partial.replace(out)  # never half a file
    return history if old is not None else None


def run_text(command: str, device: str, blocks: list[str], notes: list[str]) -> str:
    """A run, as its section shows it: when, the command, the machine, the tables in ``blocks``, then notes."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Newest run: {stamp}.", "", f"Command: `{command}`", "", f"Machine: {machine_line(device)}.", ""]
    for block in blocks:
        lines += [block, ""]
    return "\n".join([*lines, "Notes:", "", *notes])


def publish(
    args: argparse.Namespace,
    name: str,
    title: str,
    script: str,
    argv: list[str] | None,
    blocks: list[str],
    notes: list[str],
    device: str = "cpu",
    reading: str | None = None,
    command: str | None = None,
) -> None:
    """Write the run to ``args.out`` as the section ``args.section`` (default ``name``) with
    :func:`write_section`, unless ``args.no_write``. ``command``: the command line to show (default:
    :func:`command_line` of ``script`` and ``argv``)."""
    if args.no_write:
        return
    section = args.section or name
    text = run_text(command or command_line(script, argv), device, blocks, notes)
    moved = write_section(args.out, section, title, text, reading)
    print(f"\nWrote section {section!r} of {args.out}" + (f"; the one it replaced is in {moved}" if moved else ""))
