"""GPU check: training images/s and MFU of TiTok-B-64 and MsTok-B-64 stage 1, encode/decode images/s, peak
memory, and the official TiTok stage-1 step on the same GPU, in under 8 minutes on one H100 or H200.

Training rows time ``Trainer.train_step`` of the project's trainer in two-stage **stage 1**: proxy-code
cross-entropy + VQ against a frozen MaskGIT-VQGAN proxy with random weights (``maskgit_vqgan_f16`` at
256 px, ``vqgan_tiny`` at 64 px), built as ``train_step.py``'s ``stage1`` rows are
(:func:`harness.stage_trainer`): proxy encode, forward, losses, backward, grad clipping, fused AdamW, LR
schedule, EMA, dead-code revival and codebook statistics. Random image batches are made beforehand.

MFU (model FLOPs utilisation) = model FLOPs per step / median step time / the device's peak dense bf16
FLOP/s. Model FLOPs per step = 3 x forward FLOPs of the trained networks (encoder + decoder with its
proxy-code head, from :func:`mstok.evaluation.flops.tokenizer_flops`: matmuls and convolutions, 2 per
multiply-add; forward + backward ~ 3 x forward) x batch. Not counted: the frozen proxy's forward (its
FLOPs/img are reported beside, and ``MFU +proxy`` adds them once), the quantizer's code lookup, the loss,
element-wise ops and the optimizer. Peak by device name (:data:`PEAK_BF16`), or ``--peak-tflops``; an
unknown device without it reads "unknown peak".

Inference rows time ``tokenizer.encode(images)`` and ``tokenizer.decode(tokens)`` (and the two-stage
decode to pixels through the proxy's VQGAN decoder, ``decode2``) under ``torch.inference_mode``.

With ``--official DIR`` (a checkout of bytedance/1d-tokenizer; its ``modeling`` package is imported
from there at run time, nothing of it is copied here) the official TiTok-B-64 stage-1 step is timed on
the same batch: their ``TiTok`` built from their ``configs/training/TiTok/stage1/titok_b64.yaml``,
their ``PretrainedTokenizer`` (random weights) for the proxy codes, their ``ReconstructionLoss_Stage1``,
then backward, grad clipping, AdamW with their parameter groups, their LR schedule and their EMA, as
their ``train_one_epoch`` does for stage 1 (:func:`official_stage1`).

    python benchmarks/gpu_check.py                                   # on a GPU: the default rows (< 8 min)
    python benchmarks/gpu_check.py --official ../1d-tokenizer        # + the official TiTok stage-1 rows
    python benchmarks/gpu_check.py --device cpu --presets titok_tiny,mstok_tiny --steps 2 --budget 1 --no-write
    bash benchmarks/gpu_check.sh                                     # nvidia-smi, checks, then the above

Rows run in order of importance (bf16 training, inference, bf16+compile training, fp32 training), each
official row after the mstok rows of its mode; once ``--max-minutes`` is near, the rest are reported as
skipped. Prints markdown tables and writes its section of ``--out`` in place (``harness.publish``)
unless ``--no-write``. Exits 1 if a row failed (the others are still reported).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import math
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mstok.evaluation.flops import count_flops, tokenizer_flops
from mstok.tokenizers import create_tokenizer
from mstok.tokenizers.registry import preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness
from harness import PROXY_FOR_SIZE

DEFAULT_PRESETS = ("titok_b64", "mstok_b64")
PARTS = ("encode", "decode", "decode2")
PART_TEXT = {"encode": "encode", "decode": "decode", "decode2": "decode (two-stage, to pixels)"}
OFFICIAL_CONFIG = "configs/training/TiTok/stage1/titok_b64.yaml"
OFFICIAL_LABEL = "official TiTok-B-64"
NOT_RUN_OFFICIAL = "not run (pass --official DIR)"
# the official PretrainedTokenizer's architecture, fixed in its __init__ (modeling/titok.py)
OFFICIAL_PROXY_CONF = {"channel_mult": [1, 1, 2, 2, 4], "num_resolutions": 5, "dropout": 0.0, "hidden_channels": 128,
                       "num_channels": 3, "num_res_blocks": 2, "resolution": 256, "z_channels": 256}  # fmt: skip
UNKNOWN_PEAK = "unknown peak"

# Peak dense (no sparsity) bf16 tensor-core FLOP/s by device: (label, words the CUDA device name must hold,
# words it must not, FLOP/s). "NVIDIA H100 80GB HBM3" is the SXM part; H100/H200 NVL parts differ and are
# left unknown (pass --peak-tflops).
PEAK_BF16: tuple[tuple[str, tuple[str, ...], tuple[str, ...], float], ...] = (
    ("H100 PCIe", ("h100", "pcie"), (), 756e12),
    ("H100 SXM", ("h100", "sxm"), ("nvl",), 989e12),
    ("H100 SXM", ("h100", "hbm3"), ("nvl", "pcie"), 989e12),
    ("H200", ("h200",), ("nvl",), 989e12),
    ("A100", ("a100",), (), 312e12),
)


def peak_flops(device_name: str, peak_tflops: float | None = None) -> tuple[str, float] | None:
    """(what the peak is, its bf16 dense FLOP/s) for ``device_name``: ``peak_tflops`` (TFLOP/s) when given,
    else the row of :data:`PEAK_BF16` the name matches; None for an unknown device."""
    if peak_tflops:
        return f"--peak-tflops {peak_tflops:g}", peak_tflops * 1e12
    name = device_name.lower()
    for label, words, not_words, flops in PEAK_BF16:
        if all(w in name for w in words) and not any(w in name for w in not_words):
            return f"{label} bf16 dense {flops / 1e12:g} TFLOP/s", flops
    return None


def mfu(flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops_per_step / step_seconds`` as a share of ``peak`` FLOP/s (None when
    the peak is unknown; NaN without a time)."""
    if not peak:
        return None
    if not step_seconds or not math.isfinite(step_seconds):
        return math.nan
    return flops_per_step / step_seconds / peak


def mfu_cell(value: float | None) -> str:
    """An MFU as a table cell: a percentage, '-' without a time, :data:`UNKNOWN_PEAK` without a peak."""
    if value is None:
        return UNKNOWN_PEAK
    return f"{100 * value:.1f}%" if math.isfinite(value) else "-"


@dataclass(frozen=True)
class Row:
    """One timed configuration: ``kind`` ``train`` (mstok stage 1), ``official`` (the official stage 1) or
    an inference part (``encode``, ``decode``, ``decode2``), of ``model`` in ``mode`` (``PRECISION[+compile]``)."""

    kind: str
    model: str
    mode: str

    @property
    def compiled(self) -> bool:
        return self.mode.endswith("+compile")

    @property
    def training(self) -> bool:
        return self.kind in ("train", "official")

    @property
    def label(self) -> str:
        what = "stage 1" if self.training else self.kind
        return f"{self.model} {what} {self.mode}"


@dataclass
class Result(harness.Timed):
    """What one row measured (``times``: seconds per timed step or call); ``error`` or ``skipped`` set and
    ``times`` empty when it did not run."""

    row: Row
    device: str
    batch_size: int
    image_size: int
    forward_flops: int = 0  # forward FLOPs per image of the trained (train) or run (inference) networks
    proxy_flops: int = 0  # forward FLOPs per image of the frozen proxy's encoder (training rows)
    trainable_params: int = 0
    times: list[float] = field(default_factory=list)
    build_s: float = math.nan
    warmup_s: float = math.nan
    loss: float = math.nan
    skipped: str | None = None

    @property
    def model_flops(self) -> int:
        """Model FLOPs per image of one step (3 x forward: forward + backward) or call (1 x forward)."""
        return (3 if self.row.training else 1) * self.forward_flops

    @property
    def median_s(self) -> float:
        return harness.median(self.times)

    @property
    def images_per_s(self) -> float:
        return harness.per_second(self.batch_size, self.times)

    def mfu(self, peak: float | None, with_proxy: bool = False) -> float | None:
        flops = self.model_flops + (self.proxy_flops if with_proxy else 0)
        return mfu(flops * self.batch_size, self.median_s, peak)


# -- command line -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_output_arguments(parser)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--presets", help=f"comma-separated presets (default {','.join(DEFAULT_PRESETS)})")
    parser.add_argument(
        "--modes", help="training modes, PRECISION[+compile] (default: CUDA bf16,bf16+compile,fp32; CPU fp32)"
    )
    parser.add_argument("--infer-modes", help="inference modes (default: CUDA bf16; CPU fp32; '' for none)")
    parser.add_argument("--parts", help=f"inference parts (default {','.join(PARTS)}; '' for none)")
    parser.add_argument("--batch-size", type=int, help="training batch (default: CUDA 32, the official B-64's; CPU 8)")
    parser.add_argument("--infer-batch", type=int, default=32, help="encode/decode batch (default 32)")
    parser.add_argument("--steps", type=int, help="most timed steps (calls) per row (default: CUDA 50; CPU 5)")
    parser.add_argument(
        "--budget", type=float, help="seconds of timed steps (calls) per row before stopping (default: CUDA 10; CPU 3)"
    )
    parser.add_argument(
        "--warmup", type=int, help="untimed steps (calls) per row (default: CUDA 3; CPU 1; one more with compile)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="skip the rows that would start too late to end within this many minutes (default: CUDA 7; CPU 0 = "
        "no limit)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s (default: by name)")
    parser.add_argument("--official", type=Path, help="a checkout of bytedance/1d-tokenizer: time its TiTok stage 1")
    parser.add_argument(
        "--official-config", default=OFFICIAL_CONFIG, help=f"its training config, in DIR (default {OFFICIAL_CONFIG})"
    )
    parser.add_argument(
        "--official-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the official config (OmegaConf dot-list; repeatable)",
    )
    args = parser.parse_args(argv)
    cuda = harness.resolve_device(parser, args)
    args.presets = harness.names(args.presets, DEFAULT_PRESETS)
    args.modes = harness.names(args.modes, ("bf16", "bf16+compile", "fp32") if cuda else ("fp32",))
    args.infer_modes = harness.names(args.infer_modes, ("bf16",) if cuda else ("fp32",))
    args.parts = harness.names(args.parts, PARTS)
    args.batch_size = args.batch_size or (32 if cuda else 8)
    args.steps = args.steps if args.steps is not None else (50 if cuda else 5)
    args.budget = args.budget if args.budget is not None else (10.0 if cuda else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.max_minutes = args.max_minutes if args.max_minutes is not None else (7.0 if cuda else 0.0)
    if not args.presets:
        parser.error("--presets names none")
    for name in args.presets:
        try:
            cfg = preset_config(name)
        except ValueError as err:
            parser.error(str(err))
        if cfg.family == "maskgit_vqgan" or cfg.image_size not in PROXY_FOR_SIZE:
            parser.error(f"--presets: {name} has no two-stage training here (a proxy, or no proxy for its size)")
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; known: {', '.join(PARTS)}")
    harness.check_timing(parser, args, "--steps", "--modes")
    for mode in args.infer_modes:
        precision, _, extra = mode.partition("+")
        if precision not in harness.DTYPES or extra not in ("", "compile"):
            parser.error(f"--infer-modes: {mode!r} is not PRECISION[+compile] with PRECISION fp32, bf16 or fp16")
    if args.batch_size < 1 or args.infer_batch < 1:
        parser.error("--batch-size and --infer-batch must be >= 1")
    if args.official is not None and not (args.official / "modeling" / "titok.py").is_file():
        parser.error(f"--official {args.official}: no modeling/titok.py there (a bytedance/1d-tokenizer checkout)")
    if args.official is not None and not (args.official / args.official_config).is_file():
        parser.error(f"--official-config: {args.official / args.official_config} not found")
    return args


def official_label(args: argparse.Namespace) -> str:
    """The official row's name: TiTok-B-64 with its own config, else the config's name, marked when changed."""
    if args.official_config == OFFICIAL_CONFIG and not args.official_set:
        return OFFICIAL_LABEL
    return f"official TiTok ({Path(args.official_config).stem}{', changed' if args.official_set else ''})"


def make_rows(args: argparse.Namespace) -> list[Row]:
    """Rows in the order they run: bf16 training (the first mode without bf16; each official row after the
    mstok rows of its mode), the inference rows, then the other training modes, compiled ones first."""
    first = ["bf16" if "bf16" in args.modes else args.modes[0]]
    rest = sorted((m for m in args.modes if m not in first), key=lambda m: (not m.endswith("+compile"), m))
    official = args.official is not None

    def training(mode: str) -> list[Row]:
        return [Row("train", p, mode) for p in args.presets] + [Row("official", official_label(args), mode)] * official

    inference = [Row(part, p, m) for m in args.infer_modes for p in args.presets for part in args.parts]
    return [*(r for m in first for r in training(m)), *inference, *(r for m in rest for r in training(m))]


# -- the rows -------------------------------------------------------------------------------------------------


@functools.cache
def image_batches(batch_size: int, image_size: int) -> tuple[torch.Tensor, ...]:
    """Two random image batches in [0, 1] (alternated, like fresh data), the same for every row of a size."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.rand(batch_size, 3, image_size, image_size, generator=gen) for _ in range(2))


def pinned(batches: tuple[torch.Tensor, ...], device: torch.device) -> list[torch.Tensor]:
    """``batches`` pinned on CUDA (as the trainer's loader pins them), else as they are."""
    return [b.pin_memory() for b in batches] if device.type == "cuda" else list(batches)


@functools.cache
def stage1_flops(preset: str) -> tuple[int, int]:
    """(forward FLOPs per image of the stage-1 model's encoder + decoder with its proxy-code head, of its
    proxy's encoder), counted on the meta device."""
    with torch.device("meta"):
        tok = create_tokenizer(preset, head="proxy_codes")
        proxy = create_tokenizer(PROXY_FOR_SIZE[tok.config.image_size])
    flops = tokenizer_flops(tok)
    size = tok.config.image_size
    return flops["encoder"] + flops["decoder"], count_flops(proxy.encoder, torch.empty(1, 3, size, size, device="meta"))


def build_tokenizer(preset: str, part: str, device: torch.device | str) -> Any:
    """The tokenizer an inference row runs (random weights, eval mode) on ``device`` (``meta`` to count)."""
    overrides: dict[str, Any] = {}
    if part == "decode2":
        proxy = PROXY_FOR_SIZE[preset_config(preset).image_size]
        overrides = {"head": "proxy_codes", "pixel_decoder": preset_config(proxy).to_dict()}
    torch.manual_seed(0)
    with harness.fast_init(), torch.device(device):
        return create_tokenizer(preset, **overrides).eval()


@functools.cache
def part_flops(preset: str, part: str) -> int:
    """Forward FLOPs per image of an inference row's call (the quantizer not counted)."""
    tok = build_tokenizer(preset, part, "meta")
    flops = tokenizer_flops(tok)
    if part == "encode":
        return flops["encoder"]
    if part == "decode":
        return flops["decoder"]
    logits = torch.empty(1, tok.config.num_patches, tok.config.proxy_codebook_size, device="meta")
    return flops["decoder"] + count_flops(tok.pixel_decoder, logits)


def timed_steps(result: Result, step: Callable[[], Any], args: argparse.Namespace, device: torch.device) -> Any:
    """Warm up (timed apart, as start-up cost) then time ``step`` until ``--steps`` or ``--budget``; fills
    ``result``; returns the last step's output."""
    out: Any = None

    def call() -> list[float]:
        nonlocal out
        out, seconds = harness.timed(device, step)
        return [seconds]

    warmup = args.warmup + (1 if result.row.compiled else 0)
    started = time.perf_counter()
    for _ in range(warmup):
        call()
    harness.synchronize(device)
    result.warmup_s = time.perf_counter() - started
    result.times = [t[0] for t in harness.time_calls(call, 0, args.steps, args.budget)]
    result.peak_mem_bytes = harness.peak_bytes(device)
    return out


def train_row(result: Result, args: argparse.Namespace, proxies: dict[int, Path], tmp: Path) -> None:
    """mstok's stage-1 ``Trainer.train_step`` on the row's preset."""
    row, device = result.row, torch.device(args.device)
    result.forward_flops, result.proxy_flops = stage1_flops(row.model)
    started = time.perf_counter()
    steps = args.warmup + args.steps + 2  # a schedule longer than the steps run
    trainer = harness.stage_trainer(
        row.model, "stage1", row.mode, args.device, args.batch_size, steps, proxies, tmp, quick_init=True
    )
    result.build_s = time.perf_counter() - started
    result.trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    batches = pinned(image_batches(args.batch_size, result.image_size), device)
    labels = torch.zeros(args.batch_size, dtype=torch.long)
    calls = itertools.count()

    def step() -> dict[str, torch.Tensor]:
        terms = trainer.train_step([(batches[next(calls) % 2], labels)])
        trainer.step += 1  # as fit() does: the schedules read it
        return terms

    terms = timed_steps(result, step, args, device)
    result.loss = float(terms["loss"])


# -- the official TiTok ---------------------------------------------------------------------------------------


def import_official(official_dir: Path) -> dict[str, Any]:
    """The official classes, imported from ``official_dir`` (its ``modeling`` package goes on ``sys.path``;
    ``utils/lr_schedulers.py`` is loaded by path, since a top-level ``utils`` may be another package).
    Needs what their modules import: omegaconf, einops, huggingface_hub, accelerate, torchvision."""
    official_dir = official_dir.resolve()
    loaded = sys.modules.get("modeling")
    if loaded is not None and Path(loaded.__file__ or "").resolve().parent.parent != official_dir:
        raise ImportError(f"a package 'modeling' from {loaded.__file__} is already imported")
    if str(official_dir) not in sys.path:
        sys.path.insert(0, str(official_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # their torch.cuda.amp.autocast decorators
        from modeling.modules.ema_model import EMAModel
        from modeling.modules.losses import ReconstructionLoss_Stage1
        from modeling.modules.maskgit_vqgan import Decoder, Encoder, VectorQuantizer
        from modeling.titok import PretrainedTokenizer, TiTok
        from omegaconf import OmegaConf
    spec = importlib.util.spec_from_file_location("_official_lr_schedulers", official_dir / "utils/lr_schedulers.py")
    schedulers: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schedulers)
    return {"TiTok": TiTok, "PretrainedTokenizer": PretrainedTokenizer, "loss": ReconstructionLoss_Stage1,
            "EMAModel": EMAModel, "Encoder": Encoder, "Decoder": Decoder, "VectorQuantizer": VectorQuantizer,
            "OmegaConf": OmegaConf, "get_scheduler": schedulers.get_scheduler}  # fmt: skip


def official_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups as the official ``create_optimizer`` (utils/train_utils.py) makes them: no decay for
    1-D parameters, layer norms, biases, latent/mask tokens and embeddings."""

    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return (p.ndim < 2 or "ln" in n or "bias" in n or "latent_tokens" in n or "mask_token" in n
                or "embedding" in n or "norm" in n or "gamma" in n or "embed" in n)  # fmt: skip

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def random_official_proxy(official: dict[str, Any], tmp: Path) -> Any:
    """The official ``PretrainedTokenizer`` (MaskGIT-VQGAN f16, 1024 codes) loaded from a file of random
    weights: its architecture, as its ``__init__`` fixes it, saved once and read by its own code."""
    conf = official["OmegaConf"].create(OFFICIAL_PROXY_CONF)
    path = tmp / "official_proxy_random.bin"
    if not path.exists():
        with torch.device("cpu"):
            holder = torch.nn.Module()
            holder.encoder = official["Encoder"](conf)
            holder.decoder = official["Decoder"](conf)
            holder.quantize = official["VectorQuantizer"](num_embeddings=1024, embedding_dim=256, commitment_cost=0.25)
        torch.save(holder.state_dict(), path)
    return official["PretrainedTokenizer"](str(path))


def to_fp32(value: Any) -> Any:
    """Floating tensors in ``value`` (a tensor, or a dict of them) as float32: what accelerate's
    ``convert_outputs_to_fp32`` does to a prepared model's outputs under mixed precision."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_fp32(v) for k, v in value.items()}
    return value


@dataclass
class OfficialStep:
    """The official stage-1 step: ``step(images) -> loss``, what it trains, its proxy, its config, and
    ``restore()``, which undoes the global settings it made (TF32, cuDNN benchmark)."""

    step: Callable[[torch.Tensor], torch.Tensor]
    model: torch.nn.Module
    proxy: torch.nn.Module
    config: Any
    restore: Callable[[], None]


def official_stage1(
    official_dir: Path, config_path: str, overrides: list[str], mode: str, device: torch.device, tmp: Path
) -> OfficialStep:
    """The official TiTok stage-1 training step, built with their code from their config (``config_path`` in
    ``official_dir``, with ``overrides``, an OmegaConf dot-list), in ``mode`` on ``device``.

    As their ``scripts/train_titok.py`` + ``train_one_epoch`` do for stage 1 (one GPU, no gradient
    accumulation): TF32 and cuDNN benchmark on; the proxy codes from their ``PretrainedTokenizer`` outside
    autocast (accelerate prepares only the model in stage 1); the model's forward under autocast with its
    outputs cast to float32 (accelerate's mixed precision: bf16 here, fp16 in their config); their
    ``ReconstructionLoss_Stage1`` (proxy-code cross-entropy + quantizer loss); backward; gradient clipping
    at ``training.max_grad_norm``; AdamW with their parameter groups and betas; their LR scheduler;
    ``zero_grad(set_to_none=True)``; their EMA (decay 0.999). Left out: the per-step ``gather().item()``
    of the logged losses and the data loader. ``+compile``: ``torch.compile`` of the model."""
    official = import_official(official_dir)
    conf = official["OmegaConf"]
    config = conf.merge(conf.load(official_dir / config_path), conf.from_dotlist(list(overrides)))
    config.model.vq_model.finetune_decoder = False  # stage 1
    backends = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    if device.type == "cuda" and config.training.get("enable_tf32", True):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    def restore() -> None:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = (
            backends
        )

    torch.manual_seed(0)
    with harness.fast_init(), torch.device(device):
        model = official["TiTok"](config)
        proxy = random_official_proxy(official, tmp)
    model.train()
    loss_module = official["loss"](config=config).to(device)
    opt = config.optimizer.params
    optimizer = torch.optim.AdamW(
        official_parameter_groups(model, opt.weight_decay), lr=opt.learning_rate, betas=(opt.beta1, opt.beta2)
    )
    scheduler = official["get_scheduler"](
        config.lr_scheduler.scheduler,
        optimizer=optimizer,
        num_training_steps=config.training.max_train_steps,
        num_warmup_steps=config.lr_scheduler.params.warmup_steps,
        base_lr=config.lr_scheduler.params.learning_rate,
        end_lr=config.lr_scheduler.params.end_lr,
    )
    ema = official["EMAModel"](model.parameters(), decay=0.999, model_cls=official["TiTok"], config=config)
    forward = torch.compile(model) if mode.endswith("+compile") else model
    precision = mode.partition("+")[0]
    max_grad_norm = config.training.get("max_grad_norm", None)

    def step(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, memory_format=torch.contiguous_format, non_blocking=True)
        proxy.eval()
        proxy_codes = proxy.encode(images)
        with harness.autocast(device, precision):
            reconstructed, extra = forward(images)
        loss, _ = loss_module(proxy_codes, to_fp32(reconstructed), to_fp32(extra))
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        return loss.detach()

    return OfficialStep(step, model, proxy, config, restore)


def official_row(result: Result, args: argparse.Namespace, tmp: Path) -> None:
    """The official TiTok stage-1 step (:func:`official_stage1`) on the batch the mstok rows of its image
    size get."""
    device = torch.device(args.device)
    started = time.perf_counter()
    official = official_stage1(args.official, args.official_config, args.official_set, result.row.mode, device, tmp)
    try:
        result.build_s = time.perf_counter() - started
        result.image_size = int(official.config.dataset.preprocessing.crop_size)
        result.trainable_params = sum(p.numel() for p in official.model.parameters() if p.requires_grad)
        batches = pinned(image_batches(args.batch_size, result.image_size), device)
        one = batches[0][:1].to(device)
        # their whole forward (encoder, quantizer, decoder with its proxy-code head), counted as mstok's is
        result.forward_flops = count_flops(official.model, one)
        result.proxy_flops = count_flops(official.proxy.encoder, one)
        calls = itertools.count()
        result.loss = float(timed_steps(result, lambda: official.step(batches[next(calls) % 2]), args, device))
    finally:
        official.restore()


# -- inference -------------------------------------------------------------------------------------------------


def infer_row(result: Result, args: argparse.Namespace) -> None:
    """``encode(images)`` / ``decode(tokens)`` of the row's preset under inference mode and autocast."""
    row, device = result.row, torch.device(args.device)
    result.forward_flops = part_flops(row.model, row.kind)
    started = time.perf_counter()
    tok = build_tokenizer(row.model, row.kind, device)
    result.build_s = time.perf_counter() - started
    cfg, gen = tok.config, torch.Generator().manual_seed(0)
    if row.kind == "encode":
        images = image_batches(args.infer_batch, cfg.image_size)[0].to(device)
        run = lambda: tok.encode(images)  # noqa: E731
    else:
        k = cfg.num_latent_tokens
        if tok.vocab_size is None:  # a continuous bottleneck decodes float latents (B, K, C)
            tokens = torch.randn(args.infer_batch, k, cfg.code_dim, generator=gen).to(device)
        else:
            tokens = torch.randint(0, tok.vocab_size, (args.infer_batch, k), generator=gen).to(device)
        run = lambda: tok.decode(tokens)  # noqa: E731
    precision = row.mode.partition("+")[0]
    with harness.compiled_parts(tok, ("encoder", "decoder", "pixel_decoder"), row.compiled):

        def call() -> Any:
            with torch.inference_mode(), harness.autocast(device, precision):
                return run()

        timed_steps(result, call, args, device)


# -- the run ----------------------------------------------------------------------------------------------------


def reserve_s(row: Row, args: argparse.Namespace) -> float:
    """Seconds a row is assumed to need beyond its timed ones (build, warm-up, compilation), for
    ``--max-minutes``: generous for a compiled training step."""
    if row.compiled:
        return 100.0 if row.training else 60.0
    return 25.0 if row.training else 10.0


def new_result(row: Row, args: argparse.Namespace) -> Result:
    """The row's result before it runs (the official row's image size is set from its config as it runs)."""
    size = preset_config(row.model).image_size if row.kind != "official" else 256
    return Result(row, args.device, args.batch_size if row.training else args.infer_batch, size)


class Stopped(BaseException):
    """SIGTERM (``gpu_check.sh``'s hard time limit) while rows run: the rest are reported as skipped and the
    tables still printed and written. Not an ``Exception``, so that no row's error handling swallows it."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Stopped` in the main thread while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Stopped()

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def time_row(row: Row, args: argparse.Namespace, proxies: dict[int, Path], tmp: Path, clock: harness.Clock) -> Result:
    """Run one row (or skip it for time); a failure is reported in the row, never raised."""
    result = new_result(row, args)
    if args.max_minutes and clock.minutes * 60 + args.budget + reserve_s(row, args) > args.max_minutes * 60:
        result.skipped = f"time: --max-minutes {args.max_minutes:g}"
        return result
    harness.release(args.device)
    harness.reset_peak(args.device)
    try:
        if row.kind == "train":
            train_row(result, args, proxies, tmp)
        elif row.kind == "official":
            official_row(result, args, tmp)
        else:
            infer_row(result, args)
        if row.training and not math.isfinite(result.loss):
            raise FloatingPointError(f"non-finite loss {result.loss}")
    except Exception as err:  # report the row and go on: one bad row must not lose the run
        result.times = []
        result.error = harness.failure(err)
    finally:
        harness.release(args.device, compiled=row.compiled)
    return result


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else harness.cpu_name()


def official_rate(results: list[Result], mode: str) -> float | None:
    """images/s of the official row in ``mode``, when it ran."""
    for r in results:
        if r.row.kind == "official" and r.row.mode == mode and r.times:
            return r.images_per_s
    return None


def rate(value: float) -> str:
    """A rate (images/s, TFLOP/s) with about 3 significant digits, without an exponent."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def status(r: Result) -> str | None:
    """Why a row has no numbers ('failed', 'skipped (...)'), None when it has them."""
    if r.error:
        return "failed"
    if r.skipped:
        return f"skipped ({r.skipped})"
    return None if r.times else "no timed steps"


def train_table(results: list[Result], peak: float | None, official_given: bool) -> str:
    head = ["model", "mode", "batch", "image", "trainable M", "fwd GFLOPs/img", "proxy GFLOPs/img",
            "timed steps", "median step (ms)", "images/s", "model TFLOP/s", "MFU", "MFU +proxy",
            "÷ official", "peak mem (GiB)", "build (s)", "warm-up (s)"]  # fmt: skip
    rows = []
    for r in (r for r in results if r.row.training):
        name = f"{r.row.model} stage 1" if r.row.kind == "train" else r.row.model
        cells = [name, f"{r.device} {r.row.mode}", str(r.batch_size), str(r.image_size)]
        cells.append(f"{r.trainable_params / 1e6:.1f}" if r.trainable_params else "-")
        cells += [f"{r.forward_flops / 1e9:.2f}" if r.forward_flops else "-",
                  f"{r.proxy_flops / 1e9:.2f}" if r.proxy_flops else "-"]  # fmt: skip
        why = status(r)
        if why:
            cells += ["-", "-", why, "-", "-", "-", "-", "-", "-", "-"]
        else:
            official = official_rate(results, r.row.mode)
            if r.row.kind == "official":
                ratio = "1.00"
            elif official and r.image_size == next(x.image_size for x in results if x.row.kind == "official"):
                ratio = f"{r.images_per_s / official:.2f}"
            else:
                ratio = "-"
            tflops = r.model_flops * r.images_per_s / 1e12
            cells += [str(len(r.times)), f"{1e3 * r.median_s:.1f}", rate(r.images_per_s), rate(tflops),
                      mfu_cell(r.mfu(peak)), mfu_cell(r.mfu(peak, with_proxy=True)), ratio,
                      harness.gib(r.peak_mem_bytes), f"{r.build_s:.1f}", f"{r.warmup_s:.1f}"]  # fmt: skip
        rows.append(cells)
    if not official_given:
        rows.append([OFFICIAL_LABEL, NOT_RUN_OFFICIAL, *["-"] * (len(head) - 2)])
    return harness.markdown_table(head, rows, left=2)


def infer_table(results: list[Result], peak: float | None) -> str:
    head = ["model", "part", "mode", "batch", "fwd GFLOPs/img", "timed calls", "median call (ms)", "images/s",
            "TFLOP/s", "MFU", "peak mem (GiB)", "build (s)", "warm-up (s)"]  # fmt: skip
    rows = []
    for r in (r for r in results if not r.row.training):
        cells = [r.row.model, PART_TEXT[r.row.kind], f"{r.device} {r.row.mode}", str(r.batch_size)]
        cells.append(f"{r.forward_flops / 1e9:.2f}" if r.forward_flops else "-")
        why = status(r)
        if why:
            cells += ["-", "-", why, "-", "-", "-", "-", "-"]
        else:
            tflops = r.model_flops * r.images_per_s / 1e12
            cells += [str(len(r.times)), f"{1e3 * r.median_s:.1f}", rate(r.images_per_s), rate(tflops),
                      mfu_cell(r.mfu(peak)), harness.gib(r.peak_mem_bytes), f"{r.build_s:.1f}",
                      f"{r.warmup_s:.1f}"]  # fmt: skip
        rows.append(cells)
    return harness.markdown_table(head, rows, left=3)


def describe(r: Result) -> str:
    why = status(r)
    if why:
        return why + (f": {r.error}" if r.error else "")
    return (f"{rate(r.images_per_s)} images/s (median {1e3 * r.median_s:.1f} ms, {len(r.times)} timed; build "
            f"{r.build_s:.1f} s, warm-up {r.warmup_s:.1f} s)")  # fmt: skip


def main(argv: list[str] | None = None) -> list[Result]:
    """Run the check; returns one :class:`Result` per row (failed rows carry ``error``, skipped ``skipped``)."""
    args = parse_args(argv)
    return harness.with_threads(args.threads, lambda: run(args, argv))


def run(args: argparse.Namespace, argv: list[str] | None) -> list[Result]:
    """Time every row, print the tables and write the section unless ``--no-write``."""
    rows = make_rows(args)
    clock = harness.Clock()
    name = device_name(args.device)
    peak_info = peak_flops(name, args.peak_tflops) if (args.device == "cuda" or args.peak_tflops) else None
    peak = peak_info[1] if peak_info else None
    print(f"GPU check: {len(rows)} rows on {args.device} ({harness.machine_line(args.device)}); peak "
          f"{peak_info[0] if peak_info else UNKNOWN_PEAK}", flush=True)  # fmt: skip
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="mstok_gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        proxies = harness.save_proxies(args.presets, tmp, quick_init=True)
        stopped = False
        for row in rows:
            row_start = time.perf_counter()
            if stopped:
                result = new_result(row, args)
                result.skipped = "time: stopped by SIGTERM"
            else:
                try:
                    with stop_on_sigterm():
                        result = time_row(row, args, proxies, tmp, clock)
                except Stopped:
                    stopped = True
                    result = new_result(row, args)
                    result.skipped = "time: stopped by SIGTERM as it ran"
            result.load_after = clock.seen()
            results.append(result)
            print(f"  {row.label}: {describe(result)} ({time.perf_counter() - row_start:.0f} s)", flush=True)
    blocks = [train_table(results, peak, args.official is not None)]
    if any(not r.row.training for r in results):
        blocks.append(infer_table(results, peak))
    failed_notes = harness.print_outcome(clock, blocks, results, lambda r: r.row.label)
    notes = make_notes(args, results, name, peak_info, clock)
    harness.publish(args, "gpu_check", "GPU check", __file__, argv, blocks, notes + failed_notes, args.device)
    return results


def make_notes(
    args: argparse.Namespace,
    results: list[Result],
    name: str,
    peak_info: tuple[str, float] | None,
    clock: harness.Clock,
) -> list[str]:
    """The section's notes: what the rows do, how MFU is counted, the official row, the machine's load."""
    sync, peak_mem, _ = harness.measured_notes(
        args.device, "around each step or call", "the row (reset before it is built: weights, optimizer state, EMA, "
        "the proxy and activations)"
    )  # fmt: skip
    peak_text = peak_info[0] if peak_info else f"{UNKNOWN_PEAK} for {name} (pass --peak-tflops)"
    notes = [
        "- Training rows: mstok's `Trainer.train_step` in two-stage stage 1 (proxy-code cross-entropy + VQ against a "
        "frozen MaskGIT-VQGAN proxy with random weights: maskgit_vqgan_f16 at 256 px, vqgan_tiny at 64 px), the "
        "trainer train_step.py's `stage1` rows build (`harness.stage_trainer`): proxy codes (bf16 autocast on CUDA), "
        "forward, losses, backward, grad clipping, fused AdamW, LR schedule, EMA, dead-code revival, codebook "
        "statistics. Random batches in [0, 1], made beforehand and pinned, are handed to the step (no data loading). "
        "Random weights (a clamped normal for truncated-normal init: same compute).",
        f"- MFU = model FLOPs per step / median step time / peak ({peak_text}). Model FLOPs per step = 3 x the forward "
        "FLOPs of the trained networks (`fwd GFLOPs/img`: encoder + decoder with its proxy-code head, "
        "`mstok.evaluation.flops.tokenizer_flops`, matmuls and convolutions at 2 FLOPs per multiply-add, attention "
        "included) x batch; forward + backward taken as 3 x forward. Not counted: the frozen proxy's encoder "
        "(`proxy GFLOPs/img`, run once per step without gradients; `MFU +proxy` adds it once), the quantizer's code "
        "lookup, the losses, element-wise ops and the optimizer. `model TFLOP/s` = model FLOPs per image x images/s. "
        "fp32 rows run their matmuls as TF32 (the trainer enables it on CUDA) and are still divided by the bf16 "
        "peak. Inference rows: MFU = forward FLOPs per image x images/s / peak.",
        f"- {args.warmup} warm-up step(s) or call(s) per row (one more with compile), timed apart as `warm-up (s)`: "
        "for a `+compile` row that is torch.compile's start-up cost (compare with the eager row); `build (s)` is "
        f"building the model, trainer, optimizer and EMA. Then up to {args.steps} timed steps, stopping once "
        f"{args.budget:g} s of them have passed (at least one); {sync}images/s = batch / median step; {peak_mem}.",
        "- Inference rows: `tokenizer.encode(images)` (value checks, encoder, quantizer), `tokenizer.decode(tokens)` "
        "(random ids, the preset's ViT decoder to pixels) and `decode (two-stage, to pixels)` (a `head='proxy_codes'` "
        "tokenizer whose pixel decoder is the proxy's codebook + VQGAN decoder), eval mode, `torch.inference_mode`, "
        "autocast in the row's precision; `+compile` compiles the encoder, decoder and pixel decoder.",
    ]
    if args.official is None:
        notes.append(f"- `{OFFICIAL_LABEL}`: {NOT_RUN_OFFICIAL}, a checkout of bytedance/1d-tokenizer.")
    else:
        sets = f" with {' '.join(args.official_set)}" if args.official_set else ""
        notes.append(
            f"- `{official_label(args)}`: the official code from `{args.official}` (imported at run time), their "
            f"`{args.official_config}`{sets}, same batch and images: their TiTok, their PretrainedTokenizer "
            "(random weights) for the proxy codes (fp32/TF32 outside autocast, as their stage 1 runs it), the "
            "forward under autocast with outputs cast to fp32 (accelerate's mixed precision; their config uses "
            "fp16, bf16 here), their ReconstructionLoss_Stage1, backward, clipping at their max_grad_norm, torch "
            "AdamW with their parameter groups (foreach, where mstok uses fused), their LR schedule, their EMA; "
            "cuDNN benchmark on as their script sets it. Without the per-step logging `.item()` syncs and the "
            "data loader. `÷ official` = this row's images/s / the official row's in the same mode. Its MFU "
            "counts 3 x its whole forward (encoder, quantizer, decoder; the quantizer's distance matmul is "
            "~0.01% of it)."
        )
    notes.append(
        harness.load_note(clock, "on a GPU the host's load matters little unless it starves the Python thread")
    )
    return notes


if __name__ == "__main__":
    sys.exit(1 if any(r.error for r in main()) else 0)
