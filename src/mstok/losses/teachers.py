"""Frozen semantic teachers: the pretrained network whose features SemTok's encoder is aligned to.

SemTok (section 3.1, eq. 1) runs each image through a SigLIP encoder ``E_sig`` and aligns its
own encoder to the resulting feature grid ``x_sig`` (:mod:`mstok.tokenizers.semtok_semantic`). This module
is that teacher, made pluggable like :mod:`mstok.tokenizers.latent_space`:

* :class:`SiglipTeacher`: a ``transformers.SiglipVisionModel`` (SigLIP, and SigLIP 2's
  fixed-resolution checkpoints, which share its architecture), read from a local folder or a
  hub id; images are resized and normalised as SigLIP's image processor does;
* :class:`CallableTeacher`: any function or module mapping images to a feature grid;
* :class:`TinyTeacher`: a small seeded random conv net, for tests and CPU runs without weights;
* :class:`ReferenceTeacher`: mstok's own reference network (``mstok reference train``, a Tiny
  ImageNet classifier trained here), the semantic teacher that exists on machines without SigLIP.

Every teacher maps images (B, 3, H, W) in [0, 1] to float32 features (B, D_t, h, w) under
``no_grad``, with every parameter frozen and the module kept in eval mode: a teacher is a fixed
target, never trained by the losses that read it. :func:`build_teacher` makes one from a config
spec (``"tiny"``, ``{"type": "siglip", "path": ...}``, ``{"type": "reference", "path": ...}``).

Glossary: B batch, D_t teacher feature width, h x w the teacher's feature grid.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mstok.layers.init import init_weights
from mstok.networks.reference import ReferenceNet
from mstok.persistence import load_reference_net
from mstok.storage.locate import is_hub_id
from mstok.storage.weights import MissingWeightsError
from mstok.tokenizers.contract import _check_finite

INSTALL_HINT = 'pip install "mstok[semtok]"'
SIGLIP_CONFIG_FILE = "config.json"
SIGLIP_WEIGHTS_FILE = "model.safetensors"
SIGLIP_PREPROCESSOR_FILE = "preprocessor_config.json"
# other weight layouts transformers' from_pretrained reads from a folder
_SIGLIP_WEIGHTS_FALLBACKS = ("model.safetensors.index.json", "pytorch_model.bin")
# 256 px with 16 px patches: a 16 x 16 grid, SemTok's latent token grid at 256 px (f = 8, 2 x 2 patches)
SIGLIP_EXAMPLE_REPO = "google/siglip-base-patch16-256"
# config.json model types that hold a SigLIP vision tower (a full SigLIP checkpoint, or the tower alone)
_SIGLIP_MODEL_TYPES = ("siglip", "siglip_vision_model")
# SiglipImageProcessor's defaults, used when a folder has no preprocessor_config.json
_SIGLIP_MEAN = (0.5, 0.5, 0.5)
_SIGLIP_STD = (0.5, 0.5, 0.5)
# PIL resampling codes (as saved in preprocessor_config.json) -> F.interpolate modes
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class Teacher(nn.Module):
    """A frozen map from images to a feature grid: the interface the semantic losses read.

    Subclasses implement :meth:`_features`; ``forward`` checks the input, runs without
    gradients (under bf16 autocast on CUDA when ``bf16`` is set) and returns float32.

    Attributes:
        dim: D_t, the width of the features.
        bf16: run the teacher under bf16 autocast on CUDA (ignored on other devices).
    """

    def __init__(self, dim: int, bf16: bool = False) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(self).__name__}: dim must be a positive integer, got {dim!r}")
        self.dim, self.bf16 = dim, bf16

    def freeze(self) -> None:
        """Eval mode and ``requires_grad=False`` on every parameter (subclasses call it once built)."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """Ignore ``mode``: a teacher is fixed, so it stays in eval mode (as LPIPS does)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] -> float32 features (B, D_t, h, w)."""
        images = self._check_images(images)
        with self._autocast(images.device):
            features = self._features(images)
        if features.dim() != 4 or features.shape[:2] != (images.shape[0], self.dim):
            raise ValueError(
                f"{type(self).__name__} returned features of shape {tuple(features.shape)}, expected "
                f"(B={images.shape[0]}, D_t={self.dim}, h, w)"
            )
        return features.float()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """Checked images (B, 3, H, W) in [0, 1] -> features (B, D_t, h, w)."""
        raise NotImplementedError

    def _check_images(self, images: Any) -> torch.Tensor:
        """A float (B, 3, H, W) tensor on this teacher's device, converted to its dtype.

        The range and NaN checks run on CPU tensors only: on an accelerator they would wait for
        the device at every training step (:func:`mstok.tokenizers.contract.check_images` does the same).
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor in [0, 1], got dtype {images.dtype} "
                "(for uint8 images divide by 255: images.float() / 255)"
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.numel() and images.device.type == "cpu":
            _check_finite(images)
            if images.min() < -1e-3 or images.max() > 1 + 1e-3:
                raise ValueError(
                    f"images must be in [0, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]"
                )
        param = next(self.parameters(), None)
        if param is None:
            return images
        if images.device != param.device:
            raise ValueError(
                f"images are on {images.device} but {type(self).__name__} is on {param.device}: "
                "move one of them (.to(device))"
            )
        return images.to(param.dtype)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        if self.bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bf16={self.bf16}"


class TinyTeacher(Teacher):
    """A small randomly initialised conv net, seeded: a stand-in teacher for tests and CPU runs.

    ``patch x patch`` stride-``patch`` conv to ``width`` channels, GELU, a 3 x 3 conv, GELU, a
    1 x 1 conv to ``dim``: images (B, 3, H, W) -> (B, dim, H / patch, W / patch). The weights
    follow :func:`mstok.layers.init_weights` drawn from ``seed`` alone (the global random state
    is left as it was), so two teachers with one seed are identical.
    """

    def __init__(self, dim: int = 32, width: int = 32, patch: int = 8, seed: int = 0) -> None:
        super().__init__(dim)
        for name, value in (("width", width), ("patch", patch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyTeacher: {name} must be a positive integer, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"TinyTeacher: seed must be an integer, got {seed!r}")
        self.patch, self.seed = patch, seed
        with torch.random.fork_rng(devices=[]):  # torch's default init of the layers draws too
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, width, kernel_size=patch, stride=patch),
                nn.GELU(),
                nn.Conv2d(width, width, kernel_size=3, padding=1),
                nn.GELU(),
                nn.Conv2d(width, dim, kernel_size=1),
            )
            init_weights(self.net)
        self.freeze()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[2:]
        if height % self.patch or width % self.patch:
            raise ValueError(f"TinyTeacher: image sides must be multiples of patch={self.patch}, got {height}x{width}")
        return self.net(images * 2 - 1)  # (B, D_t, H / patch, W / patch)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, patch={self.patch}, seed={self.seed}"


class CallableTeacher(Teacher):
    """Any function or module ``images (B, 3, H, W) in [0, 1] -> features (B, dim, h, w)`` as a teacher.

    A module is registered as a submodule (so ``.to(device)`` moves it) and frozen in place;
    a plain function is called as is. Either way it runs under ``no_grad``.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], dim: int, bf16: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"CallableTeacher: fn must be callable, got {type(fn).__name__}")
        super().__init__(dim, bf16)
        self.fn = fn  # nn.Module's setattr registers a module, and keeps a function as a plain attribute
        self.freeze()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.fn(images)
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"CallableTeacher: fn returned a {type(features).__name__}, expected a tensor")
        return features


def _transformers_siglip() -> type:
    """``transformers.SiglipVisionModel``, imported on first use: transformers is the optional ``semtok`` extra."""
    try:
        from transformers import SiglipVisionModel
    except ImportError as err:
        raise ImportError(f"SiglipTeacher needs the transformers package: {INSTALL_HINT}") from err
    return SiglipVisionModel


class SiglipTeacher(Teacher):
    """A frozen SigLIP vision tower (``transformers.SiglipVisionModel``): SemTok's ``E_sig``.

    Images are resized to the model's ``image_size`` (``resample``, antialiased, clamped to
    [0, 1] as the processor's uint8 round trip does), normalised with ``(x - mean) / std``, and
    the final hidden state (after SigLIP's post-layernorm, before its attention-pooling head)
    is returned as a (B, hidden_size, g, g) grid, g = image_size / patch_size. SigLIP has no
    class token: every output token is a patch.

    Args:
        model: a ``SiglipVisionModel`` (frozen in place and converted to float32).
        mean, std: per-channel normalisation; SigLIP's processor uses 0.5 and 0.5.
        resample: ``"bicubic"`` (SigLIP's processor), ``"bilinear"`` or ``"nearest"``.
        bf16: bf16 autocast on CUDA.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float] = _SIGLIP_MEAN,
        std: tuple[float, float, float] = _SIGLIP_STD,
        resample: str = "bicubic",
        bf16: bool = False,
    ) -> None:
        config = model.config
        super().__init__(int(config.hidden_size), bf16)
        self.image_size, self.patch_size = int(config.image_size), int(config.patch_size)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"SiglipTeacher: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if resample not in _RESAMPLE.values():
            raise ValueError(f"SiglipTeacher: resample must be one of {sorted(_RESAMPLE.values())}, got {resample!r}")
        if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"SiglipTeacher: mean and std need 3 values, std > 0; got mean={mean}, std={std}")
        self.resample = resample
        self.model = model.float()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @property
    def grid(self) -> int:
        """g, the side of the output feature grid (for any input size: images are resized first)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, download: bool = True, bf16: bool = False
    ) -> SiglipTeacher:
        """Load a SigLIP vision tower from a local folder or the Hugging Face hub.

        Args:
            path: a folder holding ``config.json`` and ``model.safetensors`` of a SigLIP model (a
                full ``SiglipModel`` checkpoint: its text tower is skipped) and optionally
                ``preprocessor_config.json`` (its ``image_mean``, ``image_std`` and ``resample``
                are used), or a hub id such as ``google/siglip-base-patch16-256``.
            download: allow fetching a hub id (else only the hub cache is read).
            bf16: bf16 autocast on CUDA.

        Raises:
            MissingWeightsError: the files are absent; the message names them and where to put them.
            ValueError: the folder holds another kind of model, or the weights do not cover it.
            ImportError: transformers is not installed.
        """
        if path is None or str(path) == "":
            raise ValueError(f"SiglipTeacher needs a path: a SigLIP folder or a hub id such as {SIGLIP_EXAMPLE_REPO}")
        local = Path(path).expanduser()
        if not local.exists():
            if not is_hub_id(str(path)):
                raise MissingWeightsError(f"SigLIP folder {local} does not exist.\n{_how_to_get_siglip(local)}")
            local = _download_siglip(str(path), download)
        model = _load_local_siglip(local)
        return cls(model, **_preprocessing(local), bf16=bf16)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        if tuple(images.shape[2:]) != size:
            antialias = self.resample != "nearest"  # F.interpolate antialiases only the linear modes
            images = F.interpolate(images, size=size, mode=self.resample, antialias=antialias).clamp(0.0, 1.0)
        pixels = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        tokens = self.model(pixel_values=pixels).last_hidden_state  # (B, g*g, D_t)
        if tokens.shape[1] != self.grid**2:
            raise ValueError(
                f"SiglipTeacher: the model returned {tokens.shape[1]} tokens for a {self.grid}x{self.grid} patch grid; "
                "a vision tower with a class token is not a SigLIP model"
            )
        return rearrange(tokens, "b (h w) d -> b d h w", h=self.grid)  # (B, D_t, g, g)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, image_size={self.image_size}, patch_size={self.patch_size}, grid={self.grid}"


def _how_to_get_siglip(folder: Path) -> str:
    return (
        f"  A SigLIP folder holds {SIGLIP_CONFIG_FILE} and {SIGLIP_WEIGHTS_FILE} ({SIGLIP_PREPROCESSOR_FILE} too, "
        "optionally).\n"
        f"  To fix: download them from https://huggingface.co/{SIGLIP_EXAMPLE_REPO}/tree/main (or another SigLIP "
        "checkpoint), e.g.\n"
        f"      hf download {SIGLIP_EXAMPLE_REPO} {SIGLIP_CONFIG_FILE} {SIGLIP_WEIGHTS_FILE} "
        f"{SIGLIP_PREPROCESSOR_FILE} --local-dir DIR\n"
        f"  and put them in {folder}, or pass path=DIR; with network access a hub id (path={SIGLIP_EXAMPLE_REPO!r}) "
        "is downloaded into the hub cache."
    )


def _download_siglip(repo_id: str, download: bool) -> Path:
    """The local snapshot folder of a hub repository's config, weights and preprocessing files."""
    if importlib.util.find_spec("transformers") is None:  # an ImportError must not read as missing weights
        raise ImportError(f"SiglipTeacher needs the transformers package: {INSTALL_HINT}")
    from huggingface_hub import snapshot_download

    patterns = [SIGLIP_CONFIG_FILE, SIGLIP_WEIGHTS_FILE, SIGLIP_PREPROCESSOR_FILE]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not download))
    except Exception as err:  # huggingface_hub raises many types for absent, gated or unreachable repositories
        reason = "downloading is disabled (download=False) and they are not in the hub cache" if not download else err
        raise MissingWeightsError(
            f"cannot load the SigLIP model {repo_id} ({SIGLIP_CONFIG_FILE}, {SIGLIP_WEIGHTS_FILE}) from the hub: "
            f"{reason}\n{_how_to_get_siglip(Path('DIR'))}"
        ) from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds a {type(meta).__name__}, expected a JSON object")
    return meta


def _load_local_siglip(folder: Path) -> nn.Module:
    """``SiglipVisionModel.from_pretrained`` on a local folder, after checking its files are there."""
    has_weights = any((folder / name).is_file() for name in (SIGLIP_WEIGHTS_FILE, *_SIGLIP_WEIGHTS_FALLBACKS))
    missing = [] if (folder / SIGLIP_CONFIG_FILE).is_file() else [SIGLIP_CONFIG_FILE]
    missing += [] if has_weights else [SIGLIP_WEIGHTS_FILE]
    if missing:
        where = f"{folder} is not a folder" if not folder.is_dir() else f"{folder} lacks {' and '.join(missing)}"
        raise MissingWeightsError(f"SigLIP weights not found: {where}.\n{_how_to_get_siglip(folder)}")
    model_type = _read_json(folder / SIGLIP_CONFIG_FILE).get("model_type")
    if model_type not in _SIGLIP_MODEL_TYPES:
        raise ValueError(
            f"{folder / SIGLIP_CONFIG_FILE} is not a SigLIP config: model_type {model_type!r}, expected one of "
            f"{', '.join(map(repr, _SIGLIP_MODEL_TYPES))} (SigLIP, or SigLIP 2 at a fixed resolution)"
        )
    siglip = _transformers_siglip()
    from transformers.utils import logging as transformers_logging

    # a full SiglipModel checkpoint lists its text tower as unexpected keys: expected here, not news
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = siglip.from_pretrained(str(folder), output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        # transformers would leave those weights at random values: a teacher must be all pretrained
        keys = sorted(info["missing_keys"])
        raise ValueError(
            f"the weights in {folder} do not cover the SigLIP vision tower: {len(keys)} missing, e.g. {keys[:3]}"
        )
    return model


def _preprocessing(folder: Path) -> dict[str, Any]:
    """``mean``, ``std`` and ``resample`` from a folder's ``preprocessor_config.json``, when it has one."""
    path = folder / SIGLIP_PREPROCESSOR_FILE
    if not path.is_file():
        return {}
    meta, found = _read_json(path), {}
    if "image_mean" in meta:
        found["mean"] = tuple(float(v) for v in meta["image_mean"])
    if "image_std" in meta:
        found["std"] = tuple(float(v) for v in meta["image_std"])
    if "resample" in meta:
        if meta["resample"] not in _RESAMPLE:
            raise ValueError(f"{path}: resample {meta['resample']!r} is not one of the PIL codes {sorted(_RESAMPLE)}")
        found["resample"] = _RESAMPLE[meta["resample"]]
    return found


class ReferenceTeacher(Teacher):
    """A frozen :class:`~mstok.networks.reference.ReferenceNet` (``mstok reference train``) as the teacher.

    Its features are the last stage's grid (B, F, h, w) (``pooled=False``, the default: 4 x 4 for
    the default 32 px network, which the distillation term resizes to the latent grid), whose mean
    over the grid is exactly the network's penultimate feature vector, the contrastive term's
    target; ``pooled=True`` gives that vector alone as a 1 x 1 grid. ``dim`` is the network's
    ``feature_dim``. Images of any size are resized inside the network to its resolution.

    Args:
        model: a reference network (frozen in place).
        pooled: one feature vector per image (B, F, 1, 1) instead of the grid.
    """

    def __init__(self, model: nn.Module, pooled: bool = False) -> None:
        if not isinstance(model, ReferenceNet):
            raise TypeError(f"ReferenceTeacher needs a ReferenceNet, got {type(model).__name__}")
        if not isinstance(pooled, bool):
            raise ValueError(f"ReferenceTeacher: pooled must be true or false, got {pooled!r}")
        super().__init__(model.feature_dim)
        self.model, self.pooled = model.float(), pooled
        self.freeze()

    @classmethod
    def from_pretrained(
        cls, path: str | Path = "", weights: str | None = None, pooled: bool = False
    ) -> ReferenceTeacher:
        """Load a saved reference network (a folder, run or checkpoint by the loading rule) as the teacher.

        Raises:
            ValueError: no ``path``, or the folder holds another kind of model.
            FileNotFoundError: ``path`` does not exist or holds no model.
        """
        if path is None or str(path) == "":
            raise ValueError(
                "a reference teacher needs a path: the folder `mstok reference train --out DIR` wrote "
                '(teacher.spec = {type = "reference", path = "DIR"})'
            )
        try:
            model = load_reference_net(path, weights)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error}; train the teacher first: mstok reference train --data TRAIN_IMAGES --out {path} "
                '(or teacher.spec = "tiny" for a random stand-in)'
            ) from error
        return cls(model, pooled=pooled)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.feature_map(images)  # (B, F, h, w)
        return features.mean(dim=(2, 3), keepdim=True) if self.pooled else features

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pooled={self.pooled}"


# spec "type" -> the builder its other keys are passed to
TEACHERS: dict[str, Callable[..., Teacher]] = {
    "tiny": TinyTeacher,
    "siglip": SiglipTeacher.from_pretrained,
    "reference": ReferenceTeacher.from_pretrained,
}


def _parameters(builder: Callable[..., Teacher]) -> Iterator[str]:
    yield from (name for name in inspect.signature(builder).parameters if name not in ("self", "cls"))


def build_teacher(spec: str | dict[str, Any] | Teacher) -> Teacher:
    """A teacher from a spec: ``"tiny"`` (or another type name alone), a table such as
    ``{"type": "siglip", "path": "weights/siglip", "bf16": true}``, ``{"type": "tiny", "dim": 64}`` or
    ``{"type": "reference", "path": "runs/reference"}``
    (its other keys are the builder's arguments), or a built :class:`Teacher` (returned as is).
    A function is wrapped with :class:`CallableTeacher` directly, as it needs its width.

    Raises:
        ValueError: an unknown type or key, naming the known ones.
        TypeError: a spec that is none of the above.
    """
    if isinstance(spec, Teacher):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise TypeError(
            f"a teacher spec is a type name or a table with a 'type' ({', '.join(TEACHERS)}), got {spec!r}; "
            "wrap a function with CallableTeacher(fn, dim)"
        )
    settings = dict(spec)
    kind = settings.pop("type", None)
    if kind not in TEACHERS:
        raise ValueError(f"unknown teacher type {kind!r}; known types: {', '.join(TEACHERS)}")
    builder = TEACHERS[kind]
    allowed = list(_parameters(builder))
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for teacher type {kind!r}; valid: {', '.join(allowed)}")
    return builder(**settings)
