"""Frozen latent spaces (mstok.tokenizers.latent_space) against hand-written references, offline.

The diffusers VAE is a tiny randomly initialised AutoencoderKL saved to a temporary folder, so
the loading path is the real one without any download. Importing diffusers costs a few seconds
once per session (the module fixture's setup).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mstok.storage.weights import MissingWeightsError
from mstok.tokenizers import create_tokenizer
from mstok.tokenizers.latent_space import (
    VAE_CONFIG_FILE,
    VAE_WEIGHTS_FILE,
    DiffusersVAESpace,
    LatentSpace,
    PixelSpace,
    TokenizerSpace,
    build_latent_space,
)

SCALE, SHIFT = 1.7, 0.2  # deliberately not SD3.5's, so a hard-coded constant would fail


def _assert_frozen(space: LatentSpace) -> None:
    params = list(space.parameters())
    assert params, "expected a space with parameters"
    assert not any(p.requires_grad for p in params)
    space.train()  # a trainer calling .train() on its parent must not switch the first stage
    assert not any(m.training for m in space.modules())


# ----------------------------------------------------------------- PixelSpace
def test_pixel_space_maps_to_minus_one_one_and_back() -> None:
    space = PixelSpace()
    images = torch.rand(2, 3, 12, 20)
    latents = space.encode(images)
    assert (space.channels, space.downsample) == (3, 1)
    assert latents.shape == (2, 3, 12, 20) and space.latent_shape((12, 20)) == (3, 12, 20)
    torch.testing.assert_close(latents, images * 2 - 1)
    torch.testing.assert_close(space.decode(latents), images)


def test_pixel_space_patch_folds_pixels_into_channels() -> None:
    space = PixelSpace(patch=2)
    images = torch.rand(2, 3, 8, 6)
    latents = space.encode(images)
    assert latents.shape == (2, 12, 4, 3) and space.latent_shape((8, 6)) == (12, 4, 3)
    for c, i, j in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)]:
        # channel c*4 + i*2 + j of cell (y, x) is pixel (2y + i, 2x + j) of colour c
        torch.testing.assert_close(latents[:, c * 4 + i * 2 + j], images[:, c, i::2, j::2] * 2 - 1)
    torch.testing.assert_close(space.decode(latents), images)


def test_pixel_space_decode_clamps_and_bf16_is_off_on_cpu() -> None:
    latents = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert PixelSpace().decode(latents)[0, 0, 0].tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    images = torch.rand(1, 3, 4, 4)
    assert torch.equal(PixelSpace(bf16=True).encode(images), PixelSpace().encode(images))


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(1, 3, 8, 8) * 2, r"\[0, 1\]"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float"),
        (torch.rand(1, 4, 8, 8), r"\(B, 3, h, w\)"),
        (torch.rand(3, 8, 8), r"\(B, 3, h, w\)"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.rand(1, 3, 8, 7), "multiples of the downsampling factor f=2"),
    ],
)
def test_pixel_space_rejects_bad_images(images: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PixelSpace(patch=2).encode(images)


def test_bad_arguments_raise_clearly() -> None:
    with pytest.raises(ValueError, match="patch must be a positive integer"):
        PixelSpace(patch=0)
    with pytest.raises(ValueError, match=r"\(B, 12, h, w\)"):
        PixelSpace(patch=2).decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        PixelSpace().decode([[0.0]])
    with pytest.raises(TypeError, match="an int or a pair"):
        PixelSpace().latent_shape(8.0)


# ----------------------------------------------------------------- DiffusersVAESpace
def _tiny_vae(**config: Any) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    fields = {
        "block_out_channels": (8, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "sample_size": 16,
        "scaling_factor": SCALE,
        "shift_factor": SHIFT,
    }
    return AutoencoderKL(**{**fields, **config}).eval()


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    pytest.importorskip("diffusers")
    vae = _tiny_vae()
    folder = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(folder)
    return vae, folder


def test_vae_space_encode_is_the_normalised_posterior_mean(saved_vae: tuple[torch.nn.Module, Path]) -> None:
    vae, folder = saved_vae
    space = DiffusersVAESpace.from_pretrained(folder)
    assert (space.channels, space.downsample) == (4, 2)  # two blocks: one stride-2 stage
    assert (space.scaling_factor, space.shift_factor) == (SCALE, SHIFT)
    images = torch.rand(2, 3, 16, 12)
    latents = space.encode(images)
    assert latents.shape == (2, 4, 8, 6) and space.latent_shape((16, 12)) == (4, 8, 6)
    with torch.no_grad():
        mean = vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(latents, (mean - SHIFT) * SCALE)


def test_random_vae_space_has_sd35s_architecture_and_is_seeded() -> None:
    """The timing stand-in: SD3.5's VAE shapes (83.8M parameters, f 8, 16 channels) and factors,
    built on the meta device (no compute); a small architecture is reproducible per seed."""
    pytest.importorskip("diffusers")
    with torch.device("meta"):
        space = DiffusersVAESpace.random()
    assert (space.channels, space.downsample, space.scaling_factor, space.shift_factor) == (16, 8, 1.5305, 0.0609)
    assert sum(p.numel() for p in space.parameters()) == 83_819_683
    small = _tiny_vae().config
    state = torch.get_rng_state()
    a, b, c = (DiffusersVAESpace.random(dict(small), seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert torch.equal(a.vae.decoder.conv_out.weight, b.vae.decoder.conv_out.weight)
    assert not torch.equal(a.vae.decoder.conv_out.weight, c.vae.decoder.conv_out.weight)
    assert not any(p.requires_grad for p in a.parameters()) and a.encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 8, 8)


def test_vae_space_decode_inverts_the_normalisation(saved_vae: tuple[torch.nn.Module, Path]) -> None:
    vae, folder = saved_vae
    space = DiffusersVAESpace.from_pretrained(folder)
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = ((vae.decode(latents / SCALE + SHIFT).sample + 1) / 2).clamp(0, 1)
    decoded = space.decode(latents)
    assert decoded.shape == (2, 3, 16, 16)
    torch.testing.assert_close(decoded, expected)


def test_vae_space_overrides_and_sampling(saved_vae: tuple[torch.nn.Module, Path]) -> None:
    vae, folder = saved_vae
    images = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        posterior = vae.encode(images * 2 - 1).latent_dist
        torch.manual_seed(5)
        drawn = posterior.sample()
    overridden = DiffusersVAESpace.from_pretrained(folder, scaling_factor=2.0, shift_factor=-0.5)
    torch.testing.assert_close(overridden.encode(images), (posterior.mean + 0.5) * 2.0)
    sampling = build_latent_space({"type": "vae", "path": str(folder), "sample": True})
    torch.manual_seed(5)
    sampled = sampling.encode(images)
    torch.testing.assert_close(sampled, (drawn - SHIFT) * SCALE)
    assert not torch.allclose(sampled, (posterior.mean - SHIFT) * SCALE)


def test_vae_space_without_shift_factor_uses_zero(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    vae = _tiny_vae(shift_factor=None)
    space = DiffusersVAESpace(vae)
    images = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        mean = vae.encode(images * 2 - 1).latent_dist.mean
    assert space.shift_factor == 0.0
    torch.testing.assert_close(space.encode(images), mean * SCALE)


def test_vae_space_is_frozen_and_builds_no_graph(saved_vae: tuple[torch.nn.Module, Path]) -> None:
    space = DiffusersVAESpace.from_pretrained(saved_vae[1])
    _assert_frozen(space)
    images = torch.rand(1, 3, 8, 8, requires_grad=True)
    latents = space.encode(images)
    decoded = space.decode(latents.requires_grad_(True))
    for out in (latents, decoded):
        assert out.grad_fn is None and out.dtype == torch.float32
    assert not decoded.requires_grad


def test_vae_space_loads_a_subfolder(saved_vae: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    vae, _ = saved_vae
    vae.save_pretrained(tmp_path / "vae")
    space = build_latent_space({"type": "vae", "path": str(tmp_path), "subfolder": "vae"})
    images = torch.rand(1, 3, 8, 8)
    reference = DiffusersVAESpace(vae)
    torch.testing.assert_close(space.encode(images), reference.encode(images))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # inside diffusers
def test_vae_space_missing_files_name_what_to_fetch(saved_vae: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="does not exist") as err:
        DiffusersVAESpace.from_pretrained(tmp_path / "absent")
    message = str(err.value)
    assert VAE_CONFIG_FILE in message and VAE_WEIGHTS_FILE in message and "stable-diffusion-3.5" in message
    (tmp_path / VAE_CONFIG_FILE).write_text((saved_vae[1] / VAE_CONFIG_FILE).read_text())
    with pytest.raises(MissingWeightsError, match=re.escape(f"{tmp_path} lacks {VAE_WEIGHTS_FILE}")):
        DiffusersVAESpace.from_pretrained(tmp_path)
    (tmp_path / "vae").mkdir()
    with pytest.raises(MissingWeightsError, match=re.escape(f"lacks {VAE_CONFIG_FILE} and {VAE_WEIGHTS_FILE}")):
        DiffusersVAESpace.from_pretrained(tmp_path, subfolder="vae")
    with pytest.raises(MissingWeightsError, match=re.escape(f"{tmp_path / 'sub'} is not a folder")) as err:
        DiffusersVAESpace.from_pretrained(tmp_path, subfolder="sub")
    assert VAE_WEIGHTS_FILE in str(err.value)
    # a hub id not in the cache, with downloading off: no network, the same message
    with pytest.raises(MissingWeightsError, match="downloading is disabled") as err:
        DiffusersVAESpace.from_pretrained("mstok-tests/no-such-vae", subfolder="vae", download=False)
    assert VAE_WEIGHTS_FILE in str(err.value)


def test_vae_space_refuses_other_folders(saved_vae: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    (tmp_path / VAE_CONFIG_FILE).write_text(json.dumps({"family": "convae", "config": {}}))
    (tmp_path / VAE_WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match="use type 'tokenizer'"):
        DiffusersVAESpace.from_pretrained(tmp_path)
    (tmp_path / VAE_CONFIG_FILE).write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ValueError, match="it is a SD3Transformer2DModel"):
        DiffusersVAESpace.from_pretrained(tmp_path)
    (tmp_path / VAE_CONFIG_FILE).write_text((saved_vae[1] / VAE_CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match="cannot load the AutoencoderKL in"):  # an empty weights file
        DiffusersVAESpace.from_pretrained(tmp_path)


def test_vae_space_without_diffusers_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "mstok\[semtok\]"'):
        DiffusersVAESpace.from_pretrained("mstok-tests/no-such-vae", download=False)


# ----------------------------------------------------------------- TokenizerSpace
@pytest.fixture(scope="module")
def saved_convae(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    tokenizer = create_tokenizer("convae_tiny", quantizer="none", use_l2_norm=False).eval()
    return tokenizer, tokenizer.save_pretrained(tmp_path_factory.mktemp("convae"))


def test_tokenizer_space_reshapes_the_grid(saved_convae: tuple[torch.nn.Module, Path]) -> None:
    tokenizer, folder = saved_convae
    space = build_latent_space({"type": "tokenizer", "path": str(folder)})
    assert (space.channels, space.downsample, space.latent_shape(64)) == (6, 8, (6, 8, 8))
    images = torch.rand(2, 3, 64, 64)
    latents = space.encode(images)
    tokens = tokenizer.encode(images)  # (B, K, C), K = 64 cells in raster order
    assert latents.shape == (2, 6, 8, 8)
    for y, x in [(0, 0), (0, 7), (3, 5), (7, 7)]:
        torch.testing.assert_close(latents[:, :, y, x], tokens[:, y * 8 + x])
    torch.testing.assert_close(space.decode(latents), tokenizer.decode(tokens))
    _assert_frozen(space)


def test_tokenizer_space_accepts_a_decoder_pyramid_hieratok() -> None:
    torch.manual_seed(0)
    tokenizer = create_tokenizer("hieratok_tiny", pyramid="decoder", depth=1, decoder_depth=1)
    space = TokenizerSpace(tokenizer)
    images = torch.rand(1, 3, 64, 64)
    latents = space.encode(images)
    assert latents.shape == (1, 6, 8, 8)
    torch.testing.assert_close(latents[:, :, 2, 3], tokenizer.encode(images)[:, 2 * 8 + 3])
    assert space.decode(latents).shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    ("preset", "overrides", "match"),
    [
        ("titok_tiny", {"quantizer": "none"}, "1D tokens, not a square grid"),
        ("hieratok_tiny", {"depth": 1, "decoder_depth": 1}, "pyramid='encoder'"),
        ("convae_tiny", {}, "continuous latents"),
    ],
)
def test_tokenizer_space_refuses_non_grid_or_discrete(preset: str, overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenizerSpace(create_tokenizer(preset, **overrides))


def test_tokenizer_space_loads_only_grid_families(tmp_path: Path) -> None:
    folder = create_tokenizer("titok_tiny", quantizer="none").save_pretrained(tmp_path / "titok")
    with pytest.raises(ValueError, match=r"latents form a spatial grid .* holds a 'titok' model"):
        build_latent_space({"type": "tokenizer", "path": str(folder)})


def test_tokenizer_space_checks_sizes(saved_convae: tuple[torch.nn.Module, Path]) -> None:
    space = TokenizerSpace(saved_convae[0])
    with pytest.raises(ValueError, match="takes 64x64 images, got 32x32"):
        space.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 6, 8, 8\)"):
        space.decode(torch.zeros(1, 6, 4, 4))
    with pytest.raises(ValueError, match="sample=True needs a VAE tokenizer"):
        TokenizerSpace(saved_convae[0], sample=True)


# ----------------------------------------------------------------- build_latent_space
def test_build_latent_space_specs_and_errors() -> None:
    assert isinstance(build_latent_space("pixels"), PixelSpace)
    assert build_latent_space({"type": "pixels", "patch": 2}).channels == 12
    space = PixelSpace()
    assert build_latent_space(space) is space
    with pytest.raises(ValueError, match="unknown latent space type 'sd3'; known types: pixels, vae, tokenizer"):
        build_latent_space("sd3")
    with pytest.raises(ValueError, match="unknown latent space type None"):
        build_latent_space({"path": "x"})
    unknown_key = r"unknown setting\(s\) \['size'\] for latent space type 'pixels'; valid: patch"
    with pytest.raises(ValueError, match=unknown_key):
        build_latent_space({"type": "pixels", "size": 2})
    with pytest.raises(TypeError, match="a type name or a table"):
        build_latent_space(3)
