"""Encode and decode images/s of the tokenizer presets, with the FLOP rate they reach and the machine's matmul rate.

Each row times one public call of a randomly initialised tokenizer in eval mode under
``torch.inference_mode``: ``encode(images)`` (images -> token ids, value checks and the
quantizer included) or ``decode(tokens)`` (token ids -> clamped pixels). Two-stage rows decode
through the MaskGIT-VQGAN pixel decoder of a ``proxy_codes`` tokenizer (the ViT decoder predicts
proxy-code logits, their softmax mixes the proxy codebook, the conv decoder makes pixels).

Next to images/s each row reports the FLOP rate it reached (forward FLOPs per image, counted on
the meta device with :func:`mstok.evaluation.flops.tokenizer_flops` / ``count_flops``, times
images/s) and that rate as a share of a large ``torch.mm`` timed in the same run, in the
row's precision: the gap between a model and the hardware's matmul speed.

Modes are ``PRECISION[+compile]``; ``bf16``/``fp16`` are autocast. After one warm-up call,
calls are timed until ``--reps`` are done or ``--budget`` seconds have passed (at least one);
the median call gives images/s. A row whose single call is estimated above ``--max-call-s``
(from a smaller batch of the same row, else from the matmul rate) is skipped and says so:
that keeps a default run on a shared 2-core CPU to 15-20 minutes (L and two-stage rows at
batch 32 skipped there). The matmuls are re-timed before every model, since a shared
machine's speed drifts.

    python benchmarks/throughput.py          # 7 presets + 2 two-stage, batch 8,32, fp32 + bf16 (CUDA: bf16 +- compile)
    python benchmarks/throughput.py --quick  # tiny presets + titok_b64/mstok_b64 at batch 8, ~2-3 min on 2 cores
    python benchmarks/throughput.py --presets mstok_b64 --two-stage '' --batch-sizes 8 --modes bf16
    python benchmarks/throughput.py --presets semtok_l_bsq18:decoder_mode=refine --two-stage '' --random-first-stage

A preset may carry config overrides, ``NAME:FIELD=VALUE[:FIELD=VALUE...]`` (above: SemTok's
stage-II one-step refiner in place of the 25-step flow decoder). ``--random-first-stage`` times a
latent tokenizer whose first stage is not on disk with a random-weight copy of the SD3.5 VAE
(:meth:`~mstok.tokenizers.latent_space.DiffusersVAESpace.random`: the same compute), and says so.

Prints markdown tables and writes its section of ``--out`` in place (``harness.write_section``)
unless ``--no-write`` (alias ``--no-append``).
Exits 1 if a row failed (the others are still reported).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mstok.evaluation.flops import count_flops, decoder_calls, tokenizer_flops
from mstok.storage.weights import MissingWeightsError
from mstok.tokenizers import create_tokenizer
from mstok.tokenizers.latent_space import DiffusersVAESpace, LatentSpace, build_latent_space
from mstok.tokenizers.registry import AnyTokenizer, preset_config
from mstok.tokenizers.vqgan import MaskGITVQGAN

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import DTYPES, PROXY_FOR_SIZE

DEFAULT_PRESETS = ("titok_s128", "titok_b64", "titok_l32", "mstok_b64", "mstok_b128", "mstok_b256", "mstok_l32")
QUICK_PRESETS = ("titok_tiny", "mstok_tiny", "titok_b64", "mstok_b64")
DEFAULT_TWO_STAGE = ("titok_b64", "mstok_b64")
QUICK_TWO_STAGE = ("titok_tiny", "mstok_tiny")
PART_TEXT = {"encode": "encode", "decode": "decode", "decode2": "decode (two-stage, to pixels)"}


@dataclass(frozen=True)
class Model:
    """A preset as benchmarked: single stage, or two-stage with the proxy's pixel decoder."""

    preset: str
    two_stage: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()  # config fields changed from the preset's

    @classmethod
    def parse(cls, text: str) -> Model:
        """``NAME`` or ``NAME:FIELD=VALUE[:FIELD=VALUE...]``; a VALUE that reads as a number is one."""
        name, *fields = text.split(":")
        overrides = []
        for item in fields:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"{text!r}: an override is FIELD=VALUE, got {item!r}")
            for kind in (int, float):
                with contextlib.suppress(ValueError):
                    value = kind(value)
                    break
            overrides.append((key, value))
        return cls(name, overrides=tuple(overrides))

    @property
    def proxy(self) -> str:
        return PROXY_FOR_SIZE[preset_config(self.preset).image_size]

    @property
    def label(self) -> str:
        name = " ".join([self.preset, *(f"{k}={v}" for k, v in self.overrides)])
        return f"{name} + {self.proxy}" if self.two_stage else name

    @property
    def parts(self) -> tuple[str, ...]:
        # a two-stage encoder is the single-stage one, so only its decode is a row of its own
        return ("decode2",) if self.two_stage else ("encode", "decode")


@dataclass(frozen=True)
class Row:
    """One benchmarked configuration: a model's encode or decode at one batch size, in one mode."""

    model: Model
    part: str
    batch_size: int
    mode: str


@dataclass
class Result(harness.Timed):
    """Timings of one row; ``error`` or ``skipped`` is set (and the timings empty) when it did not run."""

    row: Row
    device: str
    flops_per_image: int
    call_times: list[float] = field(default_factory=list)
    mm_gflops: float = math.nan  # the matmul rate this row is compared with (see ``run``)
    skipped: str | None = None

    @property
    def median_s(self) -> float:
        return harness.median(self.call_times)

    @property
    def images_per_s(self) -> float:
        return harness.per_second(self.row.batch_size, self.call_times)

    @property
    def gflops_per_s(self) -> float:
        return self.flops_per_image * self.images_per_s / 1e9


@dataclass
class MatmulRate:
    """GFLOP/s of ``size x size`` ``torch.mm`` calls in one dtype, measured at one point of the run."""

    precision: str
    size: int
    when: str
    rates: list[float]

    best: float = field(init=False)
    median: float = field(init=False)

    def __post_init__(self) -> None:
        self.best, self.median = max(self.rates), statistics.median(self.rates)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.timing_parser(__doc__, "tiny presets + titok_b64/mstok_b64, batch 8")
    parser.add_argument("--presets", help="comma-separated presets for encode/decode rows ('' for none)")
    parser.add_argument(
        "--two-stage", help=harness.list_help("presets for two-stage decode rows", DEFAULT_TWO_STAGE, QUICK_TWO_STAGE)
    )
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes (default 8,32; --quick 8)")
    parser.add_argument(
        "--modes", help="comma-separated PRECISION[+compile] (default: fp32,bf16; CUDA bf16,bf16+compile)"
    )
    harness.add_repeat_arguments(
        parser, "--reps", "call", "5; CUDA 20", "10; --quick 3", "untimed calls before a row's first timed call"
    )
    parser.add_argument(
        "--max-call-s",
        type=float,
        default=30.0,
        help="skip a row whose one call is estimated above this many seconds (0: never skip; default 30)",
    )
    parser.add_argument("--mm-size", type=int, help="matrix size of the matmul reference (default 2048; CUDA 8192)")
    parser.add_argument("--mm-reps", type=int, default=5, help="timed matmuls per precision (default 5)")
    parser.add_argument(
        "--random-first-stage",
        action="store_true",
        help="time a latent tokenizer whose VAE is not on disk with SD3.5's VAE architecture and random weights",
    )
    args = parser.parse_args(argv)
    args.presets = harness.names(args.presets, QUICK_PRESETS if args.quick else DEFAULT_PRESETS)
    args.two_stage = harness.names(args.two_stage, QUICK_TWO_STAGE if args.quick else DEFAULT_TWO_STAGE)
    cuda = harness.resolve_device(parser, args)
    args.modes = harness.names(args.modes, ("bf16", "bf16+compile") if cuda else ("fp32", "bf16"))
    try:
        args.batch_sizes = sorted(
            {int(b) for b in harness.names(args.batch_sizes, ("8",) if args.quick else ("8", "32"))}
        )
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    args.reps = args.reps if args.reps is not None else (20 if cuda else 5)
    args.budget = args.budget if args.budget is not None else (3.0 if args.quick else 10.0)
    args.mm_size = args.mm_size or (8192 if cuda else 2048)
    try:
        args.models = [Model.parse(p) for p in args.presets]
        args.models += [dataclasses.replace(Model.parse(p), two_stage=True) for p in args.two_stage]
        for model in args.models:
            preset_config(model.preset, **dict(model.overrides))
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    for model in (m for m in args.models if m.two_stage):
        if preset_config(model.preset).family == "maskgit_vqgan":
            parser.error(f"--two-stage: {model.preset} is a proxy tokenizer, it has no two-stage decode")
        if preset_config(model.preset).image_size not in PROXY_FOR_SIZE:
            parser.error(f"--two-stage: no proxy preset for {model.preset}'s image size")
    harness.check_timing(parser, args, "--reps", "--modes")
    if not args.presets and not args.two_stage:
        parser.error("nothing to run: --presets and --two-stage are both empty")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must name positive integers")
    if args.max_call_s < 0 or args.mm_reps < 1:
        parser.error("--mm-reps must be >= 1, --max-call-s >= 0")
    return args


def build(model: Model, device: torch.device | str) -> AnyTokenizer:
    """The model with random weights, in eval mode, on ``device`` (``"meta"`` for FLOP counting)."""
    overrides: dict[str, Any] = dict(model.overrides)
    if model.two_stage:
        overrides |= {"head": "proxy_codes", "pixel_decoder": preset_config(model.proxy).to_dict()}
    torch.manual_seed(0)
    with harness.fast_init(), torch.device(device):
        return create_tokenizer(model.preset, **overrides).eval()


def part_flops(model: Model) -> dict[str, int]:
    """Forward FLOPs per image of each of the model's parts (quantizer not counted), on the meta device."""
    tok = build(model, "meta")
    cfg = tok.config
    if isinstance(tok, MaskGITVQGAN):
        images = torch.empty(1, 3, cfg.image_size, cfg.image_size, device="meta")
        grid = torch.empty(1, cfg.z_channels, cfg.grid_size, cfg.grid_size, device="meta")
        return {"encode": count_flops(tok.encoder, images), "decode": count_flops(tok.decoder, grid)}
    flops = tokenizer_flops(tok)
    # a flow decoder (SemTok stage I) counts one step; decode() runs its default number of them
    out = {"encode": flops["encoder"], "decode": flops["decoder"] * decoder_calls(tok)}
    if tok.pixel_decoder is not None:
        logits = torch.empty(1, cfg.num_patches, cfg.proxy_codebook_size, device="meta")
        out["decode2"] = out.pop("decode") + count_flops(tok.pixel_decoder, logits)
    return out


def first_stage(model: Model, random_vae: bool = False) -> tuple[LatentSpace | None, str | None]:
    """(the frozen first stage a latent tokenizer (SemTok) encodes and decodes through, None) when
    it loads from local files, (None, why) when it does not; (None, None) for a pixel tokenizer.
    Never downloads: a VAE is read from a local folder or the hub cache only; with ``random_vae``
    a VAE that is not there is replaced by SD3.5's architecture with random weights."""
    spec = getattr(preset_config(model.preset, **dict(model.overrides)), "latent_space", None)
    if spec is None:
        return None, None
    table = {"type": spec} if isinstance(spec, str) else dict(spec)
    if table["type"] == "vae":
        table["download"] = False
    try:
        return build_latent_space(table), None
    except MissingWeightsError as err:
        if random_vae and table["type"] == "vae":
            print(f"  {model.label}: the VAE is not on disk; timing SD3.5's VAE with random weights", flush=True)
            return DiffusersVAESpace.random(), None
        print(f"  {model.label}: {err}", flush=True)
    except ImportError as err:
        print(f"  {model.label}: {err}", flush=True)
    return None, f"first stage {table['type']!r} not available offline"


def measure_matmul(device: torch.device, precision: str, size: int, reps: int, when: str) -> MatmulRate:
    """GFLOP/s of ``reps`` timed ``size x size`` matmuls in ``precision`` (after one warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device, DTYPES[precision]) for _ in range(2))
    rates = []
    for i in range(reps + 1):
        _, seconds = harness.timed(device, lambda: torch.mm(a, b))
        if i:
            rates.append(2 * size**3 / seconds / 1e9)
    return MatmulRate(precision, size, when, rates)


def make_call(tok: AnyTokenizer, part: str, batch_size: int, mode: str, device: torch.device) -> Callable[[], Any]:
    """A no-argument function running the row's public call on fixed random inputs."""
    cfg = tok.config
    gen = torch.Generator().manual_seed(0)
    precision = mode.partition("+")[0]
    if part == "encode":
        images = torch.rand(batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
        run = lambda: tok.encode(images)  # noqa: E731
    else:
        k = cfg.num_latent_tokens
        if tok.vocab_size is None:  # a continuous bottleneck (KL, none) decodes float latents (B, K, C)
            tokens = torch.randn(batch_size, k, cfg.code_dim, generator=gen).to(device)
        else:
            tokens = torch.randint(0, tok.vocab_size, (batch_size, k), generator=gen).to(device)
        run = lambda: tok.decode(tokens)  # noqa: E731

    def call() -> Any:
        with torch.inference_mode(), harness.autocast(device, precision):
            return run()

    return call


def estimate_s(flops_per_image: int, batch_size: int, rate: float) -> float:
    """Seconds of one call at ``rate`` FLOP/s."""
    return flops_per_image * batch_size / rate if rate > 0 else 0.0


def time_row(result: Result, call: Callable[[], Any], args: argparse.Namespace, warmup: int) -> None:
    """Run ``warmup`` untimed calls, then timed calls until ``--reps`` or ``--budget``; fills ``result``."""
    harness.reset_peak(args.device)
    try:
        times = harness.time_calls(lambda: [harness.timed(args.device, call)[1]], warmup, args.reps, args.budget)
        result.call_times = [t[0] for t in times]
        result.peak_mem_bytes = harness.peak_bytes(args.device)
    except Exception as err:  # report the row and go on: one bad config must not lose a long run
        result.call_times = []
        result.error = harness.failure(err)


def run_model(
    model: Model, args: argparse.Namespace, mm_now: dict[str, float], report: Callable[[Result], None]
) -> list[Result]:
    """Every row of one model: modes, then parts, then batch sizes (smallest first)."""
    device = torch.device(args.device)
    flops = part_flops(model)
    results: list[Result] = []
    space, missing = first_stage(model, args.random_first_stage)
    if missing:  # counted, but nothing to time: skip before building a model that cannot run
        for mode in args.modes:
            for part in model.parts:
                for batch in args.batch_sizes:
                    result = Result(Row(model, part, batch, mode), args.device, flops[part], skipped=missing)
                    result.load_after = harness.load_1min()
                    results.append(result)
                    report(result)
        return results
    try:
        tok = build(model, device)
        if space is not None:
            tok.attach_latent_space(space)
    except Exception as err:
        error = harness.failure(err)
        for mode in args.modes:
            for part in model.parts:
                for batch in args.batch_sizes:
                    results.append(Result(Row(model, part, batch, mode), args.device, flops[part], error=error))
        return results
    for mode in args.modes:
        precision, _, extra = mode.partition("+")
        with harness.compiled_parts(tok, ("encoder", "decoder", "pixel_decoder"), extra == "compile"):
            for part in model.parts:
                rate = mm_now[precision] * 1e9  # optimistic until this part has been timed
                warmed = False
                for batch in args.batch_sizes:
                    result = Result(Row(model, part, batch, mode), args.device, flops[part])
                    est = estimate_s(flops[part], batch, rate)
                    if args.max_call_s and est > args.max_call_s:
                        result.skipped = f"est. {est:.0f} s/call"
                    else:
                        # On CPU eager the one-time costs (allocator, oneDNN primitives) are small next to a
                        # multi-second call, so only a part's first batch size is warmed up; compile
                        # re-specialises per shape and CUDA calls are short, so there every batch is.
                        every = device.type == "cuda" or extra == "compile"
                        warmup = args.warmup if every or not warmed else 0
                        time_row(result, make_call(tok, part, batch, mode, device), args, warmup)
                        warmed = True
                        if result.call_times:
                            rate = result.gflops_per_s * 1e9
                    result.load_after = harness.load_1min()
                    results.append(result)
                    report(result)
    del tok
    harness.release(device)
    return results


def make_table(results: list[Result]) -> str:
    header = ["model", "part", "mode", "batch", "GFLOPs/img", "timed calls", "median call (s)", "min call (s)",
              "images/s", "GFLOP/s", "mm GFLOP/s", "% of mm", "peak mem (GiB)", "load 1m"]  # fmt: skip
    rows = []
    for r in results:
        cells = [r.row.model.label, PART_TEXT[r.row.part], f"{r.device} {r.row.mode}", str(r.row.batch_size)]
        cells.append(f"{r.flops_per_image / 1e9:.2f}")
        if r.call_times:
            cells += [
                str(len(r.call_times)),
                f"{r.median_s:.3f}",
                f"{min(r.call_times):.3f}",
                f"{r.images_per_s:.2f}",
                f"{r.gflops_per_s:.1f}",
                f"{r.mm_gflops:.0f}",
                f"{100 * r.gflops_per_s / r.mm_gflops:.0f}%",
                harness.gib(r.peak_mem_bytes),
            ]
        else:
            cells += ["-", "-", "-", "failed" if r.error else f"skipped ({r.skipped})", "-", "-", "-", "-"]
        cells.append(f"{r.load_after:.1f}")
        rows.append(cells)
    return harness.markdown_table(header, rows, left=3)


def make_matmul_table(rates: list[MatmulRate]) -> str:
    """One line per checkpoint of the run, median and best GFLOP/s of each precision."""
    precisions = list(dict.fromkeys(m.precision for m in rates))
    size, reps = rates[0].size, len(rates[0].rates)
    header = ["torch.mm measured"] + [f"{p} {stat} GFLOP/s" for p in precisions for stat in ("median", "best")]
    rows = []
    for when in dict.fromkeys(m.when for m in rates):
        by_precision = {m.precision: m for m in rates if m.when == when}
        rows.append(
            [when] + [f"{getattr(by_precision[p], stat):.1f}" for p in precisions for stat in ("median", "best")]
        )
    intro = f"`torch.mm` of two {size}x{size} matrices, {reps} timed after one warm-up, at each checkpoint:"
    return intro + "\n\n" + harness.markdown_table(header, rows)


def label(r: Result) -> str:
    return f"{r.row.model.label} {r.row.part} b{r.row.batch_size} {r.row.mode}"


def describe(result: Result) -> str:
    r = result
    if r.error:
        return f"error: {r.error}"
    if r.skipped:
        return f"skipped ({r.skipped})"
    return f"{r.images_per_s:.2f} images/s, {r.gflops_per_s:.1f} GFLOP/s ({len(r.call_times)} calls)"


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the benchmark; returns one :class:`Result` per row (failed rows carry ``error``)."""
    args = parse_args(argv)
    return harness.with_threads(args.threads, lambda: run(args, argv))


def run(args: argparse.Namespace, argv: list[str] | None) -> list[Result]:
    """Time every row, print the tables and write the section (see :func:`main`)."""
    device = torch.device(args.device)
    models = args.models
    precisions = list(dict.fromkeys(m.partition("+")[0] for m in args.modes))
    clock = harness.Clock()
    print(f"Timing {len(models)} models on {args.device} ({harness.machine_line(args.device)}); "
          f"load average {clock.loads[0]:.2f}")  # fmt: skip
    matmuls: list[MatmulRate] = []

    def checkpoint(when: str) -> dict[str, float]:
        """Time the matmuls now; returns the best GFLOP/s per precision."""
        now = [measure_matmul(device, p, args.mm_size, args.mm_reps, when) for p in precisions]
        matmuls.extend(now)
        rates = ", ".join(f"{m.precision} {m.best:.1f}" for m in now)
        print(f"  torch.mm {args.mm_size}^2 {when}: {rates} GFLOP/s", flush=True)
        return {m.precision: m.best for m in now}

    def report(r: Result) -> None:
        clock.seen(r.load_after)
        row = r.row
        print(f"  {row.model.label} {row.part} b{row.batch_size} {row.mode}: {describe(r)}", flush=True)

    # A shared machine's speed drifts (here by 2x within minutes), so the matmuls are timed before
    # every model and at the end; each row is compared with the faster of the two around its model.
    results: list[Result] = []
    before = checkpoint(f"before {models[0].label}")
    for i, model in enumerate(models):
        rows = run_model(model, args, before, report)
        after = checkpoint(f"before {models[i + 1].label}" if i + 1 < len(models) else "end")
        for r in rows:
            precision = r.row.mode.partition("+")[0]
            r.mm_gflops = max(before[precision], after[precision])
        results += rows
        before = after

    table, mm_table = make_table(results), make_matmul_table(matmuls)
    failed_notes = harness.print_outcome(clock, [mm_table, table], results, label)
    sync, peak, warm = harness.measured_notes(
        args.device,
        "around each call",
        "a row's warm-up and timed calls (weights included)",
        "before the first (smallest) batch size of each model/part/mode (before every batch size with compile)",
    )
    notes = [
        "- `encode` is `tokenizer.encode(images)` (value checks, encoder, quantizer) on random 256x256 (tiny: 64x64) "
        "images; `decode` is `tokenizer.decode(tokens)` on random ids; `decode (two-stage, to pixels)` is the decode "
        "of a `head='proxy_codes'` tokenizer whose pixel decoder is the proxy's codebook + MaskGIT-VQGAN conv decoder. "
        "Random weights (a clamped normal stands in for truncated-normal init, which is slow to sample; values do "
        "not change op costs), eval mode, `torch.inference_mode`; bf16/fp16 are autocast.",
        f"- {args.warmup} warm-up call(s) {warm}, then up to {args.reps} timed calls per row, stopping once "
        f"{args.budget:g} s of timed calls have passed (at least one); {sync}images/s = batch / median call "
        f"(min call: the least disturbed one); {peak}. A row with one timed call is a single measurement.",
        "- GFLOPs/img: forward matmul/conv FLOPs (2 per multiply-add) per image from FlopCounterMode on the meta "
        "device (attention counted on the math SDPA backend; quantizer and element-wise ops not counted). GFLOP/s = "
        "GFLOPs/img x images/s; `mm GFLOP/s` is the best `torch.mm` rate of the row's precision at the checkpoints "
        "just before and after its model (table above) and `% of mm` the row's share of it: the gap to what this "
        "machine's matmul reached at that time.",
        (
            f"- Rows whose single call was estimated above {args.max_call_s:g} s (from the same model/part/mode at a "
            "smaller batch, else from the matmul rate, which is optimistic) are skipped and marked so "
            "(`--max-call-s 0` runs them all)."
            if args.max_call_s
            else "- No row was skipped for time (`--max-call-s 0`)."
        ),
        harness.load_note(
            clock,
            "a load above this run's thread count means they competed for the cores and the rates here are lower "
            "bounds (min call shows the least disturbed one)",
        ),
    ]
    if any(hasattr(preset_config(m.preset), "latent_space") for m in models):
        notes.append(
            "- Latent tokenizers (SemTok): `decode` runs the flow decoder's default number of Euler steps "
            "(`sample_steps`), and GFLOPs/img counts that many decoder calls; the frozen first stage (a VAE) runs "
            "inside encode and decode but its FLOPs are not counted. Its rows are skipped when the first stage is "
            "not available offline (never downloaded here)"
            + (
                ", unless `--random-first-stage` (this run) put SD3.5's VAE architecture with random weights in its "
                "place: the same compute, so the timings hold."
                if args.random_first_stage
                else "."
            )
        )
    quick = " (quick)" if args.quick else ""
    name = "throughput-quick" if args.quick else "throughput"
    harness.publish(args, name, f"Inference throughput{quick}", __file__, argv, [mm_table, table],
                    notes + failed_notes, args.device)  # fmt: skip
    return results


if __name__ == "__main__":
    sys.exit(1 if any(r.error for r in main()) else 0)
