"""``mstok demo --official titok_l32``: a released TiTok tokenizer on scikit-image's photos.

The first contact with a real tokenizer: ``make demo`` proves that the tiny models learn, but a
CPU trains them only to blurry 8x8 blocks. This fetches an official TiTok release from the
Hugging Face hub (or reads a local copy in the release's layout), converts it in memory with
:mod:`mstok.persistence.convert.titok`, and reconstructs the photos bundled with scikit-image at
the release's resolution (256 px), with the token count, PSNR and SSIM of each photo.

Offline, a release name fails in one line that says how to give a local copy
(:class:`OfficialUnavailableError`). The web app's model picker loads ``official:<release>``
through :func:`load_official` too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from mstok.data import center_crop_resize, to_tensor
from mstok.demo import HELD_OUT_PHOTOS, TRAIN_PHOTOS, image_grid, skimage_photos
from mstok.device import resolve_device
from mstok.evaluation.metrics import mean_colour, psnr, ssim
from mstok.persistence import load_generator, load_tokenizer
from mstok.persistence.convert.generator import GENERATOR_RELEASES, generator_release_key
from mstok.persistence.convert.titok import HUB_OWNER, RELEASES, release_key
from mstok.storage.weights import MissingWeightsError

PHOTOS = TRAIN_PHOTOS + HELD_OUT_PHOTOS  # none of them is in ImageNet, which the releases were trained on
BATCH = 4  # photos per encode/decode call: bounds the memory of a Large decoder on a CPU


class OfficialUnavailableError(FileNotFoundError):
    """An official release that is neither a local folder nor fetchable (offline, no cached copy)."""


def hub_id(release: str, kind: str = "tokenizer") -> str:
    """``titok_l32`` -> ``yucornetto/tokenizer_titok_l32_imagenet`` (``kind``: tokenizer or generator)."""
    return f"{HUB_OWNER}/{kind}_{release}_imagenet"


def _release_name(source: str, kind: str) -> str:
    """The release key of ``source`` (a release name or hub id), or a ValueError listing the releases."""
    key = release_key(source) if kind == "tokenizer" else generator_release_key(source)
    known = RELEASES if kind == "tokenizer" else GENERATOR_RELEASES
    if key not in known:
        raise ValueError(
            f"{source!r} is neither a folder nor an official TiTok {kind} release; the releases are "
            f"{', '.join(known)} (or give a folder holding one, e.g. from `hf download {hub_id('titok_l32', kind)}`)"
        )
    return key


def load_official(source: str | Path, kind: str = "tokenizer") -> tuple[torch.nn.Module, str]:
    """(model, description) of an official TiTok ``kind`` (``tokenizer`` or ``generator``).

    ``source`` is a release name (``titok_l32``), its hub id, or a local folder in the release's
    layout (``config.json`` + ``model.safetensors``, as ``hf download`` writes it) or already
    converted; a release name is fetched into the hub cache (a cached copy needs no network).

    Raises:
        OfficialUnavailableError: the weights cannot be fetched; its one-line message says how to
            give a local copy.
    """
    loader = load_tokenizer if kind == "tokenizer" else load_generator
    if Path(source).expanduser().exists():
        return loader(Path(source).expanduser()), f"{source} (official TiTok {kind}, local copy)"
    release = _release_name(str(source), kind)
    repo = hub_id(release, kind)
    try:
        return loader(repo), f"{release} (official TiTok {kind}, {repo})"
    except MissingWeightsError as err:
        cause = str(err.__cause__ or err).splitlines()[0].split(". ")[0][:150]
        local = repo.rsplit("/", 1)[-1]
        raise OfficialUnavailableError(
            f"the weights of {release} cannot be fetched from the Hugging Face hub ({cause}); where there "
            f"is internet run `hf download {repo} --local-dir {local}`, copy {local}/ here and give the folder "
            f"instead: `mstok demo --official {local}` (in the app: official:{local})"
        ) from None


def _batches(images: torch.Tensor, size: int):
    for start in range(0, len(images), size):
        yield images[start : start + size]


def run_official_demo(
    source: str | Path, out_dir: str | Path | None = None, device: str = "auto", progress: bool = True
) -> Path:
    """Reconstruct scikit-image's photos with an official TiTok; writes ``grid.png``,
    ``metrics.json`` and ``report.md`` into ``out_dir`` and returns the report's path."""
    say = print if progress else (lambda *_: None)
    model, description = load_official(source)
    name = release_key(str(source)) if not Path(source).exists() else Path(source).name
    out = Path(out_dir) if out_dir else Path("runs/demo") / f"official_{name}"
    out.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device, "--device")
    model = model.to(torch_device).eval()
    cfg = model.config
    size = cfg.image_size
    images = torch.stack([to_tensor(center_crop_resize(photo, size)) for photo in skimage_photos(PHOTOS)])
    say(f"{description}: {cfg.num_latent_tokens} tokens per {size}x{size} image; reconstructing {len(images)} photos")
    started, recons, count = time.perf_counter(), [], 0
    for batch in _batches(images, BATCH):
        with torch.no_grad():
            recon = model.decode(model.encode(batch.to(torch_device))).float().cpu()
        recons.append(recon)
        count += len(batch)
        say(f"  {count}/{len(images)} photos ({time.perf_counter() - started:.0f} s)")
    recon = torch.cat(recons)
    seconds = time.perf_counter() - started
    per_photo = {
        photo: {"psnr": p, "ssim": s}
        for photo, p, s in zip(PHOTOS, psnr(images, recon), ssim(images, recon), strict=True)
    }
    flat = float(np.mean(psnr(images, mean_colour(images))))
    bits = None if model.vocab_size is None else cfg.num_latent_tokens * float(np.log2(model.vocab_size))
    summary = {
        "model": description,
        "tokens_per_image": cfg.num_latent_tokens,
        "bits_per_image": bits,
        "image_size": size,
        "psnr": float(np.mean([m["psnr"] for m in per_photo.values()])),
        "ssim": float(np.mean([m["ssim"] for m in per_photo.values()])),
        "mean_colour_psnr": flat,
        "seconds": seconds,
        "device": str(torch_device),
        "photos": per_photo,
    }
    image_grid([("photo", images), ("TiTok", recon)], scale=1).save(out / "grid.png")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = out / "report.md"
    report.write_text(_report(summary))
    codes = f"{bits:.0f} bits" if bits is not None else f"{cfg.code_dim}-channel latents"
    say(
        f"{cfg.num_latent_tokens} tokens ({codes}) per {size}x{size} image: PSNR {summary['psnr']:.2f} dB, SSIM "
        f"{summary['ssim']:.4f} over {len(images)} photos (mean colour {flat:.2f} dB), {seconds:.0f} s on "
        f"{torch_device}"
    )
    return report


def _report(summary: dict) -> str:
    lines = [
        f"# An official TiTok on scikit-image's photos: {summary['model']}",
        "",
        f"{summary['tokens_per_image']} tokens per {summary['image_size']}x{summary['image_size']} image"
        + (f" ({summary['bits_per_image']:.0f} bits)" if summary["bits_per_image"] else "")
        + f"; mean PSNR {summary['psnr']:.2f} dB (painting each photo in its mean colour: "
        f"{summary['mean_colour_psnr']:.2f} dB), SSIM {summary['ssim']:.4f}; {summary['seconds']:.0f} s on "
        f"{summary['device']}. The photos are center-cropped and resized; none is an ImageNet image.",
        "",
        "| photo | PSNR (dB) | SSIM |",
        "|---|---|---|",
        *(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} |" for name, m in summary["photos"].items()),
        "",
        "![photos (top) and reconstructions (bottom)](grid.png)",
        "",
    ]
    return "\n".join(lines)
