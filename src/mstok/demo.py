"""``mstok demo``: TiTok vs MsTok at the same budget, on photos bundled with scikit-image.

Both tiny models train with the tiny recipe (``mstok.training.recipes``) and identical
settings (steps, batch, seed, data stream) on random crops of six of scikit-image's colour
photos; two photos are held out. The held-out crops are validated during training and, at
the end, tokenized to K tokens each with the EMA weights, reconstructed and scored (PSNR,
SSIM, and LPIPS when its weights are on the machine) against painting each crop in its mean
colour. A Markdown report with an image grid, loss and validation curves is written.
``--data DIR`` trains on your own images instead (every 10th file is held out).

Processes and threads: with two or more usable cores the two models train side by side, one
process each with half the free cores' threads (at least one), two progress bars; a demo step
of these small models is mostly per-step overhead that a second thread barely shortens, so two
single-thread processes finish both models in about the time of one. With one core (or
``jobs=1``) they train one after the other in this process with the trainer's automatic thread
count. Either way intra-op threads never exceed the free cores, so a busy machine does not slow
the demo down tenfold (threads spin-waiting for a core another process holds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from mstok.data import InMemoryImages, RandomResizedCropFlip, find_images, load_rgb, to_tensor
from mstok.evaluation.evaluate import load_lpips
from mstok.evaluation.metrics import bits_per_pixel, mean_colour, psnr, ssim
from mstok.persistence import load_tokenizer
from mstok.storage.layout import EMA_FILE, step_dir_name
from mstok.tokenizers import Tokenizer, preset_config
from mstok.training import TrainConfig, Trainer
from mstok.training.config import DataConfig, ModelConfig
from mstok.training.recipes import TINY_EMA_DECAY, TINY_OPTIM, tiny_optim
from mstok.training.threads import busy_cores, choose_threads, usable_cores

MODELS = ("titok_tiny", "mstok_tiny")
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle")
HELD_OUT_PHOTOS = ("chelsea", "coffee")
CROPS_PER_HELD_OUT_PHOTO = 8
CROP_SCALE = (0.04, 0.25)  # 64 px crops from ~100-250 px regions of the 300-800 px photos
# Small batches, many steps: these small models need updates more than images per update.
# Measured on the held-out crops (seed 0, 2 cores): one model after the other on 2 threads,
# 600 x 32 +2.24/+2.11 dB over mean colour (TiTok/MsTok), 1200 x 16 +2.79/+2.75 (7 min 51 s from
# a fresh clone), 2800 x 8 +3.17/+3.40 but 11 min 51 s without the install. Both models side by
# side on one thread each (the default since 2026-12-02): 2800 x 8 +3.26/+3.33 dB in 6 min 25 s
# without the install (0.12-0.13 s/step each, where one model on 2 threads took 0.12). With Muon
# (the tiny recipe since 2026-12-07) a step costs 0.29-0.31 s (the Newton-Schulz iterations
# weigh on a batch-8 step) but 2800 x 8 reached +4.92/+4.67 dB and its 1120-step validation
# already +4.09/+4.04, above AdamW's 2800 steps: 1200 x 8 keeps the demo's minutes.
DEFAULT_STEPS = 1200
DEFAULT_BATCH = 8
# The tiny recipe's peak lr is 2e-3 (tiny-imagenet-64); on the demo's narrow data (crops of six
# photos) it collapsed MsTok-tiny's codebook to 3% of the codes and left it below mean colour
# after 600 steps, while 1e-3 kept 39% in use and learned (16.4 dB at step 300): measured, so
# the demo halves it for both models (at batch 8, 1.5e-3 collapsed MsTok-tiny again: 15.7 dB at
# step 960 where 1e-3 had 17.9). Muon at 1e-3 (its 4e-3 on tiny-imagenet halved twice) kept
# 21-22% of the codes in use on the held-out crops at 1200 steps (25-26% at 2800), as AdamW's
# 22-24% at 2800.
DEMO_LR = 1e-3


def skimage_photos(names: tuple[str, ...]) -> list[Image.Image]:
    """Colour photos shipped inside scikit-image (no download needed)."""
    from skimage import data

    photos = []
    for name in names:
        array = getattr(data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle returns (left, right, disparity)
            array = array[0]
        photos.append(Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB"))
    return photos


def _folder_photos(root: str | Path) -> tuple[list[Image.Image], list[Image.Image]]:
    samples, _ = find_images(root)
    held = [load_rgb(p) for i, (p, _) in enumerate(samples) if i % 10 == 9][:16]
    train = [load_rgb(p) for i, (p, _) in enumerate(samples) if i % 10 != 9]
    if not train or not held:
        raise ValueError(f"--data needs at least 10 readable images, found {len(samples)} under {root}")
    return train, held


def held_out_crops(photos: list[Image.Image], size: int, per_photo: int, seed: int) -> torch.Tensor:
    """Deterministic evaluation crops (no flip) of held-out photos: (N, 3, size, size)."""
    crop = RandomResizedCropFlip(size, CROP_SCALE, flip=False)
    rng = np.random.default_rng(seed + 12345)
    return torch.stack([to_tensor(crop(photo, rng)) for photo in photos for _ in range(per_photo)])


def image_grid(rows: list[tuple[str, torch.Tensor]], scale: int = 2) -> Image.Image:
    """Rows of images (N, 3, H, W) with a label column on the left."""
    label_w, pad = 70, 2
    n, _, h, w = rows[0][1].shape
    h, w = h * scale, w * scale
    canvas = Image.new("RGB", (label_w + n * (w + pad), len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * (h + pad)
        draw.text((4, y + h // 2 - 5), label, fill="black")
        arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for c, array in enumerate(arrays):
            tile = Image.fromarray(array).resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * (w + pad), y))
    return canvas


def plot_losses(
    histories: dict[str, list[dict]], path: Path, validation: dict[str, list[dict]] | None = None, floor: float = 0.0
) -> None:
    """Training loss (and its L1 part) per step for each model, and, when given, the held-out
    PSNR of each validation with the mean-colour ``floor``, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if validation else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    for name, history in histories.items():
        steps = [h["step"] for h in history]
        for ax, key in zip(axes[:2], ("loss", "l1"), strict=True):
            values = np.array([h[key] for h in history])
            window = max(1, len(values) // 40)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, label=name)
    for ax, title in zip(axes[:2], ("total loss", "L1 reconstruction"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if validation:
        ax = axes[2]
        for name, records in validation.items():
            ax.plot([r["step"] for r in records], [r["val_psnr"] for r in records], marker=".", label=name)
        ax.axhline(floor, color="grey", lw=0.8, label="mean colour")
        ax.set_title("held-out PSNR (dB), EMA weights")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _evaluate(model: Tokenizer, crops: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    tokens = model.encode(crops)
    recon = model.decode(tokens)
    cfg = model.config
    return recon, {
        "psnr": float(np.mean(psnr(crops, recon))),
        "ssim": float(np.mean(ssim(crops, recon))),
        "tokens_per_image": cfg.num_latent_tokens,
        "bits_per_pixel": bits_per_pixel(cfg.num_latent_tokens, cfg.vocab_size, cfg.image_size, cfg.image_size),
        "codebook_usage": model.quantizer.usage_statistics(tokens)["usage"],
    }


@dataclasses.dataclass
class _Job:
    """One model's training run of the demo (picklable: it may run in a worker process)."""

    name: str
    desc: str
    photos: list[Image.Image]
    crop_scale: tuple[float, float]
    crops: torch.Tensor
    steps: int
    batch_size: int
    seed: int
    out_dir: Path
    progress: bool
    threads: int = 0  # 0: the trainer's automatic choice
    bar_position: int | None = None


def _train(job: _Job) -> dict[str, Any]:
    """Train one tiny model with the demo recipe and evaluate its EMA weights on the held-out crops."""
    size = job.crops.shape[-1]
    config = TrainConfig(
        model=ModelConfig(preset=job.name),
        data=DataConfig(num_workers=0),
        optim=dataclasses.replace(tiny_optim(), lr=DEMO_LR, end_lr=DEMO_LR / 10),
        steps=job.steps,
        batch_size=job.batch_size,
        ema_decay=TINY_EMA_DECAY,
        seed=job.seed,
        out_dir=str(job.out_dir / job.name),
        log_every=max(1, job.steps // 50),
        ckpt_every=job.steps,
        keep_last=1,
        val_every=max(1, job.steps // 10),
        threads=job.threads,
    )
    dataset = InMemoryImages(job.photos, RandomResizedCropFlip(size, job.crop_scale))
    trainer = Trainer(
        config, dataset=dataset, progress=job.progress, val_images=job.crops, desc=job.desc,
        bar_position=job.bar_position,
    )  # fmt: skip
    started = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - started
    model = load_tokenizer(trainer.ckpt_dir / step_dir_name(job.steps), weights=EMA_FILE)
    recon, metrics = _evaluate(model, job.crops)
    metrics |= {
        "train_seconds": seconds,
        "seconds_per_step": trainer.train_seconds / job.steps,
        "threads": trainer.threads,
        "final_loss": history[-1]["loss"],
        "params": model.parameter_counts()["total"],
    }
    return {"history": history, "validation": trainer.val_history, "recon": recon, "metrics": metrics}


def demo_jobs(requested: int | None = None) -> tuple[int, int]:
    """(processes, threads per process) for the demo's two models: side by side when the machine
    has two usable cores (``requested`` None or 2), each with half the free cores' threads; one
    after the other (threads 0: the trainer's choice) with one core or ``requested = 1``."""
    if requested not in (None, 1, 2):
        raise ValueError(f"jobs must be 1 or 2 (models trained at once), got {requested!r}")
    cores = usable_cores()
    if requested == 1 or (requested is None and cores < 2):
        return 1, 0
    return 2, choose_threads(cores, 0, busy_cores()[0], processes=2)


def run_demo(
    out_dir: str | Path = "runs/demo",
    data: str | Path | None = None,
    steps: int | None = None,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    progress: bool = True,
    jobs: int | None = None,
) -> Path:
    """Train both tiny models, evaluate on held-out crops, write ``report.md``; returns its path.

    ``jobs``: models trained at once, 1 or 2 (None: 2 when the machine has two usable cores,
    see :func:`demo_jobs`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = steps or DEFAULT_STEPS
    if data is None:
        train_photos, held_photos = skimage_photos(TRAIN_PHOTOS), skimage_photos(HELD_OUT_PHOTOS)
        source, per_photo = "scikit-image photos (" + ", ".join(TRAIN_PHOTOS) + ")", CROPS_PER_HELD_OUT_PHOTO
        held_desc = ", ".join(HELD_OUT_PHOTOS)
    else:
        train_photos, held_photos = _folder_photos(data)
        source, per_photo = f"{data} ({len(train_photos)} training images)", 1
        held_desc = f"{len(held_photos)} images (every 10th file)"

    sizes = {preset_config(name).image_size for name in MODELS}
    if len(sizes) != 1:
        raise ValueError(f"demo models must share one resolution, got {sorted(sizes)}")
    size = sizes.pop()
    crops = held_out_crops(held_photos, size, per_photo, seed)  # the same held-out batch for every model

    lpips, lpips_missing = load_lpips(torch.device("cpu"), download=False, level=logging.INFO)
    processes, threads = demo_jobs(jobs)
    train_jobs = []
    for i, name in enumerate(MODELS):
        if processes > 1:
            others = ", ".join(n for n in MODELS if n != name)
            desc = f"{name} (alongside {others})"
        else:
            following = f", {MODELS[i + 1]} next" if i + 1 < len(MODELS) else ""
            desc = f"{name} ({i + 1}/{len(MODELS)}{following})"
        crop_scale = CROP_SCALE if data is None else (0.5, 1.0)
        train_jobs.append(_Job(name, desc, train_photos, crop_scale, crops, steps, batch_size, seed, out_dir, progress,
                               threads, i if processes > 1 else None))  # fmt: skip
    if processes > 1:
        # spawn: a forked child would inherit this process's OpenMP state, which can hang
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
            runs = list(pool.map(_train, train_jobs))
    else:
        runs = [_train(job) for job in train_jobs]
    histories = {name: run["history"] for name, run in zip(MODELS, runs, strict=True)}
    validation = {name: run["validation"] for name, run in zip(MODELS, runs, strict=True)}
    recons = {name: run["recon"] for name, run in zip(MODELS, runs, strict=True)}
    results = {}
    for name, run in zip(MODELS, runs, strict=True):
        lpips_value = float(lpips(run["recon"], crops).mean()) if lpips is not None else None
        results[name] = {**run["metrics"], "lpips": lpips_value, "processes": processes}

    flat = mean_colour(crops)
    reference = {
        "psnr": float(np.mean(psnr(crops, flat))),
        "ssim": float(np.mean(ssim(crops, flat))),
        "lpips": float(lpips(flat, crops).mean()) if lpips is not None else None,
    }
    image_grid([("original", crops), *[(n.split("_")[0], recons[n]) for n in MODELS]]).save(out_dir / "grid.png")
    plot_losses(histories, out_dir / "loss_curves.png", validation, reference["psnr"])
    (out_dir / "metrics.json").write_text(json.dumps({**results, "mean_colour_reference": reference}, indent=2) + "\n")
    report = out_dir / "report.md"
    text = _report_text(results, reference, source, held_desc, steps, batch_size, seed, len(crops), lpips_missing)
    report.write_text(text)
    return report


def _report_text(
    results: dict,
    reference: dict,
    source: str,
    held: str,
    steps: int,
    batch: int,
    seed: int,
    n_eval: int,
    lpips_missing: str | None,
) -> str:
    def fmt_lpips(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    settings = {**TINY_OPTIM, "lr": DEMO_LR, "end_lr": DEMO_LR / 10}
    optimizer = "Muon + AdamW" if settings.pop("name", "adamw") == "muon" else "AdamW"
    recipe = ", ".join(f"{k} {v}" for k, v in settings.items())
    lines = [
        "# mstok demo: TiTok vs MsTok at the same budget",
        "",
        f"Trained on random 64x64 crops of {source}; {steps} steps, batch {batch}, seed {seed}, the tiny "
        f"recipe ({optimizer} {recipe}, warmup + cosine, EMA {TINY_EMA_DECAY}), L1 + MSE + VQ losses. "
        f"Evaluated with EMA weights on {n_eval} held-out crops of {held}.",
        "",
        "| model | params | tokens/image | bits/pixel | PSNR (dB) | vs mean colour | SSIM | LPIPS "
        "| codebook usage | final loss | train time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        side_by_side = ", both models at once" if r.get("processes", 1) > 1 else ""
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['tokens_per_image']} | {r['bits_per_pixel']:.4f} | "
            f"{r['psnr']:.2f} | {r['psnr'] - reference['psnr']:+.2f} dB | {r['ssim']:.4f} | {fmt_lpips(r['lpips'])} | "
            f"{r['codebook_usage']:.3f} | {r['final_loss']:.4f} | {r['train_seconds']:.0f} s "
            f"({r['seconds_per_step']:.2f} s/step, {r['threads']} thread(s){side_by_side}) |"
        )
    ref_psnr, ref_ssim = reference["psnr"], reference["ssim"]
    lines.append(
        f"| each crop's mean colour (reference) | - | - | - | {ref_psnr:.2f} | - | {ref_ssim:.4f} | "
        f"{fmt_lpips(reference['lpips'])} | - | - | - |"
    )
    lines += [
        "",
        "Codebook usage is the fraction of the V codes used by the held-out tokens. The reference row "
        "paints each crop in its own mean colour: a tokenizer must beat it to carry more than colour.",
    ]
    if lpips_missing:
        lines.append(f"LPIPS: not measured ({lpips_missing.splitlines()[0]}).")
    lines += [
        "",
        "## Reconstructions (originals | TiTok | MsTok)",
        "",
        "![reconstructions](grid.png)",
        "",
        "## Loss and held-out PSNR curves",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    return "\n".join(lines)
