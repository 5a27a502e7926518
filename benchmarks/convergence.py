"""How fast the tiny tokenizers learn, against a calibration measured in the same run.

Every row trains on the same data stream (the 50,000 Tiny ImageNet training images of
``tiny-imagenet-64-train``, WebDataset shards, random crops and flips) and is measured with its
EMA weights on the same held-out images (Tiny ImageNet's validation images in
``tiny-imagenet-64``, never trained on, spread over the 200 classes), every ``--val-every``
steps: PSNR and SSIM at fixed steps, PSNR at fixed training time, and seconds per step. Three
groups of rows:

* **candidates**: ``titok_tiny`` as it was before this study (learned positions, random
  latents, no qk-norm, lr 5e-4), then each candidate fix applied alone to it (sin-cos
  positions with grid latents and mimetic attention init are one idea in three parts);
* **recipe**: the chosen combination on TiTok and MsTok, with VQ (V = 1024, 320 bits) and
  with no quantizer at all (a continuous 32 x 12 bottleneck);
* **calibration**: a plain conv autoencoder (``convae_tiny``, 0.63M parameters) with the same
  continuous bottleneck size (8 x 8 x 6 = 384 floats) and with VQ at equal bits (64 codes of
  V = 32 = 320 bits), and each held-out image painted in its own mean colour.

    python benchmarks/convergence.py                      # all rows, 400 steps, 2 rows at a time
    python benchmarks/convergence.py --steps 2000 --groups recipe,calibration
    python benchmarks/convergence.py --rows "titok VQ (recipe)" --steps 200 --no-append

``--jobs 2`` trains two rows at once with one thread each (on 2 cores, the fairest use of the
machine: every row sees the same contention, so seconds per step compare across rows).
Finished rows are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
The table, a PSNR-vs-step plot and the command go to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mstok.data import ImageFolder, RandomResizedCropFlip, center_crop_transform, open_image_dataset
from mstok.evaluation.metrics import mean_colour, psnr, ssim
from mstok.evaluation.report import append_section, command_line, load_1min, load_summary, results_section
from mstok.tokenizers import create_tokenizer
from mstok.training import Trainer, load_train_config
from mstok.training.recipes import tiny_settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "tiny-imagenet-64"  # the held-out images
TRAIN_DATA = ROOT.parent / "shared" / "datasets" / "tiny-imagenet-64-train"  # the training shards
# The tiny presets before this study: random positions and latents, no qk-norm.
BEFORE = {"position_embedding": "learned", "latent_init": "random", "attention_init": "random", "qk_norm": False}
# Today's titok_tiny.toml optimiser before this study (lr 5e-4, warmup 100, betas 0.9/0.99).
BASELINE_OPTIM = ["optim.lr=5e-4", "optim.end_lr=5e-5", "optim.warmup_steps=100", "optim.betas=[0.9, 0.99]"]
RECIPE_OPTIM = tiny_settings()  # the recipe this study chose (mstok.training.recipes)


@dataclass
class Row:
    """One training run of the table: a preset, config-field overrides and run settings."""

    group: str
    preset: str
    model: dict[str, Any] = field(default_factory=dict)
    settings: list[str] = field(default_factory=list)


def _candidate(**switches: Any) -> Row:
    return Row("candidates", "titok_tiny", {**BEFORE, **switches}, BASELINE_OPTIM)


ROWS: dict[str, Row] = {
    "titok VQ before (learned pos. lr 5e-4)": _candidate(),
    "+ lr 2e-3 betas 0.95 warmup 50": Row("candidates", "titok_tiny", BEFORE, RECIPE_OPTIM),
    "+ qk-norm": _candidate(qk_norm=True),
    "+ sincos positions": _candidate(position_embedding="sincos"),
    "+ mimetic attention init": _candidate(attention_init="mimetic"),
    "+ sincos + grid latents": _candidate(position_embedding="sincos", latent_init="grid"),
    "+ sincos + grid latents + mimetic": _candidate(
        position_embedding="sincos", latent_init="grid", attention_init="mimetic"
    ),
    "+ conv pixel head": _candidate(pixel_head="conv"),
    # the recipe: the tiny presets as shipped (sincos, grid latents, mimetic init, qk-norm) + its optimiser
    "titok VQ (recipe)": Row("recipe", "titok_tiny", {}, RECIPE_OPTIM),
    "titok VQ (recipe) MSE only": Row("recipe", "titok_tiny", {}, [*RECIPE_OPTIM, "loss.l1_weight=0"]),
    # "continuous": no quantizer, latents L2-normalised like VQ's (use_l2_norm, the default);
    # "raw": not normalised (how the first continuous rows ran: they started slower than VQ)
    "titok continuous (recipe)": Row("recipe", "titok_tiny", {"quantizer": "none"}, RECIPE_OPTIM),
    # the recipe's peak lr halved: at 2000 steps the continuous row stayed on the plateau at 2e-3
    "titok continuous (recipe) at lr 1e-3": Row(
        "recipe", "titok_tiny", {"quantizer": "none"}, [*RECIPE_OPTIM, "optim.lr=1e-3", "optim.end_lr=1e-4"]
    ),
    "titok continuous raw (recipe)": Row(
        "recipe", "titok_tiny", {"quantizer": "none", "use_l2_norm": False}, RECIPE_OPTIM
    ),
    "mstok VQ (recipe)": Row("recipe", "mstok_tiny", {}, RECIPE_OPTIM),
    "mstok continuous (recipe)": Row("recipe", "mstok_tiny", {"quantizer": "none"}, RECIPE_OPTIM),
    "conv AE continuous 8x8x6": Row(
        "calibration", "convae_tiny", {"quantizer": "none", "use_l2_norm": False}, RECIPE_OPTIM
    ),
    "conv AE VQ 8x8 V=32 (320 bits)": Row("calibration", "convae_tiny", {}, RECIPE_OPTIM),
}
GROUPS = ("candidates", "recipe", "calibration")
LOGGED_TERMS = ("l1", "mse", "entropy", "commitment", "codebook", "usage", "perplexity")


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


def checked_rows(
    parser: argparse.ArgumentParser, args: argparse.Namespace, rows: dict[str, Row], default: list[str]
) -> list[str]:
    """The rows ``--rows`` names (comma-separated; ``default`` when empty), after checking that each
    is known, that the data folders exist, and that each row's model builds: every bad input fails
    here, before any training."""
    names = [n.strip() for n in args.rows.split(",") if n.strip()] or default
    unknown = [n for n in names if n not in rows]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; known: {', '.join(rows)}")
    check_data_arguments(parser, args)
    for name in names:
        create_tokenizer(rows[name].preset, **rows[name].model)
    return names


@functools.cache  # a worker process trains several rows: list the folder once
def folder_labels(data: str) -> tuple[int, ...]:
    """The class index (sorted class folders) of every image of the held-out folder, in its order."""
    return tuple(label for _, label in ImageFolder(data, center_crop_transform(64)).samples)


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
    """The training images (shards or a folder) with the study's augmentation (random crops of
    80-100% of the area and flips) unless ``transform`` is given."""
    return open_image_dataset(train_data, transform or RandomResizedCropFlip(64, (0.8, 1.0)))


@functools.cache
def held_out_images(data: str, indices: tuple[int, ...]) -> torch.Tensor:
    """The held-out images, center-cropped: (N, 3, 64, 64) in [0, 1]."""
    fixed = ImageFolder(data, center_crop_transform(64))
    return torch.stack([fixed[(i, 0)][0] for i in indices])


def held_out_labels(data: str, indices: tuple[int, ...]) -> torch.Tensor:
    """The class index of each of :func:`held_out_images`' images: (N,) int64."""
    labels = folder_labels(data)
    return torch.tensor([labels[i] for i in indices], dtype=torch.long)


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal for a ``key=value`` override (a dict becomes an inline table)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are written alike in JSON and TOML


def bit_entropies(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, ...) int64 bit ids (LFQ, BSQ) -> (..., C) the binary entropy of each bit over the N ids,
    in bits: 1 = a fair coin, 0 = the same value for every id."""
    p = ((ids[..., None] >> torch.arange(bits)) & 1).double().mean(0)  # share of ones
    return (-torch.special.xlogy(p, p) - torch.special.xlogy(1 - p, 1 - p)) / math.log(2)


@torch.no_grad()
def held_out_metrics(model: torch.nn.Module, images: torch.Tensor, batch: int = 250) -> dict[str, float]:
    """PSNR and SSIM of ``model``'s reconstructions of ``images`` and, for a tokenizer with ids,
    the quantizer's usage statistics of them (the fraction of the codebook used, the code
    perplexity) and for bit ids (LFQ, BSQ) the mean and least binary entropy of a bit."""
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


def run_dir(args: argparse.Namespace, name: str, seed: int = 0) -> Path:
    """Where :func:`run_row` trains row ``name`` with ``seed`` (under ``args.work_dir``)."""
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return Path(args.work_dir) / (slug if seed == 0 else f"{slug}_seed{seed}")


def run_row(name: str, args: argparse.Namespace, threads: int, row: Row | None = None, seed: int = 0) -> dict[str, Any]:
    """Train one row (``ROWS[name]`` unless ``row`` is given) with ``seed``, or reuse a finished
    one; return its val history, timings and the held-out codebook usage of its EMA weights."""
    row = ROWS[name] if row is None else row
    out = run_dir(args, name, seed)
    identity = {"preset": row.preset, "model": row.model, "settings": row.settings, "steps": args.steps,
                "batch_size": args.batch_size, "val_every": args.val_every, "val_images": args.val_images,
                "train_data": Path(args.train_data).name, "held_out": Path(args.data).name,
                "final_images": getattr(args, "final_images", 0)}  # fmt: skip
    if seed:
        identity["seed"] = seed  # seed 0 leaves the identity (and finished rows) as before
    done = out / "result.json"
    if done.is_file() and not args.fresh:
        saved = json.loads(done.read_text())
        if saved.get("identity") == identity:
            return saved
    if out.exists():
        shutil.rmtree(out)  # a stale or unfinished run: the trainer would resume it
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
    done.write_text(json.dumps(result, indent=2))
    return result


def run_pooled(
    jobs: int, tasks: dict[Any, Callable[[], Any]], report: Callable[[Any, Any], str], loads: list[float]
) -> dict[Any, Any]:
    """Run ``tasks`` (picklable zero-argument callables: ``functools.partial`` of a module-level
    function) ``jobs`` at a time in worker processes and return their results by key, in the
    tasks' order. As each result is collected (in that order), ``report(key, result)`` is
    printed and the 1-minute load appended to ``loads`` (for :func:`load_summary`)."""
    done: dict[Any, Any] = {}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {key: pool.submit(task) for key, task in tasks.items()}
        for key, future in futures.items():
            done[key] = future.result()
            loads.append(load_1min())
            print(report(key, done[key]), flush=True)
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


def mean_colour_floor(data: str, val_images: int) -> tuple[float, float]:
    """(PSNR, SSIM) of painting each held-out image in its own mean colour: the floor every row is read against."""
    images = held_out_images(data, tuple(held_out_indices(data, val_images)))
    flat = mean_colour(images)
    return float(np.mean(psnr(images, flat))), float(np.mean(ssim(images, flat)))


def _at_time(val: list[dict[str, Any]], seconds: float) -> float:
    """PSNR of the last validation whose training time is within ``seconds`` (NaN if none)."""
    within = [r["val_psnr"] for r in val if r["train_seconds"] <= seconds]
    return within[-1] if within else math.nan


def table(results: dict[str, dict[str, Any]], floor: tuple[float, float], args: argparse.Namespace) -> str:
    """Markdown: one row per run, PSNR at each validation step, at fixed times, final SSIM, s/step."""
    steps = sorted({r["step"] for res in results.values() for r in res["val"]})
    shown = [s for s in steps if s in _milestones(args.steps, args.val_every)]
    times = [float(t) for t in args.wall.split(",") if t]
    head = ["row", "params", "s/step", *[f"PSNR @{s}" for s in shown], *[f"PSNR @{t:.0f}s" for t in times],
            f"SSIM @{args.steps}"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for name, res in results.items():
        by_step = {r["step"]: r for r in res["val"]}
        cells = [name, f"{res['params'] / 1e6:.2f}M", f"{res['seconds_per_step']:.3f}"]
        cells += [f"{by_step[s]['val_psnr']:.2f}" if s in by_step else "-" for s in shown]
        at_times = [_at_time(res["val"], t) for t in times]
        cells += ["-" if math.isnan(v) else f"{v:.2f}" for v in at_times]  # no validation by then
        cells.append(f"{by_step[args.steps]['val_ssim']:.4f}" if args.steps in by_step else "-")
        lines.append("| " + " | ".join(cells) + " |")
    psnr_cells = [f"{floor[0]:.2f}"] * (len(shown) + len(times))
    lines.append("| each image in its mean colour | - | - | " + " | ".join(psnr_cells) + f" | {floor[1]:.4f} |")
    return "\n".join(lines)


def _milestones(steps: int, every: int) -> set[int]:
    """About four evenly spaced validation steps to show in the table, the last included."""
    all_steps = list(range(every, steps + 1, every))
    if all_steps[-1] != steps:
        all_steps.append(steps)
    pick = max(1, len(all_steps) // 4)
    return {s for i, s in enumerate(all_steps, start=1) if i % pick == 0} | {steps}


def plot(results: dict[str, dict[str, Any]], floor: float, path: Path) -> None:
    """Held-out PSNR against step for every row, with the mean-colour floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, res in results.items():
        group = ROWS[name.split(SEED_TAG)[0]].group
        style = {"candidates": ":", "recipe": "-", "calibration": "--"}[group]
        ax.plot([r["step"] for r in res["val"]], [r["val_psnr"] for r in res["val"]], style, label=name)
    ax.axhline(floor, color="grey", lw=0.8, label="mean colour")
    ax.set_xlabel("step (batch 32)")
    ax.set_ylabel("held-out PSNR (dB), EMA weights")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--val-images", type=int, default=200, help="held-out images (one per class first)")
    parser.add_argument("--wall", default="60,120", help="training seconds at which to read PSNR")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: every row of --groups)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per row, each its own table row (default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="rows trained at once (one thread each when > 1)")
    parser.add_argument("--threads", type=int, default=0, help="threads per row with --jobs 1 (0 = auto)")
    parser.add_argument("--work-dir", default="runs/convergence")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "convergence.png"))
    parser.add_argument("--no-append", action="store_true", help="print only; write neither --out nor --plot")
    parser.add_argument("--fresh", action="store_true", help="retrain finished rows")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    names = checked_rows(parser, args, ROWS, [n for n, r in ROWS.items() if r.group in groups])

    loads, started = [load_1min()], time.perf_counter()
    threads = 1 if args.jobs > 1 else args.threads

    def report(name: str, result: dict[str, Any]) -> str:
        last = result["val"][-1]
        return (f"{name}: PSNR {last['val_psnr']:.2f} SSIM {last['val_ssim']:.4f} at step {last['step']}, "
                f"{result['seconds_per_step']:.3f} s/step")  # fmt: skip

    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    # seed 0 keeps the row's name (and its finished run); seed s > 0 is the row "name [seed s]"
    tasks = {
        seeded_name(name, seed): functools.partial(run_row, name, args, threads, seed=seed)
        for name in names
        for seed in range(args.seeds)
    }
    results: dict[str, dict[str, Any]] = run_pooled(args.jobs, tasks, report, loads)

    floor = mean_colour_floor(args.data, args.val_images)
    text = table(results, floor, args)
    print(text)
    if not args.no_append:
        plot(results, floor[0], Path(args.plot))
        minutes = (time.perf_counter() - started) / 60
        notes = [
            f"{args.steps} steps of batch {args.batch_size} per row; {args.val_images} held-out images validated "
            f"every {args.val_every} steps with EMA weights; {args.jobs} rows at a time "
            f"({threads or 'auto'} thread(s) each); {minutes:.0f} min in all (reused rows count 0); "
            f"{load_summary(loads)}. PSNR @Ns reads the last validation within N s of training time "
            f"(data + steps; validation excluded). Plot: `{Path(args.plot).name}`.",
        ]
        section = results_section("Convergence of the tiny tokenizers", command_line(__file__, argv), "cpu",
                                  [text], notes)  # fmt: skip
        append_section(args.out, section)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
