"""Forward GFLOPs of TiTok-B and MsTok-B as the number of latent tokens K grows.

TiTok runs its K latents through the encoder (and decoder) ViT together with the P = 256
patch tokens, so every block pays for 1 + P + K tokens: cost grows linearly in K through the
linear layers and quadratically through attention (about 1.85x from K = 32 to 256 at B size).
MsTok's backbones never see K; only the query attention module does, linearly (plus a small
K^2 query self-attention), so cost stays nearly flat.

Two-stage decoding to pixels goes further: the decoder predicts proxy-code logits and the
MaskGIT-VQGAN conv decoder turns their codebook mix into pixels. That pixel decoder costs the
same for every model and K, and at 256x256 it is several times a ViT decoder, so it dominates
the two-stage decode; the second table adds it to each decoder (with its proxy-code head).

Builds one model at a time on the meta device (counts depend only on shapes) at 256x256,
batch 1, counts FLOPs with :func:`mstok.evaluation.flops.tokenizer_flops`, prints markdown
tables with ratios to the smallest K, checks the targets, draws cost vs K into ``--plot``
and writes its section of ``--out`` in place (``harness.write_section``).

    python benchmarks/flops_vs_tokens.py --out benchmarks/RESULTS.md --ks 32,64,128,256 --models titok_b64,mstok_b64
    python benchmarks/flops_vs_tokens.py --models titok_tiny,mstok_tiny --ks 8,32 --image-size 64 --no-write --no-plot

Exits 1 if a target fails.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import mstok
from mstok.evaluation.flops import count_flops, tokenizer_flops
from mstok.tokenizers.registry import PRESETS, preset_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/harness.py, also when loaded by path
import harness

PARTS = ("encoder", "decoder", "total")
# two-stage entries of a result: decoder with the proxy-code head, pixel decoder, their sum
TWO_STAGE_PARTS = ("proxy_decoder", "pixel_decoder", "two_stage_decode")
Results = dict[tuple[str, int], dict[str, int]]  # (preset, K) -> FLOPs per part
# the figure for the official MaskGIT-VQGAN decoder at 256x256, per image
VQGAN_F16_GFLOPS = (180.0, 192.0)


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
    harness.add_output_arguments(parser)
    parser.add_argument("--ks", default="32,64,128,256", help="comma-separated numbers of latent tokens K")
    parser.add_argument("--models", default="titok_b64,mstok_b64", help="comma-separated preset names")
    parser.add_argument("--image-size", type=int, default=256, help="image resolution (square)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--pixel-decoder",
        default="auto",
        help="MaskGIT-VQGAN preset for the two-stage rows: auto (the one whose downsampling equals the model's "
        "patch size), a preset name, or none",
    )
    plot = parser.add_mutually_exclusive_group()
    plot.add_argument(
        "--plot", type=Path, default=Path("benchmarks/flops_vs_tokens.png"), help="PNG of GFLOPs vs K to write"
    )
    plot.add_argument("--no-plot", action="store_true", help="draw no plot")
    args = parser.parse_args(argv)
    args.ks = sorted({int(k) for k in harness.names(args.ks)})
    args.models = harness.names(args.models)
    if not args.ks or not args.models:
        parser.error("--ks and --models must each name at least one value")
    if args.pixel_decoder not in ("auto", "none"):
        try:
            family = preset_config(args.pixel_decoder).family
        except ValueError as err:
            parser.error(str(err))
        if family != "maskgit_vqgan":
            parser.error(f"--pixel-decoder: {args.pixel_decoder} is not a MaskGIT-VQGAN preset")
    if args.no_plot:
        args.plot = None
    return args


def pixel_decoder_for(name: str, choice: str, image_size: int) -> dict[str, Any] | None:
    """The MaskGIT-VQGAN config fields to decode ``name``'s proxy codes at ``image_size``, or None.

    ``auto`` picks the proxy preset whose code grid is the model's patch grid (f16 for patch 16,
    f8 for patch 8); None where there is no such preset or ``choice`` is ``none``.
    """
    if choice == "none":
        return None
    patch = preset_config(name).patch_size
    proxies = [p for p in PRESETS if preset_config(p).family == "maskgit_vqgan"] if choice == "auto" else [choice]
    for proxy in proxies:
        try:
            cfg = preset_config(proxy, image_size=image_size)
        except ValueError:  # image_size does not fit this proxy's downsampling
            continue
        if cfg.downsample_factor == patch:
            return {"preset": proxy, **cfg.to_dict()}
    return None


def decode_probabilities_flops(proxy: str, image_size: int, batch_size: int) -> int:
    """FLOPs of ``MaskGITVQGAN.decode_probabilities`` (codebook mix + conv decoder) on the meta device."""
    with torch.device("meta"):
        vqgan = mstok.create_tokenizer(proxy, image_size=image_size)
    cfg = vqgan.config
    probs = torch.empty(batch_size, cfg.num_tokens, cfg.codebook_size, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        vqgan.decode_probabilities(probs)
    return int(counter.get_total_flops())


def measure(models: list[str], ks: list[int], image_size: int, batch_size: int, pixel_decoder: str = "none") -> Results:
    """FLOPs per (model, K), plus the two-stage parts where a pixel decoder fits; one model at a time.

    Models are built on the meta device: the counts depend only on shapes, and B/L models then
    cost neither memory nor compute (or a slow weight init).
    """
    results: Results = {}
    for name in models:
        proxy = pixel_decoder_for(name, pixel_decoder, image_size)
        for k in ks:
            start = time.perf_counter()
            with torch.device("meta"):
                tokenizer = mstok.create_tokenizer(name, num_latent_tokens=k, image_size=image_size)
            flops = tokenizer_flops(tokenizer, batch_size=batch_size)
            flops["total"] = flops["encoder"] + flops["decoder"]
            if proxy is not None:
                fields = {key: value for key, value in proxy.items() if key != "preset"}
                with torch.device("meta"):
                    two_stage = mstok.create_tokenizer(
                        name, num_latent_tokens=k, image_size=image_size, head="proxy_codes", pixel_decoder=fields
                    )
                cfg = two_stage.config
                logits = torch.empty(batch_size, cfg.num_patches, cfg.proxy_codebook_size, device="meta")
                flops["proxy_decoder"] = tokenizer_flops(two_stage, batch_size=batch_size)["decoder"]
                flops["pixel_decoder"] = count_flops(two_stage.pixel_decoder, logits)
                flops["two_stage_decode"] = flops["proxy_decoder"] + flops["pixel_decoder"]
                del two_stage
            results[name, k] = flops
            del tokenizer
            gc.collect()
            print(f"  {name} K={k}: {flops['total'] / 1e9:.2f} GFLOPs ({time.perf_counter() - start:.1f}s)", flush=True)
    return results


def make_table(results: Results, models: list[str], ks: list[int]) -> str:
    base = ks[0]
    header = ["model", "K"] + [f"{p} GFLOPs" for p in PARTS] + [f"{p} / K={base}" for p in PARTS]
    rows = []
    for name in models:
        for k in ks:
            flops, ref = results[name, k], results[name, base]
            cells = [name, str(k)]
            cells += [f"{flops[p] / 1e9:.2f}" for p in PARTS]
            cells += [f"{flops[p] / ref[p]:.3f}x" for p in PARTS]
            rows.append(cells)
    return harness.markdown_table(header, rows, left=2)


def make_two_stage_table(results: Results, models: list[str], ks: list[int], proxies: dict[str, str]) -> str:
    """Decoder (proxy-code head) + pixel decoder per (model, K); empty when no model has a pixel decoder."""
    base = ks[0]
    header = [
        "model",
        "K",
        "pixel decoder",
        "decoder GFLOPs (proxy head)",
        "pixel decoder GFLOPs",
        "decode to pixels GFLOPs",
        "pixel decoder share",
        "vs one-stage decoder",
        f"decode to pixels / K={base}",
    ]
    rows = []
    for name in models:
        if name not in proxies:
            continue
        for k in ks:
            flops, ref = results[name, k], results[name, base]
            cells = [name, str(k), proxies[name]]
            cells += [f"{flops[p] / 1e9:.2f}" for p in TWO_STAGE_PARTS]
            cells.append(f"{100 * flops['pixel_decoder'] / flops['two_stage_decode']:.0f}%")
            cells.append(f"{flops['two_stage_decode'] / flops['decoder']:.2f}x")
            cells.append(f"{flops['two_stage_decode'] / ref['two_stage_decode']:.3f}x")
            rows.append(cells)
    return harness.markdown_table(header, rows, left=3) if rows else ""


def check_pixel_decoder(results: Results, proxies: dict[str, str], image_size: int, batch_size: int) -> list[str]:
    """The MaskGIT-VQGAN f16 pixel decoder's cost per 256x256 image, and that it dominates two-stage decoding."""
    lo, hi = VQGAN_F16_GFLOPS
    measured = [(name, k) for name, k in results if proxies.get(name) == "maskgit_vqgan_f16"]
    if image_size != 256 or not measured:
        return [f"- SKIP: MaskGIT-VQGAN f16 pixel decoder ~186 GFLOPs per 256x256 image ({lo:g}-{hi:g}) (not measured)"]
    per_image = results[measured[0]]["pixel_decoder"] / batch_size / 1e9
    share = min(results[key]["pixel_decoder"] / results[key]["two_stage_decode"] for key in measured)
    return [
        f"- {'PASS' if lo <= per_image <= hi else 'FAIL'}: MaskGIT-VQGAN f16 pixel decoder ~186 GFLOPs per 256x256 "
        f"image ({lo:g}-{hi:g}): measured {per_image:.2f}",
        f"- {'PASS' if share > 0.5 else 'FAIL'}: the pixel decoder is most of every two-stage decode measured: "
        f"smallest share {100 * share:.0f}%",
    ]


def plot_costs(results: Results, models: list[str], ks: list[int], path: Path, title: str) -> Path:
    """Encoder, decoder (and two-stage decode) GFLOPs vs K on a log2 axis, as a small PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)  # draw with Agg whatever backend pyplot would pick
    ax = fig.subplots()
    # TiTok's encoder and decoder cost the same: hollow, larger decoder markers keep both visible
    styles = (
        ("encoder", "encoder", "-", "o", 4),
        ("decoder", "decoder", "--", "s", 7),
        ("two_stage_decode", "decode to pixels (two-stage)", ":", "^", 5),
    )
    for i, name in enumerate(models):
        for part, text, line, marker, size in styles:
            if all(part in results[name, k] for k in ks):
                values = [results[name, k][part] / 1e9 for k in ks]
                face = "none" if part == "decoder" else f"C{i}"
                ax.plot(
                    ks,
                    values,
                    linestyle=line,
                    marker=marker,
                    markersize=size,
                    markerfacecolor=face,
                    color=f"C{i}",
                    label=f"{name} {text}",
                )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("latent tokens K")
    ax.set_ylabel("forward GFLOPs")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in args.models:
        preset_config(name)  # fail fast on a bad preset name
    size = f"{args.image_size}x{args.image_size}"
    print(f"Counting FLOPs for {args.models} at K={args.ks}, {size}, batch {args.batch_size}")
    results = measure(args.models, args.ks, args.image_size, args.batch_size, args.pixel_decoder)
    table = make_table(results, args.models, args.ks)
    target_lines, failed = check_targets(results)
    proxies = {}
    for name in args.models:
        proxy = pixel_decoder_for(name, args.pixel_decoder, args.image_size)
        if proxy is not None:
            proxies[name] = proxy["preset"]
    two_stage_table = make_two_stage_table(results, args.models, args.ks, proxies)
    pixel_lines = check_pixel_decoder(results, proxies, args.image_size, args.batch_size)
    failed |= any(line.startswith("- FAIL") for line in pixel_lines)
    target_lines += pixel_lines
    # the pixel decoder as the proxy itself runs it: must equal the tokenizer's pixel_decoder count
    proxy_lines = []
    for proxy in dict.fromkeys(proxies.values()):
        flops = decode_probabilities_flops(proxy, args.image_size, args.batch_size)
        inside = {
            results[name, k]["pixel_decoder"] for name in args.models if proxies.get(name) == proxy for k in args.ks
        }
        same = "the same as" if inside == {flops} else "DIFFERENT from"
        proxy_lines.append(
            f"- `MaskGITVQGAN.decode_probabilities` of {proxy} at {size}, batch {args.batch_size}: "
            f"{flops / 1e9:.2f} GFLOPs, {same} the two-stage tokenizers' `pixel_decoder`."
        )

    print()
    print(table)
    if two_stage_table:
        print()
        print(two_stage_table)
        print("\n".join(proxy_lines))
    print("\nTargets:")
    print("\n".join(target_lines))
    plot_path = None
    if args.plot is not None:
        title = f"Forward GFLOPs vs K, {size}, batch {args.batch_size}"
        plot_path = plot_costs(results, args.models, args.ks, args.plot, title)
        print(f"\nPlot written to {plot_path}")
    blocks = [table]
    if two_stage_table:
        blocks.append(
            "Two-stage decode to pixels (decoder with the proxy-code head, then the MaskGIT-VQGAN pixel decoder: "
            f"softmax codebook mix + conv decoder):\n\n{two_stage_table}\n\n" + "\n".join(proxy_lines)
        )
    if plot_path:
        blocks.append(f"![GFLOPs vs K]({os.path.relpath(plot_path, args.out.parent)})")
    blocks.append("Targets:\n\n" + "\n".join(target_lines))
    notes = [
        "Forward FLOPs (2 per multiply-add) from FlopCounterMode with attention on the math SDPA backend; "
        f"{size} images, batch {args.batch_size}; quantizer and element-wise ops not counted; models built on the "
        "meta device."
    ]
    harness.publish(args, "flops_vs_tokens", "FLOPs vs number of latent tokens", __file__, argv, blocks, notes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
