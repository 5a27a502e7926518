"""LPIPS-VGG against a plain float64 reference, and the weights-file resolver, all offline."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mstok.losses import LPIPS, VGG16Features, check_lpips_weights
from mstok.losses.perceptual import LPIPS_FILENAME, LPIPS_URL, VGG16_FILENAME, VGG16_URL
from mstok.storage.weights import MissingWeightsError, cache_dir, load_torch_state_dict, resolve_weights

# torchvision vgg16().features layout, written out independently of the module under test.
STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
WIDTHS = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256, 17: 512, 19: 512, 21: 512, 24: 512, 26: 512, 28: 512}
POOLS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)


def _random_vgg_state_dict(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """He-scaled random convs (so 13 layers neither vanish nor explode) plus classifier keys to ignore."""
    sd: dict[str, torch.Tensor] = {}
    in_ch = 3
    for idx in (i for stage in STAGES for i in stage):
        out = WIDTHS[idx]
        sd[f"features.{idx}.weight"] = torch.randn(out, in_ch, 3, 3, generator=gen) * (2.0 / (9 * in_ch)) ** 0.5
        sd[f"features.{idx}.bias"] = torch.randn(out, generator=gen) * 0.05
        in_ch = out
    sd["classifier.0.weight"] = torch.randn(16, 32, generator=gen)
    sd["classifier.0.bias"] = torch.randn(16, generator=gen)
    return sd


def _random_lin_state_dict(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(CHANNELS)}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("lpips_weights")
    gen = torch.Generator().manual_seed(1234)
    vgg, lin = folder / "vgg16.pth", folder / "vgg.pth"
    torch.save(_random_vgg_state_dict(gen), vgg)
    torch.save(_random_lin_state_dict(gen), lin)
    return vgg, lin


@pytest.fixture(scope="module")
def lpips(weight_files: tuple[Path, Path]) -> LPIPS:
    vgg, lin = weight_files
    return LPIPS.from_pretrained(vgg_weights=vgg, lpips_weights=lin, download=False)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MSTOK_CACHE", str(cache))
    return cache


def _reference_lpips(vgg: dict, lin: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 written out in float64: scale, VGG taps, unit-normalise, weighted squared diff, mean."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(img: torch.Tensor) -> list[torch.Tensor]:
        h = (2 * img.double() - 1 - shift) / scale
        out = []
        for s, stage in enumerate(STAGES):
            if s > 0:
                h = F.max_pool2d(h, 2)
            for idx in stage:
                h = F.relu(
                    F.conv2d(h, vgg[f"features.{idx}.weight"].double(), vgg[f"features.{idx}.bias"].double(), padding=1)
                )
            out.append(h)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for layer, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        na = a / (torch.sqrt((a**2).sum(dim=1, keepdim=True)) + 1e-10)
        nb = b / (torch.sqrt((b**2).sum(dim=1, keepdim=True)) + 1e-10)
        w = lin[f"lin{layer}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((na - nb) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
    return total


def test_vgg_features_have_torchvision_indices() -> None:
    features = VGG16Features()
    expected = {f"features.{i}.{p}" for stage in STAGES for i in stage for p in ("weight", "bias")}
    assert set(features.state_dict()) == expected
    assert len(features.features) == 31
    assert all(isinstance(features.features[i], torch.nn.MaxPool2d) for i in POOLS)
    shapes = [tuple(t.shape) for t in features(torch.zeros(2, 3, 32, 32))]
    assert shapes == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (2, 512, 2, 2)]


def test_lpips_matches_float64_reference(lpips: LPIPS, weight_files: tuple[Path, Path]) -> None:
    vgg, lin = (torch.load(p, weights_only=True) for p in weight_files)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    got = lpips(x, y)
    want = _reference_lpips(vgg, lin, x, y)
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    # Non-square input exercises the per-axis pooling and the spatial mean.
    x, y = torch.rand(1, 3, 16, 32), torch.rand(1, 3, 16, 32)
    torch.testing.assert_close(lpips(x, y).double(), _reference_lpips(vgg, lin, x, y), rtol=1e-5, atol=0)


def test_lpips_zero_for_identical_and_symmetric(lpips: LPIPS) -> None:
    x, y = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    assert torch.equal(lpips(x, x), torch.zeros(3))
    d_xy, d_yx = lpips(x, y), lpips(y, x)
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-6, atol=0)
    assert bool((d_xy > 0).all())


def test_lpips_gradients_frozen_params_and_eval_mode(lpips: LPIPS) -> None:
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    y = torch.rand(2, 3, 16, 16, requires_grad=True)
    lpips(x, y).sum().backward()
    for grad in (x.grad, y.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())
    assert all(p.grad is None for p in lpips.parameters())
    lpips.train()
    assert not lpips.training and not any(m.training for m in lpips.modules())


def test_lpips_float32_under_autocast(lpips: LPIPS) -> None:
    x, y = torch.rand(2, 3, 16, 16).bfloat16(), torch.rand(2, 3, 16, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = lpips(x, y)
    assert mixed.dtype == torch.float32
    # Same arithmetic as a plain float32 call on the same (bf16-valued) pixels: no bf16 convs inside.
    torch.testing.assert_close(mixed, lpips(x.float(), y.float()), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "match"),
    [
        ((3, 32, 32), (3, 32, 32), "3-D"),
        ((1, 3, 32, 32), (1, 3, 32, 16), "same shape"),
        ((1, 1, 32, 32), (1, 1, 32, 32), "3-channel"),
        ((1, 3, 8, 32), (1, 3, 8, 32), "at least 16x16"),
    ],
)
def test_lpips_rejects_bad_shapes(lpips: LPIPS, x_shape: tuple, y_shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lpips(torch.rand(x_shape), torch.rand(y_shape))


def test_vgg_loader_names_missing_and_misshaped_keys(weight_files: tuple[Path, Path]) -> None:
    sd = load_torch_state_dict(weight_files[0])
    missing = {k: v for k, v in sd.items() if k != "features.12.bias"}
    with pytest.raises(ValueError, match=r"features\.12\.bias"):
        VGG16Features().load_torchvision_state_dict(missing)
    misshaped = dict(sd, **{"features.7.weight": torch.zeros(128, 64, 1, 1)})
    with pytest.raises(ValueError, match=r"features\.7\.weight"):
        VGG16Features().load_torchvision_state_dict(misshaped)


def test_lin_loader_rejects_bad_linear_weights(weight_files: tuple[Path, Path]) -> None:
    vgg = load_torch_state_dict(weight_files[0])
    lin = load_torch_state_dict(weight_files[1])
    model = LPIPS()
    before = model.net.features[0].weight.clone()
    with pytest.raises(ValueError, match="lin3"):
        model.load_weights(vgg, {k: v for k, v in lin.items() if not k.startswith("lin3")})
    with pytest.raises(ValueError, match=r"lin2.*negative"):
        model.load_weights(vgg, dict(lin, **{"lin2.model.1.weight": -lin["lin2.model.1.weight"]}))
    assert torch.equal(model.net.features[0].weight, before)  # a rejected file changes nothing


def test_from_pretrained_through_cache_and_safetensors(tmp_path: Path, weight_files: tuple[Path, Path]) -> None:
    cache = tmp_path / "mycache"
    cache.mkdir()
    vgg = {k: v for k, v in load_torch_state_dict(weight_files[0]).items() if k.startswith("features.")}
    save_file(vgg, str(tmp_path / "vgg.safetensors"))
    (cache / LPIPS_FILENAME).write_bytes(weight_files[1].read_bytes())
    with pytest.raises(MissingWeightsError, match=VGG16_FILENAME):
        check_lpips_weights(cache=cache, download=False)
    model = LPIPS.from_pretrained(vgg_weights=tmp_path / "vgg.safetensors", cache=cache, download=False)
    x, y = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    lin = load_torch_state_dict(weight_files[1])
    torch.testing.assert_close(model(x, y).double(), _reference_lpips(vgg, lin, x, y), rtol=1e-5, atol=0)


# ---- resolver -------------------------------------------------------------------------------


def test_cache_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("MSTOK_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mstok"


def test_resolve_explicit_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "w.pth"
    with pytest.raises(MissingWeightsError, match=re.escape(str(missing))) as info:
        resolve_weights("w.pth", "https://example.invalid/w.pth", path=missing)
    assert isinstance(info.value, FileNotFoundError)
    present = tmp_path / "w.pth"
    present.write_bytes(b"x")
    assert resolve_weights("other.pth", None, path=present) == present


def test_resolve_cache_hit(_private_cache: Path, tmp_path: Path) -> None:
    _private_cache.mkdir()
    (_private_cache / "w.pth").write_bytes(b"cached")
    assert resolve_weights("w.pth", "https://example.invalid/w.pth", download=False) == _private_cache / "w.pth"
    other = tmp_path / "other"
    other.mkdir()
    (other / "w.pth").write_bytes(b"x")
    assert resolve_weights("w.pth", None, cache=other) == other / "w.pth"


def test_resolve_download_disabled_message(_private_cache: Path) -> None:
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights("vgg.pth", LPIPS_URL, download=False, what="LPIPS linear weights")
    message = str(info.value)
    for part in ("LPIPS linear weights", "vgg.pth", LPIPS_URL, str(_private_cache / "vgg.pth"), "download=False"):
        assert part in message
    with pytest.raises(MissingWeightsError, match=r"perceptual\.vgg_weights") as info:
        check_lpips_weights(download=False)
    assert VGG16_URL in str(info.value) and str(_private_cache / VGG16_FILENAME) in str(info.value)


def test_resolve_downloads_file_url_atomically(_private_cache: Path, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB read
    source = tmp_path / "remote" / "w.pth"
    source.parent.mkdir()
    source.write_bytes(payload)
    got = resolve_weights("w.pth", source.as_uri())
    assert got == _private_cache / "w.pth" and got.read_bytes() == payload
    assert sorted(p.name for p in _private_cache.iterdir()) == ["w.pth"]


def test_downloaded_weights_follow_the_umask(_private_cache: Path, tmp_path: Path) -> None:
    """A download lands with the mode an ordinary open() gives (colleagues can read it), not mkstemp's 0600."""
    source = tmp_path / "remote" / "w.pth"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    old = os.umask(0o022)
    try:
        got = resolve_weights("w.pth", source.as_uri())
    finally:
        os.umask(old)
    assert stat.S_IMODE(got.stat().st_mode) == 0o644


def test_resolve_failed_download_leaves_nothing(_private_cache: Path, tmp_path: Path) -> None:
    url = (tmp_path / "absent.pth").as_uri()
    with pytest.raises(MissingWeightsError, match="download failed") as info:
        resolve_weights("w.pth", url)
    assert url in str(info.value) and str(_private_cache / "w.pth") in str(info.value)
    assert list(_private_cache.iterdir()) == []
    source = tmp_path / "bad.pth"
    source.write_bytes(b"not the expected bytes")
    with pytest.raises(MissingWeightsError, match="checksum"):
        resolve_weights("w.pth", source.as_uri(), sha256_prefix="00000000")
    assert list(_private_cache.iterdir()) == []


# ---- state-dict reader ----------------------------------------------------------------------


def test_load_torch_state_dict_unwraps_and_validates(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    for wrapper in ("state_dict", "model"):
        torch.save({wrapper: tensors, "epoch": 3}, tmp_path / f"{wrapper}.pt")
        got = load_torch_state_dict(tmp_path / f"{wrapper}.pt")
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_torch_state_dict(tmp_path / "w.safetensors")["b"], tensors["b"])

    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.pth"):
        load_torch_state_dict(tmp_path / "corrupt.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list"):
        load_torch_state_dict(tmp_path / "list.pth")
    torch.save({"a": torch.zeros(1), "step": 5}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="'step'"):
        load_torch_state_dict(tmp_path / "mixed.pth")
    with pytest.raises(FileNotFoundError):
        load_torch_state_dict(tmp_path / "absent.pth")
