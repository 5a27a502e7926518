"""The papers' claims at small scale: TiTok vs MsTok and MsTok's ablations on tiny-imagenet-64.

Every variant trains with the tiny recipe (``mstok.training.recipes``; the tiny presets carry
its model side) and the same budget (steps, batch, learning rate, width, depth, data stream)
on 35 images per class of ``../shared/datasets/tiny-imagenet-64`` and is evaluated on the
other 5 per class: PSNR and SSIM of the EMA model's reconstructions, codebook usage, and
linear-probe top-1 (frozen encoder, mean-pooled pre-quantization latents, BatchNorm + linear,
LARS; features of the same split). Each variant runs with several seeds; the table reports
mean +- standard deviation over seeds, and ``benchmarks/REPLICATION.md`` records it with the
command that made it, whatever the result (its section, replaced in place by the newest run; the
earlier ones in ``benchmarks/history/replicate.md``).

    python benchmarks/replicate.py                       # 700 steps per run: about 90 min on 2 CPU cores
    python benchmarks/replicate.py --finished-only       # the table of what has finished so far
    python benchmarks/replicate.py --steps 5000 --seeds 0,1,2 --device cuda --batch-size 128

Variants (tiny presets: 64x64, patch 8, width 128, depth 4, V 1024):
    titok / mstok at K = 32 and 64; MsTok with 1, 2, 3 or 4 memory levels (the last layers:
    (4), (2, 4), (2, 3, 4), (1, 2, 3, 4)); without scale embeddings; weighted_add instead of
    concat aggregation; a linear readout instead of query cross-attention; and TiTok's
    two-stage recipe (proxy, stage 1, stage 2) at the same budget (``train_two_stage``).

A study is resumable across sessions: each finished run's metrics go to
``benchmarks/replicate_results.json`` (``--results``, kept in the repository), and a later call
with the same settings reuses them; only unfinished runs train again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from mstok.data import ImageFolder, IndexSubset, RandomResizedCropFlip, center_crop_transform
from mstok.evaluation.evaluate import evaluate_reconstruction
from mstok.evaluation.metrics import mean_colour, psnr
from mstok.evaluation.probe import extract_features, split_per_class, train_probe
from mstok.persistence import load_tokenizer
from mstok.storage.layout import EMA_FILE, latest_checkpoint
from mstok.training import Trainer, load_train_config
from mstok.training.recipes import TINY_ADAMW_OPTIM, tiny_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness

ROOT = harness.ROOT
CONFIGS = ROOT / "configs"
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "titok K=32": ("titok_tiny", {}),
    "mstok K=32": ("mstok_tiny", {}),
    "titok K=64": ("titok_tiny", {"num_latent_tokens": 64}),
    "mstok K=64": ("mstok_tiny", {"num_latent_tokens": 64}),
    "mstok 1 level": ("mstok_tiny", {"memory_layers": [4]}),
    "mstok 2 levels": ("mstok_tiny", {"memory_layers": [2, 4]}),
    "mstok 3 levels": ("mstok_tiny", {"memory_layers": [2, 3, 4]}),
    "mstok no scale emb.": ("mstok_tiny", {"scale_embedding": False}),
    "mstok weighted_add": ("mstok_tiny", {"aggregation": "weighted_add"}),
    "mstok linear readout": ("mstok_tiny", {"readout": "linear"}),
}
# Rows trained by another recipe than single-stage pixel training (train_two_stage).
TWO_STAGE = ("titok two-stage",)
METRICS = ("psnr", "ssim", "codebook_usage", "probe_top1")


def _common(steps: int, seed: int, out: Path, args: argparse.Namespace) -> list[str]:
    """Settings every training of the study shares."""
    return [
        f"steps={steps}",
        f"batch_size={args.batch_size}",
        f"seed={seed}",
        f"out_dir='{out}'",
        f"device='{args.device}'",
        f"threads={args.threads}",
        f"ckpt_every={steps}",
        "keep_last=1",
        f"log_every={max(1, steps // 20)}",
        "tensorboard=false",
        "sample_every=0",
        "val_every=0",
        f"data.num_workers={args.workers}",
    ]


def _fit(config_file: Path | None, settings: list[str], train: IndexSubset) -> Path:
    """Train one config on the study's training split; returns the run's checkpoints folder."""
    config = load_train_config(config_file, settings)
    trainer = Trainer(config, dataset=train, progress=False)
    trainer.fit()
    return trainer.ckpt_dir


def train_two_stage(seed: int, args: argparse.Namespace, out: Path, train: IndexSubset) -> Path:
    """TiTok's two-stage recipe at tiny scale with the shipped configs: a MaskGIT-VQGAN proxy
    (``--steps`` steps, trained first and not counted in the budget, as a released proxy would
    not be), then stage 1 (proxy-code cross-entropy, 2/3 of ``--steps``, the tiny optimiser)
    and stage 2 (decoder and pixel decoder on MSE, the remaining 1/3, the GAN off so that PSNR
    compares with single-stage training). Returns stage 2's checkpoints folder."""
    proxy = _fit(CONFIGS / "proxy_tiny.toml", _common(args.steps, seed, out / "proxy", args), train)
    first = max(1, 2 * args.steps // 3)
    stage1 = _fit(
        CONFIGS / "titok_tiny_stage1.toml",
        [*_common(first, seed, out / "stage1", args), *tiny_settings(TINY_ADAMW_OPTIM), f"proxy.checkpoint='{proxy}'"],
        train,
    )
    settings = [*_common(max(1, args.steps - first), seed, out / "stage2", args), f"proxy.checkpoint='{proxy}'"]
    return _fit(
        CONFIGS / "titok_tiny_stage2.toml", [*settings, f"model.init_from='{stage1}'", "loss.gan_weight=0"], train
    )


def study_identity(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a finished run must share to be reused."""
    recipe = tiny_settings(TINY_ADAMW_OPTIM)
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "classes": args.classes,
            "probe_epochs": args.probe_epochs, "probe_lr": args.probe_lr, "recipe": recipe}  # fmt: skip


def load_results(path: Path, identity: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Finished runs recorded in ``--results`` (``"variant|seed"`` -> metrics) with this identity."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return {key: run["metrics"] for key, run in saved.items() if run.get("settings") == identity}


def record_result(path: Path, key: str, identity: dict[str, Any], metrics: dict[str, float]) -> None:
    """Add one finished run to ``--results`` (written whole through a rename: never half a file)."""
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[key] = {"settings": identity, "metrics": metrics}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def run_variant(
    name: str, seed: int, args: argparse.Namespace, train_idx: list[int], val_idx: list[int]
) -> dict[str, float] | None:
    """Train one variant with one seed, then measure it on the held-out split (None: not finished
    and ``--finished-only``)."""
    out = Path(args.work_dir) / name.replace(" ", "_").replace("=", "").replace(".", "") / f"seed{seed}"
    done = out / "result.json"
    identity = study_identity(args)
    saved = harness.saved_run(done, identity, args.fresh, key="settings")
    if saved is not None:  # a finished run with the same budget: reuse it
        return saved["metrics"]
    if args.finished_only:
        return None
    if out.exists():
        shutil.rmtree(out)  # stale or unfinished: otherwise the trainer would resume the old run
    train = IndexSubset(ImageFolder(args.data, RandomResizedCropFlip(64, (0.8, 1.0))), train_idx)
    started = time.perf_counter()
    if name in TWO_STAGE:
        checkpoints = train_two_stage(seed, args, out, train)
    else:
        preset, overrides = VARIANTS[name]
        settings = [
            f"model.preset='{preset}'",
            *_common(args.steps, seed, out, args),
            *tiny_settings(
                TINY_ADAMW_OPTIM
            ),  # the tiny recipe (the presets carry its model side); --lr overrides its lr
            f"optim.lr={args.lr}",
            f"optim.end_lr={args.lr / 10}",
            *[f"model.overrides.{k}={json.dumps(v)}" for k, v in overrides.items()],
        ]
        checkpoints = _fit(None, settings, train)
    train_seconds = time.perf_counter() - started
    model = load_tokenizer(latest_checkpoint(checkpoints), weights=EMA_FILE)
    fixed = ImageFolder(args.data, center_crop_transform(64))
    recon = evaluate_reconstruction(
        model, IndexSubset(fixed, val_idx), batch_size=128, device=args.device, progress=False
    )
    train_feats, train_labels = extract_features(model, IndexSubset(fixed, train_idx), device=args.device)
    val_feats, val_labels = extract_features(model, IndexSubset(fixed, val_idx), device=args.device)
    probe = train_probe(
        train_feats, train_labels, val_feats, val_labels, args.classes, epochs=args.probe_epochs, base_lr=args.probe_lr,
        warmup_epochs=round(args.probe_epochs / 9),
        seed=seed, device=args.device,
    )  # fmt: skip
    metrics = {
        "psnr": recon["psnr"],
        "ssim": recon["ssim"],
        "codebook_usage": recon["codebook_usage"],
        "probe_top1": probe["top1"],
        "train_seconds": train_seconds,
    }
    done.write_text(json.dumps({"settings": identity, "metrics": metrics}, indent=2))
    return metrics


def summarise(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table of mean +- std over seeds."""
    head = ["variant", "seeds", "PSNR (dB)", "SSIM", "codebook usage", "probe top-1 (%)", "train s/run"]
    rows = []
    for name, runs in results.items():
        cells = []
        for metric in METRICS:
            values = [r[metric] * (100 if metric == "probe_top1" else 1) for r in runs]
            cells.append(harness.mean_std(values, 2 if metric in ("psnr", "probe_top1") else 4))
        seconds = statistics.mean(r["train_seconds"] for r in runs)
        rows.append([name, str(len(runs)), *cells, f"{seconds:.0f}"])
    return harness.markdown_table(head, rows)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(harness.DATA), help="tiny-imagenet-64 folder (200 classes x 40)")
    parser.add_argument("--steps", type=int, default=700, help="per run (700: past the plateau, REPLICATION.md)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--lr", type=float, default=TINY_ADAMW_OPTIM["lr"], help="peak lr (default: the tiny AdamW recipe's)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run with --jobs 1 (0 = auto)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each when > 1)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--classes", type=int, default=200, help="use the first N classes (quick runs)")
    parser.add_argument("--variants", default=",".join([*VARIANTS, *TWO_STAGE]), help="comma-separated variant names")
    parser.add_argument("--probe-epochs", type=int, default=90)
    parser.add_argument("--probe-lr", type=float, default=1.0, help="LARS base lr (see probe.py on small data)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers per run")
    parser.add_argument("--work-dir", default="runs/replicate")
    parser.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "replicate_results.json"),
        help="finished runs' metrics, kept in the repository so a study spans sessions (reused unless --fresh)",
    )
    harness.add_output_arguments(parser, out=harness.BENCHMARKS / "REPLICATION.md")
    parser.add_argument(
        "--fresh", action="store_true", help="retrain every run (default: reuse finished runs in --work-dir)"
    )
    parser.add_argument(
        "--finished-only", action="store_true", help="train nothing: tabulate the runs already finished in --work-dir"
    )
    args = parser.parse_args(argv)
    names = harness.names(args.variants)
    unknown = [n for n in names if n not in VARIANTS and n not in TWO_STAGE]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join([*VARIANTS, *TWO_STAGE])}")
    seeds = [int(s) for s in args.seeds.split(",")]
    labels = [label for _, label in ImageFolder(args.data, center_crop_transform(64)).samples]
    train_idx, val_idx = (t.tolist() for t in split_per_class(labels, 35, 5, seed=0))
    train_idx = [i for i in train_idx if labels[i] < args.classes]
    val_idx = [i for i in val_idx if labels[i] < args.classes]
    results: dict[str, list[dict[str, float]]] = {}
    clock = harness.Clock()
    if args.jobs > 1:
        args.threads = 1  # --jobs runs share the cores: one thread each never oversubscribes them
    tasks = [(name, seed) for name in names for seed in seeds]
    identity, results_file = study_identity(args), Path(args.results)
    recorded = {} if args.fresh else load_results(results_file, identity)
    with ProcessPoolExecutor(max_workers=args.jobs) if args.jobs > 1 else nullcontext() as pool:
        futures = {
            (n, s): pool.submit(run_variant, n, s, args, train_idx, val_idx)
            for n, s in tasks
            if pool and f"{n}|{s}" not in recorded
        }
        for name, seed in tasks:  # in table order; a pool runs --jobs at a time
            key = f"{name}|{seed}"
            if key in recorded:
                run = recorded[key]
            else:
                future = futures.get((name, seed))
                run = future.result() if future else run_variant(name, seed, args, train_idx, val_idx)
                if run is None:
                    continue
                record_result(results_file, key, identity, run)
            clock.seen()
            results.setdefault(name, []).append(run)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in run.items()), flush=True)
    fixed = ImageFolder(args.data, center_crop_transform(64))
    held_out = torch.stack([fixed[(i, 0)][0] for i in val_idx])
    floor = statistics.mean(psnr(held_out, mean_colour(held_out)))
    table = summarise(results) + f"\n| each image in its own mean colour | - | {floor:.2f} | | | | |"
    print(table)
    if not args.no_write and not Path(args.out).exists():
        Path(args.out).write_text(
            "# Replication at small scale\n\nWritten by `benchmarks/replicate.py`; see its docstring.\n"
        )
    notes = [
        f"{len(train_idx)} training / {len(val_idx)} held-out images, {args.steps} steps of batch "
        f"{args.batch_size}, lr {args.lr}, seeds {args.seeds}, {args.jobs} run(s) at a time, device {args.device}; "
        f"{clock.minutes:.0f} min in all (runs reused from --work-dir count as 0); {clock.summary()}. Metrics on the "
        "held-out images with EMA weights; mean ± std over seeds."
    ]
    title = "TiTok vs MsTok and MsTok's ablations on tiny-imagenet-64"
    harness.publish(args, "replicate", title, __file__, argv, [table], notes, args.device)
    return results


if __name__ == "__main__":
    main()
