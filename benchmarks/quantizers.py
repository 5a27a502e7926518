"""The quantizer zoo at equal bits: VQ, FSQ, LFQ, BSQ and KL inside the tiny tokenizers.

Every row is the tiny recipe of the convergence study (``benchmarks/convergence.py``: the same
data stream from the 50,000 Tiny ImageNet training images, EMA weights) with one bottleneck
swapped in by config data (``model.overrides.quantizer``), at about 10 bits per token: VQ with
V = 1024 (Adam-learnt codebook, and with EMA updates and k-means initialisation), FSQ with
levels [8, 5, 5, 5] (1000 codes), LFQ and BSQ with 10 bits (1024 codes) as shipped and with the
papers' settings (MAGVIT-v2's LFQ, BSQ-ViT's BSQ), BSQ with 18 bits (SemTok's 2^18 codes), and
a KL (Gaussian) bottleneck of the same C = 12 as the VQ rows as the continuous reference. Each
row runs with ``--seeds`` seeds; the table gives the mean and half the spread (max - min) over
seeds of PSNR and SSIM on ``--final-images`` held-out images (Tiny ImageNet's validation set,
never trained on), the fraction of the codebook those images use, the code perplexity of their
ids, the mean binary entropy of the bits (bit quantizers), and seconds per step. Calibration
measured in the same run: the conv autoencoder with a discrete bottleneck of equal bits (64 codes
of V = 32 = 320 bits) and each image in its mean colour.

    python benchmarks/quantizers.py --rows "VQ V=1024,LFQ 10 bits,BSQ 10 bits,BSQ 18 bits"  # 2000 steps, 2 seeds
    python benchmarks/quantizers.py --presets titok_tiny,mstok_tiny --steps 600
    python benchmarks/quantizers.py --rows "FSQ 8-5-5-5" --seeds 1 --steps 50 --no-write

Finished runs are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import functools
import sys
import textwrap
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import BSQ_VIT, MAGVIT_LFQ, Row

# row name -> (model overrides on the tiny preset, bits per token as a label)
BOTTLENECKS: dict[str, tuple[dict[str, Any], str]] = {
    "VQ V=1024": ({}, "10"),
    "VQ V=1024 EMA + k-means": ({"quantizer": {"type": "vq", "ema": True, "kmeans_init": True}}, "10"),
    "FSQ 8-5-5-5": ({"quantizer": {"type": "fsq", "levels": [8, 5, 5, 5]}}, "9.97"),
    # latents L2-normalised to norm 1.5 before the bound: the tanh cannot saturate
    "FSQ 8-5-5-5 l2-normed": ({"quantizer": {"type": "fsq", "levels": [8, 5, 5, 5], "l2_norm_scale": 1.5}}, "9.97"),
    "LFQ 10 bits": ({"quantizer": "lfq", "code_dim": 10}, "10"),
    "BSQ 10 bits": ({"quantizer": "bsq", "code_dim": 10}, "10"),
    "BSQ 18 bits": ({"quantizer": "bsq", "code_dim": 18}, "18"),
    # the entropy weight (default 0.005; before, 0.1: the papers')
    "LFQ 10 bits entropy 0.1": ({"quantizer": {"type": "lfq", "entropy_weight": 0.1}, "code_dim": 10}, "10"),
    "BSQ 10 bits entropy 0.1": ({"quantizer": {"type": "bsq", "entropy_weight": 0.1}, "code_dim": 10}, "10"),
    "BSQ 10 bits entropy 0.02": ({"quantizer": {"type": "bsq", "entropy_weight": 0.02}, "code_dim": 10}, "10"),
    "LFQ 10 bits (MAGVIT-v2 settings)": ({"quantizer": MAGVIT_LFQ, "code_dim": 10}, "10"),
    "BSQ 10 bits (BSQ-ViT settings)": ({"quantizer": BSQ_VIT, "code_dim": 10}, "10"),
    "KL C=12 (continuous)": ({"quantizer": "vae"}, "- (12 floats)"),
    # the entropy term's warm start: 20x (the papers' 0.1) at step 0, down to 1x (0.005) at step 500
    "LFQ 10 bits entropy warm start": ({"quantizer": "lfq", "code_dim": 10}, "10"),
    "BSQ 18 bits entropy warm start": ({"quantizer": "bsq", "code_dim": 18}, "18"),
}
# training settings a row adds to the tiny recipe (key=value)
SETTINGS: dict[str, list[str]] = {
    name: ["loss.entropy_boost=20", "loss.entropy_boost_steps=500"]
    for name in ("LFQ 10 bits entropy warm start", "BSQ 18 bits entropy warm start")
}


def runs(presets: list[str], names: list[str], calibration: bool = True) -> dict[str, Row]:
    """Every row to train, named ``"<family>: <bottleneck>"``, then the conv calibration (unless not asked)."""
    rows = {
        f"{preset.split('_')[0]}: {name}": Row(
            "quantizers", preset, BOTTLENECKS[name][0], harness.recipe() + SETTINGS.get(name, [])
        )
        for preset in presets
        for name in names
    }
    if calibration:
        rows.update([harness.conv_ae_vq()])
    return rows


def table(rows: dict[str, Row], results: dict[str, list[dict[str, Any]]], floor: tuple[float, float]) -> str:
    """Markdown: one line per row, seeds pooled (mean ± half the max-min spread)."""
    head = ["row", "bits/token", "params", "s/step", "PSNR", "SSIM", "codebook used", "perplexity", "bit entropy"]
    lines = []
    for name, seeds in results.items():
        bottleneck = name.split(": ", 1)[-1]
        bits = BOTTLENECKS[bottleneck][1] if bottleneck in BOTTLENECKS else "5 (x64)"
        lines.append([
            name,
            bits,
            f"{seeds[0]['params'] / 1e6:.2f}M",
            *harness.pooled(seeds, ("seconds_per_step", 3), ("final_psnr", 2), ("final_ssim", 4), ("usage", 4),
                            ("perplexity", 0), ("bit_entropy", 3)),
        ])  # fmt: skip
    lines.append(harness.mean_colour_row(len(head), {4: f"{floor[0]:.2f}", 5: f"{floor[1]:.4f}"}))
    return harness.markdown_table(head, lines, left=2)


GRID_IMAGES = 10  # held-out images in the reconstruction grid: one of each of the first classes


def grid_label(name: str) -> str:
    """A row's label in the grid's 70-pixel column (11 characters a line): the bottleneck, wrapped."""
    return "\n".join(textwrap.wrap(name.split(": ", 1)[-1], 11)[:4])


def write_grid(rows: dict[str, Row], args: argparse.Namespace, path: Path) -> None:
    """Seed 0's EMA reconstructions of the first held-out images, one row per run, the originals on top."""
    import torch

    from mstok.demo import image_grid
    from mstok.persistence import load_tokenizer

    images = harness.held_out(args.data, GRID_IMAGES)
    lines = [("held-out", images)]
    with torch.no_grad():
        for name in rows:
            model = load_tokenizer(harness.run_dir(args, name)).eval()
            lines.append((grid_label(name), model(images).reconstruction.clamp(0, 1)))
    image_grid(lines).save(path)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_data_arguments(parser)
    parser.add_argument("--presets", default="titok_tiny", help="comma-separated tiny presets")
    parser.add_argument("--rows", default=",".join(BOTTLENECKS), help="comma-separated bottleneck names")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--val-images", type=int, default=200, help="held-out images validated during training")
    parser.add_argument("--final-images", type=int, default=8000, help="held-out images measured at the end")
    harness.add_run_arguments(parser, "runs/quantizers", seeds=2)
    harness.add_output_arguments(parser, also=" nor --grid")
    parser.add_argument(
        "--grid", default=str(harness.BENCHMARKS / "quantizers_grid.png"), help="held-out reconstructions (PNG)"
    )
    parser.add_argument(
        "--no-calibration", action="store_true", help="leave out the conv autoencoder row (mean colour stays)"
    )
    args = parser.parse_args(argv)
    names = harness.chosen(parser, args.rows, BOTTLENECKS, ())
    rows = runs(harness.names(args.presets), names, not args.no_calibration)
    harness.check_rows(parser, args, rows.values())  # fail fast on a bad row, before any training
    study = harness.Study(args)

    def report(key: tuple[str, int], result: dict[str, Any]) -> str:
        return (f"{key[0]} seed {key[1]}: PSNR {result['final_psnr']:.2f} SSIM {result['final_ssim']:.4f} "
                f"usage {result.get('usage', float('nan')):.4f}, {result['seconds_per_step']:.3f} s/step")  # fmt: skip

    tasks = {(name, seed): functools.partial(harness.run_row, name, row, args, study.threads, seed)
             for name, row in rows.items() for seed in range(args.seeds)}  # fmt: skip
    results = harness.by_row(study.run(tasks, report))

    floor = harness.mean_colour_floor(args.data, args.final_images)
    text = table(rows, results, floor)
    print(text)
    if not args.no_write:
        notes = [
            f"{args.steps} steps of batch {args.batch_size} per run, the tiny recipe; {args.seeds} seeds per row "
            f"(mean ± half the spread); {args.final_images} held-out images, EMA weights; codebook used "
            f"(distinct ids / V), perplexity and bit entropy of their ids; {study.pace()}.",
        ]
        write_grid(rows, args, Path(args.grid))
        notes.append(f"Held-out reconstructions (seed 0, first row the originals): `{Path(args.grid).name}`.")
        harness.publish(args, "quantizers", "Quantizers at equal bits", __file__, argv, [text], notes)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
