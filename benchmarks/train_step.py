"""Samples/s of one full training step of every tokenizer preset, through the project's own trainer.

Each row builds a real :class:`mstok.training.Trainer` from a config (model, losses, AdamW,
EMA, discriminator where the GAN is on) and times ``trainer.train_step([(images, labels)])``: forward,
loss, backward, gradient clipping, optimizer and scheduler step, EMA update, dead-code revival
and codebook statistics, plus the discriminator step of a GAN stage. Data loading is left out:
random image batches are made before timing and handed to the step directly.

Rows:

- ``single``: every preset with the default pixel losses (L1 + MSE + VQ);
- ``stage1``: two-stage stage 1, proxy-code cross-entropy + VQ against a frozen, randomly
  initialised MaskGIT-VQGAN proxy (``maskgit_vqgan_f16`` for 256px, ``vqgan_tiny`` for 64px);
- ``stage2``: two-stage stage 2, decoder and pixel decoder trained on MSE + PatchGAN (weight 0.01,
  active from step 0, so the discriminator step is included).

Modes are ``PRECISION[+compile]`` (``fp32``, ``bf16``, ``bf16+compile``); ``bf16`` is autocast.
After warm-up steps, steps are timed until ``--steps`` are done or ``--budget`` seconds have
passed (at least one), so slow rows on a small CPU still finish; the median step gives samples/s.

    python benchmarks/train_step.py                 # every preset, fp32 + bf16 (CUDA: + bf16+compile)
    python benchmarks/train_step.py --quick         # tiny presets and their stage rows, ~2-3 min on 2 cores
    python benchmarks/train_step.py --presets titok_b64 --stage-presets '' --modes bf16 --steps 20

Prints a markdown table and writes its section of ``--out`` in place (``harness.write_section``)
unless ``--no-write`` (alias ``--no-append``).
Exits 1 if a row failed (the others are still reported).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mstok.tokenizers.registry import PRESETS, preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import PROXY_FOR_SIZE, STAGE_TEXT

STAGES = ("single", "stage1", "stage2")
TINY_PRESETS = tuple(name for name in PRESETS if preset_config(name).image_size <= 64)
DEFAULT_STAGE_PRESETS = ("titok_b64", "mstok_b64")
QUICK_STAGE_PRESETS = ("titok_tiny", "mstok_tiny")


@dataclass(frozen=True)
class Row:
    """One benchmarked configuration: a preset trained in one stage, in one mode."""

    preset: str
    stage: str
    mode: str


@dataclass
class Result(harness.Timed):
    """Timings of one row; ``error`` is set (and the timings empty) when the row failed."""

    row: Row
    device: str
    image_size: int
    batch_size: int
    trainable_params: int = 0
    step_times: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return harness.median(self.step_times)

    @property
    def samples_per_s(self) -> float:
        return harness.per_second(self.batch_size, self.step_times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.timing_parser(__doc__, "tiny presets and their stage rows, few steps")
    parser.add_argument("--presets", help="comma-separated presets for single-stage rows (default: all; '' for none)")
    parser.add_argument(
        "--stage-presets",
        help=harness.list_help("presets for the stage-1/2 rows", DEFAULT_STAGE_PRESETS, QUICK_STAGE_PRESETS),
    )
    parser.add_argument(
        "--modes", help="comma-separated PRECISION[+compile] (default: fp32,bf16; CUDA adds bf16+compile)"
    )
    parser.add_argument("--batch-size", type=int, help="global batch per step (default: 8 at 256px, 32 at 64px)")
    harness.add_repeat_arguments(
        parser, "--steps", "step", "10; --quick 5", "30; --quick 3", "untimed steps per row (one more with compile)"
    )
    args = parser.parse_args(argv)
    args.presets = harness.names(args.presets, TINY_PRESETS if args.quick else PRESETS)
    args.stage_presets = harness.names(args.stage_presets, QUICK_STAGE_PRESETS if args.quick else DEFAULT_STAGE_PRESETS)
    cuda = harness.resolve_device(parser, args)
    args.modes = harness.names(args.modes, ("fp32", "bf16", "bf16+compile") if cuda else ("fp32", "bf16"))
    args.steps = args.steps if args.steps is not None else (5 if args.quick else 10)
    args.budget = args.budget if args.budget is not None else (3.0 if args.quick else 30.0)
    for name in args.presets + args.stage_presets:
        try:
            preset_config(name)
        except ValueError as err:
            parser.error(str(err))
    for name in args.stage_presets:
        if preset_config(name).family == "maskgit_vqgan":
            parser.error(f"--stage-presets: {name} is a proxy tokenizer, it has no two-stage training")
        if preset_config(name).image_size not in PROXY_FOR_SIZE:
            parser.error(f"--stage-presets: no proxy preset for {name}'s image size")
    harness.check_timing(parser, args, "--steps", "--modes")
    if not args.presets and not args.stage_presets:
        parser.error("nothing to run: --presets and --stage-presets are both empty")
    return args


def time_row(row: Row, args: argparse.Namespace, proxies: dict[int, Path], tmp: Path) -> Result:
    """Build the row's trainer, warm it up, then time steps until ``--steps`` or ``--budget``."""
    image_size = preset_config(row.preset).image_size
    batch_size = args.batch_size or (32 if image_size <= 64 else 8)
    result = Result(row, args.device, image_size, batch_size)
    trainer = None
    try:
        # a schedule longer than the steps run (compile adds a warm-up step)
        steps = args.warmup + args.steps + 2
        trainer = harness.stage_trainer(row.preset, row.stage, row.mode, args.device, batch_size, steps, proxies, tmp)
        device = trainer.device
        result.trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        gen = torch.Generator().manual_seed(0)
        # two batches alternate, like fresh data; pinned as the trainer's loader pins on CUDA
        batches = [torch.rand(batch_size, 3, image_size, image_size, generator=gen) for _ in range(2)]
        if device.type == "cuda":
            batches = [b.pin_memory() for b in batches]
        harness.reset_peak(device)
        labels = torch.zeros(batch_size, dtype=torch.long)
        warmup = args.warmup + (1 if row.mode.endswith("+compile") else 0)
        terms: dict[str, torch.Tensor] = {}
        calls = itertools.count()

        def step() -> list[float]:
            nonlocal terms
            batch = batches[next(calls) % 2]
            terms, seconds = harness.timed(device, lambda: trainer.train_step([(batch, labels)]))
            trainer.step += 1  # as fit() does: the schedules and the GAN start read it
            return [seconds]

        result.step_times = [t[0] for t in harness.time_calls(step, warmup, args.steps, args.budget)]
        result.peak_mem_bytes = harness.peak_bytes(device)
        loss = float(terms["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} after {trainer.step} steps")
    except Exception as err:  # report the row and go on: one bad config must not lose a long run
        result.step_times = []
        result.error = harness.failure(err)
    finally:
        trainer = None  # (the timed closure holds it too) freed before the caches are emptied
        harness.release(args.device, compiled=row.mode.endswith("+compile"))
    return result


def make_rows(args: argparse.Namespace) -> list[Row]:
    """Single-stage rows in preset order, then the stage rows; modes innermost."""
    rows = [Row(p, "single", m) for p in args.presets for m in args.modes]
    rows += [Row(p, s, m) for p in args.stage_presets for s in ("stage1", "stage2") for m in args.modes]
    return rows


def make_table(results: list[Result]) -> str:
    header = ["preset", "stage", "mode", "image", "batch", "trainable M", "timed steps", "median step (s)",
              "min step (s)", "samples/s", "peak mem (GiB)", "load 1m"]  # fmt: skip
    rows = []
    for r in results:
        cells = [
            r.row.preset,
            STAGE_TEXT[r.row.stage],
            f"{r.device} {r.row.mode}",
            str(r.image_size),
            str(r.batch_size),
        ]
        if r.error:
            params = f"{r.trainable_params / 1e6:.1f}" if r.trainable_params else "-"
            cells += [params, "-", "-", "-", "failed", "-", f"{r.load_after:.1f}"]
        else:
            cells += [
                f"{r.trainable_params / 1e6:.1f}",
                str(len(r.step_times)),
                f"{r.median_s:.3f}",
                f"{min(r.step_times):.3f}",
                f"{r.samples_per_s:.2f}",
                harness.gib(r.peak_mem_bytes),
                f"{r.load_after:.1f}",
            ]
        rows.append(cells)
    return harness.markdown_table(header, rows, left=3)


def label(r: Result) -> str:
    return f"{r.row.preset} {r.row.stage} {r.row.mode}"


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the benchmark; returns one :class:`Result` per row (failed rows carry ``error``)."""
    args = parse_args(argv)
    return harness.with_threads(args.threads, lambda: run(args, argv))


def run(args: argparse.Namespace, argv: list[str] | None) -> list[Result]:
    """Time every row, print the table and write the section unless ``--no-write``."""
    rows = make_rows(args)
    clock = harness.Clock()
    print(f"Timing {len(rows)} rows on {args.device} ({harness.machine_line(args.device)}); "
          f"load average {clock.loads[0]:.2f}")  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="mstok_train_step_") as tmp_name:
        tmp = Path(tmp_name)
        proxies = harness.save_proxies(args.stage_presets, tmp)
        for row in rows:
            row_start = time.perf_counter()
            result = time_row(row, args, proxies, tmp)
            result.load_after = clock.seen()
            results.append(result)
            if result.error:
                what = f"error: {result.error}"
            else:
                steps = len(result.step_times)
                what = f"{result.samples_per_s:.2f} samples/s (median {result.median_s:.3f}s, {steps} steps)"
            print(f"  {row.preset} {row.stage} {row.mode}: {what} ({time.perf_counter() - row_start:.0f}s)", flush=True)
    table = make_table(results)
    failed_notes = harness.print_outcome(clock, [table], results, label)
    sync, peak, _ = harness.measured_notes(
        args.device, "around each step", "warm-up and timed steps (weights, EMA, optimizer state and activations)"
    )
    notes = [
        "- Each row is `Trainer.train_step` of the project's trainer on one micro-batch (grad_accum 1): forward, "
        "losses, backward, grad clipping, AdamW, LR schedule, EMA, dead-code revival and codebook statistics "
        "(+ the discriminator step for stage 2). Data loading is excluded: random batches in [0, 1] made beforehand "
        "are passed straight to the step.",
        f"- {args.warmup} warm-up step(s) per row (one more with compile), then up to {args.steps} timed steps, "
        f"stopping once {args.budget:g} s of timed steps have passed (at least one); {sync}samples/s = batch / median "
        f"step time (min step: the least disturbed one); {peak}. A row with one timed step is a single measurement.",
        "- Stage rows use a randomly initialised proxy (maskgit_vqgan_f16 at 256px, vqgan_tiny at 64px) and random "
        "tokenizer weights; stage 2 trains decoder + pixel_decoder with MSE + GAN (weight 0.01, from step 0).",
        harness.load_note(
            clock,
            "a load well above this run's thread count means they competed for the cores, and on a small CPU that "
            "slows torch's OpenMP steps many times over (min step shows the least disturbed one)",
        ),
    ]
    skipped = [name for name in PRESETS if name not in args.presets]
    if skipped:
        notes.append(f"- Presets without a single-stage row in this run: {', '.join(skipped)}.")
    quick = " (quick)" if args.quick else ""
    name = "train_step-quick" if args.quick else "train_step"
    harness.publish(args, name, f"Training step throughput{quick}", __file__, argv, [table], notes + failed_notes,
                    args.device)  # fmt: skip
    return results


if __name__ == "__main__":
    sys.exit(1 if any(r.error for r in main()) else 0)
