"""What the Tokenize and Compare tabs do, as plain functions of plain values (tested without a browser).

Each handler takes what the page's inputs hold (a model picker's text, an uploaded file's path,
numbers) and returns arrays, tables and Markdown; :mod:`mstok.app.page` only wires them to
Gradio components. Errors are exceptions here; :func:`user_message` turns one into the line the
page shows, so bad input never shows a traceback. The pictures are uint8 arrays: uploads read
safely (:func:`read_image`), the error heat map, and token ids laid out as a grid.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mstok.app.models import ModelCache
from mstok.cli_errors import is_user_error, one_line
from mstok.data import CorruptImageError, center_crop_resize, load_rgb, to_tensor
from mstok.demo import HELD_OUT_PHOTOS, TRAIN_PHOTOS, skimage_photos
from mstok.evaluation.metrics import psnr, ssim

log = logging.getLogger(__name__)
# an upload above this many pixels is refused before decoding (a page must not decode a 1-gigapixel
# file into memory on behalf of a browser); ``mstok app --max-pixels`` raises it
APP_MAX_PIXELS = 40_000_000
EXAMPLES = HELD_OUT_PHOTOS + TRAIN_PHOTOS  # the photos scikit-image ships, offered as examples
HEAT_MAX = 0.25  # mean absolute error (images in [0, 1]) at the top of the heat map's colour scale
VIEW_SIZE = 256  # small images are shown enlarged (nearest neighbour) to at least this side
TOKEN_COLUMNS = 16  # the widest row of the token-id grid


def user_message(err: BaseException) -> str:
    """The line the page shows for ``err``: its message for bad input (the CLI's rule,
    :func:`mstok.cli_errors.is_user_error`), else a short note of a bug whose traceback goes to the log."""
    if is_user_error(err):
        return f"⚠️ {one_line(err)}"
    log.error("app handler failed", exc_info=err)
    return f"⚠️ internal error, a bug (the server log has its traceback): {type(err).__name__}: {one_line(err)}"


def read_image(
    upload: str | Path | None, example: str | None = None, max_pixels: int = APP_MAX_PIXELS
) -> tuple[Image.Image, str]:
    """(RGB image, a note about how it was read) from an uploaded file, else the named example photo.

    Raises a ValueError naming the file (by its name, not the server's temporary path) when it is no
    image, or over ``max_pixels``."""
    if upload:
        path = Path(upload)
        name = path.name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as probe:
                    width, height, mode = *probe.size, probe.mode
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"{name} is not an image file mstok can read ({type(err).__name__})") from None
        if width * height > max_pixels:
            raise ValueError(
                f"{name} is {width}x{height} = {width * height:,} pixels, over this app's limit of {max_pixels:,} "
                "(shrink it, or start the app with a larger --max-pixels)"
            )
        try:
            image = load_rgb(path, max_pixels=max_pixels)
        except CorruptImageError:
            raise ValueError(f"{name} is not an image file mstok can read (it fails to decode)") from None
        wide = " (16-bit or float image, scaled to 8 bits)" if mode in ("I;16", "I;16B", "I", "F") else ""
        return image, f"{name}: {width}x{height} {mode}{wide}"
    if example:
        if example not in EXAMPLES:
            raise ValueError(f"{example!r} is not one of the example photos: {', '.join(EXAMPLES)}")
        return skimage_photos((example,))[0], f"{example} (a photo shipped with scikit-image)"
    raise ValueError("upload an image or pick an example photo first")


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """One image (3, H, W) in [0, 1] -> an (H, W, 3) uint8 array."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def enlarged(array: np.ndarray, side: int = VIEW_SIZE) -> np.ndarray:
    """``array`` repeated pixel by pixel so that its short side reaches ``side`` (pixels stay visible)."""
    factor = max(1, math.ceil(side / min(array.shape[:2])))
    return array.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else array


def error_heatmap(original: torch.Tensor, recon: torch.Tensor, top: float = HEAT_MAX) -> np.ndarray:
    """Mean absolute error over channels of two (3, H, W) images as an (H, W, 3) uint8 heat map
    (black: none, yellow: ``top`` or more; one fixed scale, so two models' maps compare)."""
    import matplotlib

    error = (original.float() - recon.float()).abs().mean(0).cpu().numpy()
    colours = matplotlib.colormaps["inferno"](np.clip(error / top, 0.0, 1.0))[..., :3]
    return (colours * 255).round().astype(np.uint8)


def token_grid(tokens: torch.Tensor) -> tuple[list[str], list[list[int | float | str]]]:
    """(column headers, rows) showing one image's tokens: ids (K,) in rows of up to
    :data:`TOKEN_COLUMNS`, or latents (K, C) as one row per token (its norm and first channels)."""
    tokens = tokens.detach().cpu()
    if tokens.dim() == 1:
        k = tokens.numel()
        columns = min(TOKEN_COLUMNS, k)
        ids = tokens.tolist()
        rows = [
            [f"{start}-{min(start + columns, k) - 1}", *ids[start : start + columns]] for start in range(0, k, columns)
        ]
        rows[-1] += [""] * (columns + 1 - len(rows[-1]))
        return ["tokens", *(f"+{i}" for i in range(columns))], rows
    shown = min(4, tokens.shape[1])
    rows = [[i, round(float(t.norm()), 3), *(round(float(v), 3) for v in t[:shown])] for i, t in enumerate(tokens)]
    return ["token", "norm", *(f"c{i}" for i in range(shown))], rows


@dataclass
class Slider:
    """How the page shows the slider over the decoded prefix (token count k, or HieraTok's scales)."""

    label: str = "tokens decoded"
    minimum: int = 1
    maximum: int = 1
    value: int = 1
    interactive: bool = False
    info: str = ""


@dataclass
class Reconstruction:
    """One model's reconstruction of one image, ready to show."""

    original: np.ndarray
    recon: np.ndarray
    heatmap: np.ndarray
    psnr: float
    ssim: float
    metrics: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    slider: Slider = field(default_factory=Slider)
    state: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def prefix_slider(model: torch.nn.Module, k: int) -> Slider:
    """The slider a model allows: HieraTok's number of scales, a nested model's prefix length, else
    a disabled one (the model decodes its K tokens only)."""
    scales = getattr(model.config, "scales", None)
    if hasattr(model, "decode_scales") and scales and len(scales) > 1:
        if model.config.attention == "full":
            info = "this HieraTok decodes all scales at once (attention 'full'): no coarser decode"
            return Slider("scales decoded", 1, len(scales), len(scales), False, info)
        return Slider("scales decoded", 1, len(scales), len(scales), True, "coarse to fine: decode the first n scales")
    if getattr(model, "supports_prefix", False):
        return Slider("tokens decoded", 1, k, k, True, "decode the first k tokens (a nested model)")
    return Slider("tokens decoded", 1, k, k, False, "this model decodes its full K tokens only (not trained nested)")


@torch.no_grad()
def decode_prefix(model: torch.nn.Module, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Decode the first ``k`` of the K ``tokens`` (B, K) or (B, K, C): a nested model
    (``supports_prefix``) decodes any prefix; any other model only all K (its ``decode`` refuses
    a prefix with the reason, so the page offers the slider for nested models only)."""
    count = tokens.shape[1]
    if not 1 <= k <= count:
        raise ValueError(f"k must be a number of tokens in 1..{count}, got {k}")
    return model.decode(tokens if k == count else tokens[:, :k])


def _decode(model: torch.nn.Module, tokens: torch.Tensor, slider: Slider, n: int) -> torch.Tensor:
    """The image the slider's position ``n`` asks for, at the model's full resolution."""
    image = model.decode(tokens, scales=n) if slider.label == "scales decoded" else decode_prefix(model, tokens, n)
    size = model.config.image_size
    if image.shape[-1] != size:  # a coarse HieraTok scale: shown at full size, pixels kept
        image = F.interpolate(image.float(), size=(size, size), mode="nearest")
    return image


def _scores(original: torch.Tensor, recon: torch.Tensor) -> tuple[float, float]:
    original, recon = original.float().cpu(), recon.float().cpu()
    return psnr(original, recon)[0], ssim(original, recon)[0]


def _metrics_text(model: torch.nn.Module, label: str, psnr: float, ssim: float, slider: Slider, n: int) -> str:
    cfg = model.config
    size, k = cfg.image_size, cfg.num_latent_tokens
    if model.vocab_size is None:
        codes = f"latents of {cfg.code_dim} channels"
    else:
        bits = k * float(np.log2(model.vocab_size))
        codes = f"ids of {model.vocab_size} codes ({bits:.0f} bits, {bits / size**2:.4f} bits per pixel)"
    part = f" · decoded: {n} of {slider.maximum} {slider.label.split()[0]}" if n != slider.maximum else ""
    return f"**PSNR {psnr:.2f} dB** · SSIM {ssim:.4f} · {k} tokens, {codes} · {size}x{size} px{part}  \n{label}"


def reconstruct(
    cache: ModelCache,
    spec: str | None,
    upload: str | Path | None,
    example: str | None = None,
    max_pixels: int = APP_MAX_PIXELS,
) -> Reconstruction:
    """The Tokenize tab: encode the image with the model ``spec`` names, decode all of its tokens,
    measure; ``state`` keeps what the slider's redraws need."""
    loaded = cache.get(spec, "tokenizer")
    model, runtime = loaded.model, cache.runtime
    image, note = read_image(upload, example, max_pixels)
    x = to_tensor(center_crop_resize(image, model.config.image_size))[None].to(runtime.device)
    with runtime.autocast():
        tokens = model.encode(x)
        recon = model.decode(tokens)
    slider = prefix_slider(model, tokens.shape[1])
    psnr, ssim = _scores(x, recon)
    headers, rows = token_grid(tokens[0])
    return Reconstruction(
        original=enlarged(to_uint8(x[0])),
        recon=enlarged(to_uint8(recon[0])),
        heatmap=enlarged(error_heatmap(x[0], recon[0])),
        psnr=psnr,
        ssim=ssim,
        metrics=_metrics_text(model, loaded.label, psnr, ssim, slider, slider.maximum),
        headers=headers,
        rows=rows,
        slider=slider,
        state={"spec": spec, "tokens": tokens.cpu(), "image": x.cpu()},
        note=note,
    )


def redraw(cache: ModelCache, state: dict[str, Any] | None, n: int | float) -> tuple[np.ndarray, np.ndarray, str]:
    """The slider moved: (reconstruction, heat map, metrics) of the first ``n`` tokens or scales."""
    if not state:
        raise ValueError("tokenize an image first: the slider redraws its reconstruction")
    loaded = cache.get(state["spec"], "tokenizer")
    model, runtime = loaded.model, cache.runtime
    tokens, x = state["tokens"].to(runtime.device), state["image"].to(runtime.device)
    slider = prefix_slider(model, tokens.shape[1])
    n = round(float(n))
    if not slider.interactive and n != slider.maximum:
        raise ValueError(slider.info)
    with runtime.autocast():
        recon = _decode(model, tokens, slider, n)
    psnr, ssim = _scores(x, recon)
    text = _metrics_text(model, loaded.label, psnr, ssim, slider, n)
    return enlarged(to_uint8(recon[0])), enlarged(error_heatmap(x[0], recon[0])), text


def compare(
    cache: ModelCache,
    spec_a: str | None,
    spec_b: str | None,
    upload: str | Path | None,
    example: str | None = None,
    max_pixels: int = APP_MAX_PIXELS,
) -> tuple[Reconstruction, Reconstruction, str]:
    """The Compare tab: two models on one image; returns both and a Markdown table of their scores."""
    first = reconstruct(cache, spec_a, upload, example, max_pixels)
    second = reconstruct(cache, spec_b, upload, example, max_pixels)
    rows = ["| model | PSNR (dB) | SSIM | tokens |", "|---|---|---|---|"]
    for name, result in (("A", first), ("B", second)):
        model = cache.get(result.state["spec"], "tokenizer").model
        rows.append(
            f"| {name}: {result.state['spec']} | {result.psnr:.2f} | {result.ssim:.4f} | "
            f"{model.config.num_latent_tokens} |"
        )
    return first, second, "\n".join(rows)
