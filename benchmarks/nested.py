"""Nested tokens: one nested MsTok-tiny decoding every prefix against dedicated models at k = 8, 16, 32,
and the length chosen per image from a PSNR target.

Every row is ``mstok_tiny`` with the tiny recipe on the data stream of the convergence study
(``benchmarks/convergence.py``: the 50,000 Tiny ImageNet training images, EMA weights):

* **nested**: K = 32 trained with nested dropout (each image keeps the first k of its tokens;
  docs/nested.md), one row per ``--nested`` variant: ``uniform+full`` (the shipped recipe,
  configs/mstok_tiny_nested.toml: half the images keep all 32, the others k uniform over 1..32,
  One-D-Piece's tail drop), ``pow2+full`` (the others k uniform over 1, 2, 4, 8, 16, 32, FlexTok's
  distribution), ``pow2`` (FlexTok's distribution alone);
* **dedicated**: a model trained for one length, K = 8, 16 and 32 (``--dedicated``), the usual way.

Measured on ``--final-images`` held-out images (Tiny ImageNet's validation set, never trained on):
PSNR and SSIM of the nested model's decode of its first k tokens (``decode(encode(x, num_tokens=k))``)
for every k of ``--prefixes``, beside each dedicated model's decode of all its K tokens; the
difference nested - dedicated at each dedicated K (the issue's target: within 0.5 dB at every k,
0.2 dB at the full 32). Then the length chosen per image (``encode_adaptive``): for each PSNR target
of ``--targets``, the mean tokens per image, the mean PSNR reached, the share of images that reach
the target, and the fixed length the nested model needs for the same mean PSNR. The adaptive
lengths come from the table of every image's PSNR at every k (one decode per k), which gives
exactly what ``encode_adaptive`` returns (checked here on the first 64 images). ``--seeds`` seeds
per row, mean ± half the spread. With ``--feature-net DIR`` (a reference network, ``mstok reference
train``) each prefix's decodes also get FD-ref against the held-out images and the network's top-1.

    python benchmarks/nested.py --feature-net runs/reference      # 2000 steps, 2 seeds, 8000 held-out images
    python benchmarks/nested.py --steps 4 --seeds 1 --final-images 16 --no-write --work-dir /tmp/nested_smoke

Finished runs are reused from ``--work-dir`` when their settings match (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import Row

PRESET = "mstok_tiny"
NESTED_VARIANTS = {  # --nested name -> the [nested] settings of its row
    "uniform+full": ["nested.distribution='uniform'", "nested.full_fraction=0.5"],
    "pow2+full": ["nested.distribution='pow2'", "nested.full_fraction=0.5"],
    "pow2": ["nested.distribution='pow2'"],
}
CHECKED_IMAGES = 64  # images on which encode_adaptive itself is compared with the table


def dedicated_name(k: int) -> str:
    return f"dedicated K={k}"


def nested_name(variant: str) -> str:
    return f"nested K=32 ({variant})"


def runs(nested: list[str], dedicated: list[int]) -> dict[str, Row]:
    """One nested row per variant, then one dedicated row per K."""
    rows = {nested_name(v): Row("nested", PRESET, {"nested": True}, [*harness.recipe(), *NESTED_VARIANTS[v]])
            for v in nested}  # fmt: skip
    for k in dedicated:
        rows[dedicated_name(k)] = Row("dedicated", PRESET, {"num_latent_tokens": k}, harness.recipe())
    return rows


@torch.no_grad()
def prefix_scores(model: torch.nn.Module, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """(N, K) float64: the PSNR of every image's decode of its first k tokens, k = 1..K (one column
    when the model is not nested: all K only)."""
    from mstok.images import image_psnr

    model.eval()
    total = model.config.num_latent_tokens
    lengths = range(1, total + 1) if model.config.nested else [total]
    rows = []
    for chunk in images.split(batch):
        tokens = model.encode(chunk)
        rows.append(torch.stack([image_psnr(chunk, model.decode(tokens[:, :k])) for k in lengths], 1))
    return torch.cat(rows)


@torch.no_grad()
def prefix_quality(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, k: int, net: Any,
                   batch: int = 250) -> dict[str, float]:  # fmt: skip
    """Mean SSIM of the decodes of the first k tokens and, with a reference network ``net``, their FD-ref
    against the images and the network's top-1 on them."""
    from mstok.evaluation.metrics import ssim

    decodes = torch.cat([model.decode(model.encode(chunk, num_tokens=k)) for chunk in images.split(batch)])
    result = {"ssim": float(np.mean(ssim(images, decodes)))}
    if net is not None:
        scores = harness.reference_scores(net, images, decodes, labels)
        result |= {"fd_ref": float(scores["fd_ref"]), "top1": float(scores["ref_top1_recon"])}
    return result


def adaptive(scores: torch.Tensor, target: float) -> dict[str, float]:
    """What encode_adaptive chooses for ``target`` given the (N, K) PSNR table: the shortest k reaching it
    (K when none does); the mean length, the mean PSNR at it, the share of images reaching the target."""
    total = scores.shape[1]
    reached = scores >= target
    lengths = torch.where(reached.any(1), reached.int().argmax(1) + 1, total)
    chosen = scores.gather(1, (lengths - 1)[:, None]).squeeze(1)
    return {"tokens": float(lengths.double().mean()), "psnr": float(chosen.mean()),
            "reached": float(reached.any(1).double().mean()), "lengths": lengths}  # fmt: skip


def check_adaptive(model: torch.nn.Module, images: torch.Tensor, scores: torch.Tensor, target: float) -> None:
    """encode_adaptive on a few images picks the lengths the table says (the table stands for the API)."""
    chosen = model.encode_adaptive(images, target)
    expected = adaptive(scores, target)["lengths"]
    if not torch.equal(chosen.lengths, expected):
        raise AssertionError(f"encode_adaptive chose {chosen.lengths.tolist()}, the table {expected.tolist()}")


def evaluate(args: argparse.Namespace, name: str, seed: int, prefixes: list[int]) -> dict[str, Any]:
    """One run's held-out measurements (its EMA weights): PSNR, SSIM (and FD-ref, top-1 with
    ``--feature-net``) per prefix; for the nested model the adaptive-length rows too."""
    from mstok.persistence import load_reference_net, load_tokenizer

    model = load_tokenizer(harness.run_dir(args, name, seed)).eval()
    indices = tuple(harness.held_out_indices(args.data, args.final_images))
    images, labels = harness.held_out_images(args.data, indices), harness.held_out_labels(args.data, indices)
    net = load_reference_net(args.feature_net) if args.feature_net else None
    scores = prefix_scores(model, images)  # (N, K) or (N, 1)
    total = model.config.num_latent_tokens
    kept = [k for k in prefixes if k <= total] if model.config.nested else [total]
    quality = {k: prefix_quality(model, images, labels, k, net) for k in kept}
    result: dict[str, Any] = {
        "psnr": {k: float(scores[:, k - 1 if model.config.nested else 0].mean()) for k in kept},
        **{metric: {k: q[metric] for k, q in quality.items()} for metric in quality[kept[0]]},
    }
    if not model.config.nested:
        return result
    result["curve"] = scores.mean(0).tolist()  # mean PSNR at every k, for the fixed-length comparison
    result["adaptive"] = {}
    for target in args.targets:
        picked = adaptive(scores, target)
        del picked["lengths"]
        result["adaptive"][target] = picked
        check_adaptive(model, images[:CHECKED_IMAGES], scores[:CHECKED_IMAGES], target)
    return result


def fixed_tokens_for(curve: list[float], psnr: float) -> str:
    """The shortest fixed length whose mean PSNR reaches ``psnr`` ('> K' when none does)."""
    for k, value in enumerate(curve, start=1):
        if value >= psnr:
            return str(k)
    return f"> {len(curve)}"


def tables(evaluated: dict[str, list[dict[str, Any]]], prefixes: list[int], targets: list[float]) -> list[str]:
    """Markdown: PSNR/SSIM against k (nested row, dedicated rows, the difference); the adaptive lengths."""
    head = ["row", *[f"k={k}" for k in prefixes]]
    lines = []
    measured = next(iter(evaluated.values()))[0]  # FD-ref and top-1 only with --feature-net
    metrics = [m for m in (("psnr", 2), ("ssim", 4), ("fd_ref", 2), ("top1", 3)) if m[0] in measured]
    for metric, digits in metrics:
        for name, seeds in evaluated.items():
            cells = [harness.cell([s[metric].get(k) for s in seeds], digits) for k in prefixes]
            lines.append([f"{name} {metric.upper().replace('_', '-').replace('REF', 'ref')}", *cells])
    nested_rows = [name for name, seeds in evaluated.items() if "curve" in seeds[0]]
    for name in nested_rows:
        deltas = []
        for k in prefixes:
            dedicated = evaluated.get(dedicated_name(k))
            seeds = zip(evaluated[name], dedicated or [], strict=False)
            pairs = [(n["psnr"].get(k), d["psnr"].get(k)) for n, d in seeds]
            deltas.append(harness.cell([a - b for a, b in pairs if a is not None and b is not None], 2))
        lines.append([f"{name} - dedicated PSNR (dB)", *deltas])
    fixed = harness.markdown_table(head, lines)
    nested = evaluated[nested_rows[0]]  # the first variant's adaptive lengths (the shipped recipe by default)
    curve = list(np.mean([s["curve"] for s in nested], axis=0))
    rows = []
    for target in targets:
        per = [s["adaptive"][target] for s in nested]
        psnr = float(np.mean([p["psnr"] for p in per]))
        rows.append([f"{target:g}", *harness.pooled(per, ("tokens", 2), ("psnr", 2), ("reached", 3)),
                     fixed_tokens_for(curve, psnr)])  # fmt: skip
    head2 = [f"target PSNR (dB), {nested_rows[0]}", "mean tokens / image", "mean PSNR reached",
             "share reaching it", "fixed k for that mean PSNR"]  # fmt: skip
    return [fixed, harness.markdown_table(head2, rows)]


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_data_arguments(parser)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--val-images", type=int, default=200, help="held-out images validated during training")
    parser.add_argument("--final-images", type=int, default=8000, help="held-out images measured at the end")
    parser.add_argument(
        "--nested",
        default="uniform+full",
        help="comma-separated nested variants: "
        + ", ".join(NESTED_VARIANTS)
        + " (the first gives the adaptive-length table)",
    )
    parser.add_argument("--dedicated", default="8,16,32", help="comma-separated K of the dedicated models")
    parser.add_argument("--prefixes", default="1,2,4,8,16,32", help="comma-separated prefix lengths k measured")
    parser.add_argument("--targets", default="14,16,18,20", help="comma-separated PSNR targets (dB), adaptive length")
    parser.add_argument(
        "--feature-net",
        default="",
        help="a reference network (mstok reference train --out DIR): "
        "FD-ref and its top-1 of each prefix's decodes too (default: not measured)",
    )
    harness.add_run_arguments(parser, "runs/nested", seeds=2)
    harness.add_output_arguments(parser)
    args = parser.parse_args(argv)
    try:
        dedicated = [int(k) for k in harness.names(args.dedicated)]
        prefixes = [int(k) for k in harness.names(args.prefixes)]
        args.targets = [float(t) for t in harness.names(args.targets)]
    except ValueError as err:
        parser.error(f"--dedicated, --prefixes and --targets are comma-separated numbers ({err})")
    if not prefixes or any(not 1 <= k <= 32 for k in [*dedicated, *prefixes]):
        parser.error("--dedicated and --prefixes take lengths in 1..32 (mstok_tiny's K), --prefixes at least one")
    if args.feature_net:
        harness.feature_net(parser, args)  # a parser error now for a missing or foreign network
    rows = runs(harness.chosen(parser, args.nested, NESTED_VARIANTS, ["uniform+full"]), dedicated)
    harness.check_rows(parser, args, rows.values())  # fail fast on a bad row, before any training
    study = harness.Study(args)

    def report(key: tuple[str, int], result: dict[str, Any]) -> str:
        return f"{key[0]} seed {key[1]}: PSNR {result['final_psnr']:.2f}, {result['seconds_per_step']:.3f} s/step"

    tasks = {(name, seed): functools.partial(harness.run_row, name, row, args, study.threads, seed)
             for name, row in rows.items() for seed in range(args.seeds)}  # fmt: skip
    trained = harness.by_row(study.run(tasks, report))
    evaluated = {name: [evaluate(args, name, seed, prefixes) for seed in range(args.seeds)] for name in trained}
    blocks = tables(evaluated, prefixes, args.targets)
    print("\n\n".join(blocks))
    notes = [
        f"- {args.steps} steps of batch {args.batch_size} per run, the tiny recipe; {args.seeds} seeds per row "
        f"(mean ± half the spread); {args.final_images} held-out images, EMA weights; {study.pace()}.",
        "- The nested row decodes its first k tokens with the tail token in the other slots; a dedicated row "
        "decodes all its K. The adaptive rows choose, per image, the shortest prefix reaching the target (K = 32 "
        "when none does); 'fixed k' is the shortest single length whose mean PSNR reaches the same mean.",
    ]
    harness.publish(args, "nested", "Nested tokens: PSNR against the prefix length", __file__, argv, blocks, notes)
    return evaluated


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
