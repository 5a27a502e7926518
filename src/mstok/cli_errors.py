"""How the ``mstok`` CLI reports failures: a problem the user can fix is one line on stderr,
``mstok <command>: error: <message>``, and a non-zero exit code; a bug keeps its traceback.

The rule (:func:`is_user_error`):

- ``ValueError`` (bad values, corrupt files, config checks), ``OSError`` (missing files and
  folders, permissions, a full disk) and ``FloatingPointError`` (a training run that diverged)
  are the user's to fix, wherever they come from;
- ``TypeError`` and ``RuntimeError`` are, only when mstok raised them on purpose (the innermost
  frame is a ``raise`` statement in the mstok package, e.g. ``create_tokenizer(None)``'s "name
  must be a preset name"), or when torch ran out of memory;
- everything else (an ``AttributeError``, a ``TypeError`` deep inside torch...) is a bug: its
  traceback is printed as usual, so it can be reported.

Ctrl-C exits with code 130 and one line (the trainer saves its checkpoint before that).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
USER_ERROR_CODE = 2  # as argparse's usage errors
INTERRUPTED_CODE = 130  # 128 + SIGINT, what shells report for Ctrl-C


def raised_on_purpose(err: BaseException) -> bool:
    """Whether ``err`` comes from a ``raise`` statement in mstok's own code (not from Python or a library)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    try:
        in_package = Path(last.filename).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError):
        return False
    return in_package and (last.line or "").lstrip().startswith("raise")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a problem with the input (printed in one line) rather than a bug."""
    if isinstance(err, ValueError | OSError | FloatingPointError | torch.OutOfMemoryError):
        return True
    return isinstance(err, TypeError | RuntimeError) and raised_on_purpose(err)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (multi-line messages, such as missing-weights hints, joined)."""
    text = str(err) or type(err).__name__
    parts = [part.strip() for part in text.splitlines() if part.strip()]
    return " ".join(parts)


def command_name(args: argparse.Namespace) -> str:
    """``train``, ``data to-shards``, ``convert titok``: the command as typed."""
    words = [args.command]
    for attr in ("data_command", "convert_command", "reference_command"):
        if getattr(args, attr, None):
            words.append(getattr(args, attr))
    return " ".join(words)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command's function under the error rule of this module; returns the exit code."""
    name = command_name(args)
    try:
        return func(args)
    except KeyboardInterrupt as err:
        detail = f" ({err})" if str(err) else ""  # the trainer says which checkpoint holds the stopped step
        print(f"\nmstok {name}: interrupted{detail}", file=sys.stderr)
        return INTERRUPTED_CODE
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"mstok {name}: error: {one_line(err)}", file=sys.stderr)
        return USER_ERROR_CODE


MAX_PIXELS_HELP = "skip (and count) images with more pixels, width x height (default 89478485, PIL's own limit)"


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
