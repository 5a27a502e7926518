"""The ``mstok`` command line: ``presets``, ``train`` and ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch


def _cmd_presets(args: argparse.Namespace) -> int:
    from mstok.tokenizers.registry import PRESETS, create_tokenizer

    rows = []
    for name in PRESETS:
        with torch.device("meta"):  # count parameters without allocating B/L weights
            model = create_tokenizer(name)
        counts, cfg = model.parameter_counts(), model.config
        rows.append(
            (
                name,
                cfg.family,
                f"{cfg.image_size}",
                f"{cfg.num_latent_tokens}",
                f"{cfg.codebook_size}",
                *(f"{counts[k] / 1e6:.2f}M" for k in ("encoder", "decoder", "quantizer", "total")),
            )
        )
    header = ("preset", "family", "res", "K", "V", "encoder", "decoder", "quantizer", "total")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mstok.training import Trainer, load_train_config

    config = load_train_config(args.config, args.set)
    trainer = Trainer(config, progress=not args.no_progress)
    if args.resume:
        used = trainer.resume(args.resume)
        print(f"resumed from {used} (step {trainer.step})" if used else "no checkpoint to resume: starting fresh")
    trainer.fit()
    print(f"done: step {trainer.step}; checkpoints in {trainer.ckpt_dir} (log: {trainer.out_dir / 'log.jsonl'})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mstok.demo import run_demo

    report = run_demo(
        out_dir=args.out,
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"report written to {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mstok", description="Compact 1D image tokenizers (MsTok, TiTok).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    presets = sub.add_parser("presets", help="list every preset with its parameter counts")
    presets.set_defaults(func=_cmd_presets)

    train = sub.add_parser("train", help="train a tokenizer (single-stage pixel losses)")
    train.add_argument("--config", required=True, help="TOML config file (see configs/)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=3e-4 --set steps=100 (repeatable)",
    )
    train.add_argument(
        "--resume", metavar="auto|DIR", help="resume from a checkpoint folder, or the newest with 'auto'"
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="train TiTok-tiny and MsTok-tiny on bundled photos and write a report")
    demo.add_argument("--data", help="train on this image folder instead of scikit-image's photos")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model (default 600)")
    demo.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    demo.add_argument("--seed", type=int, default=0, help="random seed shared by both models (default 0)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mstok`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"mstok {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
