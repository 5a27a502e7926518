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
    python benchmarks/convergence.py --rows "titok VQ (recipe)" --steps 200 --no-write

``--jobs 2`` trains two rows at once with one thread each (on 2 cores, the fairest use of the
machine: every row sees the same contention, so seconds per step compare across rows).
Finished rows are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
The table, a PSNR-vs-step plot and the command go to its section of ``benchmarks/RESULTS.md``, replaced in
place by each run (the one replaced moves to ``benchmarks/history/convergence.md``).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import Row

# The tiny presets before this study: random positions and latents, no qk-norm.
BEFORE = {"position_embedding": "learned", "latent_init": "random", "attention_init": "random", "qk_norm": False}
# Today's titok_tiny.toml optimiser before this study (lr 5e-4, warmup 100, betas 0.9/0.99).
BASELINE_OPTIM = ["optim.lr=5e-4", "optim.end_lr=5e-5", "optim.warmup_steps=100", "optim.betas=[0.9, 0.99]"]
RECIPE_OPTIM = harness.recipe()  # the recipe this study chose (mstok.training.recipes)


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
    # calibration: the conv autoencoder at the continuous bottleneck's size and at equal bits
    **dict([harness.conv_ae_continuous(), harness.conv_ae_vq()]),
}
GROUPS = ("candidates", "recipe", "calibration")


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
    rows = []
    for name, res in results.items():
        by_step = {r["step"]: r for r in res["val"]}
        cells = [name, f"{res['params'] / 1e6:.2f}M", f"{res['seconds_per_step']:.3f}"]
        cells += [f"{by_step[s]['val_psnr']:.2f}" if s in by_step else "-" for s in shown]
        at_times = [_at_time(res["val"], t) for t in times]
        cells += ["-" if math.isnan(v) else f"{v:.2f}" for v in at_times]  # no validation by then
        cells.append(f"{by_step[args.steps]['val_ssim']:.4f}" if args.steps in by_step else "-")
        rows.append(cells)
    psnr_cells = dict.fromkeys(range(3, 3 + len(shown) + len(times)), f"{floor[0]:.2f}")
    rows.append(harness.mean_colour_row(len(head), {**psnr_cells, len(head) - 1: f"{floor[1]:.4f}"}))
    return harness.markdown_table(head, rows, left=2)


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
        group = ROWS[name.split(harness.SEED_TAG)[0]].group
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
    harness.add_data_arguments(parser)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--val-images", type=int, default=200, help="held-out images (one per class first)")
    parser.add_argument("--wall", default="60,120", help="training seconds at which to read PSNR")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {', '.join(GROUPS)}")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: every row of --groups)")
    harness.add_run_arguments(parser, "runs/convergence", seeds=1, unit="rows")
    harness.add_output_arguments(parser, also=" nor --plot")
    parser.add_argument("--plot", default=str(harness.BENCHMARKS / "convergence.png"))
    args = parser.parse_args(argv)
    groups = harness.names(args.groups)
    names = harness.chosen(parser, args.rows, ROWS, [n for n, r in ROWS.items() if r.group in groups])
    harness.check_rows(parser, args, [ROWS[n] for n in names])
    study = harness.Study(args)

    def report(name: str, result: dict[str, Any]) -> str:
        last = result["val"][-1]
        return (f"{name}: PSNR {last['val_psnr']:.2f} SSIM {last['val_ssim']:.4f} at step {last['step']}, "
                f"{result['seconds_per_step']:.3f} s/step")  # fmt: skip

    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    # seed 0 keeps the row's name (and its finished run); seed s > 0 is the row "name [seed s]"
    tasks = {
        harness.seeded_name(name, seed): functools.partial(harness.run_row, name, ROWS[name], args, study.threads, seed)
        for name in names
        for seed in range(args.seeds)
    }
    results: dict[str, dict[str, Any]] = study.run(tasks, report)

    floor = harness.mean_colour_floor(args.data, args.val_images)
    text = table(results, floor, args)
    print(text)
    if not args.no_write:
        plot(results, floor[0], Path(args.plot))
        notes = [
            f"{args.steps} steps of batch {args.batch_size} per row; {args.val_images} held-out images validated "
            f"every {args.val_every} steps with EMA weights; {study.pace('rows')}. PSNR @Ns reads the last "
            f"validation within N s of training time (data + steps; validation excluded). "
            f"Plot: `{Path(args.plot).name}`.",
        ]
        harness.publish(args, "convergence", "Convergence of the tiny tokenizers", __file__, argv, [text], notes)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
