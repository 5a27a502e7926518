"""The ``mstok app`` command: build the page and ``launch()`` it (nothing else in mstok launches)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from mstok.cli_errors import positive_int, run_command

DEFAULT_RUNS = "runs"  # searched for trained models to offer in the pickers
DEFAULT_PORT = 7860  # Gradio's usual port


def add_app_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mstok app`` on the top-level sub-parsers."""
    app = sub.add_parser(
        "app",
        help='a web app (Gradio): tokenize, compare and generate in a browser (pip install "mstok[app]")',
        description="Serve a web page with three tabs: Tokenize (reconstruction, error map, PSNR/SSIM, token ids, "
        "decoding a prefix of the tokens or HieraTok's scales), Compare (two tokenizers on one image) and Generate "
        "(a generator and its tokenizer, by class). The pickers list the models found under --runs and official:"
        "<release> (official TiTok, fetched from the Hugging Face hub), and take any path or hub id typed in.",
    )
    app.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PATH",
        help="a tokenizer to list first (a run folder, saved model, hub id or official:<release>); repeatable",
    )
    app.add_argument(
        "--generator", action="append", default=[], metavar="PATH", help="a generator to list first; repeatable"
    )
    app.add_argument(
        "--runs", default=DEFAULT_RUNS, help=f"folder searched for trained models (default {DEFAULT_RUNS})"
    )
    app.add_argument(
        "--class-names",
        help="class names for the Generate tab: a manifest.csv (class_idx, class_name) or one name per line",
    )
    app.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    app.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda (default auto)")
    app.add_argument("--half", action="store_true", help="bfloat16 on a GPU (the CPU always computes in float32)")
    app.add_argument("--max-pixels", type=positive_int, help="refuse uploads with more pixels (default 40,000,000)")
    app.set_defaults(func=cmd_app)


def cmd_app(args: argparse.Namespace) -> int:
    """Serve the page until Ctrl-C."""
    # lazy: CLI start-up time (the page loads Gradio, the metrics and the demo's photos)
    from mstok.app.handlers import APP_MAX_PIXELS
    from mstok.app.models import ModelCache, choose_runtime, find_models, official_choices
    from mstok.app.page import build_page

    try:
        import gradio  # noqa: F401  (only checked here: the page imports it)
    except ImportError:
        raise RuntimeError('mstok app needs Gradio, the optional extra "app": pip install "mstok[app]"') from None
    if args.class_names and not Path(args.class_names).is_file():
        raise FileNotFoundError(f"--class-names: no such file {args.class_names}")
    runtime = choose_runtime(args.device, args.half)
    tokenizers = _unique([*args.model, *find_models([args.runs], "tokenizer"), *official_choices("tokenizer")])
    generators = _unique([*args.generator, *find_models([args.runs], "generator"), *official_choices("generator")])
    page = build_page(ModelCache(runtime), tokenizers, generators, args.max_pixels or APP_MAX_PIXELS, args.class_names)
    logging.getLogger(__name__).info(
        "mstok app: %d tokenizers, %d generators on %s", len(tokenizers), len(generators), runtime.describe()
    )
    page.queue(default_concurrency_limit=1)  # one model call at a time: a CPU gains nothing from two
    page.launch(server_name=args.host, server_port=args.port, show_error=False, ssr_mode=False, quiet=False)
    return 0


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mstok.app [options]``: ``mstok app`` without the other commands."""
    parser = argparse.ArgumentParser(prog="mstok")
    add_app_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["app", *(argv if argv is not None else [])])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return run_command(args.func, args)
