"""The quantizer zoo at equal bits: VQ, FSQ, LFQ, BSQ and KL inside the tiny tokenizers.

Every row is the tiny recipe of the convergence study (``benchmarks/convergence.py``: the same
data stream, 35 training images per class of tiny-imagenet-64, the same held-out images, EMA
weights) with one bottleneck swapped in by config data (``model.overrides.quantizer``), at about
10 bits per token: VQ with V = 1024 (Adam-learnt codebook, and with EMA updates and k-means
initialisation), FSQ with levels [8, 5, 5, 5] (1000 codes), LFQ and BSQ with 10 bits (1024
codes; also with a tenth of the papers' entropy weight), and a KL (Gaussian) bottleneck of the
same C = 12 as the VQ rows as the continuous reference. Each row runs with ``--seeds`` seeds;
the table gives the mean and half the spread (max - min) of held-out PSNR, and SSIM, codebook
usage and perplexity on the held-out images, and seconds per step. Calibration measured in the
same run: the conv autoencoder with a discrete bottleneck of equal bits (64 codes of V = 32 =
320 bits) and each image in its mean colour.

    python benchmarks/quantizers.py                        # TiTok, 400 steps, 2 seeds, 2 runs at a time
    python benchmarks/quantizers.py --presets titok_tiny,mstok_tiny --steps 600
    python benchmarks/quantizers.py --rows "FSQ 8-5-5-5" --seeds 1 --steps 50 --no-append

Finished runs are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mstok.evaluation.report import append_section, command_line, load_1min, load_summary, results_section
from mstok.tokenizers import create_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script convergence.py
from convergence import RECIPE_OPTIM, Row, by_row, mean_colour_floor, run_pooled, run_row

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "tiny-imagenet-64"

# row name -> (model overrides on the tiny preset, bits per token as a label)
BOTTLENECKS: dict[str, tuple[dict[str, Any], str]] = {
    "VQ V=1024": ({}, "10"),
    "VQ V=1024 EMA + k-means": ({"quantizer": {"type": "vq", "ema": True, "kmeans_init": True}}, "10"),
    "FSQ 8-5-5-5": ({"quantizer": {"type": "fsq", "levels": [8, 5, 5, 5]}, "code_dim": 4}, "9.97"),
    # latents L2-normalised to norm 1.5 before the bound: the tanh cannot saturate
    "FSQ 8-5-5-5 l2-normed": (
        {"quantizer": {"type": "fsq", "levels": [8, 5, 5, 5], "l2_norm_scale": 1.5}, "code_dim": 4},
        "9.97",
    ),
    "LFQ 10 bits": ({"quantizer": "lfq", "code_dim": 10}, "10"),
    "BSQ 10 bits": ({"quantizer": "bsq", "code_dim": 10}, "10"),
    # the papers' entropy weight (0.1) is set against their loss scale (perceptual + GAN terms);
    # against this recipe's L1 + MSE it dominates the objective (the total goes negative)
    "LFQ 10 bits entropy 0.01": ({"quantizer": {"type": "lfq", "entropy_weight": 0.01}, "code_dim": 10}, "10"),
    "BSQ 10 bits entropy 0.01": ({"quantizer": {"type": "bsq", "entropy_weight": 0.01}, "code_dim": 10}, "10"),
    "KL C=12 (continuous)": ({"quantizer": "vae"}, "- (12 floats)"),
}
CALIBRATION = ("conv AE VQ 8x8 V=32 (320 bits)", Row("calibration", "convae_tiny", {}, RECIPE_OPTIM))


def runs(presets: list[str], names: list[str]) -> dict[str, Row]:
    """Every row to train, named ``"<family>: <bottleneck>"``, then the conv calibration."""
    rows = {
        f"{preset.split('_')[0]}: {name}": Row("quantizers", preset, BOTTLENECKS[name][0], RECIPE_OPTIM)
        for preset in presets
        for name in names
    }
    rows[CALIBRATION[0]] = CALIBRATION[1]
    return rows


def _cell(values: list[float], digits: int) -> str:
    """``mean ± spread/2`` of the seeds (just the value for one seed); '-' when missing."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def table(rows: dict[str, Row], results: dict[str, list[dict[str, Any]]], floor: tuple[float, float]) -> str:
    """Markdown: one line per row, seeds pooled (mean ± half the max-min spread)."""
    head = ["row", "bits/token", "params", "s/step", "PSNR", "SSIM", "usage", "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, seeds in results.items():
        bottleneck = name.split(": ", 1)[-1]
        bits = BOTTLENECKS[bottleneck][1] if bottleneck in BOTTLENECKS else "5 (x64)"
        final = [s["val"][-1] for s in seeds]
        cells = [
            name,
            bits,
            f"{seeds[0]['params'] / 1e6:.2f}M",
            _cell([s["seconds_per_step"] for s in seeds], 3),
            _cell([f["val_psnr"] for f in final], 2),
            _cell([f["val_ssim"] for f in final], 4),
            _cell([s.get("usage") for s in seeds], 3),
            _cell([s.get("perplexity") for s in seeds], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| each image in its mean colour | - | - | - | {floor[0]:.2f} | {floor[1]:.4f} | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="tiny-imagenet-64 folder (200 classes x 40)")
    parser.add_argument("--presets", default="titok_tiny", help="comma-separated tiny presets")
    parser.add_argument("--rows", default=",".join(BOTTLENECKS), help="comma-separated bottleneck names")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=200, help="held-out images (one per class first)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each when > 1)")
    parser.add_argument("--threads", type=int, default=0, help="threads per run with --jobs 1 (0 = auto)")
    parser.add_argument("--work-dir", default="runs/quantizers")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="print only; do not write --out")
    parser.add_argument("--fresh", action="store_true", help="retrain finished runs")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in BOTTLENECKS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; known: {', '.join(BOTTLENECKS)}")
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data} not found (tiny-imagenet-64 ships in ../shared/datasets)")
    rows = runs([p.strip() for p in args.presets.split(",") if p.strip()], names)
    for row in rows.values():  # fail fast on a bad row, before any training
        create_tokenizer(row.preset, **row.model)

    loads, started = [load_1min()], time.perf_counter()
    threads = 1 if args.jobs > 1 else args.threads

    def report(key: tuple[str, int], result: dict[str, Any]) -> str:
        last = result["val"][-1]
        return (f"{key[0]} seed {key[1]}: PSNR {last['val_psnr']:.2f} SSIM {last['val_ssim']:.4f} "
                f"usage {result.get('usage', float('nan')):.3f}, {result['seconds_per_step']:.3f} s/step")  # fmt: skip

    tasks = {(name, seed): functools.partial(run_row, name, args, threads, row, seed)
             for name, row in rows.items() for seed in range(args.seeds)}  # fmt: skip
    results = by_row(run_pooled(args.jobs, tasks, report, loads))

    floor = mean_colour_floor(args.data, args.val_images)
    text = table(rows, results, floor)
    print(text)
    if not args.no_append:
        minutes = (time.perf_counter() - started) / 60
        notes = [
            f"{args.steps} steps of batch {args.batch_size} per run, the tiny recipe; {args.seeds} seeds per row "
            f"(mean ± half the spread); {args.val_images} held-out images, EMA weights; usage and perplexity "
            f"of the held-out ids; {args.jobs} runs at a time ({threads or 'auto'} thread(s) each); "
            f"{minutes:.0f} min in all (reused runs count 0); {load_summary(loads)}.",
        ]
        section = results_section("Quantizers at equal bits", command_line(__file__, argv), "cpu", [text], notes)
        append_section(args.out, section)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
