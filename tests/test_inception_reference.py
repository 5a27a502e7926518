"""The FID Inception-v3 against an independent functional transcription, on random weights.

The reference below is written from the architecture of the TF 2015-12-05 graph as pytorch-fid
ports it (torchvision's Inception3 layout with FID blocks): every convolution is ``F.conv2d``
on the state dict's tensors, BatchNorm is its formula with eps 0.001, and the block wiring,
strides, paddings and pools are spelled out here. It shares no code with
:mod:`mstok.evaluation.inception`, so a wrong pool (average with or without padding, max in
``Mixed_7c``), a wrong stride or padding, a wrong BatchNorm eps, a wrong input scaling or
resize, or a different final pooling makes a test fail. A few feature values of a fixed-seed
network on a fixed image are pinned as well.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mstok.evaluation.inception import FIDInceptionV3

State = dict[str, torch.Tensor]


def conv(state: State, name: str, x: torch.Tensor, stride: int = 1, padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """BasicConv2d: bias-free convolution, BatchNorm (eps 1e-3, running statistics), ReLU."""
    x = F.conv2d(x, state[f"{name}.conv.weight"], stride=stride, padding=padding)
    mean, var = state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"]
    scale = state[f"{name}.bn.weight"] / torch.sqrt(var + 1e-3)
    x = (x - mean[:, None, None]) * scale[:, None, None] + state[f"{name}.bn.bias"][:, None, None]
    return torch.clamp(x, min=0)


def same(state: State, name: str, x: torch.Tensor) -> torch.Tensor:
    """A stride-1 convolution padded to keep the size: pad half the kernel on each axis."""
    kh, kw = state[f"{name}.conv.weight"].shape[2:]
    return conv(state, name, x, padding=(kh // 2, kw // 2))


def avg_valid(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average over the pixels inside the image (TF SAME average pooling)."""
    ones = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype)
    sums = F.conv2d(F.pad(x, (1, 1, 1, 1)), torch.ones(x.shape[1], 1, 3, 3, dtype=x.dtype), groups=x.shape[1])
    counts = F.conv2d(F.pad(ones, (1, 1, 1, 1)), torch.ones(1, 1, 3, 3, dtype=x.dtype))
    return sums / counts


def max3(x: torch.Tensor, stride: int) -> torch.Tensor:
    if stride == 1:  # padded with -inf so the border takes the max of the real pixels
        return F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=float("-inf")), 3, 1)
    return F.max_pool2d(x, 3, stride)


def block_a(s: State, p: str, x: torch.Tensor) -> torch.Tensor:
    b1 = same(s, f"{p}.branch1x1", x)
    b5 = same(s, f"{p}.branch5x5_2", same(s, f"{p}.branch5x5_1", x))
    b3 = same(s, f"{p}.branch3x3dbl_3", same(s, f"{p}.branch3x3dbl_2", same(s, f"{p}.branch3x3dbl_1", x)))
    return torch.cat([b1, b5, b3, same(s, f"{p}.branch_pool", avg_valid(x))], 1)


def block_b(s: State, p: str, x: torch.Tensor) -> torch.Tensor:
    b3 = conv(s, f"{p}.branch3x3", x, stride=2)
    dbl = conv(s, f"{p}.branch3x3dbl_3", same(s, f"{p}.branch3x3dbl_2", same(s, f"{p}.branch3x3dbl_1", x)), stride=2)
    return torch.cat([b3, dbl, max3(x, 2)], 1)


def block_c(s: State, p: str, x: torch.Tensor) -> torch.Tensor:
    b7 = x
    for i in (1, 2, 3):
        b7 = same(s, f"{p}.branch7x7_{i}", b7)
    dbl = x
    for i in (1, 2, 3, 4, 5):
        dbl = same(s, f"{p}.branch7x7dbl_{i}", dbl)
    return torch.cat([same(s, f"{p}.branch1x1", x), b7, dbl, same(s, f"{p}.branch_pool", avg_valid(x))], 1)


def block_d(s: State, p: str, x: torch.Tensor) -> torch.Tensor:
    b3 = conv(s, f"{p}.branch3x3_2", same(s, f"{p}.branch3x3_1", x), stride=2)
    b7 = x
    for i in (1, 2, 3):
        b7 = same(s, f"{p}.branch7x7x3_{i}", b7)
    return torch.cat([b3, conv(s, f"{p}.branch7x7x3_4", b7, stride=2), max3(x, 2)], 1)


def block_e(s: State, p: str, x: torch.Tensor, pool: str) -> torch.Tensor:
    b3 = same(s, f"{p}.branch3x3_1", x)
    b3 = torch.cat([same(s, f"{p}.branch3x3_2a", b3), same(s, f"{p}.branch3x3_2b", b3)], 1)
    dbl = same(s, f"{p}.branch3x3dbl_2", same(s, f"{p}.branch3x3dbl_1", x))
    dbl = torch.cat([same(s, f"{p}.branch3x3dbl_3a", dbl), same(s, f"{p}.branch3x3dbl_3b", dbl)], 1)
    pooled = max3(x, 1) if pool == "max" else avg_valid(x)
    return torch.cat([same(s, f"{p}.branch1x1", x), b3, dbl, same(s, f"{p}.branch_pool", pooled)], 1)


def reference_features(s: State, x: torch.Tensor) -> torch.Tensor:
    """Network input (B, 3, H, W) in [-1, 1] -> pool_3 features (B, 2048)."""
    x = conv(s, "Conv2d_1a_3x3", x, stride=2)
    x = conv(s, "Conv2d_2a_3x3", x)
    x = same(s, "Conv2d_2b_3x3", x)
    x = max3(x, 2)
    x = conv(s, "Conv2d_4a_3x3", same(s, "Conv2d_3b_1x1", x))
    x = max3(x, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = block_a(s, name, x)
    x = block_b(s, "Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = block_c(s, name, x)
    x = block_d(s, "Mixed_7a", x)
    x = block_e(s, "Mixed_7b", x, pool="avg")
    x = block_e(s, "Mixed_7c", x, pool="max")
    return x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])


def reference_preprocess(images: np.ndarray, size: int = 299) -> np.ndarray:
    """uint8 (B, 3, H, W) -> TF1 resize_bilinear (source = i * in / out, float32) -> (x - 128) / 128."""
    x = images.astype(np.float32)

    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.arange(size, dtype=np.float32) * (np.float32(n_in) / np.float32(size))
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
        return lo, hi, (src - np.floor(src)).astype(np.float32)

    y0, y1, wy = taps(x.shape[2])
    x0, x1, wx = taps(x.shape[3])
    rows_top, rows_bottom = x[:, :, y0, :], x[:, :, y1, :]
    top = rows_top[..., x0] + (rows_top[..., x1] - rows_top[..., x0]) * wx
    bottom = rows_bottom[..., x0] + (rows_bottom[..., x1] - rows_bottom[..., x0]) * wx
    out = top + (bottom - top) * wy[:, None]
    return (out - 128.0) / 128.0


def random_state(seed: int) -> State:
    """He-scaled convolutions, BatchNorm statistics and affine terms away from identity, random fc."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_mean") or key.endswith("bn.bias"):
            state[key] = torch.randn(value.shape, generator=gen) * 0.1
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            state[key] = torch.rand(value.shape, generator=gen) * 0.4 + 0.8
        elif key.startswith("fc."):
            state[key] = torch.randn(value.shape, generator=gen) * 0.05
        else:
            state[key] = value  # num_batches_tracked
    return state


@pytest.fixture(scope="module")
def network() -> tuple[FIDInceptionV3, State]:
    state = random_state(7)
    model = FIDInceptionV3()
    model.load_fid_state_dict(state)
    return model.eval(), state


@pytest.mark.slow  # two float64 passes through 94 layers, ~3 s on a busy core
def test_features_match_the_functional_reference(network: tuple[FIDInceptionV3, State]) -> None:
    # 107 px: every grid stays > 1 pixel (Mixed_7c sees 2x2), so avg vs max pools and padding rules all show.
    torch.set_num_threads(1)
    model, state = network
    double_state = {k: v.double() for k, v in state.items()}
    x = torch.rand(1, 3, 107, 107, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        got = model.double().forward_features(x)
        expected = reference_features(double_state, x)
    model.float()
    assert got.shape == (1, 2048)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert expected.std() > 1e-2  # the features carry signal through all 94 layers


def test_preprocessing_matches_the_reference() -> None:
    model = FIDInceptionV3()
    images = torch.randint(0, 256, (2, 3, 37, 53), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    got = model.preprocess(images)
    expected = torch.from_numpy(reference_preprocess(images.numpy()))
    assert got.shape == (2, 3, 299, 299)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert float(got.min()) >= -1.0 and float(got.max()) < 1.0
    # Float input in [0, 1] is rounded half up to uint8 first.
    as_float = (images.float() + 0.4) / 255
    torch.testing.assert_close(model.preprocess(as_float), expected, rtol=0, atol=1e-5)


# Feature and logit values of random_state(7) on _pinned_image(), computed with the functional
# reference above in float64 (float32 model: rel 1e-4).
PINNED_FEATURES = {
    1: 0.11934857618304481,
    300: 1.4317892176062497,
    1000: 1.487087829790073,
    1500: 1.9691820553477486,
    2047: 0.0466628947393353,
}
PINNED_LOGITS = {0: 1.5768867656937224, 500: 0.5731170527168823, 1007: 1.429010620061041}


def _pinned_image() -> torch.Tensor:
    yy, xx = np.mgrid[0:48, 0:40]
    channels = [(yy * 5) % 256, (xx * 7) % 256, ((xx + yy) * 3) % 256]
    return torch.from_numpy(np.stack(channels).astype(np.uint8))[None]


def test_pinned_feature_values(network: tuple[FIDInceptionV3, State]) -> None:
    torch.set_num_threads(1)
    model = network[0]
    with torch.no_grad():
        out = model(_pinned_image())
    for index, value in PINNED_FEATURES.items():
        assert float(out.features[0, index]) == pytest.approx(value, rel=1e-4, abs=1e-6), index
    for index, value in PINNED_LOGITS.items():
        assert float(out.logits[0, index]) == pytest.approx(value, rel=1e-4, abs=1e-6), index
