"""HieraTok at tiny scale: single vs multi-scale, conv vs area, the three scale masks, latent uniformity.

The tiny-scale reading of HieraTok's Tables 2-5 (``../shared/papers/hieratok.txt``). Every row is
a tiny HieraTok (64 px, patch 8, width 128, depth 4, KL latents of C = 6 per token) trained with
the tiny recipe on the data stream of the convergence study (``benchmarks/convergence.py``: 35
images per class of tiny-imagenet-64; the same 200 held-out images, EMA weights):

* **single-scale**: the 8 x 8 token map decoded at one scale (``hieratok_single_tiny``, 384 floats);
* **multi-scale** (the paper's placement, ``pyramid = "decoder"``: the same 8 x 8 x 6 latent, the
  decoder builds the 1-2-4-8 pyramid of 85 tokens and the multi-scale RGB loss supervises every
  scale): conv vs area downsampling, and scale-causal vs scale-independent vs full attention;
* **multi-scale, pyramid as codes** (``pyramid = "encoder"``, the ``hieratok_tiny`` preset: the 85
  pyramid tokens are the latents, 510 floats);
* **calibration**: the conv autoencoder with the same 8 x 8 x 6 continuous bottleneck, and each
  image in its mean colour.

Per run: held-out PSNR/SSIM, and the latent-space uniformity of Table 5 (t-SNE of the held-out
images' latents, Gaussian KDE: density CV and Gini, lower = more uniform; normalised entropy,
higher = more uniform; :mod:`mstok.evaluation.uniformity`). ``--seeds`` seeds per row, mean ± half
the spread.

    python benchmarks/hieratok.py                                  # every row, 400 steps, 2 seeds
    python benchmarks/hieratok.py --rows "single-scale" --seeds 1 --steps 50 --no-append

Finished runs are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from mstok.evaluation.report import append_section, command_line, load_1min, load_summary, results_section
from mstok.tokenizers import create_tokenizer, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from convergence import RECIPE_OPTIM, Row, _split, held_out_images, mean_colour_floor, run_row
from quantizers import _cell

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "tiny-imagenet-64"
MULTISCALE = [*RECIPE_OPTIM, "loss.multiscale_weight=1.0"]
PAPER = {"pyramid": "decoder"}  # K follows the placement: the 8x8 map

ROWS: dict[str, Row] = {
    "single-scale (8)": Row("hieratok", "hieratok_single_tiny", {}, RECIPE_OPTIM),
    "multi-scale conv scale-causal": Row("hieratok", "hieratok_tiny", dict(PAPER), MULTISCALE),
    "multi-scale area scale-causal": Row("hieratok", "hieratok_tiny", {**PAPER, "downsample": "area"}, MULTISCALE),
    "multi-scale conv scale-independent": Row(
        "hieratok", "hieratok_tiny", {**PAPER, "attention": "scale_independent"}, MULTISCALE
    ),
    "multi-scale conv full attention": Row("hieratok", "hieratok_tiny", {**PAPER, "attention": "full"}, MULTISCALE),
    "multi-scale conv scale-causal; pyramid as codes (K=85)": Row("hieratok", "hieratok_tiny", {}, MULTISCALE),
    "conv AE continuous 8x8x6": Row(
        "calibration", "convae_tiny", {"quantizer": "none", "use_l2_norm": False}, RECIPE_OPTIM
    ),
}


def run_with_uniformity(name: str, args: argparse.Namespace, threads: int, seed: int) -> dict[str, Any]:
    """Train (or reuse) one run, then measure the uniformity of its EMA latents on the held-out images."""
    import torch

    from mstok.evaluation.uniformity import latent_uniformity

    result = run_row(name, args, threads, ROWS[name], seed)
    if "uniformity" not in result:
        torch.set_num_threads(max(1, threads))
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        out = Path(args.work_dir) / (slug if seed == 0 else f"{slug}_seed{seed}")
        model = load_tokenizer(out).eval()
        _, val_idx = _split(args.data, args.val_images)
        stats = latent_uniformity(model, held_out_images(args.data, tuple(val_idx)), seed=0)
        result["uniformity"] = {k: float(stats[k]) for k in ("density_cv", "gini", "normalized_entropy")}
        result["latent_floats"] = model.config.num_latent_tokens * model.config.code_dim
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def table(results: dict[str, list[dict[str, Any]]], floor: tuple[float, float]) -> str:
    """Markdown: one line per row, seeds pooled (mean ± half the max-min spread)."""
    head = ["row", "latent floats", "params", "s/step", "PSNR", "SSIM", "density CV ↓", "Gini ↓", "norm. entropy ↑"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, seeds in results.items():
        final = [s["val"][-1] for s in seeds]
        uni = [s["uniformity"] for s in seeds]
        cells = [
            name,
            str(seeds[0]["latent_floats"]),
            f"{seeds[0]['params'] / 1e6:.2f}M",
            _cell([s["seconds_per_step"] for s in seeds], 3),
            _cell([f["val_psnr"] for f in final], 2),
            _cell([f["val_ssim"] for f in final], 4),
            *[_cell([u[k] for u in uni], 3) for k in ("density_cv", "gini", "normalized_entropy")],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| each image in its mean colour | - | - | - | {floor[0]:.2f} | {floor[1]:.4f} | - | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="tiny-imagenet-64 folder (200 classes x 40)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (row names hold no commas)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=200, help="held-out images (one per class first)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each when > 1)")
    parser.add_argument("--threads", type=int, default=0, help="threads per run with --jobs 1 (0 = auto)")
    parser.add_argument("--work-dir", default="runs/hieratok")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="print only; do not write --out")
    parser.add_argument("--fresh", action="store_true", help="retrain finished runs")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data} not found (tiny-imagenet-64 ships in ../shared/datasets)")
    for name in names:  # fail fast on a bad row, before any training
        create_tokenizer(ROWS[name].preset, **ROWS[name].model)

    loads, started = [load_1min()], time.perf_counter()
    threads = 1 if args.jobs > 1 else args.threads
    results: dict[str, list[dict[str, Any]]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            (name, seed): pool.submit(run_with_uniformity, name, args, threads, seed)
            for name in names
            for seed in range(args.seeds)
        }
        for (name, seed), future in futures.items():
            result = future.result()
            results.setdefault(name, []).append(result)
            loads.append(load_1min())
            last, uni = result["val"][-1], result["uniformity"]
            print(f"{name} seed {seed}: PSNR {last['val_psnr']:.2f} SSIM {last['val_ssim']:.4f} "
                  f"CV {uni['density_cv']:.3f} Gini {uni['gini']:.3f} H {uni['normalized_entropy']:.3f}, "
                  f"{result['seconds_per_step']:.3f} s/step", flush=True)  # fmt: skip

    floor = mean_colour_floor(args.data, args.val_images)
    text = table(results, floor)
    print(text)
    if not args.no_append:
        minutes = (time.perf_counter() - started) / 60
        notes = [
            f"{args.steps} steps of batch {args.batch_size} per run, the tiny recipe (multi-scale rows: "
            f"loss.multiscale_weight = 1); {args.seeds} seeds per row (mean ± half the spread); "
            f"{args.val_images} held-out images, EMA weights, uniformity of their posterior-mean latents; "
            f"{args.jobs} runs at a time ({threads or 'auto'} thread(s) each); {minutes:.0f} min in all "
            f"(reused runs count 0); {load_summary(loads)}.",
        ]
        section = results_section("HieraTok at tiny scale", command_line(__file__, argv), "cpu", [text], notes)
        append_section(args.out, section)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
