"""LPIPS perceptual distance (v0.1, VGG16 trunk) with a VGG16 written in this project.

The distance follows Zhang et al., "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric" (2018), as the reference ``lpips`` package computes it:

    x' = (2x - 1 - shift) / scale                           for x in [0, 1]
    f_l = relu_l(VGG16(x'))  for l in relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    n_l = f_l / (sqrt(sum_c f_l^2) + 1e-10)                   per pixel, over channels
    d(x, y) = sum_l mean_hw( sum_c w_l[c] * (n_l(x) - n_l(y))^2 )

Weights: the VGG16 trunk from torchvision's ImageNet checkpoint and the non-negative linear
weights ``w_l`` from the lpips ``v0.1/vgg.pth`` file, both found by :func:`mstok.storage.weights.resolve_weights`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from mstok.io import load_state_dict_checked
from mstok.storage.weights import load_torch_state_dict, resolve_weights

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_FILENAME = "lpips_vgg_v0.1.pth"
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# torchvision's VGG16 "D" configuration: conv widths per stage, each stage ending in a 2x2 max-pool.
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# Indices in ``features`` of the ReLUs LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_MIN_SIDE = 16  # relu5_3 sits behind four 2x max-pools
_NORM_EPS = 1e-10
_LIN_KEY = re.compile(r"^lin(\d)\.model\.\d\.weight$")


class VGG16Features(nn.Module):
    """The convolutional part of VGG16 with torchvision's module indices (``features.N``).

    ``forward`` maps (B, 3, H, W) to the five activations after relu1_2, relu2_2, relu3_3,
    relu4_3 and relu5_3, of shapes (B, 64, H, W), (B, 128, H/2, W/2), (B, 256, H/4, W/4),
    (B, 512, H/8, W/8), (B, 512, H/16, W/16).
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for stage in _VGG16_STAGES:
            for width in stage:
                layers += [nn.Conv2d(in_ch, width, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                in_ch = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised images -> the five tapped ReLU activations, shallowest first."""
        taps: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAPS:
                taps.append(x)
                if index == _TAPS[-1]:
                    break  # the final max-pool is not used
        return taps

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a torchvision ``vgg16()`` state dict; ``classifier.*`` keys are ignored.

        Raises:
            ValueError: listing missing, unexpected or mis-shaped ``features.*`` keys.
        """
        features = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
        load_state_dict_checked(self, features, source)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with a VGG16 trunk, for images in [0, 1].

    ``forward(x, y)`` takes two (B, 3, H, W) batches (H, W >= 16) and returns (B,) distances,
    computed in float32 even under autocast. Gradients flow to the inputs; every parameter is
    frozen and the module always stays in eval mode.
    Build with :meth:`from_pretrained` (or load weights with :meth:`load_weights`).
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Ignore ``mode``: LPIPS is a fixed metric, so it stays in eval mode."""
        return super().train(False)

    def load_weights(self, vgg_state_dict: dict[str, torch.Tensor], lpips_state_dict: dict[str, torch.Tensor]) -> None:
        """Load torchvision VGG16 weights and lpips ``lin{i}.model.1.weight`` linear weights.

        Raises:
            ValueError: a key is missing or mis-shaped, or a linear weight is negative.
        """
        lin_weights = _lin_weights(lpips_state_dict)  # validated first so a bad file leaves the model untouched
        with torch.no_grad():
            self.net.load_torchvision_state_dict(vgg_state_dict, "the VGG16 weights")
            for lin, weight in zip(self.lins, lin_weights, strict=True):
                lin.weight.copy_(weight.to(lin.weight.dtype))

    @classmethod
    def from_pretrained(
        cls,
        vgg_weights: str | Path | None = None,
        lpips_weights: str | Path | None = None,
        cache: str | Path | None = None,
        download: bool = True,
    ) -> LPIPS:
        """Build LPIPS from the torchvision VGG16 and lpips v0.1 weight files.

        Args:
            vgg_weights: explicit path of ``vgg16-397923af.pth`` (or a safetensors copy).
            lpips_weights: explicit path of the lpips ``v0.1/vgg.pth``.
            cache: cache folder overriding :func:`mstok.storage.weights.cache_dir`.
            download: fetch files missing from the cache.

        Raises:
            MissingWeightsError: a file is missing; the message says where to get it and put it.
        """
        vgg_path, lpips_path = check_lpips_weights(vgg_weights, lpips_weights, cache, download)
        model = cls()
        model.load_weights(load_torch_state_dict(vgg_path), load_torch_state_dict(lpips_path))
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance between images ``x`` and ``y`` in [0, 1], (B, 3, H, W) each -> (B,)."""
        _check_pair(x, y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            # One trunk pass for both images; VGG16 has no batch statistics, so this equals two passes.
            both = torch.cat([x, y]).float() * 2 - 1  # (2B, 3, H, W) in [-1, 1]
            feats = self.net((both - self.shift) / self.scale)
            total = x.new_zeros(x.shape[0], dtype=torch.float32)
            for feat, lin in zip(feats, self.lins, strict=True):
                # eps outside the sqrt, as in the reference; a 0/0 in sqrt's backward at an all-zero
                # pixel is masked by the ReLU that produced it, so gradients stay finite.
                norm = feat.pow(2).sum(dim=1, keepdim=True).sqrt()  # (2B, 1, H_l, W_l)
                unit = feat / (norm + _NORM_EPS)
                fx, fy = unit.chunk(2)
                diff = (fx - fy).pow(2)  # (B, C_l, H_l, W_l)
                total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"LPIPS expects (B, 3, H, W) images, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"LPIPS inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"LPIPS expects 3-channel RGB images, got {x.shape[1]} channels (shape {tuple(x.shape)})")
    if min(x.shape[2:]) < _MIN_SIDE:
        raise ValueError(f"LPIPS needs images of at least {_MIN_SIDE}x{_MIN_SIDE} pixels, got {tuple(x.shape[2:])}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise ValueError(f"LPIPS expects floating-point images in [0, 1], got {x.dtype} and {y.dtype}")


def _lin_weights(state_dict: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The five (1, C_l, 1, 1) LPIPS linear weights from an lpips-layout state dict, checked."""
    found: dict[int, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _LIN_KEY.match(key)
        if match:
            found[int(match.group(1))] = value
    weights = []
    for i, channels in enumerate(LPIPS_CHANNELS):
        if i not in found:
            raise ValueError(
                f"LPIPS weights lack lin{i}.model.1.weight (found keys: {sorted(state_dict)[:10]}); "
                "expected the lpips v0.1 vgg.pth file"
            )
        weight = found[i]
        if tuple(weight.shape) != (1, channels, 1, 1):
            raise ValueError(
                f"LPIPS weight lin{i} has shape {tuple(weight.shape)}, expected (1, {channels}, 1, 1) for VGG16"
            )
        # The reference clamps these to >= 0 while training; a negative one means a wrong file
        # and could make distances negative.
        if bool((weight < 0).any()):
            raise ValueError(f"LPIPS weight lin{i} has negative entries (min {weight.min().item():.3g})")
        weights.append(weight)
    return weights


def check_lpips_weights(
    vgg_weights: str | Path | None = None,
    lpips_weights: str | Path | None = None,
    cache: str | Path | None = None,
    download: bool = True,
) -> tuple[Path, Path]:
    """Resolve (VGG16 weights path, lpips linear weights path), downloading if allowed.

    A trainer calls this before building anything so a config needing LPIPS fails early.

    Raises:
        MissingWeightsError: naming the missing file, its URL and where to put it.
    """
    vgg = resolve_weights(
        VGG16_FILENAME,
        VGG16_URL,
        path=vgg_weights,
        cache=cache,
        download=download,
        what="torchvision VGG16 ImageNet weights for the LPIPS loss",
        sha256_prefix="397923af",  # torchvision names its files after their SHA-256 prefix
        option="perceptual.vgg_weights (vgg_weights=)",
    )
    lin = resolve_weights(
        LPIPS_FILENAME,
        LPIPS_URL,
        path=lpips_weights,
        cache=cache,
        download=download,
        what="LPIPS v0.1 VGG linear weights (lpips vgg.pth)",
        option="perceptual.lpips_weights (lpips_weights=)",
    )
    return vgg, lin
