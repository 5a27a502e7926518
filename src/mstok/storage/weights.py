"""Pretrained weight files: an explicit path, the local cache, or a download; and reading a
state dict from safetensors or a ``torch.save`` file without running pickled code.

Pretrained networks used by losses and metrics (LPIPS-VGG, FID-Inception, the MaskGIT VQGAN)
are resolved here so every one of them fails the same way when its file is absent: a
:class:`MissingWeightsError` that says what the file is, where to get it and exactly where to
put it. Downloads land in the cache through a temporary file and a rename, so an interrupted
download never leaves a truncated file under the final name. (The rule that finds a *saved
mstok model*'s weights is :func:`mstok.storage.locate.locate_model`.)
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from mstok.io import apply_umask, read_safetensors

CACHE_ENV = "MSTOK_CACHE"
_CHUNK = 1 << 20
# what a command calls the settings resolve_weights mentions (see command_hints)
_HINTS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("mstok_weights_hints", default=None)


class MissingWeightsError(FileNotFoundError):
    """A pretrained weights file is neither at the given path, in the cache, nor downloadable."""


@contextlib.contextmanager
def command_hints(**hints: str) -> Iterator[None]:
    """Inside the block, missing-weights messages name a command's flags instead of config keys.

    Keys are weight file names (``vgg16-397923af.pth`` -> ``"--vgg-weights"``) and ``download``
    (the flag that turned downloading off, e.g. ``"--no-download"``).
    """
    token = _HINTS.set({**(_HINTS.get() or {}), **hints})
    try:
        yield
    finally:
        _HINTS.reset(token)


def cache_dir() -> Path:
    """The weights cache folder: ``$MSTOK_CACHE`` if set, else ``~/.cache/mstok``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mstok"


def _describe(what: str, filename: str) -> str:
    return f"{what} ({filename})" if what else f"weights file {filename}"


def _download(url: str, dest: Path, sha256_prefix: str | None = None) -> None:
    """Fetch ``url`` to ``dest`` through a temporary file in the same folder and an atomic rename.

    The temporary file lives beside ``dest`` so ``os.replace`` never crosses file systems.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if sha256_prefix is not None and not digest.hexdigest().startswith(sha256_prefix.lower()):
            raise ValueError(
                f"checksum mismatch: sha256 {digest.hexdigest()[:16]}... does not start with {sha256_prefix}"
            )
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, dest)
    finally:
        # After a successful rename the temporary name no longer exists; otherwise drop the partial file.
        tmp.unlink(missing_ok=True)


def resolve_weights(
    filename: str,
    url: str | None = None,
    path: str | Path | None = None,
    cache: str | Path | None = None,
    download: bool = True,
    what: str = "",
    sha256_prefix: str | None = None,
    option: str = "",
) -> Path:
    """Find a pretrained weights file, downloading it into the cache if allowed.

    Order: the explicit ``path``; else ``<cache or cache_dir()>/filename``; else download ``url``
    (``http(s)://`` or ``file://``) into that cache location.

    Args:
        filename: file name inside the cache (e.g. ``"vgg16-397923af.pth"``).
        url: where the file can be downloaded from; ``None`` if it cannot.
        path: an explicit location; when given it must exist (the cache is not consulted).
            ``None`` or ``""`` (an unset config field) means "not given".
        cache: cache folder overriding :func:`cache_dir`; ``None`` or ``""`` for the default.
        download: allow fetching ``url`` when the file is not cached.
        what: human description of the file, used in error messages.
        sha256_prefix: if given, a downloaded file must have a SHA-256 starting with it.
        option: the config option that sets ``path`` (e.g. ``"perceptual.vgg_weights"``), for the message.

    Returns:
        Path of an existing file.

    Raises:
        MissingWeightsError: the file is missing and could not be downloaded; the message names
            the file, its URL and the exact path to place it at.
    """
    label = _describe(what, filename)
    hints = _HINTS.get() or {}
    flag = hints.get(filename)
    if flag:
        option = flag
    if path is not None and str(path) != "":
        explicit = Path(path).expanduser()
        if explicit.is_file():
            return explicit
        given = f" (from {option})" if option else ""
        source = f"; it can be downloaded from {url}" if url else ""
        raise MissingWeightsError(f"{label} not found at the explicitly given path {explicit}{given}{source}")

    custom_cache = cache is not None and str(cache) != ""
    target = (Path(cache).expanduser() if custom_cache else cache_dir()) / filename
    if target.is_file():
        return target

    if url is None:
        reason = "no download URL is known for it"
    elif not download:
        reason = f"downloading is disabled ({hints.get('download', 'download=False')})"
    else:
        try:
            _download(url, target, sha256_prefix)
            return target
        except (OSError, ValueError, http.client.HTTPException) as err:  # HTTPException: truncated reply
            reason = f"the download failed: {err}"
    get = f"download it from {url} and put it at {target}" if url else f"put it at {target}"
    if flag:
        elsewhere = f"pass {flag} FILE with its location"
    else:
        where = f"set {option}" if option else "pass path=... (or the matching config option)"
        elsewhere = f"{where} to its location"
    raise MissingWeightsError(
        f"{label} is not available: {reason}.\n"
        f"  To fix: {get}\n"
        f"  To use a copy elsewhere, {elsewhere}"
        + ("." if custom_cache else f"; ${CACHE_ENV} moves the cache folder (now {target.parent}).")
    )


def load_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, without running pickled code.

    A top-level ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is removed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt or unreadable, or does not hold a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many unrelated types for a bad file
        raise ValueError(
            f"cannot read weights file {path}: not a readable torch checkpoint of plain tensors ({err})"
        ) from err
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                break
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {path} holds a {type(obj).__name__}, expected a dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"weights file {path} is not a dict of tensors: entry {key!r} is a {type(value).__name__}")
    return dict(obj)
