"""The reference-network commands of the ``mstok`` CLI: ``reference train`` and ``reference eval``,
and the ``--feature-net`` part of ``mstok eval`` (FD-ref of reconstructions, or of generated images
with class accuracy and precision/recall). ``mstok.cli`` registers them with
:func:`add_reference_commands`; errors are ``ValueError``/``FileNotFoundError``, which its ``main``
turns into one-line messages."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mstok.cli_errors import MAX_PIXELS_HELP, positive_int
from mstok.cli_generation import MODEL_HELP, WEIGHTS_HELP
from mstok.device import auto_precision, resolve_device
from mstok.evaluation.evaluate import write_results
from mstok.evaluation.fid import load_stats
from mstok.evaluation.generated import evaluate_generated_reference
from mstok.evaluation.reference import ReferenceMeter, evaluate_reference
from mstok.persistence import load_reference_net
from mstok.training.reference import DEFAULT_BATCH, DEFAULT_DATA, DEFAULT_LR, DEFAULT_STEPS, train_reference

DEFAULT_VAL_DATA = "../shared/datasets/tiny-imagenet-64"


def _require_folder(path: str, flag: str) -> None:
    """A one-line error for a data path that is not there, before anything slow starts."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{flag}: {path} does not exist (expected a folder of class sub-folders or of shards)")


def _cmd_reference_train(args: argparse.Namespace) -> int:
    _require_folder(args.data, "--data")
    if args.val_data:
        _require_folder(args.val_data, "--val-data")
    if args.val_every and not args.val_data:
        raise ValueError("--val-every needs --val-data DIR (held-out labelled images)")
    started = time.perf_counter()
    model = train_reference(
        args.data,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        seed=args.seed,
        val_data=args.val_data,
        val_every=args.val_every,
        num_workers=args.workers,
        device=args.device,
        progress=not args.no_progress,
        precision=auto_precision(args.precision, resolve_device(args.device)),
    )
    print(f"done: {args.steps} steps in {time.perf_counter() - started:.0f} s; the model is in {args.out}")
    if args.val_data:
        result = evaluate_reference(model, args.val_data, num_workers=args.workers, progress=not args.no_progress)
        Path(args.out, "val.json").write_text(json.dumps({"data": str(args.val_data), **result}, indent=2) + "\n")
        print(
            f"held-out top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
            f"({result['images']} images of {args.val_data}; written to {Path(args.out, 'val.json')})"
        )
    return 0


def _cmd_reference_eval(args: argparse.Namespace) -> int:
    model = load_reference_net(args.model, args.weights)  # a missing or wrong-kind folder fails here, at once
    _require_folder(args.data, "--data")
    model.to(resolve_device(args.device))
    result = evaluate_reference(
        model,
        args.data,
        batch_size=args.batch_size,
        limit=args.limit,
        num_workers=args.workers,
        progress=not args.no_progress,
        max_pixels=args.max_pixels,
    )
    print(json.dumps({"model": str(args.model), "data": str(args.data), **result}))
    return 0


def reference_meter(args: argparse.Namespace, dataset: Dataset, device: torch.device) -> tuple[Any, dict[str, str]]:
    """``mstok eval --feature-net DIR [--feature-net-stats FILE]``: the FD-ref meter on ``device``,
    and why the top-1 is unavailable (the data's classes are not the network's) if it is."""
    net = load_reference_net(args.feature_net).to(device)
    stats = load_stats(args.feature_net_stats) if args.feature_net_stats else None
    classes = getattr(dataset, "classes", None)
    labelled = classes is not None and len(classes) == net.config.num_classes
    unavailable = {}
    if not labelled:
        unavailable["ref_top1"] = (
            f"the data has {'unknown' if classes is None else len(classes)} classes and the feature net "
            f"{net.config.num_classes}: its top-1 needs the same classes (numbered as the sorted class folders)"
        )
    source = f"--feature-net-stats {args.feature_net_stats}"
    return ReferenceMeter(net, stats, labelled=labelled, source=source), unavailable


def eval_generated_reference(args: argparse.Namespace, out: Path | None) -> int:
    """``mstok eval --generated DIR --feature-net NET --data REAL``: FD-ref, class accuracy and
    precision/recall of generated images against real ones, printed and written to ``--out``."""
    if args.feature_net_stats:
        raise ValueError("--feature-net-stats is for reconstructions; with --generated the real features are cached")
    if not args.data:
        raise ValueError("--generated with --feature-net needs --data DIR: the real images to compare with")
    if not Path(args.generated).exists():
        raise FileNotFoundError(f"--generated: {args.generated} does not exist")
    _require_folder(args.data, "--data")
    net = load_reference_net(args.feature_net).to(resolve_device(args.device))
    results = evaluate_generated_reference(
        args.generated,
        args.data,
        net,
        batch_size=args.batch_size,
        k=args.pr_k,
        require_labels=args.class_accuracy,
        progress=not args.no_progress,
    )
    results["feature_net"] = str(args.feature_net)
    print(write_results(results, out))
    if out is not None:
        print(f"results written to {out}")
    return 0


def add_feature_net_arguments(evaluate: argparse.ArgumentParser) -> None:
    """``mstok eval``'s FD-ref options."""
    evaluate.add_argument(
        "--feature-net",
        metavar="DIR",
        help="a reference network (`mstok reference train`): also report FD-ref (the Fréchet distance of its "
        "features of the real and reconstructed images; not FID, comparable only with the same network file) and "
        "its top-1 on both; the real images' statistics go to fd_ref_stats.npz beside the results",
    )
    evaluate.add_argument(
        "--feature-net-stats",
        metavar="FILE",
        help="reuse real-image FD-ref statistics (an fd_ref_stats.npz written with the same --feature-net)",
    )
    evaluate.add_argument(
        "--class-accuracy",
        action="store_true",
        help="with --generated and --feature-net: require class labels (samples.npz or class<c>_<i>.png names) "
        "and fail without them (otherwise the accuracy is reported when they are there)",
    )
    evaluate.add_argument(
        "--pr-k", type=positive_int, default=3, help="neighbourhood size of precision/recall (Kynkäänniemi et al.)"
    )


def add_reference_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``mstok reference train`` and ``mstok reference eval``."""
    reference = sub.add_parser(
        "reference",
        help="train or evaluate the reference network (a Tiny ImageNet classifier: SemTok's teacher, FD-ref)",
    )
    commands = reference.add_subparsers(dest="reference_command", required=True)
    train = commands.add_parser(
        "train",
        help="train the reference network (resumes an unfinished run in --out)",
        description="Train a small ResNet classifier on labelled images and save it into --out (config.json + "
        "model.safetensors). Checkpoints go to --out/checkpoints; running the same command again resumes.",
    )
    train.add_argument("--data", default=DEFAULT_DATA, help=f"labelled training images (default {DEFAULT_DATA})")
    train.add_argument("--out", default="runs/reference", help="run folder and saved model (default runs/reference)")
    train.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help=f"steps (default {DEFAULT_STEPS})")
    train.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH, help=f"images per step (default {DEFAULT_BATCH})"
    )
    train.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak AdamW learning rate (default {DEFAULT_LR})")
    train.add_argument("--threads", type=int, default=0, help="torch threads (default 0: the free cores)")
    train.add_argument("--workers", type=int, default=0, help="data-loader processes (default 0)")
    train.add_argument("--seed", type=int, default=0, help="seed of the init and the data order (default 0)")
    train.add_argument("--val-data", help="held-out labelled images: print top-1/top-5 at the end (and --val-every)")
    train.add_argument("--val-every", type=int, default=0, help="top-1 on 1000 --val-data images every N steps")
    train.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="autocast (default auto: bf16 where the CPU or GPU computes it natively, else fp32)",
    )
    train.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=_cmd_reference_train)

    evaluate = commands.add_parser(
        "eval", help="top-1/top-5 of a reference network on labelled images, as one JSON line"
    )
    evaluate.add_argument("--model", required=True, help=f"the reference network: {MODEL_HELP}")
    evaluate.add_argument("--weights", help=WEIGHTS_HELP)
    evaluate.add_argument("--data", default=DEFAULT_VAL_DATA, help=f"labelled images (default {DEFAULT_VAL_DATA})")
    evaluate.add_argument("--batch-size", type=positive_int, default=256, help="images per batch (default 256)")
    evaluate.add_argument("--limit", type=positive_int, help="only the first N images")
    evaluate.add_argument("--workers", type=int, default=0, help="data-loader processes (default 0)")
    evaluate.add_argument("--max-pixels", type=int, help=MAX_PIXELS_HELP)
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    evaluate.set_defaults(func=_cmd_reference_eval)
