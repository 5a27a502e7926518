"""The generation and import commands of the ``mstok`` CLI: ``pretokenize`` (alias ``tokenize``), ``sample`` and
``convert titok`` / ``convert titok-generator``. ``mstok.cli`` registers them with
:func:`add_generation_commands`; errors are ``ValueError``/``FileNotFoundError``, which its
``main`` turns into one-line messages."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mstok.cli_errors import MAX_PIXELS_HELP, positive_int
from mstok.data import center_crop_transform, open_image_dataset
from mstok.data.tokens import identity_differences, pretokenize, tokenizer_identity
from mstok.device import resolve_device
from mstok.generators import (
    GeneratorConfig,
    GeneratorFamily,
    check_tokenizer,
    family_of,
    generate_images,
    token_lengths,
)
from mstok.generators.sampling import write_samples
from mstok.persistence import load_generator, load_tokenizer_folder
from mstok.persistence.convert.generator import SAMPLING_FILE, convert_titok_generator, describe_generator
from mstok.persistence.convert.titok import convert_titok, describe
from mstok.persistence.hub import download, is_hub_id
from mstok.storage.layout import CHECKPOINTS_DIR, CONFIG_FILE, TRAIN_CONFIG_FILE
from mstok.storage.locate import locate_model
from mstok.tokenizers import TiTokConfig
from mstok.training.distributed import DistContext

# every command that reads a model says the same (the rule: mstok.storage.locate.locate_model, as mstok.load_tokenizer)
MODEL_HELP = "a run folder (its newest checkpoint), a checkpoint or saved-model folder, or a weights file in one"
WEIGHTS_HELP = (
    "ema, model, or a weights file name in the folder (default: ema.safetensors when the checkpoint has it, "
    "else model.safetensors; the same rule as mstok.load_tokenizer)"
)


def default_out_dir(folder: Path, command: str) -> Path:
    """Where a command writes when no ``--out`` is given: ``<run>/<command>/<step_N>`` for a
    checkpoint of a run, else ``<model folder>/<command>``; never the current folder."""
    if folder.parent.name == CHECKPOINTS_DIR:
        return folder.parent.parent / command / folder.name
    return folder / command


def check_resolution(model: torch.nn.Module, resolution: int | None) -> int:
    """The ``--resolution`` to use: the tokenizer's own; any other value is an error."""
    resolution = resolution or model.config.image_size
    if resolution != model.config.image_size:
        raise ValueError(f"--resolution {resolution}: this tokenizer takes {model.config.image_size}px images")
    return resolution


def add_generation_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``pretokenize``, ``sample`` and ``convert`` on the top-level sub-parsers."""
    _add_pretokenize_parser(sub)
    _add_sample_parser(sub)
    _add_convert_generator_parser(_add_convert_parser(sub))  # `mstok convert titok` and `titok-generator`


def _add_pretokenize_parser(sub: argparse._SubParsersAction) -> None:
    pretok = sub.add_parser(
        "pretokenize",
        aliases=["tokenize"],
        help="encode a dataset once into token shards (ids, or float16 latents of a continuous tokenizer) for "
        "generator training (torchrun works too); with --target-psnr, a length per image",
    )
    pretok.add_argument("--checkpoint", required=True, help=f"the tokenizer: {MODEL_HELP}")
    pretok.add_argument("--data", required=True, help="image folder or shards (resize + center crop)")
    pretok.add_argument("--out", required=True, help="token-shard folder (an unfinished run there is resumed)")
    pretok.add_argument("--flip", action="store_true", help="also encode the horizontally flipped images")
    pretok.add_argument(
        "--sample-latents",
        action="store_true",
        help="a VAE tokenizer: store one posterior sample per image instead of the posterior mean (the default)",
    )
    pretok.add_argument(
        "--target-psnr",
        type=float,
        metavar="DB",
        help="a nested tokenizer: keep per image the shortest prefix whose decode reaches DB dB PSNR (ragged "
        "token shards with lengths, for a MaskGIT generator with an end token; docs/nested.md)",
    )
    pretok.add_argument(
        "--max-tokens", type=positive_int, help="with --target-psnr: the longest prefix kept (default: K)"
    )
    pretok.add_argument("--weights", help=WEIGHTS_HELP)
    pretok.add_argument("--resolution", type=int, help="image resolution (default: the tokenizer's)")
    pretok.add_argument("--batch-size", type=int, default=64, help="images per encode call (default 64)")
    pretok.add_argument("--shard-size", type=int, default=4096, help="images per shard file (default 4096)")
    pretok.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")
    pretok.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    pretok.add_argument("--max-pixels", type=int, help=MAX_PIXELS_HELP)
    pretok.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pretok.set_defaults(func=_cmd_pretokenize)


def _cmd_sample(args: argparse.Namespace) -> int:
    import time

    device = resolve_device(args.device)
    folder, weights = locate_model(args.generator, args.weights, "--generator")
    generator = load_generator(folder, weights).to(device)
    tokenizer = load_tokenizer_folder(args.tokenizer, args.tokenizer_weights, "--tokenizer")[0].to(device)
    check_tokenizer(generator, tokenizer)  # ids of the same K and V, or latents of the same K and C
    g, family = generator.config, family_of(generator)
    class_names = check_generator_tokens(folder, tokenizer)
    classes = parse_classes(args.classes, g.num_classes)
    labels = torch.tensor(classes).repeat_interleave(args.n)
    grid = args.out
    if not (grid or args.out_dir):
        grid = default_out_dir(folder, "sample") / "grid.png"
    settings = family.sampling_class
    config = settings.from_dict({**_sampling_file(args.sampling, folder), **_sampling_fields(args, family)})
    started = time.perf_counter()
    images, ids = generate_images(
        generator,
        tokenizer,
        labels,
        config,
        args.seed,
        args.batch_size,
        progress=not args.no_progress,
        decode_steps=args.decode_steps,  # checked before any sampling
    )
    seconds = time.perf_counter() - started
    names = [f"{c} {class_names[c]}" if c < len(class_names) else f"class {c}" for c in classes]
    lengths = token_lengths(ids, g.end_id) if getattr(g, "end_token", False) else None  # a ragged generator's
    written = write_samples(
        images, labels, ids, args.n, grid=grid, out_dir=args.out_dir, row_labels=names, lengths=lengths
    )
    print(f"{len(labels)} images in {seconds:.1f} s ({len(labels) / seconds:.2f} img/s); wrote {', '.join(written)}")
    return 0


def parse_classes(text: str, num_classes: int) -> list[int]:
    """``--classes``: ``all`` or comma-separated ids, each in ``0 .. num_classes - 1`` (id
    ``num_classes`` is the generator's null class, which would give unconditional samples)."""
    if text.strip() == "all":
        return list(range(num_classes))
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated class ids or 'all', got {text!r}") from None
    if not classes:
        raise ValueError(f"--classes names no class: give ids in 0..{num_classes - 1} or 'all'")
    outside = [c for c in classes if not 0 <= c < num_classes]
    if outside:
        raise ValueError(
            f"--classes {', '.join(map(str, outside))}: this generator has {num_classes} classes, "
            f"so class ids go from 0 to {num_classes - 1}"
        )
    return classes


def check_generator_tokens(folder: Path, tokenizer: torch.nn.Module) -> list[str]:
    """When the generator's training tokens are reachable, refuse a tokenizer other than theirs;
    returns the class names of those tokens' images when known (for the grid's row labels)."""
    import json

    try:
        data = Path(json.loads((folder / TRAIN_CONFIG_FILE).read_text())["data"]["path"])
        index = json.loads((data / "index.json").read_text())
        made_by = index["tokenizer"]
    except (OSError, KeyError, TypeError, ValueError):
        return []  # a converted or copied generator: nothing to compare with
    differ = identity_differences(made_by, tokenizer_identity(tokenizer))
    if differ:
        raise ValueError(
            f"this generator was trained on tokens of {made_by.get('checkpoint')} (see {data}); the --tokenizer "
            f"differs in {', '.join(differ)}, so its samples would be noise"
        )
    names = index.get("classes")
    return [str(name) for name in names] if isinstance(names, list) else []


def _sampling_file(given: str | None, folder: Path) -> dict:
    """Sampling-settings fields from ``--sampling FILE``, else from the generator folder's ``sampling.json``
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


# the sampling flags of `mstok sample`, by the sampling-settings field each sets
SAMPLING_FLAGS = ("steps", "schedule", "temperature", "choice_temperature", "confidence", "guidance_scale",
                  "guidance_schedule", "guidance_power", "anneal_temperature", "softmax_annealing", "sampler",
                  "eta", "top_p")  # fmt: skip


def _sampling_fields(args: argparse.Namespace, family: GeneratorFamily) -> dict:
    """The sampling flags that were given, as fields of the generator family's sampling settings
    (a flag of another family's sampler is an error naming the flags that apply)."""
    # None: a value flag not given; False: a switch not given (a 0 given is kept)
    given = {
        name: value for name in SAMPLING_FLAGS if (value := getattr(args, name)) is not None and value is not False
    }
    fields = family.sampling_class.field_names()
    foreign = [name for name in given if name not in fields]
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        usable = ", ".join("--" + name.replace("_", "-") for name in SAMPLING_FLAGS if name in fields)
        raise ValueError(f"{flags}: not a setting of {family.title} sampling; this generator takes {usable}")
    return given


def _cmd_pretokenize(args: argparse.Namespace) -> int:
    import time

    # same default as eval: the EMA weights of a training checkpoint when it has them
    model, folder, weights = load_tokenizer_folder(args.checkpoint, args.weights, "--checkpoint")
    resolution = check_resolution(model, args.resolution)
    dataset = open_image_dataset(args.data, center_crop_transform(resolution), args.max_pixels)
    dist = DistContext.from_env(args.device)
    started = time.perf_counter()
    try:
        index = pretokenize(
            model,
            dataset,
            args.out,
            flip=args.flip,
            sample_latents=args.sample_latents,
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
            target_psnr=args.target_psnr,
            max_tokens=args.max_tokens,
        )
    finally:
        dist.shutdown()
    if dist.is_main:
        tokens = f"K={index['num_tokens']}" + (f", C={index['token_dim']} latents" if index.get("continuous") else "")
        if index.get("ragged"):
            target = index["ragged"]["target_psnr"]
            tokens += f", {index['mean_length']:.2f} tokens per image on average for {target:g} dB"
        print(
            f"pretokenized {index['num_images']} images ({index['num_valid']} valid, {index['views']} view(s), "
            f"{tokens}) into {len(index['shards'])} shards in {args.out} in {time.perf_counter() - started:.1f} s"
        )
    return 0


def _add_sample_parser(sub: argparse._SubParsersAction) -> None:
    sample = sub.add_parser(
        "sample", help="generate images of some classes with a generator (MaskGIT, DiT or BitMAR) + its tokenizer"
    )
    sample.add_argument("--generator", required=True, help=f"the generator: {MODEL_HELP}")
    sample.add_argument(
        "--tokenizer", required=True, help=f"the tokenizer the generator's tokens came from: {MODEL_HELP}"
    )
    sample.add_argument(
        "--classes", default="0", help="comma-separated class ids in 0..classes-1, or 'all' (default 0)"
    )
    sample.add_argument("--n", type=positive_int, default=8, help="images per class, at least 1 (default 8)")
    sample.add_argument(
        "--out",
        help="grid PNG, one labelled row per class (default without --out-dir: sample/step_N/grid.png in the "
        "generator's run folder)",
    )
    sample.add_argument("--out-dir", help="folder for one PNG per image and samples.npz (uint8 NHWC, for FID)")
    sample.add_argument("--seed", type=int, default=0, help="seed: the same seed gives the same images")
    sample.add_argument("--batch-size", type=int, default=32)
    sample.add_argument(
        "--sampling", metavar="FILE", help="JSON of sampling settings (default: the generator's sampling.json if any)"
    )
    sample.add_argument(
        "--steps", type=int, help="sampling steps S (MaskGIT default 8; DiT: 250 for ddpm/ddim, 50 for euler/heun)"
    )
    sample.add_argument(
        "--decode-steps",
        type=positive_int,
        help="a tokenizer whose decoder samples (SemTok stage I): its ODE steps (default: its config's sample_steps)",
    )
    sample.add_argument(
        "--sampler",
        help="DiT: ddpm or ddim for a DDPM-trained model, euler or heun for a flow one (default: ddpm or euler)",
    )
    sample.add_argument("--eta", type=float, help="DiT with --sampler ddim: the noise scale eta in [0, 1] (default 0)")
    sample.add_argument(
        "--top-p", type=float, help="BitMAR: nucleus threshold per bit or bit group, in (0, 1] (default 0.75)"
    )
    sample.add_argument("--schedule", help="masking schedule: arccos (default), cosine, linear, sqrt")
    sample.add_argument("--temperature", type=float, help="token sampling temperature (default 1.0)")
    sample.add_argument("--anneal-temperature", action="store_true", help="scale the temperature by 1 - t/S")
    sample.add_argument(
        "--softmax-annealing", action="store_true", help="divide logits by 0.5 + 0.8 (1 - t/S) (official FID script)"
    )
    sample.add_argument("--choice-temperature", type=float, help="confidence Gumbel noise, annealed (default 4.5)")
    sample.add_argument("--confidence", help="log_prob (default) or logit (official TiTok)")
    sample.add_argument(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance: MaskGIT's weight w in cond + w (cond - uncond), 0 = none (default); a DiT's "
        "scale s in uncond + s (cond - uncond), 1 = none (default); s = 1 + w",
    )
    sample.add_argument("--guidance-schedule", help="constant (default), linear, power_cosine")
    sample.add_argument("--guidance-power", type=float, help="exponent of power_cosine (default 3)")
    sample.add_argument("--weights", help=f"generator weights: {WEIGHTS_HELP}")
    sample.add_argument("--tokenizer-weights", help=f"tokenizer weights: {WEIGHTS_HELP}")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    sample.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sample.set_defaults(func=_cmd_sample)


def _cmd_convert_titok(args: argparse.Namespace) -> int:
    import json

    src = args.src
    if not Path(src).exists() and is_hub_id(src):
        src = download(src)  # a hub id: fetch the release into the hub cache first
    out = convert_titok(src, args.out, release=args.release, overwrite=args.overwrite)
    config = TiTokConfig.from_dict(json.loads((out / CONFIG_FILE).read_text())["config"])
    print(f"converted {args.src} into {out} ({describe(config)}); load it with mstok.load_tokenizer({str(out)!r})")
    return 0


def _cmd_convert_titok_generator(args: argparse.Namespace) -> int:
    import json

    src = args.src
    if not Path(src).exists() and is_hub_id(src):
        src = download(src, kind="generator")  # a hub id: fetch the release into the hub cache first
    out = convert_titok_generator(src, args.out, release=args.release, overwrite=args.overwrite)
    config = GeneratorConfig.from_dict(json.loads((out / CONFIG_FILE).read_text())["config"])
    sampling = f"; official sampling settings in {out / SAMPLING_FILE}" if (out / SAMPLING_FILE).is_file() else ""
    print(
        f"converted {args.src} into {out} ({describe_generator(config)}){sampling}; sample with "
        f"mstok sample --generator {out} --tokenizer TOKENIZER --classes 207 (the grid goes to {out}/sample/)"
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
