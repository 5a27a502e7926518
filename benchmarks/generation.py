"""Generation at tiny scale: each tokenizer family with its generator, trained, sampled and scored alike.

Item 1 of issue 24: one protocol for the four families, so they can be compared. For each row (by
default the four family pipelines: TiTok + MaskGIT, MsTok + MaskGIT, HieraTok + DiT, SemTok + BitMAR):

1. **tokenizer**: trained with its shipped tiny config (``configs/titok_tiny.toml``, ``mstok_tiny.toml``,
   ``hieratok_tiny.toml``; SemTok ``semtok_tiny_stage1.toml`` then ``_stage2.toml``, with ``--feature-net``
   as its teacher) on the 50,000 training images, or a finished run given with ``--tokenizer ROW=PATH``;
2. **tokens**: the training images pre-tokenized with their flips (``mstok pretokenize --flip``; a KL
   tokenizer's posterior means), class labels included;
3. **generator**: trained class-conditionally with its shipped tiny config (``configs/maskgit_tiny.toml``,
   ``dit_tiny.toml``, ``bitmar_tiny.toml``) for ``--gen-steps`` steps with each of ``--seeds`` seeds;
4. **samples**: for each guidance scale s of ``--guidance`` (default 1, 2, 4, 8; ``uncond + s (cond - uncond)``,
   1 = none: a DiT's scale, BitMAR's maximum, MaskGIT's w = s - 1; ``--more-guidance ROW=16`` extends one
   row's sweep), ``--per-class`` images of every class from the EMA
   generator (``STEPS``' middle: MaskGIT 8, DiT 25 DDIM, BitMAR 16 steps), scored by the reference network
   (``--feature-net``) against the held-out images: FD-ref, class accuracy (its top-1 against the class
   asked for), precision/recall (k = 3), seconds per image (sampling + decoding); and each of ``STEPS``
   timed on ``--timing-per-class`` images per class at the first scale;
5. **calibrations**, scored alike: the held-out images themselves (the accuracy ceiling), the tokenizer's
   reconstructions of them, images decoded from random tokens (ids uniform over V; latents Gaussian with
   the training latents' per-channel mean and std), each class's mean held-out image;
6. **a grid** per row (``benchmarks/generation_<row>_grid.png``): a named row for each of 10 fixed
   classes, two held-out images then seed 0's samples at its most accurate scale.

The rows of item 3, the papers' generation claims, are selectable with ``--rows``: MsTok vs TiTok tokens
under the same MaskGIT are the ``titok`` and ``mstok`` rows; HieraTok's multi- vs single-scale latents
under the same DiT (K = 64 latents of C = 6 each, the paper's placement of the pyramid in the decoder)
with each scale mask (``hieratok-single``, ``hieratok-causal``, ``hieratok-independent``,
``hieratok-full``); BitMAR on SemTok tokens without and with both semantic terms (``semtok-none``,
``semtok-both``; the ``semtok`` row trains distillation only, as shipped).

Time, measured for TiTok and MsTok (2026-12-07, AMD EPYC, 2 cores, ``--jobs 2``: one thread per row): the
tokenizer 18-21 min, pre-tokenizing 100,000 views ~8 min, then per seed the generator's 2000 steps (MaskGIT
0.26 s/step: 9 min) and sampling + scoring 4 x 8,000 images ~18 min (a guided step costs two passes): both
rows, 2 seeds, in ~1.5 h. SemTok (the same day and machine): its two stages 33 + 15 min, pre-tokenizing ~8 min,
BitMAR 0.48 s/step (16 min per seed), sampling + scoring ~35 min per seed: the row in ~1.7 h. Estimated from
20-step timings for HieraTok, per row on one core: the tokenizer ~32 min and DiT 0.88 s/step (29 min per
seed, sampling ~100 min per seed); the four rows in ~6 h.

    python benchmarks/generation.py                                      # the four families, 2 seeds
    python benchmarks/generation.py --rows hieratok-single,hieratok-causal,hieratok-independent,hieratok-full
    python benchmarks/generation.py --rows semtok --tokenizer semtok=runs/semtok/stage_II_distill_only
    python benchmarks/generation.py --rows titok --tokenizer-steps 20 --gen-steps 20 --train-images 500 \\
        --classes 10 --per-class 2 --seeds 1 --no-write --work-dir /tmp/generation_smoke

Finished tokenizer and generator runs are reused from ``--work-dir`` when their settings match
(``--fresh`` retrains; paths may be spelt another way); so are the token shards of the same tokenizer and
the scores of the same protocol, per guidance scale (a scale added later is the only one sampled).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch

from mstok.data.tokens import TokenDataset, tokenizer_identity
from mstok.evaluation.generated import classify_batches, network_key, score_images
from mstok.generators import generate_images
from mstok.generators.registry import preset_family
from mstok.images import make_grid
from mstok.persistence import load_generator, load_reference_net, load_tokenizer
from mstok.training.config import GeneratorTrainConfig
from mstok.training.generator_trainer import TRAINING

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import CONFIGS, toml_value


@dataclass
class Pipeline:
    """A row: a tokenizer (its shipped config and model overrides, a ``preset`` key replacing the
    preset; or a SemTok pipeline of :data:`harness.SEMTOK_PIPELINES`) and the generator config it feeds."""

    title: str
    family: str  # the tokenizer family a --tokenizer run must hold
    generator: str
    config: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    semtok: str = ""

    def recipe(self) -> str:
        """The tokenizer's recipe in words: its config(s) and overrides."""
        made = [
            self.config or f"semtok_tiny_stage1/2.toml, {self.semtok}",
            *(f"{k}={v}" for k, v in self.model.items()),
        ]
        return ", ".join(made)


DECODER_PYRAMID = {"pyramid": "decoder"}  # HieraTok's placement: K = 64, the decoder builds the pyramid
ROWS: dict[str, Pipeline] = {
    "titok": Pipeline("TiTok + MaskGIT", "titok", "maskgit_tiny.toml", "titok_tiny.toml"),
    "mstok": Pipeline("MsTok + MaskGIT", "mstok", "maskgit_tiny.toml", "mstok_tiny.toml"),
    "hieratok": Pipeline("HieraTok + DiT", "hieratok", "dit_tiny.toml", "hieratok_tiny.toml"),
    "semtok": Pipeline("SemTok + BitMAR", "semtok", "bitmar_tiny.toml", semtok="distill only"),
    "hieratok-single": Pipeline("HieraTok single-scale + DiT", "hieratok", "dit_tiny.toml", "hieratok_tiny.toml",
                                {"preset": "hieratok_single_tiny"}),
    "hieratok-causal": Pipeline("HieraTok scale-causal + DiT", "hieratok", "dit_tiny.toml", "hieratok_tiny.toml",
                                dict(DECODER_PYRAMID)),
    "hieratok-independent": Pipeline("HieraTok scale-independent + DiT", "hieratok", "dit_tiny.toml",
                                     "hieratok_tiny.toml", {**DECODER_PYRAMID, "attention": "scale_independent"}),
    "hieratok-full": Pipeline("HieraTok full attention + DiT", "hieratok", "dit_tiny.toml", "hieratok_tiny.toml",
                              {**DECODER_PYRAMID, "attention": "full"}),
    "semtok-none": Pipeline("SemTok no semantic + BitMAR", "semtok", "bitmar_tiny.toml", semtok="no semantic"),
    "semtok-both": Pipeline("SemTok both terms + BitMAR", "semtok", "bitmar_tiny.toml", semtok="semantic"),
}  # fmt: skip
DEFAULT_ROWS = ("titok", "mstok", "hieratok", "semtok")
# sampling steps of each generator family: the middle value samples the scored images, all are timed
STEPS = {"maskgit": (4, 8, 16), "dit": (10, 25, 50), "bitmar": (8, 16, 32)}
GRID_CLASSES, GRID_SAMPLES, GRID_REAL = 10, 8, 2
SEED_STRIDE = 100_000  # chunk i of seed s samples with seed s * SEED_STRIDE + i: the chunks differ, seeds too


@dataclass
class Real:
    """The held-out images of the sampled classes: their labels and the reference network's features."""

    indices: tuple[int, ...]
    labels: np.ndarray
    features: np.ndarray


# -- tokenizer, tokens, calibrations ----------------------------------------------------------------------------


def train_tokenizer(name: str, args: argparse.Namespace, threads: int) -> tuple[Path, dict[str, Any]]:
    """The row's tokenizer run folder, trained (or reused) with its shipped config(s), or the one given;
    and the training result (empty for a given run)."""
    if name in args.tokenizers:
        return Path(args.tokenizers[name]), {}
    rows = tokenizer_rows(name, args)
    config = harness.SEMTOK_CONFIGS[0] if ROWS[name].semtok else CONFIGS / ROWS[name].config
    args = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size or harness.config_batch_size(config)})
    if ROWS[name].semtok:  # stage I, then stage II from it (both stages' configs train batches of 32)
        steps = tuple(args.tokenizer_steps or harness.config_steps(path) for path in harness.SEMTOK_CONFIGS)
        *_, (last, result) = harness.run_semtok_stages(rows, args, threads, 0, steps).items()
        return harness.run_dir(args, last), result
    ((run, row),) = rows.items()
    steps = args.tokenizer_steps or harness.config_steps(config)
    return harness.run_dir(args, run), harness.run_row(run, row, harness.stage_args(args, steps), threads)


@torch.no_grad()
def random_tokens(tokenizer: torch.nn.Module, tokens: Path, count: int) -> torch.Tensor:
    """``count`` images decoded from uniformly random ids, or from latents drawn per channel from a Gaussian
    with the training latents' mean and std (a continuous tokenizer)."""
    data, rng = TokenDataset(tokens), torch.Generator().manual_seed(0)
    if data.continuous:
        noise = torch.randn(count, data.num_tokens, data.token_dim, generator=rng)
        drawn = data.latent_mean + data.latent_std * noise
    else:
        drawn = torch.randint(data.codebook_size, (count, data.num_tokens), generator=rng)
    return torch.cat([tokenizer.decode(chunk).float() for chunk in drawn.split(250)])


@torch.no_grad()
def calibrations(tokenizer: torch.nn.Module, tokens: Path, args: argparse.Namespace, real: Real) -> dict[str, Any]:
    """The tokenizer's reconstructions of the held-out images (with their PSNR) and random-token images, scored."""
    from mstok.evaluation.metrics import psnr  # lazy: torchmetrics takes about 2 s to import

    net = load_reference_net(args.feature_net)
    images = harness.held_out_images(args.data, real.indices)
    recon = [tokenizer.decode(tokenizer.encode(chunk)).float() for chunk in images.split(250)]
    quality = float(np.mean(psnr(images, torch.cat(recon).clamp(0, 1))))
    count = args.per_class * args.classes
    labels = np.repeat(np.arange(args.classes), args.per_class)  # random tokens know no class: chance
    return {
        "reconstructions": {**score_images(net, recon, real.features, real.labels), "psnr": quality},
        "random tokens": score_images(net, random_tokens(tokenizer, tokens, count).split(250), real.features, labels),
    }


def prepare(name: str, args: argparse.Namespace, threads: int, real: Real) -> dict[str, Any]:
    """The row's tokenizer (trained or reused), its token shards and its calibrations (reused when the
    tokenizer, the feature net and the images are the same)."""
    if threads:
        torch.set_num_threads(threads)
    folder, trained = train_tokenizer(name, args, threads)
    tokenizer = load_tokenizer(folder).eval()
    tokens = harness.pretokenized(
        tokenizer, folder, args.train_data, harness.run_dir(args, name) / "tokens", args.train_images, args.fresh
    )
    identity = {"tokenizer": tokenizer_identity(tokenizer)["weights_sha256"], "feature_net": args.net_key,
                "real": list(real.indices), "random": args.per_class * args.classes}  # fmt: skip
    done = harness.run_dir(args, name) / "calibration.json"
    saved = harness.saved_run(done, identity, args.fresh)
    if saved is None:
        saved = {"identity": identity, **calibrations(tokenizer, tokens, args, real)}
        done.write_text(json.dumps(saved, indent=2))
    summary = {k: trained.get(k) for k in ("final_psnr", "seconds_per_step", "params")}
    steps = trained.get("identity", {}).get("steps")
    return {"tokenizer": str(folder), "tokens": str(tokens), "trained": {**summary, "steps": steps}, **saved}


# -- generator: training, samples, scores ---------------------------------------------------------------------


def generator_config(name: str, args: argparse.Namespace, seed: int, prepared: dict[str, Any], threads: int) -> Any:
    """The row's shipped generator config on its tokens (:func:`harness.generator_config`) with the held-out
    classes (also those ``--train-images`` misses); a DiT's token layout (K and the square grids, coarse to
    fine) follows the tokenizer's."""
    extra = [f"model.overrides.num_classes={args.held_classes}"]
    extra += [f"batch_size={args.gen_batch_size}"] if args.gen_batch_size else []
    path = CONFIGS / ROWS[name].generator
    if preset_family(tomllib.loads(path.read_text())["model"]["preset"]).name == "dit":
        cfg = load_tokenizer(prepared["tokenizer"]).config
        scales = list(cfg.scales) if getattr(cfg, "pyramid", "") == "encoder" else [cfg.grid_size]
        extra += [f"model.overrides.num_tokens={cfg.num_latent_tokens}", f"model.overrides.scales={scales}"]
    out = harness.run_dir(args, name) / f"generator_seed{seed}" / "run"
    return harness.generator_config(path, Path(prepared["tokens"]), out, args.gen_steps, seed, threads, extra)


def sampling(config: GeneratorTrainConfig, steps: int, scale: float) -> Any:
    """The config's sampling settings of its family with ``steps`` steps and guidance scale ``scale`` (the
    diffusion convention s, 1 = none; MaskGIT's weight is w = s - 1)."""
    family = preset_family(config.model.preset).name
    base = TRAINING[family].sampling(config)
    weight = scale - 1 if family == "maskgit" else scale
    return type(base).from_dict({**base.to_dict(), "steps": steps, "guidance_scale": weight})


def sampled(
    models: tuple[Any, Any, Any], settings: Any, labels: torch.Tensor, seed: int, args: argparse.Namespace, real: Real
) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """Sample and decode an image for each label (in chunks of ``--sample-batch``, timed), score them;
    returns the scores with the seconds per image, and the first images of each grid class. ``models``: the
    generator, its tokenizer and the reference network."""
    (generator, tokenizer, net), batches, seconds = models, [], 0.0
    for i, chunk in enumerate(labels.split(args.sample_batch)):
        started = time.perf_counter()
        images, _ = generate_images(generator, tokenizer, chunk, settings, SEED_STRIDE * seed + i, args.sample_batch)
        seconds += time.perf_counter() - started
        batches.append(images)
    # cloned: a slice would keep (and torch.save would write) all of the class's samples
    kept = {c: torch.cat(batches)[labels == c][:GRID_SAMPLES].clone() for c in args.grid_classes}
    scores = score_images(net, batches, real.features, labels.numpy())
    return {**scores, "seconds_per_image": seconds / len(labels)}, kept


def run_generator(
    name: str, args: argparse.Namespace, threads: int, seed: int, prepared: dict[str, Any], real: Real
) -> dict[str, Any]:
    """Train (or reuse) the row's generator with ``seed``, then sample and score it at each guidance scale
    and time it at each step count; the grid classes' images come back too.

    Scores are kept per guidance scale: a scale scored before under the same protocol is reused, and each
    new one is saved as soon as it is scored, so adding a scale costs only that scale and a run cut off
    mid-sweep resumes at the scale it was on."""
    if threads:
        torch.set_num_threads(threads)
    scales = args.sweeps[name]
    config = generator_config(name, args, seed, prepared, threads)
    out = Path(config.out_dir).parent
    result = harness.run_generator_row(config, args.fresh)
    tokenizer = load_tokenizer(prepared["tokenizer"]).eval()
    family = preset_family(config.model.preset).name
    steps = STEPS[family]
    protocol = {"per_class": args.per_class, "classes": args.classes, "steps": list(steps),
                "timing_per_class": args.timing_per_class, "feature_net": args.net_key, "real": len(real.indices),
                "grid": args.grid_classes}  # fmt: skip
    saved = result.get("eval", {})
    identity = dict(saved.get("identity", {}))
    # results of before the per-scale cache record their scales in the identity, timed at the first
    timing_scale = saved.get("timing_scale", (identity.pop("guidance", None) or [None])[0])
    if identity != protocol:
        saved, timing_scale = {}, None
    guided = {g["scale"]: g for g in saved.get("guided", [])}
    grids = torch.load(out / "grid.pt", weights_only=True) if guided and (out / "grid.pt").is_file() else {}
    timing = saved.get("timing", []) if timing_scale == scales[0] else []

    def save() -> None:
        result["eval"] = {"identity": protocol, "guided": sorted(guided.values(), key=lambda g: g["scale"]),
                          "timing": timing, "timing_scale": scales[0] if timing else None}  # fmt: skip
        torch.save(grids, out / "grid.pt")  # first: a saved scale always has its grid images
        harness.save_result(out, result)

    labels = torch.arange(args.classes).repeat_interleave(args.per_class)
    few = torch.arange(args.classes).repeat_interleave(args.timing_per_class)
    # loaded once, and only when something is sampled
    models = functools.cache(
        lambda: (load_generator(out / "run").eval(), tokenizer, load_reference_net(args.feature_net))
    )
    for scale in [s for s in scales if s not in guided or s not in grids]:
        row, grids[scale] = sampled(models(), sampling(config, steps[1], scale), labels, seed, args, real)
        guided[scale] = {"scale": scale, "steps": steps[1], **row}
        save()
    if not timing and len(few):
        for n in steps:
            row, _ = sampled(models(), sampling(config, n, scales[0]), few, seed, args, real)
            timing.append({"steps": n, **row})
        save()
    chosen = {"guided": [guided[s] for s in scales], "timing": timing}
    return {**result, "eval": {**result.get("eval", {}), **chosen}, "grids": {s: grids[s] for s in scales}}


# -- the held-out set and the calibrations every row shares ------------------------------------------------------


def real_set(args: argparse.Namespace, net: Any) -> Real:
    """Every held-out image of the sampled classes (the first ``--classes``), classified by ``net``."""
    labels = harness.folder_labels(args.data)
    indices = tuple(i for i, label in enumerate(labels) if label < args.classes)
    images = harness.held_out_images(args.data, indices)
    features, _ = classify_batches(net, list(images.split(250)))
    return Real(indices, np.array([labels[i] for i in indices]), features)


def shared_calibrations(args: argparse.Namespace, net: Any, real: Real) -> dict[str, dict[str, Any]]:
    """The held-out images scored against themselves (FD-ref 0; the accuracy ceiling) and each class's
    mean held-out image (one per class)."""
    images = harness.held_out_images(args.data, real.indices)
    labels = torch.from_numpy(real.labels)
    means = torch.stack([images[labels == c].mean(0) for c in range(args.classes)])
    itself = score_images(net, images.split(250), real.features, real.labels)
    itself["fd_ref"] = 0.0  # the reference set itself (the sqrtm leaves a rounding error of either sign)
    return {
        "the held-out images themselves": itself,
        "per-class mean images": score_images(net, [means], real.features, np.arange(args.classes)),
    }


# -- tables and grids ----------------------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> str:
    """``value / base`` with two decimals ('-' when either is missing or the base is 0)."""
    return f"{value / base:.2f}" if value is not None and base else "-"


def mean(items: list[dict[str, Any]], key: str) -> float | None:
    values = [item[key] for item in items if item.get(key) is not None]
    return float(np.mean(values)) if values else None


def samples_table(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """Per row and guidance scale, seeds pooled: FD-ref, class accuracy, precision/recall, s/img, and the
    ratios the issue's targets read (accuracy over the reconstructions' and over chance, FD-ref over the
    random tokens')."""
    head = ["row", "guidance s", "images", "FD-ref", "class acc", "precision", "recall", "s/img",
            "acc ÷ recon acc", "acc ÷ chance", "FD ÷ random FD"]  # fmt: skip
    lines = []
    for name, row in rows.items():
        recon, random = row["prepared"]["reconstructions"], row["prepared"]["random tokens"]
        for i, scale in enumerate(args.sweeps[name]):
            seeds = [seed["eval"]["guided"][i] for seed in row["seeds"]]
            accuracy = mean(seeds, "class_accuracy")
            lines.append([ROWS[name].title, f"{scale:g}", str(seeds[0]["images"]),
                          *harness.pooled(seeds, ("fd_ref", 2), ("class_accuracy", 3), ("precision", 3), ("recall", 3),
                                          ("seconds_per_image", 4)),
                          ratio(accuracy, recon["class_accuracy"]), ratio(accuracy, 1 / args.classes),
                          ratio(mean(seeds, "fd_ref"), random["fd_ref"])])  # fmt: skip
    return harness.markdown_table(head, lines, left=2)


def calibration_table(rows: dict[str, dict[str, Any]], shared: dict[str, dict[str, Any]]) -> str:
    """The calibrations scored like the samples: the shared ones, then each tokenizer's."""
    head = ["calibration", "images", "FD-ref", "class acc", "precision", "recall", "PSNR"]
    found = [(name, cal) for name, cal in shared.items()]
    for name, row in rows.items():
        found += [(f"{ROWS[name].title.split(' + ')[0]}: {what}", row["prepared"][what])
                  for what in ("reconstructions", "random tokens")]  # fmt: skip
    columns = (("fd_ref", 2), ("class_accuracy", 3), ("precision", 3), ("recall", 3), ("psnr", 2))
    lines = [[name, str(cal["images"]), *harness.pooled([cal], *columns)] for name, cal in found]
    return harness.markdown_table(head, lines)


def timing_table(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """Sampling steps against seconds per image (sampling + decoding), FD-ref and accuracy, seeds pooled."""
    head = ["row", "steps", "images", "s/img", "FD-ref", "class acc"]
    lines = []
    for name, row in rows.items():
        for i, first in enumerate(row["seeds"][0]["eval"]["timing"]):
            seeds = [seed["eval"]["timing"][i] for seed in row["seeds"]]
            cells = harness.pooled(seeds, ("seconds_per_image", 4), ("fd_ref", 2), ("class_accuracy", 3))
            lines.append([ROWS[name].title, str(first["steps"]), str(first["images"]), *cells])
    return harness.markdown_table(head, lines, left=2)


def training_table(rows: dict[str, dict[str, Any]]) -> str:
    """What was trained: the tokenizer (steps, held-out PSNR on its validation images, s/step; '-' for a
    given run) and the generator (parameters, s/step, the last logged loss), seeds pooled."""
    head = ["row", "tokenizer", "tok. steps", "tok. PSNR", "tok. s/step", "generator", "gen. params", "gen. steps",
            "gen. s/step", "final loss"]  # fmt: skip
    lines = []
    for name, row in rows.items():
        trained, seeds = row["prepared"]["trained"], row["seeds"]
        losses = [{"loss": seed["loss"][-1][1]} for seed in seeds if seed["loss"]]
        source = ROWS[name].recipe() if trained["steps"] else f"given: {row['prepared']['tokenizer']}"
        lines.append([ROWS[name].title, source, str(trained["steps"] or "-"),
                      *harness.pooled([trained], ("final_psnr", 2), ("seconds_per_step", 3)),
                      ROWS[name].generator, f"{seeds[0]['params'] / 1e6:.2f}M", str(seeds[0]["identity"]["steps"]),
                      *harness.pooled(seeds, ("seconds_per_step", 3)),
                      *harness.pooled(losses, ("loss", 4))])  # fmt: skip
    return harness.markdown_table(head, lines, left=2)


def write_grid(name: str, row: dict[str, Any], args: argparse.Namespace, real: Real) -> tuple[Path, float]:
    """Seed 0's samples at its most accurate guidance scale, a row per grid class after two of its held-out
    images, each row named; returns the PNG and the scale."""
    guided = row["seeds"][0]["eval"]["guided"]
    best = max(guided, key=lambda g: g["class_accuracy"])["scale"]
    samples = row["seeds"][0]["grids"][best]
    images = harness.held_out_images(args.data, real.indices)
    names = harness.class_names(args.data)
    lines, labels = [], []
    for c in args.grid_classes:
        real_c = images[torch.from_numpy(real.labels == c)][:GRID_REAL]
        lines.append(torch.cat([real_c, samples[c]]))
        labels.append(f"{c} {names[c]}" if c < len(names) else str(c))
    width = min(len(line) for line in lines)  # a class with fewer samples (a small --per-class)
    path = Path(args.grid_dir) / f"generation_{name}_grid.png"
    from PIL import Image

    Image.fromarray(make_grid(torch.stack([line[:width] for line in lines]), labels=labels)).save(path)
    return path, best


# -- command line ------------------------------------------------------------------------------------------------


def tokenizer_rows(name: str, args: argparse.Namespace) -> dict[str, harness.Row]:
    """The tokenizer run(s) of row ``name`` by run name: its shipped config with the row's model overrides,
    or SemTok's two stages with the reference network as stage I's teacher."""
    pipe = ROWS[name]
    if pipe.semtok:
        teacher = f"teacher.spec={toml_value({'type': 'reference', 'path': args.feature_net})}"
        return harness.semtok_stage_rows(pipe.semtok, args, 0, {"teacher_dim": args.feature_dim}, [teacher])
    row = harness.config_row(CONFIGS / pipe.config, "tokenizer")
    model = dict(pipe.model)
    row.preset = model.pop("preset", row.preset)
    row.model.update(model)
    return {f"tokenizer {name}": row}


# the numeric options: flag -> (type, default, help)
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "--tokenizer-steps": (int, 0, "tokenizer steps (0: the shipped configs')"),
    "--gen-steps": (int, 2000, "generator steps (the shipped configs': 2000)"),
    "--gen-batch-size": (int, 0, "generator batch (0: the configs', 64)"),
    "--train-images": (int, 0, "pre-tokenize the first N training images (0: all)"),
    "--val-images": (int, 64, "held-out images a tokenizer validates on"),
    "--classes": (int, 0, "sample the first N classes (0: all held-out classes)"),
    "--per-class": (int, 40, "images sampled per class and guidance scale"),
    "--guidance": (str, "1,2,4,8", "classifier-free guidance scales s (1 = none) of every row's sweep"),
    "--timing-per-class": (int, 1, "images per class at each step count"),
    "--sample-batch": (int, 100, "images per sampling call"),
}


def guidance_scales(parser: argparse.ArgumentParser, flag: str, text: str) -> list[float]:
    """``text`` "1,2,4" as guidance scales, or one parser error naming ``flag`` (one or more, each >= 1)."""
    try:
        scales = [float(s) for s in harness.names(text)]
    except ValueError:
        scales = []
    if not scales or min(scales) < 1:
        parser.error(f"{flag}: comma-separated guidance scales such as 1,2,4, each >= 1 (1 = no guidance)")
    return scales


def more_guidance(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, list[float]]:
    """Each row's guidance sweep: ``--guidance``, then the scales ``--more-guidance ROW=S,S`` adds for it
    (a family whose scale means a weaker push, such as BitMAR's linear schedule's maximum, may need more)."""
    sweeps = {name: list(args.guidance) for name in args.names}
    for text in args.more_guidance:
        name, sep, scales = text.partition("=")
        if not sep or name not in args.names:
            parser.error(f"--more-guidance {text!r}: expected ROW=S,S with ROW one of --rows ({', '.join(args.names)})")
        more = guidance_scales(parser, f"--more-guidance {text!r}", scales)
        sweeps[name] += [s for s in more if s not in sweeps[name]]
    return sweeps


def given_tokenizers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """``--tokenizer ROW=PATH`` as {row: absolute path}, each a tokenizer of the row's family."""
    given = {}
    for text in args.tokenizer:
        name, sep, path = text.partition("=")
        if not sep or name not in ROWS:
            parser.error(f"--tokenizer {text!r}: expected ROW=PATH with ROW one of {', '.join(ROWS)}")
        if name not in args.names:
            parser.error(f"--tokenizer {text!r}: row {name!r} is not among --rows ({', '.join(args.names)})")
        try:
            family = load_tokenizer(path).config.family
        except (FileNotFoundError, ValueError) as error:
            parser.error(f"--tokenizer {text!r}: {error}")
        if family != ROWS[name].family:
            parser.error(f"--tokenizer {text!r} holds a {family!r} tokenizer; row {name!r} needs a "
                         f"{ROWS[name].family!r} one")  # fmt: skip
        given[name] = str(Path(path).resolve())
    return given


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked: every bad input is one parser error before anything trains."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_data_arguments(parser)
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--tokenizer", action="append", default=[], metavar="ROW=PATH",
                        help="a finished tokenizer run for ROW instead of training one (repeatable)")  # fmt: skip
    harness.add_feature_net_argument(parser, "; SemTok's teacher too")
    parser.add_argument("--more-guidance", action="append", default=[], metavar="ROW=S,S",
                        help="more guidance scales for ROW's sweep, after --guidance's (repeatable)")  # fmt: skip
    for flag, (kind, default, text) in OPTIONS.items():
        parser.add_argument(flag, type=kind, default=default, help=text)
    harness.add_run_arguments(parser, "runs/generation", seeds=2, unit="pipelines")
    parser.set_defaults(batch_size=0)  # the tokenizer trains with its shipped config's batch size
    harness.add_output_arguments(parser, also=" nor the grids")
    parser.add_argument("--grid-dir", default=str(harness.BENCHMARKS), help="folder of generation_<row>_grid.png")
    args = parser.parse_args(argv)
    args.names = harness.chosen(parser, args.rows, ROWS, DEFAULT_ROWS)
    harness.check_data_arguments(parser, args)
    if min(args.gen_steps, args.per_class, args.sample_batch, args.seeds, args.val_images) < 1:
        parser.error("--gen-steps, --per-class, --sample-batch, --seeds and --val-images must be >= 1")
    if min(args.tokenizer_steps, args.train_images, args.classes, args.timing_per_class, args.gen_batch_size,
           args.batch_size) < 0:  # fmt: skip
        parser.error("--tokenizer-steps, --train-images, --classes, --timing-per-class, --gen-batch-size, "
                     "--batch-size (0: the tokenizer config's): >= 0")  # fmt: skip
    args.guidance = guidance_scales(parser, f"--guidance {args.guidance!r}", args.guidance)
    args.sweeps = more_guidance(parser, args)
    net = harness.feature_net(parser, args)
    held = len(set(harness.folder_labels(args.data)))
    args.classes, args.held_classes = args.classes or held, held
    if args.classes > min(held, net.config.num_classes):
        parser.error(f"--classes {args.classes}: the held-out images have {held}, the feature net "
                     f"{net.config.num_classes}")  # fmt: skip
    args.tokenizers = given_tokenizers(parser, args)
    args.feature_net, args.feature_dim = str(Path(args.feature_net).resolve()), net.feature_dim
    args.net_key = network_key(net)  # scores are reused only from the same network
    args.grid_classes = [c * args.classes // GRID_CLASSES for c in range(min(GRID_CLASSES, args.classes))]
    for name in args.names:  # every model builds: a bad override fails here, before any training
        harness.check_rows(parser, args, tokenizer_rows(name, args).values())
    return args


def protocol_notes(args: argparse.Namespace, real: Real, study: harness.Study) -> list[str]:
    """The notes under the tables: what was trained and sampled, what each column means, the targets."""
    images = args.train_images or "all"
    return [
        f"- {args.seeds} seed(s) per generator (mean ± half the spread): {args.gen_steps} steps of the shipped tiny "
        f"config on the tokens of {images} training images with flips; per guidance scale {args.per_class} "
        f"images of each of {args.classes} classes, against the {len(real.indices)} held-out images of those "
        f"classes; {study.pace()}.",
        f"- FD-ref: Fréchet distance of the reference network's features ({args.feature_net}), not Inception "
        f"FID; class acc: its top-1 against the class asked for (chance {1 / args.classes:.3f}); precision/"
        "recall: Kynkäänniemi et al., k = 3, in its feature space. Guidance s: uncond + s (cond - uncond), "
        "1 = none (MaskGIT's w = s - 1; BitMAR's linear schedule's maximum). Steps: MaskGIT "
        f"{STEPS['maskgit'][1]}, DiT {STEPS['dit'][1]} (DDIM), BitMAR {STEPS['bitmar'][1]}; s/img is sampling + "
        f"decoding at batch {args.sample_batch} in a worker, the other possibly training. Targets (issue 24): "
        "acc ÷ recon acc >= 0.33, acc ÷ chance >= 10, FD ÷ random FD <= 0.5.",
    ]


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    study = harness.Study(args)
    net = load_reference_net(args.feature_net)
    real = real_set(args, net)
    tasks = {name: functools.partial(prepare, name, args, study.threads, real) for name in args.names}
    prepared = study.run(tasks, lambda name, p: f"{name}: tokenizer {p['tokenizer']}, reconstructions' class "
                                                 f"accuracy {p['reconstructions']['class_accuracy']:.3f}")  # fmt: skip

    def report(key: tuple[str, int], result: dict[str, Any]) -> str:
        cells = [f"s={g['scale']:g} FD-ref {g['fd_ref']:.2f} acc {g['class_accuracy']:.3f}"
                 for g in result["eval"]["guided"]]  # fmt: skip
        return f"{key[0]} seed {key[1]}: {'; '.join(cells)}"

    tasks = {(name, seed): functools.partial(run_generator, name, args, study.threads, seed, prepared[name], real)
             for seed in range(args.seeds) for name in args.names}  # fmt: skip
    done = harness.by_row(study.run(tasks, report))
    rows = {name: {"prepared": prepared[name], "seeds": seeds} for name, seeds in done.items()}
    shared = shared_calibrations(args, net, real)
    blocks = [
        samples_table(rows, args),
        calibration_table(rows, shared),
        timing_table(rows, args),
        training_table(rows),
    ]
    print("\n\n".join(blocks))
    notes = protocol_notes(args, real, study)
    if not args.no_write:
        for name, row in rows.items():
            path, best = write_grid(name, row, args, real)
            link = os.path.relpath(path, Path(args.out).parent)
            notes.append(f"- {ROWS[name].title}, seed 0 at guidance {best:g}, its most accurate: ![{name}]({link})")
    title = "Generation at tiny scale: tokenizer + generator families"
    harness.publish(args, "generation", title, __file__, argv, blocks, notes)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
