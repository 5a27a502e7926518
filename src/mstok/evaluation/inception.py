"""The FID Inception-v3: the TensorFlow 2015-12-05 graph that FID and Inception Score are defined on.

FID numbers are only comparable when they come from this exact network and preprocessing, so
this module rebuilds the graph as pytorch-fid and torch-fidelity port it, not torchvision's
Inception-v3 (which has other weights and differs in three places):

* the pooling branch of the A, C and first E blocks averages over valid pixels only
  (TensorFlow's ``avg_pool`` with SAME padding; ``count_include_pad=False`` here);
* the pooling branch of the last E block (``Mixed_7c``) is a *max* pool;
* BatchNorm uses eps 0.001 and the classifier has 1008 outputs.

Preprocessing follows the graph too: the uint8 image, as float in [0, 255], is resized to
299x299 with TensorFlow 1's ``resize_bilinear`` (legacy coordinates, not PyTorch's
``align_corners=False``), then mapped to [-1, 1) by ``(x - 128) / 128``.

The module and parameter names equal torchvision's ``inception_v3(num_classes=1008,
aux_logits=False)``, which is the layout of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``;
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` uses the same names minus the
BatchNorm ``num_batches_tracked`` counters, so both files load strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mstok.storage.weights import load_torch_state_dict, resolve_weights

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
# torch-fidelity's conversion of the same TF graph; pass it as ``path=`` to use it instead.
TORCH_FIDELITY_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) as uint8: uint8 passes through, float in [0, 1] becomes ``floor(255 x + 0.5)``.

    Float images are clamped to [0, 1] and rounded half up, the rule PNG writers such as
    ``torchvision.utils.save_image`` use, so features of a float batch equal those of the same
    batch saved to PNG and read back.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"expected uint8 or float images in [0, 1], got dtype {images.dtype}")
    return torch.floor(images.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def _tf1_source_coords(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 legacy sampling along one axis: lower index, upper index and lerp weight, each (out_size,).

    Output pixel ``i`` reads source coordinate ``i * in_size / out_size`` (no half-pixel shift),
    computed in float32 as TensorFlow does, so the last outputs clamp to the final source pixel.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    coords = torch.arange(out_size, dtype=torch.float32) * scale
    floor = torch.floor(coords)
    lower = floor.long().clamp(0, in_size - 1)
    upper = torch.ceil(coords).long().clamp(max=in_size - 1)
    return lower.to(device), upper.to(device), (coords - floor).to(device)


def tf1_resize_bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with TensorFlow 1 ``resize_bilinear(align_corners=False)`` semantics.

    Args:
        images: float tensor (B, C, H, W).
        size: output ``(height, width)``.

    Returns:
        (B, C, height, width) in the dtype of ``images``; an unchanged size gives the input values.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) tensor, got {images.dtype} of shape {tuple(images.shape)}")
    out_h, out_w = size
    y0, y1, wy = _tf1_source_coords(images.shape[2], out_h, images.device)
    x0, x1, wx = _tf1_source_coords(images.shape[3], out_w, images.device)
    wy = wy.to(images.dtype).view(-1, 1)  # (h, 1)
    wx = wx.to(images.dtype)  # (w,)
    top, bottom = images[:, :, y0], images[:, :, y1]  # (B, C, h, W) each
    # Same operation order as TensorFlow's kernel: lerp along x on both rows, then along y.
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx  # (B, C, h, w)
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx  # (B, C, h, w)
    return top + (bottom - top) * wy


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001), ReLU; parameters under ``conv`` and ``bn``."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W')."""
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_valid(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME average pool divides by the number of real pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 64 + 64 + 96 + ``pool_features`` output channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, 35, 35) -> (B, 224 + pool_features, 35, 35)."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_avg_pool_valid(x))
        return torch.cat([self.branch1x1(x), b5, b3, pool], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 384 + 96 + C_in output channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, 35, 35) -> (B, 480 + C_in, 17, 17)."""
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..e): 768 output channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 768, 17, 17) -> (B, 768, 17, 17)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        pool = self.branch_pool(_avg_pool_valid(x))
        return torch.cat([self.branch1x1(x), b7, b7dbl, pool], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 320 + 192 + C_in output channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 768, 17, 17) -> (B, 1280, 8, 8)."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 3x3 convolutions (Mixed_7b/c): 2048 output channels.

    ``max_pool=True`` reproduces the TF graph's last block (``Mixed_7c``), whose pooling branch
    is a max pool; the other uses the valid-pixel average pool.
    """

    def __init__(self, in_channels: int, max_pool: bool = False) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, 8, 8) -> (B, 2048, 8, 8)."""
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], dim=1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_valid(x)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(pooled)], dim=1)


class InceptionOutput(NamedTuple):
    """``features``: (B, 2048) pool_3 activations; ``logits``: (B, 1008) bias-free logits."""

    features: torch.Tensor
    logits: torch.Tensor


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the TF 2015-12-05 graph, returning pool_3 features and IS logits.

    ``forward`` takes uint8 images (B, 3, H, W) of any size (or float in [0, 1], rounded to
    uint8 by :func:`images_to_uint8`) and does the graph's own preprocessing. The logits are
    ``features @ fc.weight.T`` without the bias: the original Inception Score code (and
    torch-fidelity's ``logits_unbiased``, and the ADM evaluator) reads the ``softmax/logits/MatMul``
    output, before the bias add. The network computes in the dtype of its parameters, so
    ``model.double()`` gives a float64 pipeline.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images (B, 3, H, W) -> network input (B, 3, 299, 299) in [-1, 1)."""
        x = images_to_uint8(images).to(self.fc.weight.dtype)  # (B, 3, H, W) in [0, 255]
        x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))  # (B, 3, 299, 299)
        # The graph subtracts 128 and multiplies by 1/128 (exact in binary), the same as this division.
        return (x - 128) / 128

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input (B, 3, 299, 299) -> pool_3 features (B, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        """uint8 images (B, 3, H, W) -> ``InceptionOutput(features (B, 2048), logits (B, 1008))``."""
        features = self.forward_features(self.preprocess(images))
        return InceptionOutput(features, features @ self.fc.weight.T)

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Ignore ``mode``: a metric network must keep its BatchNorm statistics, so it stays in eval mode."""
        return super().train(False)

    def load_fid_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load the pytorch-fid or torch-fidelity weights strictly.

        A ``module.`` prefix on every key (a saved ``DataParallel``) is removed and absent
        BatchNorm ``num_batches_tracked`` counters (torch-fidelity's file) are filled with 0;
        nothing else is renamed.

        Raises:
            ValueError: keys are missing or unexpected, or a tensor has the wrong shape.
        """
        state = dict(state_dict)
        if state and all(key.startswith("module.") for key in state):
            state = {key.removeprefix("module."): value for key, value in state.items()}
        own = self.state_dict()
        for key, value in own.items():
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = torch.zeros_like(value)
        missing = sorted(own.keys() - state.keys())
        unexpected = sorted(state.keys() - own.keys())
        wrong = [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{source} is not an FID Inception-v3 state dict: "
                f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}, "
                f"{len(wrong)} shape mismatches {wrong[:4]}"
            )
        self.load_state_dict(state, strict=True)


def load_fid_inception(
    path: str | Path | None = None,
    cache: str | Path | None = None,
    download: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> FIDInceptionV3:
    """The FID Inception-v3 with pretrained weights, in eval mode with gradients off.

    Weights come from :func:`mstok.storage.weights.resolve_weights`: ``path``, else
    ``<cache>/pt_inception-2015-12-05-6726825d.pth``, else a download of pytorch-fid's release
    file (when ``download``). torch-fidelity's file works too when given as ``path``.

    Args:
        path: explicit weights file (``.pth`` or ``.safetensors``).
        cache: cache folder overriding ``$MSTOK_CACHE`` / ``~/.cache/mstok``.
        download: allow downloading the file into the cache.
        device: where to put the network.
        dtype: parameter dtype; ``torch.float64`` trades speed for precision.

    Raises:
        MissingWeightsError: the file is absent and cannot be downloaded.
        ValueError: the file does not hold FID Inception weights.
    """
    file = resolve_weights(
        FID_WEIGHTS_FILENAME,
        FID_WEIGHTS_URL,
        path=path,
        cache=cache,
        download=download,
        what="FID Inception-v3 weights (TF 2015-12-05 graph, pytorch-fid port)",
    )
    model = FIDInceptionV3()
    model.load_fid_state_dict(load_torch_state_dict(file), source=str(file))
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()
