"""SemTok at tiny scale: stage I with each subset of the semantic terms, each refined by stage II.

The tiny-scale reading of SemTok's Tables 4, 6 and 7 (``../shared/papers/semtok.txt``). Every run
is ``semtok_tiny`` (64 px RGB as the latent space, 8 x 8 patches, K = 32 BSQ tokens of 12 bits,
the reference network as teacher) on the data stream of the convergence study (``benchmarks/convergence.py``:
the 50,000 training images of tiny-imagenet-64-train; held-out images of Tiny ImageNet's
validation set, EMA weights), with the
settings of the shipped configs (``configs/semtok_tiny_stage1.toml``, ``..._stage2.toml``, read
here, so the benchmark follows them):

* **stage I** (generative pre-training: flow decoder, BSQ entropy term) with both semantic terms
  (``semantic``: distillation + contrastive, lambda_s = 0.05 each, against the reference network:
  the paper's recipe, Table 4's last line), without them (both weights 0 and the projections left
  untrained: Table 4's first line), and with one of them (the model built with that term's
  projection only: Table 4's middle lines; ``distill only`` is what the shipped config trains);
* **stage II** (one-step refiner: ``decoder_mode = "refine"``, MSE + PatchGAN, encoder frozen)
  initialised from each stage-I run (``model.init_from`` = its run folder);
* **calibration**: the conv autoencoder with VQ at 320 bits (``quantizers.CALIBRATION``, trained
  for steps1 + steps2 steps), each image in its mean colour, and the held-out images themselves
  (the reference network's own top-1).

Per run, on ``--eval-images`` held-out images (default all 8,000) with the EMA weights: PSNR/SSIM,
**FD-ref** (the Fréchet distance of the reference network's features, real vs reconstructed:
``mstok eval --feature-net``'s meter) and the reference network's top-1 on the reconstructions,
for stage I's flow decoder at 1, 4 and 25 Euler steps (``decode(tokens, steps=n, seed=0)``;
Table 7; the multi-step decodes on the first ``--sampler-images``, default 500) and stage II's
one-step refiner (Table 6); the tokens' **linear-probe top-1** (``encode_features`` mean-pooled
over K, a LARS linear probe trained on 35 and scored on the other 5 held-out images per class,
as ``mstok probe`` does; Table 4's semantic column); BSQ usage (distinct ids / N, N = images x K)
and the mean entropy of the 12 bits; bits per pixel; encode and decode milliseconds per image,
each timed once by the worker that trained the run while the other may still be training: read
them as relative. ``--seeds`` seeds per row, mean ± half the spread. ``--feature-net`` (default
``runs/reference``, ``mstok reference train``) must exist: it is stage I's teacher too.

    python benchmarks/semtok.py --rows "distill only" --seeds 2           # the shipped configs, ~100 min on 2 cores
    python benchmarks/semtok.py --seeds 2                                 # all four lines, ~3.5 h
    python benchmarks/semtok.py --steps1 6 --steps2 4 --eval-images 16 --sampler-images 4 --no-write \\
        --work-dir /tmp/semtok_smoke

The size of one pipeline: on a 2-core machine running two pipelines at a time (one thread each),
stage I (2000 steps) takes ~0.7 s/step with the reference teacher and stage II (1000 steps, the
pixel losses and from step 200 the discriminator) about as long: ~40 min, then ~5 min of
evaluation.

Finished runs are reused from ``--work-dir`` when their settings match (``--fresh`` retrains); a
stage II whose stage I was retrained since is retrained too.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mstok.evaluation.metrics import bits_per_pixel, mean_colour, psnr, ssim
from mstok.evaluation.probe import split_per_class, train_probe
from mstok.persistence import load_reference_net, load_tokenizer
from mstok.tokenizers import create_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import Row

ROOT = harness.ROOT
FLOW_STEPS = (1, 4, 25)  # Table 7: one step, a few, the paper's 25
# Table 4's four pipelines (their stage rows, the shipped stage configs and the run of both stages are
# the harness's, shared with generation.py)
PIPELINES = harness.SEMTOK_PIPELINES


def _timed(call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start


@torch.no_grad()
def token_stats(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float | None]:
    """Usage (distinct ids / N for the N = B x K ids (B, K)) and, for BSQ, the mean binary entropy
    of the bits over the held-out ids (bits; 1 = every bit a fair coin)."""
    stats: dict[str, float | None] = {"usage": torch.unique(ids).numel() / ids.numel(), "bit_entropy": None}
    if model.config.quantizer_spec().kind == "bsq":
        stats["bit_entropy"] = float(harness.bit_entropies(ids.reshape(-1), model.config.code_dim).mean())
    return stats


PROBE_SPLIT = (35, 5)  # of the 40 held-out images per class: the probe's train and val images


def token_probe(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Linear-probe top-1 of the tokens (``encode_features`` mean-pooled over K, as ``mstok probe``
    reads them), trained on 35 and scored on the other 5 held-out images of each class."""
    with torch.no_grad():
        features = torch.cat([model.encode_features(chunk).mean(1) for chunk in images.split(500)]).float()
    train, val = split_per_class(labels, *PROBE_SPLIT)
    classes = int(labels.max()) + 1
    with torch.enable_grad():  # the probe trains, even when called under evaluate's no_grad
        result = train_probe(features[train], labels[train], features[val], labels[val], classes)
    return float(result["top1"])


@torch.no_grad()
def evaluate(
    folder: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    flow_steps: tuple[int, ...],
    sampler_images: int,
    reference: Any,
) -> dict[str, Any]:
    """Held-out metrics of the EMA model in ``folder``: token statistics, bits per pixel, encode
    time, the tokens' linear-probe top-1, and PSNR/SSIM, FD-ref, the reference network's top-1
    and decode time of each decoder (a flow decoder at each of ``flow_steps``). One-pass decoders
    (the refiner, a one-step flow) see every image; a multi-step flow decode the first
    ``sampler_images`` of them (its cost grows with the steps)."""
    model = load_tokenizer(folder).eval()
    cfg = model.config
    model.encode(images[:2])  # warm-up: one-time allocations out of the timing
    ids, seconds = _timed(lambda: torch.cat([model.encode(chunk) for chunk in images.split(500)]))
    out: dict[str, Any] = {
        "encode_ms": 1000 * seconds / len(images),
        **token_stats(model, ids),
        "bpp": bits_per_pixel(cfg.num_latent_tokens, model.vocab_size, cfg.image_size, cfg.image_size),
        # None when --eval-images leaves a class fewer than 40 images (smoke runs)
        "probe_top1": token_probe(model, images, labels) if labels.bincount().min() >= sum(PROBE_SPLIT) else None,
        "decoders": {},
    }
    # label -> (decode, how many of the images it decodes)
    if getattr(cfg, "decoder_mode", None) == "flow":
        decoders = {
            f"flow {n} steps": (
                functools.partial(model.decode, steps=n, seed=0, sampler="euler"),
                len(images) if n == 1 else min(sampler_images, len(images)),
            )
            for n in flow_steps
        }
    else:
        decoders = {"refiner" if hasattr(cfg, "decoder_mode") else "decoder": (model.decode, len(images))}
    for label, (decode, count) in decoders.items():
        decode(ids[:2])
        recon, seconds = _timed(lambda d=decode, n=count: torch.cat([d(chunk) for chunk in ids[:n].split(500)]))
        out["decoders"][label] = {
            "psnr": float(np.mean(psnr(images[:count], recon))),
            "ssim": float(np.mean(ssim(images[:count], recon))),
            "decode_ms": 1000 * seconds / count,
            "images": count,
            **harness.reference_scores(reference, images[:count], recon, labels[:count]),
        }
    return out


def run_evaluated(name: str, row: Row, args: argparse.Namespace, threads: int, seed: int) -> dict[str, Any]:
    """Train (or reuse) one run with :func:`harness.run_row`, then evaluate it (or reuse the evaluation)."""
    result = harness.run_row(name, row, args, threads, seed)
    identity = {"flow_steps": list(FLOW_STEPS), "eval_images": args.eval_images, "sampler_images": args.sampler_images,
                "feature_net": str(Path(args.feature_net).resolve())}  # fmt: skip
    if result.get("eval", {}).get("identity") != identity:
        if threads:
            torch.set_num_threads(threads)
        indices = tuple(harness.held_out_indices(args.data, args.eval_images))
        images, labels = harness.held_out_images(args.data, indices), harness.held_out_labels(args.data, indices)
        reference = load_reference_net(args.feature_net)
        folder = harness.run_dir(args, name, seed)
        evaluation = evaluate(folder, images, labels, FLOW_STEPS, args.sampler_images, reference)
        result["eval"] = {"identity": identity, **evaluation}
        harness.save_result(folder, result)
    return result


def run_pipeline(name: str, args: argparse.Namespace, threads: int, seed: int) -> dict[str, dict[str, Any]]:
    """Stage I then stage II of pipeline ``name`` with ``seed``, each evaluated; returns both results by row
    name (:func:`harness.run_semtok_stages`: a stage II whose stage I was retrained is retrained too)."""
    rows = harness.semtok_stage_rows(name, args, seed)
    return harness.run_semtok_stages(rows, args, threads, seed, (args.steps1, args.steps2), run_evaluated)


def run_calibration(args: argparse.Namespace, threads: int) -> dict[str, dict[str, Any]]:
    """The conv AE VQ calibration (as in quantizers.py), trained for steps1 + steps2 steps, then
    evaluated; returned by its row name, as :func:`run_pipeline` returns its rows."""
    name, row = harness.conv_ae_vq()
    return {name: run_evaluated(name, row, harness.stage_args(args, args.steps1 + args.steps2), threads, 0)}


GRID_IMAGES = 10  # held-out images in the reconstruction grid: one of each of the first classes


def write_grid(names: Sequence[str], args: argparse.Namespace, path: Path) -> None:
    """Seed 0's EMA reconstructions of the first held-out images: the originals on top, then per pipeline
    stage I's one-step decode and stage II's refiner."""
    from mstok.demo import image_grid

    images = harness.held_out(args.data, GRID_IMAGES)
    lines = [("held-out", images)]
    with torch.no_grad():
        for name in names:
            for stage, label in (("I", "1-step"), ("II", "refiner")):
                model = load_tokenizer(harness.run_dir(args, f"stage {stage} {name}", 0)).eval()
                ids = model.encode(images)
                decoded = model.decode(ids, steps=1, seed=0, sampler="euler") if stage == "I" else model.decode(ids)
                lines.append((f"{name[:8]} {label}", decoded.clamp(0, 1)))
    image_grid(lines).save(path)


def table(results: dict[str, list[dict[str, Any]]], floor: dict[str, Any]) -> str:
    """Markdown: a line per decoder of every row (seeds pooled), then the calibrations: each image
    in its mean colour, and the real images themselves (the reference network's own top-1)."""
    head = ["row", "decoder", "images", "PSNR", "SSIM", "FD-ref", "ref top-1", "probe top-1", "params", "s/step",
            "encode ms/img", "decode ms/img", "usage", "bit entropy", "bits/pixel"]  # fmt: skip
    rows = []
    for name, seeds in results.items():
        evals = [s["eval"] for s in seeds]
        for decoder in evals[0]["decoders"]:
            per = [e["decoders"][decoder] for e in evals]
            rows.append([
                name,
                decoder,
                str(per[0]["images"]),
                *harness.pooled(per, ("psnr", 2), ("ssim", 4), ("fd_ref", 2), ("ref_top1_recon", 3)),
                *harness.pooled(evals, ("probe_top1", 3)),
                f"{seeds[0]['params'] / 1e6:.2f}M",
                *harness.pooled(seeds, ("seconds_per_step", 3)),
                *harness.pooled(evals, ("encode_ms", 2)),
                *harness.pooled(per, ("decode_ms", 2)),
                *harness.pooled(evals, ("usage", 3), ("bit_entropy", 3)),
                f"{evals[0]['bpp']:.4f}",
            ])  # fmt: skip
    images = str(floor["images"])
    rows.append(
        harness.mean_colour_row(
            len(head),
            {
                2: images,
                3: f"{floor['psnr']:.2f}",
                4: f"{floor['ssim']:.4f}",
                5: f"{floor['fd_ref']:.2f}",
                6: f"{floor['ref_top1_recon']:.3f}",
            },
        )
    )
    real = {2: images, 3: "inf", 4: "1", 5: "0", 6: f"{floor['ref_top1_real']:.3f}"}
    rows.append(["the held-out images themselves", *harness.mean_colour_row(len(head), real)[1:]])
    return harness.markdown_table(head, rows, left=2)


def calibrations(args: argparse.Namespace) -> dict[str, Any]:
    """Mean colour's PSNR, SSIM, FD-ref and reference top-1 on the evaluation images, and the
    reference network's top-1 on the images themselves."""
    indices = tuple(harness.held_out_indices(args.data, args.eval_images))
    images, labels = harness.held_out_images(args.data, indices), harness.held_out_labels(args.data, indices)
    flat = mean_colour(images)
    scores = harness.reference_scores(load_reference_net(args.feature_net), images, flat, labels)
    psnr_value, ssim_value = harness.mean_colour_floor(args.data, args.eval_images)
    return {"images": len(images), "psnr": psnr_value, "ssim": ssim_value, **scores}


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_data_arguments(parser)
    parser.add_argument("--rows", default=",".join(PIPELINES), help=f"comma-separated, of {', '.join(PIPELINES)}")
    parser.add_argument("--steps1", type=int, default=2000, help="stage-I steps")
    parser.add_argument("--steps2", type=int, default=1000, help="stage-II steps")
    parser.add_argument("--val-images", type=int, default=64, help="held-out images validated during training")
    parser.add_argument("--eval-images", type=int, default=8000, help="held-out images measured after training")
    parser.add_argument("--sampler-images", type=int, default=500, help="of those, decoded by multi-step flows")
    parser.add_argument("--no-calibration", action="store_true", help="skip the conv AE VQ calibration run")
    harness.add_feature_net_argument(parser, "; also stage I's teacher")
    harness.add_run_arguments(parser, "runs/semtok", seeds=1, unit="pipelines")
    harness.add_output_arguments(parser, also=" nor --grid")
    parser.add_argument(
        "--grid", default=str(harness.BENCHMARKS / "semtok_grid.png"), help="held-out reconstructions (PNG)"
    )
    args = parser.parse_args(argv)
    names = harness.chosen(parser, args.rows, PIPELINES, ())
    if min(args.steps1, args.steps2, args.seeds, args.val_images, args.eval_images, args.sampler_images) < 1:
        parser.error("--steps1, --steps2, --seeds, --val-images, --eval-images and --sampler-images must be >= 1")
    harness.check_data_arguments(parser, args)
    harness.feature_net(parser, args)
    for name in names:  # fail fast on a bad row, before any training
        for row in harness.semtok_stage_rows(name, args, 0).values():
            create_tokenizer(row.preset, **row.model)
    study = harness.Study(args)

    def report(key: tuple[str, int], rows: dict[str, dict[str, Any]]) -> str:
        lines = []
        for row, result in rows.items():
            label, best = max(result["eval"]["decoders"].items(), key=lambda item: item[1]["psnr"])
            usage, speed = result["eval"]["usage"], result["seconds_per_step"]
            lines.append(f"{row} seed {key[1]}: best PSNR {best['psnr']:.2f} ({label}), usage {usage:.3f}, "
                         f"{speed:.3f} s/step")  # fmt: skip
        return "\n".join(lines)

    tasks = {(name, seed): functools.partial(run_pipeline, name, args, study.threads, seed)
             for seed in range(args.seeds) for name in names}  # fmt: skip
    calibration = harness.conv_ae_vq()[0]
    if not args.no_calibration:
        tasks[calibration, 0] = functools.partial(run_calibration, args, study.threads)
    results: dict[str, list[dict[str, Any]]] = {}
    for rows in study.run(tasks, report).values():
        for row, result in rows.items():
            results.setdefault(row, []).append(result)
    order = [f"stage {s} {n}" for n in names for s in ("I", "II")] + [calibration]
    results = {name: results[name] for name in order if name in results}

    text = table(results, calibrations(args))
    print(text)
    notes = [
        f"Stage I {args.steps1} steps, stage II {args.steps2} steps, batch {args.batch_size}, the settings of "
        f"configs/semtok_tiny_stage1.toml / _stage2.toml; the calibration {args.steps1 + args.steps2} steps of the "
        f"tiny recipe. {args.seeds} seed(s) per row (mean ± half the spread); {args.eval_images} held-out images "
        f"(multi-step flow decodes: the first {args.sampler_images}), EMA weights; {study.pace()}.",
        "Stage I decodes by the flow ODE from seeded noise (Euler, `decode(tokens, steps=n, seed=0)`), stage II "
        "by the one-step refiner. `semantic`: distillation and contrastive, lambda_s = 0.05 each (the paper's "
        "recipe); `distill only` is what the shipped configs train; `no semantic`: both weights 0, projections "
        "untrained (SemTok Table 4's first line); each stage II refines its stage I's tokens. FD-ref: Fréchet "
        f"distance of the reference network's features ({args.feature_net}), real vs decoded, over the images of "
        "the row (not Inception FID; it grows as the count shrinks); ref top-1: that network's top-1 on the "
        "decoded images; probe top-1: a linear probe of the mean-pooled token features, 35 train / 5 val "
        "held-out images per class. usage = distinct held-out "
        "ids / (images x K); bit entropy = mean binary entropy of the BSQ bits over the held-out ids (max 1); "
        "bits/pixel = log2 V x K / (H W). Encode and decode ms/img are one timed call on the whole held-out "
        "batch in the worker that trained the run, with the other worker possibly still training.",
    ]
    if not args.no_write:
        write_grid(names, args, Path(args.grid))
        notes.append(f"Held-out reconstructions (seed 0, first row the originals): `{Path(args.grid).name}`.")
    harness.publish(args, "semtok", "SemTok at tiny scale", __file__, argv, [text], notes)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
