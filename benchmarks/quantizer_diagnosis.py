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
    python benchmarks/quantizer_diagnosis.py --rows "BSQ (BSQ-ViT settings),BSQ (defaults)" --steps 100 --no-write

Finished runs are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import BSQ_VIT, MAGVIT_LFQ, Row

BITS = 10
RECIPE_OPTIM = harness.recipe()


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
        stats["position_bit_entropy"] = float(harness.bit_entropies(out.indices, BITS).mean())  # (K, C) averaged
    return stats


def run_diagnosed(name: str, args: argparse.Namespace, threads: int, seed: int) -> dict[str, Any]:
    """Train (or reuse) row ``name`` (measured on ``args.images`` held-out images by
    :func:`harness.run_row`), then add the statistics of its latents on the same images."""
    from mstok.persistence import load_tokenizer

    result = harness.run_row(name, ROWS[name], args, threads, seed)
    if threads:
        torch.set_num_threads(threads)
    images = harness.held_out(args.data, args.images)
    model = load_tokenizer(harness.run_dir(args, name, seed)).eval()
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
    rows = [
        [
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
        for name, r in results.items()
    ]
    return harness.markdown_table(head, rows)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_data_arguments(parser)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=1000, help="held-out images measured at the end")
    harness.add_run_arguments(parser, "runs/quantizer_diagnosis", seeds=1)
    harness.add_output_arguments(parser)
    args = parser.parse_args(argv)
    args.val_every, args.val_images = args.steps, 64  # run_row validates once, at the end
    args.final_images = args.images  # and measures the EMA weights on these
    names = harness.chosen(parser, args.rows, ROWS, ROWS)
    harness.check_rows(parser, args, [ROWS[n] for n in names])
    study = harness.Study(args)
    tasks = {
        harness.seeded_name(name, seed): functools.partial(run_diagnosed, name, args, study.threads, seed)
        for name in names
        for seed in range(args.seeds)
    }
    results = study.run(tasks, lambda key, r: f"{key}: PSNR {r['final_psnr']:.2f}")
    text = table(results, args.steps)
    print(text)
    notes = [
        f"titok_tiny, {BITS} bits per token, {args.steps} steps of batch {args.batch_size}, the tiny recipe; "
        f"{args.images} held-out images, EMA weights; entropy / recon.: the weighted entropy term and L1 + MSE "
        f"as logged at that step; {study.pace()}.",
    ]
    title = "Binary quantizers that keep their codes: diagnosis"
    harness.publish(args, "quantizer_diagnosis", title, __file__, argv, [text], notes)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
