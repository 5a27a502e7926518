"""The ``mstok`` command line: presets, train, train-proxy, train-generator, eval, probe, bench, demo and data;
pretokenize, sample and convert live in cli_generation.py, reference (train, eval) in cli_reference.py."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import torch

import mstok
from mstok.app.command import add_app_parser
from mstok.cli_errors import MAX_PIXELS_HELP, run_command
from mstok.cli_generation import MODEL_HELP, WEIGHTS_HELP, add_generation_commands, check_resolution, default_out_dir
from mstok.cli_reference import (
    add_feature_net_arguments,
    add_reference_commands,
    eval_generated_reference,
    reference_meter,
)
from mstok.data.shards import write_shards
from mstok.demo import run_demo
from mstok.demo_official import run_official_demo
from mstok.device import resolve_device
from mstok.evaluation import evaluate as ev
from mstok.evaluation import uniformity
from mstok.evaluation.inception import FID_WEIGHTS_FILENAME
from mstok.evaluation.probe import run_probe
from mstok.generators import GENERATOR_PRESETS, create_generator, family_of
from mstok.losses.perceptual import LPIPS_FILENAME, VGG16_FILENAME
from mstok.persistence import load_tokenizer_folder
from mstok.storage.locate import locate_model
from mstok.storage.weights import command_hints
from mstok.tokenizers.registry import PRESETS, create_tokenizer, preset_config
from mstok.training import GeneratorTrainConfig, Trainer, load_train_config
from mstok.training.generator_trainer import GeneratorTrainer
from mstok.training.resume import saved_run_config

DEMO_OUT = "runs/demo"


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))


def _cmd_presets(args: argparse.Namespace) -> int:
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
                "continuous" if model.vocab_size is None else f"{model.vocab_size}",
                *(f"{counts[k] / 1e6:.2f}M" for k in ("encoder", "decoder", "quantizer", "total")),
            )
        )
    _print_table(("preset", "family", "res", "K", "V", "encoder", "decoder", "quantizer", "total"), rows)
    rows = []
    for name in GENERATOR_PRESETS:
        with torch.device("meta"):
            gen = create_generator(name)
        c, family = gen.config, family_of(gen)
        tokens = family.tokens(c)  # V for ids, C for latents
        size = f"C={tokens.size}" if tokens.continuous else str(tokens.size)
        rows.append((name, family.layout(c), f"{c.width}x{c.depth}/{c.num_heads}", str(c.num_tokens), size,
                     str(c.num_classes), f"{gen.parameter_counts()['total'] / 1e6:.2f}M"))  # fmt: skip
    print()
    _print_table(("generator", "layout", "width x depth/heads", "K", "V / C", "classes", "total"), rows)
    return 0


def _run_training(args: argparse.Namespace, kind: str) -> int:
    """Shared by ``train``, ``train-proxy`` and ``train-generator``: one engine, under torchrun or not."""
    if args.config is None:
        if not args.resume or args.resume == "auto":
            raise ValueError(
                "--config is required, unless --resume names a checkpoint or run folder (its saved "
                "train_config.json is then the config)"
            )
        args.config, args.resume, run = saved_run_config(args.resume)
        args.set = [f"out_dir={json.dumps(str(run))}", *(args.set or [])]  # where it is now; --set may move it
    if kind == "generator":
        config = load_train_config(args.config, args.set, GeneratorTrainConfig)
        trainer = GeneratorTrainer(config, progress=not args.no_progress)
    else:
        config = load_train_config(args.config, args.set)
        family = _preset_family(config.model.preset)
        if kind == "proxy" and family != "maskgit_vqgan":
            raise ValueError(
                f"train-proxy trains a MaskGIT-VQGAN preset (vqgan_tiny, maskgit_vqgan_f16), got {family!r}"
            )
        if kind == "tokenizer" and family == "maskgit_vqgan":
            raise ValueError("this config trains a MaskGIT-VQGAN proxy: use `mstok train-proxy`")
        trainer = Trainer(config, progress=not args.no_progress)
    say = print if trainer.dist.is_main else (lambda *_: None)
    try:
        if args.resume:
            used = trainer.resume(args.resume, allow_changes=args.allow_changes)
            say(f"resumed from {used} (step {trainer.step})" if used else "no checkpoint to resume: starting fresh")
        trainer.fit()
        say(f"done: step {trainer.step}; checkpoints in {trainer.ckpt_dir} (log: {trainer.out_dir / 'log.jsonl'})")
    finally:
        trainer.dist.shutdown()
    return 0


def _preset_family(preset: str) -> str:
    return preset_config(preset).family


def _cmd_train(args: argparse.Namespace) -> int:
    return _run_training(args, "tokenizer")


def _cmd_train_proxy(args: argparse.Namespace) -> int:
    return _run_training(args, "proxy")


def _cmd_train_generator(args: argparse.Namespace) -> int:
    return _run_training(args, "generator")


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.official:
        if args.data or args.steps:
            raise ValueError("--official shows a released tokenizer and trains nothing: drop --data and --steps")
        out = None if args.out == DEMO_OUT else args.out
        report = run_official_demo(args.official, out, device=args.device, progress=not args.no_progress)
        print(f"report written to {report}")
        return 0
    report = run_demo(
        out_dir=args.out,
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
        jobs=args.jobs,
    )
    print(f"report written to {report}")
    return 0


def _cmd_data_to_shards(args: argparse.Namespace) -> int:
    index = write_shards(
        args.src,
        args.dst,
        shard_size=args.shard_size,
        seed=None if args.no_shuffle else args.seed,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        workers=args.workers,
        max_pixels=args.max_pixels,
    )
    skipped = index["skipped"]
    order = "sorted order" if index["seed"] is None else f"shuffled with seed {index['seed']}"
    print(
        f"wrote {index['num_samples']} images of {len(index['classes'])} classes into {len(index['shards'])} "
        f"shards in {args.dst} ({order}); skipped {len(skipped)} unreadable file(s)"
        + (f", e.g. {skipped[0]['path']}" if skipped else "")
        + f"; the index is {args.dst}/index.json"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)  # one process: eval never joins a process group
    out = Path(args.out) if args.out else None
    meter, meter_unavailable = None, {}
    if args.generated and args.feature_net:  # generated images in the reference network's feature space
        return eval_generated_reference(args, out)
    # check the inputs before the (slow) metric networks load, so a wrong path fails at once
    if args.generated:
        if args.feature_net_stats:
            raise ValueError("--feature-net-stats measures reconstructions: it needs --checkpoint and --data")
        if args.latent_stats is not None:
            raise ValueError("--latent-stats measures a tokenizer's latents: it needs --checkpoint and --data")
        if not args.reference:
            raise ValueError("--generated needs --reference stats.npz (precompute it with `mstok eval --data`)")
    else:
        if not (args.checkpoint and args.data):
            raise ValueError("mstok eval needs --checkpoint DIR and --data DIR (or --generated DIR --reference FILE)")
        if args.latent_stats is not None:
            if args.latent_stats < uniformity.MIN_POINTS:
                minimum = uniformity.MIN_POINTS
                raise ValueError(f"--latent-stats needs at least {minimum} images, got {args.latent_stats}")
            uniformity.require_sklearn()  # fail before the evaluation, not after it
        model, folder, weights = load_tokenizer_folder(args.checkpoint, args.weights, "--checkpoint")
        out = out or default_out_dir(folder, "eval") / "results.json"
        dataset = ev.eval_dataset(args.data, check_resolution(model, args.resolution), args.max_pixels)
        reference = ev.load_reference(args.reference) if args.reference else None
        if args.feature_net_stats and not args.feature_net:
            raise ValueError("--feature-net-stats needs --feature-net DIR, the network its statistics come from")
        if args.feature_net:
            meter, meter_unavailable = reference_meter(args, dataset, device)
    # missing-weights messages name this command's flags, not the training config's keys
    flags = {
        VGG16_FILENAME: "--vgg-weights",
        LPIPS_FILENAME: "--lpips-weights",
        FID_WEIGHTS_FILENAME: "--inception-weights",
    }
    with command_hints(**flags, download="--no-download"):
        lpips, inception, unavailable = ev.load_metric_networks(
            device, (args.vgg_weights, args.lpips_weights), args.inception_weights, download=not args.no_download
        )
    if args.generated:
        results = ev.evaluate_generated(
            args.generated, args.reference, inception, unavailable, args.batch_size, args.fid_method
        )
    else:
        results = ev.evaluate_reconstruction(
            model,
            dataset,
            batch_size=args.batch_size,
            device=device,
            lpips=lpips,
            inception=inception,
            reference_stats=reference,
            unavailable=unavailable,
            out_dir=out.parent,
            limit=args.limit,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            fid_method=args.fid_method,
            reference_meter=meter,
        )
        results["unavailable"].update(meter_unavailable)
        results = {"checkpoint": str(folder), "weights": weights, "data": str(args.data), **results}
        if args.feature_net:
            results["feature_net"] = str(args.feature_net)
        if args.latent_stats is not None:
            _add_latent_stats(results, model, dataset, args, out.parent / "latent_tsne.png")
    print(ev.write_results(results, out))
    if out is not None:
        beside = "grid.png" + (", latent_tsne.png" if results.get("latent_gini") is not None else "")
        print(f"results written to {out}" + ("" if args.generated else f" ({beside} beside it)"))
    return 0


def _add_latent_stats(results: dict, model: torch.nn.Module, dataset, args: argparse.Namespace, plot: Path) -> None:
    """``mstok eval --latent-stats N``: the latent-uniformity statistics as ``latent_*`` results and
    their t-SNE plot; latents with no spread to measure make them unavailable, not the evaluation."""
    batches = uniformity.dataset_batches(dataset, args.latent_stats, args.batch_size, args.num_workers)
    try:
        stats = uniformity.latent_uniformity(model, batches)
    except ValueError as err:
        logging.getLogger(__name__).warning("latent uniformity unavailable: %s", err)
        results.update(dict.fromkeys(("latent_density_cv", "latent_gini", "latent_normalized_entropy")))
        results["unavailable"]["latent_uniformity"] = str(err)
        return
    points, densities = stats.pop("points"), stats.pop("densities")
    results.update({f"latent_{key}": value for key, value in stats.items()})
    title = f"CV {stats['density_cv']:.3f}  Gini {stats['gini']:.3f}  H {stats['normalized_entropy']:.3f}"
    uniformity.save_scatter(points, densities, plot, title)


def _parse_split(text: str) -> tuple[int, int]:
    """``"35,5"`` -> (35, 5): train and val images per class."""
    try:
        train, val = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL images per class such as 35,5, got {text!r}") from None
    return train, val


def _cmd_probe(args: argparse.Namespace) -> int:
    import json

    if args.val and args.split:
        raise ValueError("--split divides the train folder and cannot be combined with --val")
    folder, weights = locate_model(args.checkpoint, args.weights, "--checkpoint")
    out = Path(args.out) if args.out else default_out_dir(folder, "probe") / "probe.json"
    result = run_probe(
        folder,
        args.train,
        val=args.val,
        weights=weights,
        split=args.split or (35, 5),
        epochs=args.epochs,
        batch_size=args.batch_size,
        base_lr=args.base_lr,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        max_pixels=args.max_pixels,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    seconds, settings = result["seconds"], result["settings"]
    print(
        f"linear probe of {result['family']} ({result['checkpoint']}, {result['weights']}): "
        f"{result['num_train']} train / {result['num_val']} val images, {result['num_classes']} classes, "
        f"D={result['feature_dim']}\n"
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
        f"({settings['epochs']} epochs, batch {settings['batch_size']}, lr {settings['lr']:g}; "
        f"features {seconds['features']:.1f} s, training {seconds['training']:.1f} s)\n"
        f"results written to {out}"
    )
    return 0


# `mstok bench`: the quick runs of the scripts in the checkout's benchmarks/ folder (not installed with the package)
BENCH_SCRIPTS = {
    "throughput": "throughput",
    "flops": "flops_vs_tokens",
    "train_step": "train_step",
    "sampling": "sampling",
}
BENCH_HARNESS = "harness"  # benchmarks/harness.py: what the scripts share, imported from their folder


def _benchmarks_dir(given: str | None) -> Path:
    """The benchmarks folder: ``given``, else the one beside ``src/`` in the checkout mstok runs from."""
    folder = Path(given) if given else Path(mstok.__file__).resolve().parents[2] / "benchmarks"
    if not all((folder / f"{script}.py").is_file() for script in [*BENCH_SCRIPTS.values(), BENCH_HARNESS]):
        raise FileNotFoundError(
            f"no benchmark scripts in {folder}: `mstok bench` runs benchmarks/*.py of a source checkout "
            "(git clone, then pip install -e .); an installed copy has none, pass --benchmarks-dir DIR"
        )
    return folder


def _load_module(name: str, path: Path) -> types.ModuleType:
    """Execute the file ``path`` as the module ``name`` (registered first: dataclasses look their module
    up while a class is built)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _cmd_bench(args: argparse.Namespace) -> int:
    folder = _benchmarks_dir(args.benchmarks_dir)
    extra = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    if extra and not args.only:
        raise ValueError("arguments after -- go to one script: name it with --only")
    common = ["--out", str(folder / "RESULTS.md")] + ([] if args.append else ["--no-append"])
    # the committed plot is redrawn only together with the RESULTS.md section that shows it
    plot = ["--plot", str(folder / "flops_vs_tokens.png")] if args.append else ["--no-plot"]
    if any(arg.startswith("--plot") or arg == "--no-plot" for arg in extra):
        plot = []
    quick = {"throughput": ["--quick"], "flops": plot, "train_step": ["--quick"], "sampling": ["--quick"]}
    failed = []
    # the scripts `import harness` from their own folder: load that one, and put back whatever
    # "harness" was before, so another checkout's harness is never reused (nor left behind)
    before = sys.modules.get("harness")
    try:
        _load_module("harness", folder / "harness.py")
        for name in [args.only] if args.only else list(BENCH_SCRIPTS):
            path = folder / f"{BENCH_SCRIPTS[name]}.py"
            module = _load_module(f"_mstok_bench_{BENCH_SCRIPTS[name]}", path)
            print(f"== {name}: {path.name} {' '.join([*quick[name], *extra])}", flush=True)
            returned = module.main([*quick[name], *common, *extra])
            # flops_vs_tokens returns an exit code, the timing scripts their rows (failed ones carry .error)
            if returned if isinstance(returned, int) else any(getattr(r, "error", None) for r in returned):
                failed.append(name)
    finally:
        if before is None:
            sys.modules.pop("harness", None)
        else:
            sys.modules["harness"] = before
    if failed:
        print(f"mstok bench: {', '.join(failed)} failed (see above)", file=sys.stderr)
    return 1 if failed else 0


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="run the quick benchmarks (throughput, FLOPs vs K, train step, sampling) of a source checkout",
        description="Run benchmarks/throughput.py --quick, flops_vs_tokens.py, train_step.py --quick and sampling.py "
        "--quick and print their tables. Arguments after -- go to the script named by --only.",
    )
    bench.add_argument("--only", choices=tuple(BENCH_SCRIPTS), help="run one benchmark only")
    append = bench.add_mutually_exclusive_group()
    append.add_argument(
        "--append", action="store_true", help="write their sections of benchmarks/RESULTS.md (each replaced in place)"
    )
    append.add_argument("--no-append", dest="append", action="store_false", help="print only (the default)")
    bench.add_argument("--benchmarks-dir", help="folder of the benchmark scripts (default: the checkout's)")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="-- ARGS for the --only script")
    bench.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mstok", description="Compact 1D image tokenizers (MsTok, TiTok).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    presets = sub.add_parser("presets", help="list every preset with its parameter counts")
    presets.set_defaults(func=_cmd_presets)

    train = sub.add_parser(
        "train",
        help="train a tokenizer (single stage, or a stage of two-stage training); runs under torchrun too",
    )
    proxy = sub.add_parser("train-proxy", help="train a MaskGIT-VQGAN proxy tokenizer for two-stage training")
    train_gen = sub.add_parser(
        "train-generator",
        help="train a generator (MaskGIT on token ids, DiT on latents) on `mstok pretokenize` shards; runs under "
        "torchrun too",
    )
    for command in (train, proxy, train_gen):
        command.add_argument(
            "--config",
            help="TOML config file (see configs/), or a run's saved train_config.json; optional with "
            "--resume DIR, which then uses the config saved with that checkpoint or run",
        )
        command.add_argument(
            "--set",
            action="extend",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override config values, e.g. --set optim.lr=3e-4 steps=100 (values are TOML)",
        )
        command.add_argument(
            "--resume",
            metavar="auto|DIR",
            help="resume from a checkpoint folder or a run folder (its newest checkpoint), or the newest "
            "checkpoint of the config's run with 'auto'",
        )
        command.add_argument(
            "--allow-changes",
            action="store_true",
            help="with --resume: accept settings that differ from the saved run's (steps, lr, data...; logged)",
        )
        command.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    proxy.set_defaults(func=_cmd_train_proxy)
    train_gen.set_defaults(func=_cmd_train_generator)
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="train TiTok-tiny and MsTok-tiny on bundled photos and write a report")
    demo.add_argument("--data", help="train on this image folder instead of scikit-image's photos")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model (default 1200)")
    demo.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed shared by both models (default 0)")
    demo.add_argument(
        "--official",
        metavar="RELEASE|DIR",
        help="show an official TiTok instead of training: a release (titok_l32, titok_b64, ...) fetched from the "
        "Hugging Face hub, or a local copy of one; reconstructs the bundled photos at 256 px",
    )
    demo.add_argument("--device", default="auto", help="with --official: auto, cpu, cuda (default auto)")
    demo.add_argument(
        "--out",
        default=DEMO_OUT,
        help=f"output folder (default {DEMO_OUT}; {DEMO_OUT}/official_<release> with --official)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument(
        "--jobs",
        type=int,
        choices=(1, 2),
        help="models trained at once: 2 side by side (default with 2+ cores), 1 one after the other",
    )
    demo.set_defaults(func=_cmd_demo)

    evaluate = sub.add_parser(
        "eval", help="reconstruction metrics (PSNR, SSIM, LPIPS, rFID, IS, usage; FD-ref with --feature-net) or gFID"
    )
    evaluate.add_argument("--checkpoint", help=f"the tokenizer: {MODEL_HELP}")
    evaluate.add_argument("--weights", help=WEIGHTS_HELP)
    evaluate.add_argument("--data", help="image folder or shards to reconstruct (resize + center crop)")
    evaluate.add_argument("--resolution", type=int, help="evaluation resolution (default: the tokenizer's)")
    evaluate.add_argument(
        "--generated",
        help="a folder (or .npz) of generated images: gFID and IS against --reference, or with --feature-net "
        "FD-ref, class accuracy and precision/recall against the real images in --data",
    )
    evaluate.add_argument("--reference", help="Inception statistics .npz (mstok or ADM reference batch)")
    evaluate.add_argument(
        "--out",
        help="results JSON path; grid.png, codebook_usage.png go beside it (default: eval/step_N/results.json in "
        "the checkpoint's run folder; with --generated, none)",
    )
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N images")
    evaluate.add_argument("--num-workers", type=int, default=2)
    evaluate.add_argument(
        "--latent-stats",
        type=int,
        metavar="N",
        help="also measure how uniformly the first N images spread over the latent space (HieraTok Table 5: "
        "density CV, Gini, normalized entropy of a KDE over a t-SNE, seed 0; needs scikit-learn, "
        'pip install "mstok[eval]"); latent_tsne.png goes beside the results',
    )
    evaluate.add_argument("--max-pixels", type=int, help=MAX_PIXELS_HELP)
    evaluate.add_argument("--inception-weights", help="pt_inception-2015-12-05 weights file (default: the cache)")
    evaluate.add_argument("--vgg-weights", help="torchvision vgg16 weights file for LPIPS (default: the cache)")
    evaluate.add_argument("--lpips-weights", help="LPIPS v0.1 vgg.pth linear weights (default: the cache)")
    evaluate.add_argument("--no-download", action="store_true", help="never download missing weights")
    evaluate.add_argument(
        "--fid-method", choices=("sqrtm", "eigh"), default="sqrtm", help="matrix square root for the FID"
    )
    add_feature_net_arguments(evaluate)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)

    probe = sub.add_parser("probe", help="linear-probe a tokenizer's frozen latent tokens (MAE protocol, LARS)")
    probe.add_argument("--checkpoint", required=True, help=f"the tokenizer: {MODEL_HELP}")
    probe.add_argument("--train", required=True, help="training image folder or shards (class = sub-folder)")
    probe.add_argument("--val", help="validation images with the same classes (default: split --train per class)")
    probe.add_argument(
        "--split", type=_parse_split, metavar="TRAIN,VAL", help="images per class without --val (default 35,5)"
    )
    probe.add_argument("--epochs", type=int, default=90, help="probe training epochs (default 90)")
    probe.add_argument("--batch-size", type=int, default=256, help="probe batch, also for features (default 256)")
    probe.add_argument("--base-lr", type=float, default=0.1, help="lr = base * batch / 256 (default 0.1)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the split and the probe (default 0)")
    probe.add_argument("--weights", help=WEIGHTS_HELP)
    probe.add_argument(
        "--out", help="results JSON path (default: probe/step_N/probe.json in the checkpoint's run folder)"
    )
    probe.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    probe.add_argument("--max-pixels", type=int, help=MAX_PIXELS_HELP)
    probe.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    probe.set_defaults(func=_cmd_probe)

    data = sub.add_parser("data", help="prepare datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    to_shards = data_sub.add_parser("to-shards", help="convert an image folder into WebDataset tar shards")
    to_shards.add_argument("src", help="image folder (class = first-level sub-folder)")
    to_shards.add_argument("dst", help="output folder for shard-NNNNNN.tar and index.json")
    to_shards.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    order = to_shards.add_mutually_exclusive_group()
    order.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample order (default 0)")
    order.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    to_shards.add_argument("--overwrite", action="store_true", help="replace shards already in DST")
    to_shards.add_argument("--workers", type=int, default=0, help="processes that test-decode images (default 0)")
    to_shards.add_argument("--max-pixels", type=int, help=MAX_PIXELS_HELP)
    to_shards.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    to_shards.set_defaults(func=_cmd_data_to_shards)
    add_generation_commands(sub)  # pretokenize, sample, convert (cli_generation.py)
    add_app_parser(sub)  # the web app (app/command.py)
    add_reference_commands(sub)  # reference train, reference eval (cli_reference.py)
    _add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mstok`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    return run_command(args.func, args)  # one-line errors for bad input, tracebacks for bugs (cli_errors.py)


if __name__ == "__main__":
    sys.exit(main())
