"""The ``mstok`` command line: presets, train, train-proxy, train-generator, sample, eval, probe, pretokenize,
bench, demo and data."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))


def _cmd_presets(args: argparse.Namespace) -> int:
    from mstok.generators import GENERATOR_PRESETS, create_generator
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
    _print_table(("preset", "family", "res", "K", "V", "encoder", "decoder", "quantizer", "total"), rows)
    rows = []
    for name in GENERATOR_PRESETS:
        with torch.device("meta"):
            gen = create_generator(name)
        c = gen.config
        layout = f"{c.architecture}, {'pre' if c.norm_first else 'post'}-LN"
        rows.append((name, layout, f"{c.width}x{c.depth}/{c.num_heads}", str(c.num_tokens), str(c.codebook_size),
                     str(c.num_classes), f"{gen.parameter_counts()['total'] / 1e6:.2f}M"))  # fmt: skip
    print()
    _print_table(("generator", "layout", "width x depth/heads", "K", "V", "classes", "total"), rows)
    return 0


def _run_training(args: argparse.Namespace, kind: str) -> int:
    """Shared by ``train``, ``train-proxy`` and ``train-generator``: one engine, under torchrun or not."""
    from mstok.training import GeneratorTrainConfig, Trainer, load_train_config
    from mstok.training.generator_trainer import GeneratorTrainer

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
            used = trainer.resume(args.resume)
            say(f"resumed from {used} (step {trainer.step})" if used else "no checkpoint to resume: starting fresh")
        trainer.fit()
        say(f"done: step {trainer.step}; checkpoints in {trainer.ckpt_dir} (log: {trainer.out_dir / 'log.jsonl'})")
    finally:
        trainer.dist.shutdown()
    return 0


def _preset_family(preset: str) -> str:
    from mstok.tokenizers.registry import preset_config

    return preset_config(preset).family


def _cmd_train(args: argparse.Namespace) -> int:
    return _run_training(args, "tokenizer")


def _cmd_train_proxy(args: argparse.Namespace) -> int:
    return _run_training(args, "proxy")


def _cmd_train_generator(args: argparse.Namespace) -> int:
    return _run_training(args, "generator")


def _cmd_sample(args: argparse.Namespace) -> int:
    import time

    from mstok.generators import SamplingConfig, generate_images, load_generator
    from mstok.generators.sampling import write_samples
    from mstok.tokenizers import load_tokenizer
    from mstok.training.checkpoint import default_weights, find_model_folder
    from mstok.training.distributed import resolve_device

    if not (args.out or args.out_dir):
        raise ValueError("give --out grid.png and/or --out-dir DIR")
    device = resolve_device(args.device)
    folder = find_model_folder(args.generator, "--generator")
    generator = load_generator(folder, default_weights(folder, args.weights)).to(device)
    tok_folder = find_model_folder(args.tokenizer, "--tokenizer")
    tokenizer = load_tokenizer(tok_folder, default_weights(tok_folder, args.tokenizer_weights)).to(device)
    g, t = generator.config, tokenizer.config
    if (g.num_tokens, g.codebook_size) != (t.num_latent_tokens, t.codebook_size):
        raise ValueError(
            f"the generator models K={g.num_tokens}, V={g.codebook_size} tokens but the tokenizer has "
            f"K={t.num_latent_tokens}, V={t.codebook_size}: use the tokenizer its tokens came from"
        )
    _check_generator_tokens(folder, tokenizer)
    if args.classes == "all":
        classes = list(range(g.num_classes))
    else:
        try:
            classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError as err:
            raise ValueError(f"--classes must be comma-separated class ids or 'all', got {args.classes!r}") from err
    labels = torch.tensor(classes).repeat_interleave(args.n)
    base = {**SamplingConfig().to_dict(), **_sampling_file(args.sampling, folder)}
    config = SamplingConfig.from_dict({**base, **_sampling_fields(args)})
    started = time.perf_counter()
    images, ids = generate_images(
        generator, tokenizer, labels, config, args.seed, args.batch_size, progress=not args.no_progress
    )
    seconds = time.perf_counter() - started
    written = write_samples(images, labels, ids, args.n, grid=args.out, out_dir=args.out_dir)
    print(f"{len(labels)} images in {seconds:.1f} s ({len(labels) / seconds:.2f} img/s); wrote {', '.join(written)}")
    return 0


def _check_generator_tokens(folder: Path, tokenizer: torch.nn.Module) -> None:
    """When the generator's training tokens are reachable, refuse a tokenizer other than theirs."""
    import json

    from mstok.data.tokens import identity_differences, tokenizer_identity

    try:
        data = Path(json.loads((folder / "train_config.json").read_text())["data"]["path"])
        made_by = json.loads((data / "index.json").read_text())["tokenizer"]
    except (OSError, KeyError, TypeError, ValueError):
        return  # a converted or copied generator: nothing to compare with
    differ = identity_differences(made_by, tokenizer_identity(tokenizer))
    if differ:
        raise ValueError(
            f"this generator was trained on tokens of {made_by.get('checkpoint')} (see {data}); the --tokenizer "
            f"differs in {', '.join(differ)}, so its samples would be noise"
        )


def _sampling_file(given: str | None, folder: Path) -> dict:
    """SamplingConfig fields from ``--sampling FILE``, else from the generator folder's ``sampling.json``
    (``mstok convert titok-generator`` writes the release's official settings there), else none."""
    import json

    path = Path(given) if given else folder / "sampling.json"
    if not path.is_file():
        if given:
            raise FileNotFoundError(f"--sampling: no such file {path}")
        return {}
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of sampling settings, got {type(values).__name__}")
    print(f"sampling settings from {path} (flags given override them)")
    return values


def _sampling_fields(args: argparse.Namespace) -> dict:
    """The sampling flags that were given, as SamplingConfig fields."""
    names = ("steps", "schedule", "temperature", "choice_temperature", "confidence", "guidance_scale",
             "guidance_schedule", "guidance_power")  # fmt: skip
    fields = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.anneal_temperature:
        fields["anneal_temperature"] = True
    if args.softmax_annealing:
        fields["softmax_annealing"] = True
    return fields


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


def _cmd_data_to_shards(args: argparse.Namespace) -> int:
    from mstok.data.shards import write_shards

    index = write_shards(
        args.src,
        args.dst,
        shard_size=args.shard_size,
        seed=None if args.no_shuffle else args.seed,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        workers=args.workers,
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
    from mstok.evaluation import evaluate as ev
    from mstok.tokenizers import load_tokenizer
    from mstok.training.checkpoint import default_weights, find_model_folder
    from mstok.training.distributed import resolve_device

    device = resolve_device(args.device)  # one process: eval never joins a process group
    lpips, inception, unavailable = ev.load_metric_networks(
        device, (args.vgg_weights, args.lpips_weights), args.inception_weights, download=not args.no_download
    )
    out_dir = Path(args.out).parent if args.out else None
    if args.generated:
        if not args.reference:
            raise ValueError("--generated needs --reference stats.npz (precompute it with `mstok eval --data`)")
        results = ev.evaluate_generated(
            args.generated, args.reference, inception, unavailable, args.batch_size, args.fid_method
        )
    else:
        if not (args.checkpoint and args.data):
            raise ValueError("mstok eval needs --checkpoint DIR and --data DIR (or --generated DIR --reference FILE)")
        folder = find_model_folder(args.checkpoint, "--checkpoint")
        weights = default_weights(folder, args.weights)
        model = load_tokenizer(folder, weights=weights)
        resolution = args.resolution or model.config.image_size
        if resolution != model.config.image_size:
            raise ValueError(f"--resolution {resolution}: this tokenizer takes {model.config.image_size}px images")
        reference = ev.load_reference(args.reference) if args.reference else None
        results = ev.evaluate_reconstruction(
            model,
            ev.eval_dataset(args.data, resolution),
            batch_size=args.batch_size,
            device=device,
            lpips=lpips,
            inception=inception,
            reference_stats=reference,
            unavailable=unavailable,
            out_dir=out_dir or Path("runs") / "eval",
            limit=args.limit,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            fid_method=args.fid_method,
        )
        results = {"checkpoint": str(folder), "weights": weights, "data": str(args.data), **results}
    print(ev.write_results(results, args.out))
    return 0


def _cmd_pretokenize(args: argparse.Namespace) -> int:
    import time

    from mstok.data import center_crop_transform, open_image_dataset
    from mstok.data.tokens import pretokenize
    from mstok.tokenizers import load_tokenizer
    from mstok.training.checkpoint import default_weights, find_model_folder
    from mstok.training.distributed import DistContext

    folder = find_model_folder(args.checkpoint, "--checkpoint")
    # same default as eval: the EMA weights of a training checkpoint when it has them
    weights = default_weights(folder, args.weights)
    model = load_tokenizer(folder, weights=weights)
    resolution = args.resolution or model.config.image_size
    if resolution != model.config.image_size:
        raise ValueError(f"--resolution {resolution}: this tokenizer takes {model.config.image_size}px images")
    dataset = open_image_dataset(args.data, center_crop_transform(resolution))
    dist = DistContext.from_env(args.device)
    started = time.perf_counter()
    try:
        index = pretokenize(
            model,
            dataset,
            args.out,
            flip=args.flip,
            batch_size=args.batch_size,
            device=dist.device,
            rank=dist.rank,
            world_size=dist.world_size,
            shard_size=args.shard_size,
            num_workers=args.workers,
            source=str(args.data),
            checkpoint=str(folder / weights),
            progress=not args.no_progress,
            barrier=dist.barrier,
        )
    finally:
        dist.shutdown()
    if dist.is_main:
        print(
            f"pretokenized {index['num_images']} images ({index['num_valid']} valid, {index['views']} view(s), "
            f"K={index['num_tokens']}) into {len(index['shards'])} shards in {args.out} "
            f"in {time.perf_counter() - started:.1f} s"
        )
    return 0


def _parse_split(text: str) -> tuple[int, int]:
    """``"35,5"`` -> (35, 5): train and val images per class."""
    try:
        train, val = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VAL images per class such as 35,5, got {text!r}") from None
    return train, val


def _cmd_probe(args: argparse.Namespace) -> int:
    import json

    from mstok.evaluation.probe import run_probe

    if args.val and args.split:
        raise ValueError("--split divides the train folder and cannot be combined with --val")
    result = run_probe(
        args.checkpoint,
        args.train,
        val=args.val,
        weights=args.weights,
        split=args.split or (35, 5),
        epochs=args.epochs,
        batch_size=args.batch_size,
        base_lr=args.base_lr,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    out = Path(args.out)
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


def _benchmarks_dir(given: str | None) -> Path:
    """The benchmarks folder: ``given``, else the one beside ``src/`` in the checkout mstok runs from."""
    import mstok

    folder = Path(given) if given else Path(mstok.__file__).resolve().parents[2] / "benchmarks"
    if not all((folder / f"{script}.py").is_file() for script in BENCH_SCRIPTS.values()):
        raise FileNotFoundError(
            f"no benchmark scripts in {folder}: `mstok bench` runs benchmarks/*.py of a source checkout "
            "(git clone, then pip install -e .); an installed copy has none, pass --benchmarks-dir DIR"
        )
    return folder


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

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
    for name in [args.only] if args.only else list(BENCH_SCRIPTS):
        path = folder / f"{BENCH_SCRIPTS[name]}.py"
        spec = importlib.util.spec_from_file_location(f"_mstok_bench_{BENCH_SCRIPTS[name]}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        print(f"== {name}: {path.name} {' '.join([*quick[name], *extra])}", flush=True)
        returned = module.main([*quick[name], *common, *extra])
        # flops_vs_tokens returns an exit code, the timing scripts their rows (failed ones carry .error)
        if returned if isinstance(returned, int) else any(getattr(r, "error", None) for r in returned):
            failed.append(name)
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
    append.add_argument("--append", action="store_true", help="append the sections to benchmarks/RESULTS.md")
    append.add_argument("--no-append", dest="append", action="store_false", help="print only (the default)")
    bench.add_argument("--benchmarks-dir", help="folder of the benchmark scripts (default: the checkout's)")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="-- ARGS for the --only script")
    bench.set_defaults(func=_cmd_bench)


def _add_sample_parser(sub: argparse._SubParsersAction) -> None:
    sample = sub.add_parser("sample", help="generate images of some classes with a generator + its tokenizer")
    sample.add_argument("--generator", required=True, help="a saved generator, checkpoint or run folder")
    sample.add_argument("--tokenizer", required=True, help="the tokenizer the generator's tokens came from")
    sample.add_argument("--classes", default="0", help="comma-separated class ids, or 'all' (default 0)")
    sample.add_argument("--n", type=int, default=8, help="images per class (default 8)")
    sample.add_argument("--out", help="grid PNG: one row per class")
    sample.add_argument("--out-dir", help="folder for one PNG per image and samples.npz (uint8 NHWC, for FID)")
    sample.add_argument("--seed", type=int, default=0, help="seed: the same seed gives the same images")
    sample.add_argument("--batch-size", type=int, default=32)
    sample.add_argument(
        "--sampling", metavar="FILE", help="JSON of sampling settings (default: the generator's sampling.json if any)"
    )
    sample.add_argument("--steps", type=int, help="sampling steps S (default 8)")
    sample.add_argument("--schedule", help="masking schedule: arccos (default), cosine, linear, sqrt")
    sample.add_argument("--temperature", type=float, help="token sampling temperature (default 1.0)")
    sample.add_argument("--anneal-temperature", action="store_true", help="scale the temperature by 1 - t/S")
    sample.add_argument(
        "--softmax-annealing", action="store_true", help="divide logits by 0.5 + 0.8 (1 - t/S) (official FID script)"
    )
    sample.add_argument("--choice-temperature", type=float, help="confidence Gumbel noise, annealed (default 4.5)")
    sample.add_argument("--confidence", help="log_prob (default) or logit (official TiTok)")
    sample.add_argument("--guidance-scale", type=float, help="CFG weight w: cond + w (cond - uncond); 0 = none")
    sample.add_argument("--guidance-schedule", help="constant (default), linear, power_cosine")
    sample.add_argument("--guidance-power", type=float, help="exponent of power_cosine (default 3)")
    sample.add_argument("--weights", help="generator weights file (default: ema.safetensors when present)")
    sample.add_argument("--tokenizer-weights", help="tokenizer weights file (default: ema.safetensors when present)")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    sample.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sample.set_defaults(func=_cmd_sample)


def _cmd_convert_titok(args: argparse.Namespace) -> int:
    import json

    from mstok.convert.hub import download, is_hub_id
    from mstok.convert.titok import convert_titok, describe
    from mstok.tokenizers import TiTokConfig

    src = args.src
    if not Path(src).exists() and is_hub_id(src):
        src = download(src)  # a hub id: fetch the release into the hub cache first
    out = convert_titok(src, args.out, release=args.release, overwrite=args.overwrite)
    config = TiTokConfig.from_dict(json.loads((out / "config.json").read_text())["config"])
    print(f"converted {args.src} into {out} ({describe(config)}); load it with mstok.load_tokenizer({str(out)!r})")
    return 0


def _cmd_convert_titok_generator(args: argparse.Namespace) -> int:
    import json

    from mstok.convert.generator import SAMPLING_FILE, convert_titok_generator, describe_generator
    from mstok.convert.hub import download, is_hub_id
    from mstok.generators import GeneratorConfig

    src = args.src
    if not Path(src).exists() and is_hub_id(src):
        src = download(src, kind="generator")  # a hub id: fetch the release into the hub cache first
    out = convert_titok_generator(src, args.out, release=args.release, overwrite=args.overwrite)
    config = GeneratorConfig.from_dict(json.loads((out / "config.json").read_text())["config"])
    sampling = f"; official sampling settings in {out / SAMPLING_FILE}" if (out / SAMPLING_FILE).is_file() else ""
    print(
        f"converted {args.src} into {out} ({describe_generator(config)}){sampling}; sample with "
        f"mstok sample --generator {out} --tokenizer TOKENIZER --classes 207 --out grid.png"
    )
    return 0


def _add_convert_generator_parser(convert_sub: argparse._SubParsersAction) -> None:
    """``mstok convert titok-generator``."""
    gen = convert_sub.add_parser(
        "titok-generator",
        help="an official TiTok generator (yucornetto/generator_titok_*, fun-research/TiTok generator_*.bin)",
        description="Convert an official TiTok generator release (bytedance/1d-tokenizer ImageBert or UViTBert) "
        "into an mstok generator folder, with the release's official sampling settings in sampling.json: SRC is a "
        "release folder (config.json + model.safetensors or pytorch_model.bin), a weights file (with --release, or "
        "named like generator_titok_l32.bin), or a hub id such as yucornetto/generator_titok_l32_imagenet.",
    )
    gen.add_argument("src", help="release folder, weights file or hub id")
    gen.add_argument("out", help="output folder (config.json, model.safetensors, sampling.json)")
    gen.add_argument("--release", help="release name when SRC has no config.json: titok_l32, titok_b64, titok_s128")
    gen.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    gen.set_defaults(func=_cmd_convert_titok_generator)


def _add_convert_parser(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """``mstok convert``: one sub-command per family of official checkpoints; returns its sub-parsers."""
    convert = sub.add_parser(
        "convert", help="import official checkpoints (TiTok tokenizers, generators) as mstok checkpoints"
    )
    convert_sub = convert.add_subparsers(dest="convert_command", required=True)
    titok = convert_sub.add_parser(
        "titok",
        help="an official TiTok tokenizer (yucornetto/tokenizer_titok_*, fun-research/TiTok .bin)",
        description="Convert an official TiTok tokenizer release (bytedance/1d-tokenizer) into an mstok checkpoint "
        "folder: SRC is a release folder (config.json + model.safetensors or pytorch_model.bin), a weights file "
        "(with --release, or named like tokenizer_titok_l32.bin), or a hub id such as "
        "yucornetto/tokenizer_titok_l32_imagenet.",
    )
    titok.add_argument("src", help="release folder, weights file or hub id")
    titok.add_argument("out", help="output folder (config.json + model.safetensors, read by mstok.load_tokenizer)")
    titok.add_argument("--release", help="release name when SRC has no config.json, e.g. titok_l32, titok_bl64_vq8k")
    titok.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    titok.set_defaults(func=_cmd_convert_titok)
    return convert_sub


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
        "train-generator", help="train a MaskGIT generator on `mstok pretokenize` shards; runs under torchrun too"
    )
    for command in (train, proxy, train_gen):
        command.add_argument("--config", required=True, help="TOML config file (see configs/)")
        command.add_argument(
            "--set",
            action="extend",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override config values, e.g. --set optim.lr=3e-4 steps=100 (values are TOML)",
        )
        command.add_argument(
            "--resume", metavar="auto|DIR", help="resume from a checkpoint folder, or the newest with 'auto'"
        )
        command.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    proxy.set_defaults(func=_cmd_train_proxy)
    train_gen.set_defaults(func=_cmd_train_generator)
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="train TiTok-tiny and MsTok-tiny on bundled photos and write a report")
    demo.add_argument("--data", help="train on this image folder instead of scikit-image's photos")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model (default 600)")
    demo.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    demo.add_argument("--seed", type=int, default=0, help="random seed shared by both models (default 0)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)

    evaluate = sub.add_parser("eval", help="reconstruction metrics (PSNR, SSIM, LPIPS, rFID, IS, usage) or gFID")
    evaluate.add_argument("--checkpoint", help="a saved tokenizer, checkpoint or run folder")
    evaluate.add_argument("--weights", help="weights file in the folder (default: ema.safetensors when present)")
    evaluate.add_argument("--data", help="image folder or shards to reconstruct (resize + center crop)")
    evaluate.add_argument("--resolution", type=int, help="evaluation resolution (default: the tokenizer's)")
    evaluate.add_argument("--generated", help="a folder of generated images: report gFID and IS against --reference")
    evaluate.add_argument("--reference", help="Inception statistics .npz (mstok or ADM reference batch)")
    evaluate.add_argument("--out", help="results JSON path; grid.png, codebook_usage.png go beside it")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--limit", type=int, help="evaluate only the first N images")
    evaluate.add_argument("--num-workers", type=int, default=2)
    evaluate.add_argument("--inception-weights", help="pt_inception-2015-12-05 weights file (default: the cache)")
    evaluate.add_argument("--vgg-weights", help="torchvision vgg16 weights file for LPIPS (default: the cache)")
    evaluate.add_argument("--lpips-weights", help="LPIPS v0.1 vgg.pth linear weights (default: the cache)")
    evaluate.add_argument("--no-download", action="store_true", help="never download missing weights")
    evaluate.add_argument(
        "--fid-method", choices=("sqrtm", "eigh"), default="sqrtm", help="matrix square root for the FID"
    )
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)

    probe = sub.add_parser("probe", help="linear-probe a tokenizer's frozen latent tokens (MAE protocol, LARS)")
    probe.add_argument("--checkpoint", required=True, help="a saved tokenizer, checkpoint or run folder")
    probe.add_argument("--train", required=True, help="training image folder or shards (class = sub-folder)")
    probe.add_argument("--val", help="validation images with the same classes (default: split --train per class)")
    probe.add_argument(
        "--split", type=_parse_split, metavar="TRAIN,VAL", help="images per class without --val (default 35,5)"
    )
    probe.add_argument("--epochs", type=int, default=90, help="probe training epochs (default 90)")
    probe.add_argument("--batch-size", type=int, default=256, help="probe batch, also for features (default 256)")
    probe.add_argument("--base-lr", type=float, default=0.1, help="lr = base * batch / 256 (default 0.1)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the split and the probe (default 0)")
    probe.add_argument("--weights", default="ema.safetensors", help="weights file (model.safetensors if absent)")
    probe.add_argument("--out", default="probe.json", help="results JSON path (default probe.json)")
    probe.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
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
    to_shards.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    to_shards.set_defaults(func=_cmd_data_to_shards)
    pretok = sub.add_parser(
        "pretokenize", help="encode a dataset once into token shards for generator training (torchrun works too)"
    )
    pretok.add_argument("--checkpoint", required=True, help="a saved tokenizer, checkpoint or run folder")
    pretok.add_argument("--data", required=True, help="image folder or shards (resize + center crop)")
    pretok.add_argument("--out", required=True, help="token-shard folder (an unfinished run there is resumed)")
    pretok.add_argument("--flip", action="store_true", help="also encode the horizontally flipped images")
    pretok.add_argument("--weights", help="weights file in the folder (default: ema.safetensors when present)")
    pretok.add_argument("--resolution", type=int, help="image resolution (default: the tokenizer's)")
    pretok.add_argument("--batch-size", type=int, default=64, help="images per encode call (default 64)")
    pretok.add_argument("--shard-size", type=int, default=4096, help="images per shard file (default 4096)")
    pretok.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")
    pretok.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    pretok.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pretok.set_defaults(func=_cmd_pretokenize)
    _add_sample_parser(sub)
    _add_bench_parser(sub)
    _add_convert_generator_parser(_add_convert_parser(sub))  # `mstok convert titok` and `titok-generator`
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mstok`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as err:
        print(f"mstok {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
