"""Images/s of class-conditional generation: MaskGIT sampling in S steps, then the tokenizer's decode (MsTok Fig. 3b).

Each row pairs a randomly initialised tokenizer preset (K latent tokens, codebook size V) with
a MaskGIT generator of ``--generator`` size (default ``maskgit_vit``: MaskGIT-ViT, width 768,
24 layers, 16 heads; ``num_tokens = K``, ``codebook_size = V``, 1000 classes), both in eval
mode, and times one batch of class-conditional generation under ``torch.inference_mode``:

- sampling: :func:`mstok.generators.sample` with ``SamplingConfig(steps=S)`` (arccos
  schedule, temperature 1, choice temperature 4.5) for random class labels: S forward passes
  of the generator over ``[class; K slots]`` plus the token draw and re-masking;
- decoding: ``tokenizer.decode(ids)`` of the sampled ids to pixels (256x256; tiny presets 64x64).

The two parts are synchronised and timed separately in every call; a row reports the median
seconds per batch of each and ``images/s = batch / median(sampling + decoding)``.
Classifier-free guidance is off unless ``--guidance W``; with ``W > 0`` every step runs the
generator on a doubled batch (conditional + null class).

Modes are ``PRECISION[+compile]`` (``--precisions``); ``bf16``/``fp16`` are autocast around
both parts; ``+compile`` runs the generator and the tokenizer's decoder through
``torch.compile``. One warm-up call (a full sample + decode) comes before the first S of each
pair/mode/batch size; every S of them runs the same shapes, so later S reuse that warm-up
(on CUDA or with compile, every row is warmed up). Then calls are timed until ``--reps`` are
done or ``--budget`` seconds have passed (at least one).

Expected time of the default CPU run (3 pairs x S 8,64 x fp32,bf16 at batch 32, 12 rows, one
timed call each): a MaskGIT-ViT step costs ~22 GFLOPs per image at K = 64 (~45 at K = 128)
and a B decode ~50-60, so one S = 64 batch of 32 is ~48 TFLOPs (K = 128: ~94); at the
~150 (fp32) / ~300 (bf16) GFLOP/s that B-size models reach on 2 idle cores, that is about
40-50 minutes in all (fp32 ~27, bf16 ~14), several times more on a loaded machine (with one
thread at load ~6, one titok_b64 S = 8 batch of 8 took 27.5 s to sample and 9.9 s to decode).
Subset it with ``--pairs``, ``--steps``, ``--batch-size`` and ``--precisions``.

    python benchmarks/sampling.py                # titok_b64, mstok_b64, mstok_b128 + maskgit_vit; S 8,64; batch 32
    python benchmarks/sampling.py --quick        # tiny presets + maskgit_tiny, batch 8, well under a minute on 2 cores
    python benchmarks/sampling.py --pairs titok_b64 --steps 8 --batch-size 8 --precisions fp32
    python benchmarks/sampling.py --device cuda  # bf16 and bf16+compile, with peak memory

Prints a markdown table and writes its section of ``--out`` in place (``harness.write_section``)
unless ``--no-write`` (alias ``--no-append``).
Exits 1 if a row failed (the others are still reported).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mstok.generators import MaskGITGenerator, SamplingConfig, create_generator, sample
from mstok.generators.registry import GENERATOR_PRESETS
from mstok.tokenizers import create_tokenizer
from mstok.tokenizers.registry import AnyTokenizer, preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness

DEFAULT_PAIRS = ("titok_b64", "mstok_b64", "mstok_b128")
QUICK_PAIRS = ("titok_tiny", "mstok_tiny")
DEFAULT_GENERATOR, QUICK_GENERATOR = "maskgit_vit", "maskgit_tiny"
DEFAULT_STEPS = (8, 64)
NUM_CLASSES = 1000


@dataclass(frozen=True)
class Row:
    """One benchmarked configuration: a tokenizer/generator pair sampled in ``steps`` steps, in one mode."""

    tokenizer: str
    generator: str
    steps: int
    mode: str
    batch_size: int

    @property
    def pair(self) -> str:
        return f"{self.tokenizer} + {self.generator}"


@dataclass
class Result(harness.Timed):
    """Timings of one row; ``error`` is set (and the timings empty) when it did not run."""

    row: Row
    device: str
    num_tokens: int
    codebook_size: int
    image_size: int
    guidance: float
    sample_times: list[float] = field(default_factory=list)
    decode_times: list[float] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.sample_times)

    @property
    def sample_s(self) -> float:
        """Median seconds per batch of sampling."""
        return harness.median(self.sample_times)

    @property
    def decode_s(self) -> float:
        """Median seconds per batch of decoding."""
        return harness.median(self.decode_times)

    @property
    def total_s(self) -> float:
        """Median seconds per batch of sampling + decoding (the median of the per-call sums)."""
        totals = [s + d for s, d in zip(self.sample_times, self.decode_times, strict=True)]
        return harness.median(totals)

    @property
    def images_per_s(self) -> float:
        return self.row.batch_size / self.total_s if self.sample_times else math.nan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.timing_parser(__doc__, f"tiny presets ({','.join(QUICK_PAIRS)}) + {QUICK_GENERATOR}, batch 8")
    parser.add_argument(
        "--pairs",
        help=f"comma-separated tokenizer presets, each paired with a --generator sized to its K and V "
        f"(default: {','.join(DEFAULT_PAIRS)}; --quick: {','.join(QUICK_PAIRS)})",
    )
    parser.add_argument(
        "--generator", help=f"generator preset (default {DEFAULT_GENERATOR}; --quick {QUICK_GENERATOR})"
    )
    parser.add_argument("--steps", help="comma-separated numbers of sampling steps S (default 8,64)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default 32; --quick 8)")
    parser.add_argument(
        "--precisions",
        help="comma-separated PRECISION[+compile] with PRECISION fp32, bf16 or fp16 "
        "(default: fp32,bf16; CUDA bf16,bf16+compile)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=0.0,
        help="classifier-free guidance weight (default 0: off; >0 doubles the generator batch)",
    )
    harness.add_repeat_arguments(
        parser,
        "--reps",
        "call",
        "3; CUDA 10",
        "10; --quick 3",
        "untimed calls before a configuration's first timed one",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, labels and sampling noise")
    args = parser.parse_args(argv)
    args.pairs = harness.names(args.pairs, QUICK_PAIRS if args.quick else DEFAULT_PAIRS)
    args.generator = args.generator or (QUICK_GENERATOR if args.quick else DEFAULT_GENERATOR)
    cuda = harness.resolve_device(parser, args)
    args.precisions = harness.names(args.precisions, ("bf16", "bf16+compile") if cuda else ("fp32", "bf16"))
    try:
        args.steps = sorted({int(s) for s in harness.names(args.steps, (str(s) for s in DEFAULT_STEPS))})
    except ValueError:
        parser.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    args.batch_size = args.batch_size or (8 if args.quick else 32)
    args.reps = args.reps if args.reps is not None else (10 if cuda else 3)
    args.budget = args.budget if args.budget is not None else (3.0 if args.quick else 10.0)
    if not args.pairs:
        parser.error("nothing to run: --pairs is empty")
    for name in args.pairs:
        try:
            cfg = preset_config(name)
        except ValueError as err:
            parser.error(str(err))
        if cfg.family == "maskgit_vqgan" or cfg.head != "pixels":
            parser.error(f"--pairs: {name} is not a 1D tokenizer decoding to pixels")
    if args.generator not in GENERATOR_PRESETS:
        parser.error(f"--generator: unknown preset {args.generator!r}; available: {', '.join(GENERATOR_PRESETS)}")
    harness.check_timing(parser, args, "--reps", "--precisions")
    if not args.steps or min(args.steps) < 1:
        parser.error("--steps must name positive integers")
    if args.batch_size < 1 or args.guidance < 0:
        parser.error("--batch-size must be >= 1, --guidance >= 0")
    return args


def build(tokenizer: str, generator: str, device: torch.device, seed: int) -> tuple[AnyTokenizer, MaskGITGenerator]:
    """The tokenizer and a generator sized to its K and V (1000 classes), random weights, eval mode, on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        tok = create_tokenizer(tokenizer).eval()
        cfg = tok.config
        gen = create_generator(
            generator, num_tokens=cfg.num_latent_tokens, codebook_size=cfg.codebook_size, num_classes=NUM_CLASSES
        ).eval()
    return tok, gen


@contextlib.contextmanager
def compiled(tok: AnyTokenizer, gen: MaskGITGenerator, enabled: bool) -> Iterator[MaskGITGenerator]:
    """Yield the generator to sample with: ``torch.compile``d (and the tokenizer's decoder swapped
    for a compiled one while the block runs) when ``enabled``, else ``gen`` itself."""
    with harness.compiled_parts(tok, ("decoder", "pixel_decoder"), enabled):
        # the compiled module forwards .config, .check_labels and .parameters() to ``gen``
        yield torch.compile(gen) if enabled else gen


def make_call(
    tok: AnyTokenizer, gen: MaskGITGenerator, row: Row, guidance: float, device: torch.device, seed: int
) -> Callable[[], tuple[float, float, torch.Tensor]]:
    """A function running one batch of the row: returns (sampling s, decoding s, images)."""
    labels = torch.randint(0, NUM_CLASSES, (row.batch_size,), generator=torch.Generator().manual_seed(seed)).to(device)
    config = SamplingConfig(steps=row.steps, guidance_scale=guidance)
    precision = row.mode.partition("+")[0]

    def call() -> tuple[float, float, torch.Tensor]:
        rng = torch.Generator(device=device).manual_seed(seed)  # the same samples in every call
        with torch.inference_mode(), harness.autocast(device, precision):
            ids, sampled = harness.timed(device, lambda: sample(gen, labels, config, generator=rng))
            images, decoded = harness.timed(device, lambda: tok.decode(ids))
        return sampled, decoded, images

    return call


def time_row(
    result: Result, call: Callable[[], tuple[float, float, torch.Tensor]], args: argparse.Namespace, warmup: int
) -> None:
    """Run ``warmup`` untimed calls, then timed calls until ``--reps`` or ``--budget``; fills ``result``."""

    def checked() -> tuple[float, float]:
        sample_s, decode_s, images = call()
        size = result.image_size
        if images.shape != (result.row.batch_size, 3, size, size) or not torch.isfinite(images).all():
            raise RuntimeError(f"decode gave {tuple(images.shape)} images (finite: {bool(images.isfinite().all())})")
        return sample_s, decode_s

    harness.reset_peak(args.device)
    try:
        times = harness.time_calls(checked, warmup, args.reps, args.budget)
        result.sample_times, result.decode_times = [t[0] for t in times], [t[1] for t in times]
        result.peak_mem_bytes = harness.peak_bytes(args.device)
    except Exception as err:  # report the row and go on: one bad config must not lose a long run
        result.sample_times, result.decode_times = [], []
        result.error = harness.failure(err)


def run_pair(tokenizer: str, args: argparse.Namespace, report: Callable[[Result], None]) -> tuple[list[Result], int]:
    """Every row of one pair (modes, then steps, fewest first); also returns the generator's parameter count."""
    device = torch.device(args.device)
    cfg = preset_config(tokenizer)

    def result(steps: int, mode: str) -> Result:
        row = Row(tokenizer, args.generator, steps, mode, args.batch_size)
        return Result(row, args.device, cfg.num_latent_tokens, cfg.codebook_size, cfg.image_size, args.guidance)

    try:
        tok, gen = build(tokenizer, args.generator, device, args.seed)
    except Exception as err:
        error = harness.failure(err)
        failed = [result(s, m) for m in args.precisions for s in args.steps]
        for r in failed:
            r.error = error
            report(r)
        return failed, 0
    params = gen.parameter_counts()["total"]
    results: list[Result] = []
    for mode in args.precisions:
        extra = mode.partition("+")[2]
        with compiled(tok, gen, extra == "compile") as sampler:
            for i, steps in enumerate(args.steps):
                r = result(steps, mode)
                # every S runs the same shapes (generator on (B, 1 + K), decode on (B, K)), so on CPU eager
                # only the first S is warmed up; CUDA calls are cheap and compile guards differ, so there all are
                every = device.type == "cuda" or extra == "compile"
                warmup = args.warmup if every or i == 0 else 0
                time_row(r, make_call(tok, sampler, r.row, args.guidance, device, args.seed), args, warmup)
                r.load_after = harness.load_1min()
                results.append(r)
                report(r)
    del tok, gen
    harness.release(device)
    return results, params


def make_table(results: list[Result]) -> str:
    header = [
        "pair",
        "K",
        "V",
        "image",
        "steps",
        "precision",
        "batch",
        "timed calls",
        "sampling s/batch",
        "decoding s/batch",
        "total s/batch",
        "sampling share",
        "images/s",
        "peak mem (GiB)",
        "load 1m",
    ]
    rows = []
    for r in results:
        size = f"{r.image_size}x{r.image_size}"
        cells = [r.row.pair, str(r.num_tokens), str(r.codebook_size), size, str(r.row.steps)]
        cells += [f"{r.device} {r.row.mode}", str(r.row.batch_size)]
        if r.sample_times:
            cells += [
                str(r.calls),
                f"{r.sample_s:.3f}",
                f"{r.decode_s:.3f}",
                f"{r.total_s:.3f}",
                f"{100 * r.sample_s / (r.sample_s + r.decode_s):.0f}%",
                f"{r.images_per_s:.2f}",
                harness.gib(r.peak_mem_bytes),
            ]
        else:
            cells += ["-", "-", "-", "-", "-", "failed", "-"]
        cells.append(f"{r.load_after:.1f}")
        rows.append(cells)
    return harness.markdown_table(header, rows, left=(0, 5))


def label(r: Result) -> str:
    return f"{r.row.pair} S={r.row.steps} b{r.row.batch_size} {r.row.mode}"


def describe(r: Result) -> str:
    if r.error:
        return f"error: {r.error}"
    return (
        f"{r.images_per_s:.2f} images/s (sampling {r.sample_s:.3f} s + decoding {r.decode_s:.3f} s per batch, "
        f"{r.calls} calls)"
    )


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the benchmark; returns one :class:`Result` per row (failed rows carry ``error``)."""
    args = parse_args(argv)
    return harness.with_threads(args.threads, lambda: run(args, argv))


def run(args: argparse.Namespace, argv: list[str] | None) -> list[Result]:
    """Time every row, print the table and write the section (see :func:`main`)."""
    clock = harness.Clock()
    print(
        f"Timing {len(args.pairs)} pairs with {args.generator} on {args.device} "
        f"({harness.machine_line(args.device)}); load average {clock.loads[0]:.2f}"
    )

    def report(r: Result) -> None:
        clock.seen(r.load_after)
        row = r.row
        print(f"  {row.pair} S={row.steps} b{row.batch_size} {row.mode}: {describe(r)}", flush=True)

    results: list[Result] = []
    params: dict[str, int] = {}
    for tokenizer in args.pairs:
        rows, params[tokenizer] = run_pair(tokenizer, args, report)
        results += rows

    table = make_table(results)
    failed_notes = harness.print_outcome(clock, [table], results, label)
    sync, peak, warm = harness.measured_notes(
        args.device,
        "before and after each part",
        "a row's warm-up and timed calls (weights included)",
        "before the fewest-steps row of each pair/precision (every row with compile; all S run the same shapes)",
    )
    sizes = ", ".join(
        f"{name}: {params[name] / 1e6:.1f}M (K={preset_config(name).num_latent_tokens}, "
        f"V={preset_config(name).codebook_size})"
        for name in args.pairs
        if params.get(name)
    )
    guidance = (
        "classifier-free guidance off (w = 0: one conditional pass per step)"
        if args.guidance == 0
        else f"classifier-free guidance w = {args.guidance:g} (constant): every step runs the generator on "
        f"2 x {args.batch_size} sequences (conditional + null class)"
    )
    notes = [
        f"- Each row samples a batch of random ImageNet class labels with `mstok.generators.sample` "
        f"(`SamplingConfig(steps=S)`: arccos schedule, temperature 1, choice temperature 4.5; {guidance}) from a "
        f"`{args.generator}` generator sized to the tokenizer (num_tokens = K, codebook_size = V, "
        f"{NUM_CLASSES} classes), then decodes the ids to pixels with `tokenizer.decode(ids)`. Random weights, "
        "eval mode, `torch.inference_mode`; bf16/fp16 are autocast around both parts; `+compile` runs the "
        "generator and the tokenizer's decoder through `torch.compile`.",
        f"- Generator parameters: {sizes}.",
        f"- {args.warmup} warm-up call(s) (sample + decode) {warm}, then up to {args.reps} timed calls per row, "
        f"stopping once {args.budget:g} s of timed calls have passed (at least one); {sync}sampling and decoding "
        f"are timed separately in each call with `time.perf_counter` (medians over the calls), and images/s = "
        f"batch / median(sampling + decoding); {peak}. A row with one timed call is a single measurement.",
        harness.load_note(
            clock,
            "a load above this run's thread count means they competed for the cores and the rates here are lower "
            "bounds",
        ),
    ]
    quick = " (quick)" if args.quick else ""
    name = "sampling-quick" if args.quick else "sampling"
    harness.publish(args, name, f"Sampling + decoding throughput{quick}", __file__, argv, [table],
                    notes + failed_notes, args.device)  # fmt: skip
    return results


if __name__ == "__main__":
    sys.exit(1 if any(r.error for r in main()) else 0)
