"""Why LFQ and BSQ lose their codes inside a tiny 1D tokenizer, and what keeps them.

Each row trains ``titok_tiny`` with 10 bits per token (K = 32) for ``--steps`` steps on the
convergence study's data stream (``benchmarks/convergence.py``: the 50,000 training images) with
one bit-quantizer setting, then measures its EMA weights on ``--images`` held-out images (Tiny
ImageNet's validation set): PSNR; the fraction of the 1,024 codes used and the code perplexity;
the mean binary entropy of the bits over all tokens, and **per token position** (the entropy of
bit d of token k over the images, averaged over d and k: 1 = each bit a fair coin at every
position, 0 = every token position emits one code whatever the image); the latents' statistics
(mean absolute value of the per-position mean over the images, against the spread over the
images at a position); and, over training, the entropy term beside the reconstruction loss
(L1 + MSE). The VQ row is the reference at equal bits.

    python benchmarks/quantizer_diagnosis.py                 # every row, 300 steps, 2 at a time
    python benchmarks/quantizer_diagnosis.py --rows "BSQ (BSQ-ViT settings),BSQ (defaults)" --steps 100 --no-append

Finished runs are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mstok.evaluation.report import append_section, command_line, load_1min, load_summary, results_section
from mstok.persistence import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from convergence import (
    RECIPE_OPTIM,
    Row,
    add_data_arguments,
    bit_entropies,
    checked_rows,
    held_out_images,
    held_out_indices,
    run_dir,
    run_pooled,
    run_row,
    seeded_name,
)
from quantizers import BSQ_VIT, MAGVIT_LFQ

ROOT = Path(__file__).resolve().parents[1]
BITS = 10


def _row(quantizer: str | dict[str, Any]) -> Row:
    return Row("diagnosis", "titok_tiny", {"quantizer": quantizer, "code_dim": BITS}, RECIPE_OPTIM)


# one change at a time from the papers' settings to the defaults (tau: the inverse temperature)
ROWS: dict[str, Row] = {
    "VQ V=1024": Row("diagnosis", "titok_tiny", {}, RECIPE_OPTIM),
    "BSQ (BSQ-ViT settings)": _row(BSQ_VIT),
    "BSQ + per-position entropy + tau 10 (defaults)": _row("bsq"),
    "LFQ (MAGVIT-v2 settings)": _row(MAGVIT_LFQ),
    "LFQ + per-position entropy + tau 1": _row(
        {**MAGVIT_LFQ, "entropy_per_position": True, "inverse_temperature": 1.0}
    ),
    "LFQ + per-position + layer norm + tau 0.5": _row(
        {**MAGVIT_LFQ, "entropy_per_position": True, "inverse_temperature": 0.5, "layer_norm": True}
    ),
    "LFQ + per-position + tau 0.5 + no commitment": _row(
        {**MAGVIT_LFQ, "entropy_per_position": True, "inverse_temperature": 0.5, "commitment_weight": 0.0}
    ),
    "LFQ + per-position + layer norm + tau 0.5 + no commitment (defaults)": _row("lfq"),
}


@torch.no_grad()
def latent_statistics(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Per-position bit entropy of the ids and the latents' position mean against their spread."""
    out = model.eval()(images)
    latents = out.latents.float()  # (N, K, C) what the quantizer took the sign of
    stats = {
        "position_mean": float(latents.mean(0).abs().mean()),  # |mean over images| per (k, d)
        "within_position_std": float(latents.std(0).mean()),  # spread over images per (k, d)
    }
    if out.indices is not None and model.vocab_size == 2**BITS:
        stats["position_bit_entropy"] = float(bit_entropies(out.indices, BITS).mean())  # (K, C) averaged
    return stats


def run_diagnosed(name: str, args: argparse.Namespace, threads: int, seed: int) -> dict[str, Any]:
    """Train (or reuse) row ``name`` (measured on ``args.images`` held-out images by
    :func:`run_row`), then add the statistics of its latents on the same images."""
    result = run_row(name, args, threads, ROWS[name], seed)
    if threads:
        torch.set_num_threads(threads)
    images = held_out_images(args.data, tuple(held_out_indices(args.data, args.images)))
    model = load_tokenizer(run_dir(args, name, seed)).eval()
    return {**result, **latent_statistics(model, images)}


def _terms_at(result: dict[str, Any], step: int) -> str:
    """``entropy / reconstruction`` of the logged step nearest ``step``."""
    terms = min(result["terms"], key=lambda t: abs(t["step"] - step))
    entropy = terms.get("entropy")
    recon = terms.get("l1", 0.0) + terms.get("mse", 0.0)
    return f"{entropy:+.3f} / {recon:.3f}" if entropy is not None else f"- / {recon:.3f}"


def table(results: dict[str, dict[str, Any]], steps: int) -> str:
    """Markdown: one line per row."""
    early = max(1, steps // 6)
    head = ["row", "PSNR", "codes used", "perplexity", "bit entropy", "bit entropy per position",
            "latent position mean / spread", f"entropy / recon. @{early}", f"entropy / recon. @{steps}"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, r in results.items():
        cells = [
            name,
            f"{r['final_psnr']:.2f}",
            f"{r['usage']:.3f}",
            f"{r['perplexity']:.0f}",
            f"{r['bit_entropy']:.3f}",
            f"{r['position_bit_entropy']:.3f}",
            f"{r['position_mean']:.3f} / {r['within_position_std']:.3f}",
            _terms_at(r, early),
            _terms_at(r, steps),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--images", type=int, default=1000, help="held-out images measured at the end")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each when > 1)")
    parser.add_argument("--threads", type=int, default=0, help="threads per run with --jobs 1 (0 = auto)")
    parser.add_argument("--work-dir", default="runs/quantizer_diagnosis")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="print only; do not write --out")
    parser.add_argument("--fresh", action="store_true", help="retrain finished runs")
    args = parser.parse_args(argv)
    args.val_every, args.val_images = args.steps, 64  # run_row validates once, at the end
    args.final_images = args.images  # and measures the EMA weights on these
    names = checked_rows(parser, args, ROWS, list(ROWS))

    loads, started = [load_1min()], time.perf_counter()
    threads = 1 if args.jobs > 1 else args.threads
    tasks = {
        seeded_name(name, seed): functools.partial(run_diagnosed, name, args, threads, seed)
        for name in names
        for seed in range(args.seeds)
    }
    results = run_pooled(args.jobs, tasks, lambda key, r: f"{key}: PSNR {r['final_psnr']:.2f}", loads)
    text = table(results, args.steps)
    print(text)
    if not args.no_append:
        minutes = (time.perf_counter() - started) / 60
        notes = [
            f"titok_tiny, {BITS} bits per token, {args.steps} steps of batch {args.batch_size}, the tiny recipe; "
            f"{args.images} held-out images, EMA weights; entropy / recon.: the weighted entropy term and L1 + MSE "
            f"as logged at that step; {args.jobs} runs at a time ({threads or 'auto'} thread(s) each); "
            f"{minutes:.0f} min in all (reused runs count 0); {load_summary(loads)}.",
        ]
        section = results_section(
            "Binary quantizers that keep their codes: diagnosis", command_line(__file__, argv), "cpu", [text], notes
        )
        append_section(args.out, section)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
