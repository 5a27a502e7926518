"""Time to quality: held-out PSNR against training seconds and steps for the shipped tiny configs, the
trainer's step against a bare loop, and where a step's time goes.

Five parts (``--parts``, all by default):

* **curves**: ``configs/titok_tiny.toml`` and ``configs/mstok_tiny.toml`` as shipped, and the conv
  autoencoder calibration at equal bits (``convae_tiny``, VQ 8x8 V = 32, the tiny recipe), trained for the
  shipped configs' steps and batch size (``--steps``, ``--batch-size``) one after the other with every core
  (``--jobs 1``, ``--threads`` = the cores: each row has the machine to itself, so its seconds are what a
  user with this machine waits). Each is validated every
  ``--val-every`` steps on ``--val-images`` held-out images (Tiny ImageNet's validation set, never
  trained on) with its EMA weights; the curve's time axis is the trainer's training time (data and
  steps; validation left out). The table reads PSNR at fixed seconds, the first validation at or
  above ``--target`` dB (seconds and steps), and PSNR on ``--final-images`` held-out images at the end;
  the plot draws PSNR against seconds and against steps.
* **overhead**: ``Trainer.train_step`` against a bare loop of the same model, the same loss object and
  the config's optimizer (``build_optimizer``: Muon + fused AdamW for the shipped configs) on the same
  batch (no clipping, schedule, EMA or codebook statistics), the two interleaved ``--overhead-reps``
  times so both see the same machine; the ratio of the medians.
* **compile**: the same step of each shipped config eager and with ``compile = true`` (the trainer's
  ``torch.compile``), interleaved ``--overhead-reps`` times; the compiled trainer's first step less an eager
  step is compile's start-up, and start-up / time saved per step the steps it takes to pay back.
* **breakdown**: ``torch.profiler`` over ``--profile-steps`` steps of ``Trainer.fit``, grouped by the
  trainer's own labels (``data``, ``forward``, ``backward``, ``optimizer``, ``ema``, ``quantizer
  bookkeeping``, ``logging``); what no label covers is ``other`` (checkpoints, the loop itself).
* **loader**: the trainer's own data stream from the training shards and from an image folder (the
  held-out images) in images/s, against the images/s a step consumes (issue: the loader must never be
  on the critical path).

    python benchmarks/time_to_quality.py                          # all five parts, about 40 min on 2 cores
    python benchmarks/time_to_quality.py --parts overhead,breakdown   # the step tables only (a few minutes)

Finished curve runs are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import Row

SHIPPED = ("titok_tiny.toml", "mstok_tiny.toml")
ROWS: dict[str, Row] = {
    **{name: harness.config_row(harness.CONFIGS / name, "shipped") for name in SHIPPED},
    **dict([harness.conv_ae_vq()]),
}
PARTS = ("curves", "overhead", "compile", "breakdown", "loader")
LABELS = ("data", "forward", "backward", "optimizer", "ema", "quantizer bookkeeping", "logging")


def row_run(name: str, args: argparse.Namespace) -> tuple[int, int]:
    """The (steps, batch size) row ``name`` trains for: ``--steps`` / ``--batch-size`` when given, else its
    shipped config's (the calibration takes the first shipped config's)."""
    config = harness.CONFIGS / (name if name in SHIPPED else SHIPPED[0])
    return (args.steps or harness.config_steps(config), args.batch_size or harness.config_batch_size(config))


def train_row(name: str, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Row ``name``'s curve run (:func:`harness.run_row`) at its :func:`row_run` steps and batch size."""
    steps, batch = row_run(name, args)
    row_args = argparse.Namespace(**{**vars(args), "steps": steps, "batch_size": batch})
    return {**harness.run_row(name, ROWS[name], row_args, threads), "steps": steps, "batch_size": batch}


def first_reaching(val: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first validation record at or above ``target`` dB, or None."""
    return next((r for r in val if r["val_psnr"] >= target), None)


def at_seconds(val: list[dict[str, Any]], seconds: float) -> float | None:
    """PSNR of the last validation within ``seconds`` of training time (None before the first)."""
    within = [r["val_psnr"] for r in val if r["train_seconds"] <= seconds]
    return within[-1] if within else None


def curves_table(results: dict[str, dict[str, Any]], args: argparse.Namespace, floor: float) -> str:
    """Markdown: per row, s/step, PSNR at each of ``--seconds``, time and steps to ``--target``, final PSNR."""
    marks = [float(s) for s in harness.names(args.seconds)]
    head = ["row", "params", "s/step", *[f"PSNR @{s:g} s" for s in marks], f"s to {args.target:g} dB",
            f"steps to {args.target:g} dB", "steps x batch",
            f"PSNR at the end ({args.final_images} images)"]  # fmt: skip
    rows = []
    for name, res in results.items():
        reached = first_reaching(res["val"], args.target)
        cells = [name, f"{res['params'] / 1e6:.2f}M", f"{res['seconds_per_step']:.3f}"]
        cells += [harness.cell([at_seconds(res["val"], s)], 2) for s in marks]
        cells += [f"{reached['train_seconds']:.0f}" if reached else "not reached",
                  str(reached["step"]) if reached else "-", f"{res['steps']} x {res['batch_size']}",
                  f"{res['final_psnr']:.2f}"]  # fmt: skip
        rows.append(cells)
    rows.append(harness.mean_colour_row(len(head), {3 + i: f"{floor:.2f}" for i in range(len(marks))}))
    return harness.markdown_table(head, rows)


def plot(results: dict[str, dict[str, Any]], args: argparse.Namespace, floor: float) -> None:
    """Held-out PSNR against training seconds (left) and steps (right), with the target and mean colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, res in results.items():
        style = "--" if ROWS[name].group == "calibration" else "-"
        axes[0].plot([r["train_seconds"] for r in res["val"]], [r["val_psnr"] for r in res["val"]], style, label=name)
        seen = [r["step"] * res["batch_size"] for r in res["val"]]  # rows may differ in batch size
        axes[1].plot(seen, [r["val_psnr"] for r in res["val"]], style, label=name)
    for ax, label in zip(axes, ("training seconds (data + steps)", "images seen (steps x batch)"), strict=True):
        ax.axhline(args.target, color="black", lw=0.8, ls=":", label=f"target {args.target:g} dB")
        ax.axhline(floor, color="grey", lw=0.8, label="mean colour")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"PSNR (dB), {args.val_images} held-out images, EMA")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def make_trainer(config_name: str, args: argparse.Namespace, out: Path, extra: list[str], data: str = "") -> Any:
    """A Trainer on the shipped config ``config_name`` over ``data`` (default: the training images),
    writing into ``out``."""
    from mstok.training import Trainer, load_train_config

    settings = [f"data.path='{data or args.train_data}'", "data.val_path=''", f"out_dir='{out}'", "val_every=0",
                "sample_every=0", "tensorboard=false", f"threads={args.threads}", *extra]  # fmt: skip
    config = load_train_config(harness.CONFIGS / config_name, settings)
    return Trainer(config, progress=False)


def bare_step(model: torch.nn.Module, loss_fn: Any, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> None:
    """The least a training step must do: forward, the loss, backward, the optimizer's step."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = loss_fn(model(images), images, None, False, step=0)
    loss.backward()
    optimizer.step()


def overhead_row(name: str, args: argparse.Namespace, work: Path) -> list[str]:
    """The trainer's step against the bare loop for the shipped config ``name`` (interleaved, medians)."""
    import copy

    from mstok.training.optim import build_optimizer

    trainer = make_trainer(name, args, work / f"overhead-{name}", [])
    images = harness.held_out(args.data, trainer.config.batch_size)
    batch = [(images, torch.zeros(len(images), dtype=torch.long))]
    model = copy.deepcopy(trainer.model).train()
    cfg = trainer.config.optim
    # the config's optimizer (Muon + AdamW for the shipped tiny configs), without schedule or clipping
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, cfg.name)
    steps = {"bare": lambda: bare_step(model, trainer.loss_fn, optimizer, images),
             "trainer": lambda: trainer.train_step(batch)}  # fmt: skip
    medians = interleaved_medians(steps, args)
    bare, full = medians["bare"], medians["trainer"]
    return [name, str(args.overhead_reps), f"{bare:.3f}", f"{full:.3f}", f"{full / bare:.3f}"]


def interleaved_medians(steps: dict[str, Callable[[], Any]], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of each of ``steps``, run in turn ``--overhead-reps`` times after two warm-up rounds
    (so that every kind sees the same machine), under ``--threads``."""
    times: dict[str, list[float]] = {kind: [] for kind in steps}

    def interleaved() -> None:
        for rep in range(args.overhead_reps + 2):
            for kind, step in steps.items():
                started = time.perf_counter()
                step()
                if rep >= 2:
                    times[kind].append(time.perf_counter() - started)

    harness.with_threads(args.threads, interleaved)
    return {kind: statistics.median(spent) for kind, spent in times.items()}


def overhead(args: argparse.Namespace, work: Path) -> str:
    """Markdown: the trainer's step against the bare loop, per shipped config."""
    rows = [overhead_row(name, args, work) for name in SHIPPED]
    return harness.markdown_table(["config", "reps", "bare loop (s)", "Trainer.train_step (s)", "ratio"], rows)


def compile_row(name: str, args: argparse.Namespace, work: Path) -> list[str]:
    """The shipped config ``name``'s step eager and under ``torch.compile`` (``compile = true``, the trainer's
    own switch), interleaved; the compiled trainer's first step, less an eager step, is its start-up cost."""
    trainers = {kind: make_trainer(name, args, work / f"{kind}-{name}", [f"compile={str(kind == 'compile').lower()}"])
                for kind in ("eager", "compile")}  # fmt: skip
    images = harness.held_out(args.data, trainers["eager"].config.batch_size)
    batch = [(images, torch.zeros(len(images), dtype=torch.long))]
    started = time.perf_counter()
    harness.with_threads(args.threads, lambda: trainers["compile"].train_step(batch))  # compiles forward+backward
    first = time.perf_counter() - started
    medians = interleaved_medians({kind: functools.partial(t.train_step, batch) for kind, t in trainers.items()}, args)
    eager, compiled = medians["eager"], medians["compile"]
    startup = max(first - eager, 0.0)
    saved = eager - compiled
    even = f"{startup / saved:.0f}" if saved > 0 else "never"
    return [name, str(args.overhead_reps), f"{eager:.3f}", f"{compiled:.3f}", f"{eager / compiled:.3f}",
            f"{startup:.1f}", even]  # fmt: skip


def compiled(args: argparse.Namespace, work: Path) -> str:
    """Markdown: eager against ``torch.compile`` steps of each shipped config, with compile's start-up."""
    rows = [compile_row(name, args, work) for name in SHIPPED]
    head = ["config", "reps", "eager step (s)", "compiled step (s)", "speed-up", "compile start-up (s)",
            "steps to pay back the start-up"]  # fmt: skip
    return harness.markdown_table(head, rows)


def breakdown(args: argparse.Namespace, work: Path) -> str:
    """Markdown: milliseconds per step under each trainer label, per shipped config (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name in SHIPPED:
        steps = args.profile_steps
        trainer = make_trainer(name, args, work / f"breakdown-{name}", [f"steps={steps}", f"log_every={steps}",
                                                                          f"ckpt_every={steps}"])  # fmt: skip
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            harness.with_threads(args.threads, trainer.fit)
            total = (time.perf_counter() - started) * 1000 / steps
        spent = {e.key: e.cpu_time_total / 1000 / steps for e in prof.key_averages() if e.key in LABELS}
        cells = [f"{spent.get(label, 0.0):.1f}" for label in LABELS]
        rows.append([name, str(steps), *cells, f"{total - sum(spent.values()):.1f}", f"{total:.1f}"])
    return harness.markdown_table(["config", "steps", *[f"{k} (ms)" for k in LABELS], "other (ms)", "step (ms)"], rows)


def loader_row(source: str, path: str, args: argparse.Namespace, work: Path) -> list[str]:
    """The trainer's own data stream (``Engine.batches``: sampler, decode, augmentation, collate, with the
    shipped config's loader workers) from ``path`` in images/s, against the images/s the step consumes."""
    trainer = make_trainer(SHIPPED[0], args, work / f"loader-{source}", [], data=path)
    batch = trainer.config.batch_size
    stream = trainer.batches()

    def read() -> float:
        next(stream)  # a warm-up batch: opens the files, starts any workers
        started = time.perf_counter()
        for _ in range(args.loader_batches):
            next(stream)
        return args.loader_batches * batch / (time.perf_counter() - started)

    def consume() -> float:
        step = next(stream)  # one step's micro-batches
        trainer.train_step(step)  # warm-up
        started = time.perf_counter()
        for _ in range(3):
            trainer.train_step(step)
        return 3 * batch / (time.perf_counter() - started)

    loaded = harness.with_threads(args.threads, read)
    consumed = harness.with_threads(args.threads, consume)  # the same thread count as the read
    return [source, str(trainer.config.data.num_workers), f"{loaded:.0f}", f"{consumed:.0f}",
            f"{100 * consumed / loaded:.1f}%"]  # fmt: skip


def loader(args: argparse.Namespace, work: Path) -> str:
    """Markdown: the data stream's images/s from the training shards and from an image folder (the
    held-out images), against what a step of the shipped config consumes."""
    rows = [loader_row("shards", args.train_data, args, work), loader_row("folder", args.data, args, work)]
    head = ["source", "loader workers", "loader images/s", "step consumes images/s", "loading share of a step"]
    return harness.markdown_table(head, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_data_arguments(parser)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=0, help="steps of every row (0: each config's own)")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=500, help="held-out images of the curves")
    parser.add_argument("--final-images", type=int, default=8000, help="held-out images measured at the end")
    parser.add_argument("--seconds", default="150,300,450,600", help="training seconds at which to read PSNR")
    parser.add_argument("--target", type=float, default=18.0, help="the PSNR (dB) whose time to reach is reported")
    parser.add_argument("--overhead-reps", type=int, default=10, help="interleaved steps of each kind")
    parser.add_argument("--profile-steps", type=int, default=20, help="Trainer.fit steps under the profiler")
    parser.add_argument("--loader-batches", type=int, default=50, help="batches read to time the data stream")
    harness.add_run_arguments(parser, "runs/time_to_quality", seeds=1, unit="rows")
    # one row at a time with the whole machine, at the shipped configs' batch size
    parser.set_defaults(jobs=1, threads=os.cpu_count() or 1, batch_size=0)  # 0: each config's own batch size
    harness.add_output_arguments(parser, also=" nor --plot")
    parser.add_argument("--plot", default=str(harness.BENCHMARKS / "time_to_quality.png"))
    args = parser.parse_args(argv)
    parts = harness.chosen(parser, args.parts, PARTS, PARTS)
    if (
        min(args.val_every, args.val_images, args.overhead_reps, args.profile_steps, args.loader_batches) < 1
        or min(args.steps, args.batch_size) < 0
    ):
        parser.error(
            "--val-every, --val-images, --overhead-reps, --profile-steps and --loader-batches must be at least 1; "
            "--steps and --batch-size at least 0 (0: each config's own)"
        )
    harness.check_rows(parser, args, ROWS.values())
    study = harness.Study(args)
    blocks, found = [], {}
    floor = harness.mean_colour_floor(args.data, args.val_images)[0]
    if "curves" in parts:

        def report(name: str, result: dict[str, Any]) -> str:
            pace = f"{result['seconds_per_step']:.3f} s/step"
            return f"{name}: PSNR {result['final_psnr']:.2f} at {result['steps']} steps, {pace}"

        tasks = {name: functools.partial(train_row, name, args, study.threads) for name in ROWS}
        found["curves"] = study.run(tasks, report)
        blocks.append(curves_table(found["curves"], args, floor))
    with tempfile.TemporaryDirectory() as scratch:
        if "overhead" in parts:
            blocks.append(found.setdefault("overhead", overhead(args, Path(scratch))))
        if "compile" in parts:
            blocks.append(found.setdefault("compile", compiled(args, Path(scratch))))
        if "breakdown" in parts:
            blocks.append(found.setdefault("breakdown", breakdown(args, Path(scratch))))
        if "loader" in parts:
            blocks.append(found.setdefault("loader", loader(args, Path(scratch))))
    print("\n\n".join(blocks))
    if not args.no_write:
        if "curves" in parts:
            plot(found["curves"], args, floor)
        notes = [
            f"- Curves: each row's steps x batch as in the table (the shipped configs' own unless --steps / "
            f"--batch-size), {study.pace('rows')}; "
            f"{args.val_images} held-out images validated every {args.val_every} steps (EMA weights); PSNR @N s "
            "reads the last validation within N s of training time (data + steps, validation left out). "
            f"Plot: `{Path(args.plot).name}`.",
            f"- Overhead: {args.overhead_reps} interleaved steps of each kind after two warm-up rounds, batch of "
            f"held-out images, {args.threads} thread(s); compile: the same, eager against `compile = true`. "
            f"Breakdown: {args.profile_steps} steps of Trainer.fit under "
            "torch.profiler, CPU time under each label per step. Loader: the trainer's data stream "
            f"(`Engine.batches`) read for {args.loader_batches} batches after one warm-up batch, against 3 "
            "train steps on one of its batches; with 0 loader workers the stream runs in the step's process, so "
            "its share is time the step waits.",
        ]
        harness.publish(args, "time_to_quality", "Time to quality", __file__, argv, blocks, notes)
    return found


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
