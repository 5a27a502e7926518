"""HieraTok at tiny scale: single vs multi-scale, conv vs area, the three scale masks, latent uniformity.

The tiny-scale reading of HieraTok's Tables 2-5 (``../shared/papers/hieratok.txt``). Every row is
a tiny HieraTok (64 px, patch 8, width 128, depth 4, KL latents of C = 6 per token) trained with
the tiny recipe on the data stream of the convergence study (``benchmarks/convergence.py``: the
50,000 training images of tiny-imagenet-64-train; the same 200 held-out images of Tiny ImageNet's
validation set, EMA weights):

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

Then (``--dit-steps`` > 0) the generation testbed of the paper at tiny scale: for the single-scale
and the multi-scale (conv, scale-causal) tokenizers of seed 0, the training images' latents
(posterior means, with flips) are pre-tokenized and a ``dit_tiny`` (DDPM epsilon prediction, the
``configs/dit_tiny.toml`` recipe, 2-D sin-cos positions of the 8 x 8 latent grid) is trained on each;
its EMA checkpoints are scored by the diffusion loss on the held-out images' latents (the same
timesteps and noise for both, a paired comparison), and a grid of class-conditional DDIM samples
is written.

    python benchmarks/hieratok.py                                  # every row, 400 steps, 2 seeds
    python benchmarks/hieratok.py --rows "single-scale" --seeds 1 --steps 50 --no-write

Finished runs are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from mstok.data import ImageFolder, IndexSubset, center_crop_transform
from mstok.persistence import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import Row

RECIPE_OPTIM = harness.recipe()
DIT_TRAIN_IMAGES = 7000  # as many as the 35 per class the study trained on before the training split
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
    **dict([harness.conv_ae_continuous()]),
}


DIT_ROWS = ("single-scale (8)", "multi-scale conv scale-causal")  # both: an 8x8 grid of 6 floats
DIT_CONFIG = harness.ROOT / "configs" / "dit_tiny.toml"
GRID_CLASSES = 8  # sample grid: this many classes, two samples each


def run_with_uniformity(name: str, args: argparse.Namespace, threads: int, seed: int) -> dict[str, Any]:
    """Train (or reuse) one run, then measure the uniformity of its EMA latents on the held-out images."""
    import torch

    from mstok.evaluation.uniformity import latent_uniformity

    result = harness.run_row(name, ROWS[name], args, threads, seed)
    if "uniformity" not in result:
        torch.set_num_threads(max(1, threads))
        out = harness.run_dir(args, name, seed)
        model = load_tokenizer(out).eval()
        stats = latent_uniformity(model, harness.held_out(args.data, args.val_images), seed=0)
        result["uniformity"] = {k: float(stats[k]) for k in ("density_cv", "gini", "normalized_entropy")}
        result["latent_floats"] = model.config.num_latent_tokens * model.config.code_dim
        harness.save_result(out, result)
    return result


def run_dit(name: str, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Pre-tokenize the training split with row ``name``'s seed-0 tokenizer, train a tiny DiT on the
    latents, score every checkpoint on the held-out latents; returns the curve and the samples."""
    import torch

    from mstok.data.tokens import pretokenize
    from mstok.diffusion import create_diffusion
    from mstok.generators import DiTSamplingConfig, generate_images
    from mstok.generators.dit_sampling import diffusion_of, normalize_latents
    from mstok.persistence import load_generator
    from mstok.training import load_train_config
    from mstok.training.config import GeneratorTrainConfig
    from mstok.training.generator_trainer import GeneratorTrainer

    torch.set_num_threads(max(1, threads))
    out = harness.run_dir(args, name) / "dit"
    done = out / "dit_result.json"
    identity = {"steps": args.dit_steps, "every": args.dit_every}
    saved = harness.saved_run(done, identity, args.fresh)
    if saved is not None:
        return {**saved, "samples": torch.load(out / "samples.pt", weights_only=True)}
    tokenizer = load_tokenizer(harness.run_dir(args, name)).eval()
    val_idx = harness.held_out_indices(args.data, args.val_images)
    folder = ImageFolder(args.data, center_crop_transform(64))
    # the DiT's data: the first DIT_TRAIN_IMAGES training images (the shards are shuffled across classes)
    train = harness.training_images(args.train_data, center_crop_transform(64))
    train = IndexSubset(train, list(range(min(DIT_TRAIN_IMAGES, len(train)))))
    pretokenize(tokenizer, train, out / "latents", flip=True, progress=False)
    side = tokenizer.config.grid_size
    settings = [
        f"data.path='{out / 'latents'}'", f"out_dir='{out / 'run'}'", f"steps={args.dit_steps}",
        f"ckpt_every={args.dit_every}", f"keep_last={args.dit_steps // args.dit_every + 1}", "sample_every=0",
        "tokenizer=''", "tensorboard=false", f"threads={threads}", "data.num_workers=0",
        f"model.overrides.num_tokens={side * side}", f"model.overrides.scales=[{side}]",
    ]  # fmt: skip
    config = load_train_config(DIT_CONFIG, settings, kind=GeneratorTrainConfig)
    trainer = GeneratorTrainer(config, progress=False)
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started

    val_images = harness.held_out_images(args.data, tuple(val_idx))
    val_labels = torch.tensor([folder.samples[i][1] for i in val_idx])
    latents = tokenizer.encode(val_images)  # (N, K, C) posterior means
    curve = []
    for step in range(args.dit_every, args.dit_steps + 1, args.dit_every):
        model = load_generator(trainer.ckpt_dir / f"step_{step:07d}").eval()
        process = create_diffusion(diffusion_of(model.config))
        x0 = normalize_latents(model.config, latents)
        draws = torch.Generator().manual_seed(0)  # the same timesteps and noise for every model
        with torch.no_grad():
            losses = [float(process.loss(model, x0, val_labels, generator=draws)[0]) for _ in range(args.dit_repeats)]
        curve.append({"step": step, "val_loss": sum(losses) / len(losses)})
    labels = torch.arange(GRID_CLASSES).repeat_interleave(2)
    sampling = DiTSamplingConfig(sampler="ddim", steps=50)
    samples, _ = generate_images(model, tokenizer, labels, config=sampling, seed=0)
    result = {
        "identity": identity,
        "curve": curve,
        "train_seconds": seconds,
        "params": model.parameter_counts()["total"],
    }
    done.write_text(json.dumps(result, indent=2))
    torch.save(samples, out / "samples.pt")
    return {**result, "samples": samples}


def dit_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: held-out diffusion loss of each DiT at every checkpoint."""
    steps = [c["step"] for c in next(iter(results.values()))["curve"]]
    head = ["latents of", "DiT params", "train s", *[f"val loss @{s}" for s in steps]]
    rows = [
        [
            name,
            f"{res['params'] / 1e6:.2f}M",
            f"{res['train_seconds']:.0f}",
            *(f"{c['val_loss']:.4f}" for c in res["curve"]),
        ]
        for name, res in results.items()
    ]
    return harness.markdown_table(head, rows)


def save_dit_figures(results: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    """The validation-loss curves and the sample grid (one row per tokenizer) as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mstok.demo import image_grid

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, res in results.items():
        ax.plot([c["step"] for c in res["curve"]], [c["val_loss"] for c in res["curve"]], marker=".", label=name)
    ax.set_xlabel("DiT step (batch 64)")
    ax.set_ylabel("held-out diffusion loss (EMA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves = folder / "hieratok_dit_val_loss.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    grid = folder / "hieratok_dit_samples.png"
    image_grid([(name.split(" ")[0], res["samples"]) for name, res in results.items()]).save(grid)
    return [curves, grid]


def save_progressive_grid(args: argparse.Namespace, name: str, path: Path, count: int = 8) -> Path:
    """Progressive decoding of row ``name``'s seed-0 tokenizer: for a few held-out images, the image
    of each scale (``decode(tokens, scales=n)``, n = 1..S; nearest-upsampled to full size), then the
    original, as a PNG. With scale-causal attention scale n needs only the first n scales' tokens."""
    import torch.nn.functional as F

    from mstok.demo import image_grid

    model = load_tokenizer(harness.run_dir(args, name)).eval()
    images = harness.held_out(args.data, args.val_images)[:count]
    tokens = model.encode(images)
    size = model.config.image_size
    rows = []
    for n, side in enumerate(model.config.scales, start=1):
        scaled = model.decode(tokens, scales=n)  # (B, 3, side * p, side * p)
        rows.append((f"scale {side}", F.interpolate(scaled, size=(size, size), mode="nearest")))
    image_grid([*rows, ("original", images)]).save(path)
    return path


def table(results: dict[str, list[dict[str, Any]]], floor: tuple[float, float]) -> str:
    """Markdown: one line per row, seeds pooled (mean ± half the max-min spread)."""
    head = ["row", "latent floats", "params", "s/step", "PSNR", "SSIM", "density CV ↓", "Gini ↓", "norm. entropy ↑"]
    rows = []
    for name, seeds in results.items():
        final = [s["val"][-1] for s in seeds]
        uni = [s["uniformity"] for s in seeds]
        rows.append([
            name,
            str(seeds[0]["latent_floats"]),
            f"{seeds[0]['params'] / 1e6:.2f}M",
            *harness.pooled(seeds, ("seconds_per_step", 3)),
            *harness.pooled(final, ("val_psnr", 2), ("val_ssim", 4)),
            *harness.pooled(uni, ("density_cv", 3), ("gini", 3), ("normalized_entropy", 3)),
        ])  # fmt: skip
    rows.append(harness.mean_colour_row(len(head), {4: f"{floor[0]:.2f}", 5: f"{floor[1]:.4f}"}))
    return harness.markdown_table(head, rows)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_data_arguments(parser)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (row names hold no commas)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=200, help="held-out images (one per class first)")
    harness.add_run_arguments(parser, "runs/hieratok", seeds=2)
    harness.add_output_arguments(parser, also=" nor the figures")
    parser.add_argument("--dit-steps", type=int, default=2000, help="DiT training steps per tokenizer (0: skip)")
    parser.add_argument("--dit-every", type=int, default=250, help="DiT checkpoint (and validation) interval")
    parser.add_argument("--dit-repeats", type=int, default=4, help="noise draws per held-out latent")
    args = parser.parse_args(argv)
    if args.dit_steps > 0 and not 1 <= args.dit_every <= args.dit_steps:
        parser.error(f"--dit-every must be in [1, --dit-steps = {args.dit_steps}], got {args.dit_every}")
    names = harness.chosen(parser, args.rows, ROWS, ROWS)
    harness.check_rows(parser, args, [ROWS[n] for n in names])
    study = harness.Study(args)

    def report(key: tuple[str, int], result: dict[str, Any]) -> str:
        last, uni = result["val"][-1], result["uniformity"]
        return (f"{key[0]} seed {key[1]}: PSNR {last['val_psnr']:.2f} SSIM {last['val_ssim']:.4f} "
                f"CV {uni['density_cv']:.3f} Gini {uni['gini']:.3f} H {uni['normalized_entropy']:.3f}, "
                f"{result['seconds_per_step']:.3f} s/step")  # fmt: skip

    tasks = {(name, seed): functools.partial(run_with_uniformity, name, args, study.threads, seed)
             for name in names for seed in range(args.seeds)}  # fmt: skip
    results = harness.by_row(study.run(tasks, report))

    floor = harness.mean_colour_floor(args.data, args.val_images)
    text = table(results, floor)
    print(text)
    tables, figures = [text], []
    folder = Path(args.out).parent
    dit_rows = [n for n in DIT_ROWS if n in names] if args.dit_steps > 0 else []
    if dit_rows:
        tasks = {name: functools.partial(run_dit, name, args, study.threads) for name in dit_rows}
        dit = study.run(tasks, lambda name, _result: f"{name}: DiT trained")
        tables.append(dit_table(dit))
        print(tables[-1])
        if not args.no_write:
            figures = save_dit_figures(dit, folder)
    progressive = "multi-scale conv scale-causal"
    if progressive in names and not args.no_write:
        figures.append(save_progressive_grid(args, progressive, folder / "hieratok_progressive.png"))
    notes = [
        f"{args.steps} steps of batch {args.batch_size} per run, the tiny recipe (multi-scale rows: "
        f"loss.multiscale_weight = 1); {args.seeds} seeds per row (mean ± half the spread); "
        f"{args.val_images} held-out images, EMA weights, uniformity of their posterior-mean latents; "
        f"{study.pace()}.",
        *[f"![{p.stem}]({p.name})" for p in figures],
    ]
    harness.publish(args, "hieratok", "HieraTok at tiny scale", __file__, argv, tables, notes)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
