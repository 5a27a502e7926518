"""Forward GFLOPs of TiTok-B and MsTok-B as the number of latent tokens K grows.

TiTok runs its K latents through the encoder (and decoder) ViT together with the P = 256
patch tokens, so every block pays for 1 + P + K tokens: cost grows linearly in K through the
linear layers and quadratically through attention (about 1.85x from K = 32 to 256 at B size).
MsTok's backbones never see K; only the query attention module does, linearly (plus a small
K^2 query self-attention), so cost stays nearly flat.

Builds one model at a time at 256x256, batch 1, counts FLOPs with
:func:`mstok.evaluation.flops.tokenizer_flops`, prints a markdown table with ratios to the
smallest K, checks the targets, and appends a dated section to ``--out``.

    python benchmarks/flops_vs_tokens.py --out benchmarks/RESULTS.md --ks 32,64,128,256 --models titok_b64,mstok_b64

Exits 1 if a target fails.
"""

from __future__ import annotations

import argparse
import gc
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import mstok
from mstok.evaluation.flops import tokenizer_flops
from mstok.tokenizers.registry import preset_config

PARTS = ("encoder", "decoder", "total")
Results = dict[tuple[str, int], dict[str, int]]  # (preset, K) -> FLOPs per part


@dataclass(frozen=True)
class Target:
    """``lo <= flops(model, part, K=k_hi) / flops(model, part, K=k_lo) <= hi``."""

    model: str
    part: str
    k_lo: int
    k_hi: int
    lo: float
    hi: float
    text: str


TARGETS = (
    Target("mstok_b64", "encoder", 32, 256, 0.0, 1.15, "MsTok-B encoder at K=256 within 1.15x of K=32"),
    Target("mstok_b64", "decoder", 32, 256, 0.0, 1.15, "MsTok-B decoder at K=256 within 1.15x of K=32"),
    Target("titok_b64", "encoder", 32, 256, 1.75, 1.95, "TiTok-B encoder grows ~1.85x (1.75-1.95) from K=32 to 256"),
    Target("titok_b64", "decoder", 32, 256, 1.75, 1.95, "TiTok-B decoder grows ~1.85x (1.75-1.95) from K=32 to 256"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"), help="markdown file to append to")
    parser.add_argument("--ks", default="32,64,128,256", help="comma-separated numbers of latent tokens K")
    parser.add_argument("--models", default="titok_b64,mstok_b64", help="comma-separated preset names")
    parser.add_argument("--image-size", type=int, default=256, help="image resolution (square)")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    args.ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.ks or not args.models:
        parser.error("--ks and --models must each name at least one value")
    return args


def measure(models: list[str], ks: list[int], image_size: int, batch_size: int) -> Results:
    """FLOPs per (model, K); one model in memory at a time."""
    results: Results = {}
    for name in models:
        for k in ks:
            start = time.perf_counter()
            tokenizer = mstok.create_tokenizer(name, num_latent_tokens=k, image_size=image_size)
            flops = tokenizer_flops(tokenizer, batch_size=batch_size)
            flops["total"] = flops["encoder"] + flops["decoder"]
            results[name, k] = flops
            del tokenizer
            gc.collect()
            print(f"  {name} K={k}: {flops['total'] / 1e9:.2f} GFLOPs ({time.perf_counter() - start:.1f}s)", flush=True)
    return results


def make_table(results: Results, models: list[str], ks: list[int]) -> str:
    base = ks[0]
    header = ["model", "K"] + [f"{p} GFLOPs" for p in PARTS] + [f"{p} / K={base}" for p in PARTS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 6) + "|"]
    for name in models:
        for k in ks:
            flops, ref = results[name, k], results[name, base]
            cells = [name, str(k)]
            cells += [f"{flops[p] / 1e9:.2f}" for p in PARTS]
            cells += [f"{flops[p] / ref[p]:.3f}x" for p in PARTS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(results: Results) -> tuple[list[str], bool]:
    """One line per target (PASS / FAIL / SKIP) and whether any failed."""
    lines, failed = [], False
    for t in TARGETS:
        if (t.model, t.k_lo) not in results or (t.model, t.k_hi) not in results:
            lines.append(f"- SKIP: {t.text} (not measured in this run)")
            continue
        ratio = results[t.model, t.k_hi][t.part] / results[t.model, t.k_lo][t.part]
        ok = t.lo <= ratio <= t.hi
        failed |= not ok
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {t.text}: measured {ratio:.3f}x")
    return lines, failed


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in args.models:
        preset_config(name)  # fail fast on a bad preset name
    size = f"{args.image_size}x{args.image_size}"
    print(f"Counting FLOPs for {args.models} at K={args.ks}, {size}, batch {args.batch_size}")
    results = measure(args.models, args.ks, args.image_size, args.batch_size)
    table = make_table(results, args.models, args.ks)
    target_lines, failed = check_targets(results)

    print()
    print(table)
    print("\nTargets:")
    print("\n".join(target_lines))

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    section = "\n".join(
        [
            f"## FLOPs vs number of latent tokens ({stamp})",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: torch {torch.__version__}, Python {platform.python_version()}, CPU {cpu_name()}, "
            f"{torch.get_num_threads()} threads. Forward FLOPs (2 per multiply-add) from FlopCounterMode with "
            f"attention on the math SDPA backend; {args.image_size}x{args.image_size} images, batch {args.batch_size}; "
            "quantizer and element-wise ops not counted.",
            "",
            table,
            "",
            "Targets:",
            "",
            *target_lines,
            "",
        ]
    )
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = out.read_text() if out.exists() else "# Benchmark results\n"
    out.write_text(existing.rstrip("\n") + "\n\n" + section)
    print(f"\nAppended to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
