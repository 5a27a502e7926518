"""Every bad input is refused with a ValueError (FileNotFoundError for missing files) whose
message names the problem."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mstok

IMAGE, K, V = 64, 32, 1024


@pytest.fixture(scope="module")
def model() -> mstok.Tokenizer:
    return mstok.create_tokenizer("titok_tiny").eval()


@pytest.fixture(scope="module")
def proxy_model() -> mstok.Tokenizer:
    return mstok.create_tokenizer("mstok_tiny", head="proxy_codes").eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return mstok.create_tokenizer("titok_tiny").save_pretrained(tmp_path_factory.mktemp("saved") / "titok")


@pytest.fixture
def checkpoint(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved titok_tiny folder that a test may damage."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


# ------------------------------------------------------------------ images
def _images(**kw) -> torch.Tensor:
    return torch.rand(2, 3, IMAGE, IMAGE, **kw)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        pytest.param([[0.5]], "must be a torch.Tensor, got list", id="list"),
        pytest.param(None, "must be a torch.Tensor, got NoneType", id="none"),
        pytest.param(
            (torch.rand(2, 3, IMAGE, IMAGE) * 255).to(torch.uint8),
            r"float tensor.*torch\.uint8.*divide by 255",
            id="uint8",
        ),
        pytest.param(torch.randint(0, 2, (2, 3, IMAGE, IMAGE)), r"float tensor.*torch\.int64", id="int64"),
        pytest.param(torch.rand(3, IMAGE, IMAGE), r"shape \(B, 3, H, W\), got \(3, 64, 64\)", id="3d"),
        pytest.param(torch.rand(1, 2, 3, IMAGE, IMAGE), r"shape \(B, 3, H, W\)", id="5d"),
        pytest.param(torch.rand(2, 1, IMAGE, IMAGE), "3 channels.*got 1", id="1-channel"),
        pytest.param(torch.rand(2, 4, IMAGE, IMAGE), "3 channels.*got 4", id="4-channels"),
        pytest.param(torch.rand(2, 3, 32, 32), "takes 64x64 images, got 32x32", id="32x32"),
        pytest.param(torch.rand(2, 3, 64, 32), "takes 64x64 images, got 64x32", id="64x32"),
        pytest.param(torch.rand(2, 3, IMAGE, IMAGE) * 255, r"must be in \[0, 1\]", id="0-255"),
        pytest.param(torch.rand(2, 3, IMAGE, IMAGE) - 0.5, r"must be in \[0, 1\]", id="negative"),
    ],
)
def test_encode_rejects_bad_images(model, images, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model.encode(images)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_rejects_non_finite(model, bad: float) -> None:
    images = _images()
    images[1, 2, 10, 20] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.encode(images)


def test_images_within_rounding_of_the_range_are_accepted(model) -> None:
    images = _images()
    images[0, 0, 0, 0] = -1e-4
    images[0, 0, 0, 1] = 1 + 1e-4
    assert model.encode(images).shape == (2, K)


@pytest.mark.parametrize("call", ["forward", "encode_features"])
def test_other_entry_points_check_images(model, call: str) -> None:
    with pytest.raises(ValueError, match="takes 64x64 images"):
        getattr(model, call)(torch.rand(1, 3, 32, 32))


# ------------------------------------------------------------------ tokens
@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        pytest.param([[1, 2]], "tokens must be a torch.Tensor, got list", id="list"),
        pytest.param(torch.zeros(2, K), r"integer tensor, got dtype torch\.float32", id="float"),
        pytest.param(torch.zeros(2, K, dtype=torch.bool), r"integer tensor, got dtype torch\.bool", id="bool"),
        pytest.param(torch.zeros(2, 16, dtype=torch.long), r"shape \(B, 32\), got \(2, 16\)", id="wrong-k"),
        pytest.param(torch.zeros(K, dtype=torch.long), r"shape \(B, 32\), got \(32,\)", id="1d"),
        pytest.param(
            torch.full((2, K), V), r"token ids must be in \[0, 1024\), got values in \[1024, 1024\]", id="too-large"
        ),
        pytest.param(
            torch.full((2, K), -1), r"token ids must be in \[0, 1024\), got values in \[-1, -1\]", id="negative"
        ),
    ],
)
def test_decode_rejects_bad_tokens(model, tokens, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model.decode(tokens)


def test_decode_accepts_other_integer_dtypes(model) -> None:
    tokens = torch.randint(0, V, (1, K), dtype=torch.int32)
    assert model.decode(tokens).shape == (1, 3, IMAGE, IMAGE)


def test_decode_on_proxy_model_points_to_decode_logits(proxy_model) -> None:
    tokens = torch.zeros(1, K, dtype=torch.long)
    with pytest.raises(ValueError, match=r"proxy codes.*use decode_logits\(\)"):
        proxy_model.decode(tokens)
    assert proxy_model.decode_logits(tokens).shape == (1, 64, 1024)


def test_decode_logits_on_pixel_model(model) -> None:
    with pytest.raises(ValueError, match="decode_logits\\(\\) needs head='proxy_codes'"):
        model.decode_logits(torch.zeros(1, K, dtype=torch.long))


# ------------------------------------------------------------------ create_tokenizer
def test_unknown_preset_lists_presets_and_suggests() -> None:
    with pytest.raises(ValueError, match="unknown preset 'mstok_b6'") as info:
        mstok.create_tokenizer("mstok_b6")
    message = str(info.value)
    assert "did you mean mstok_b64" in message
    for name in mstok.list_presets():
        assert name in message


def test_unknown_preset_without_close_match() -> None:
    with pytest.raises(ValueError, match="unknown preset 'zzz'; available: titok_s128") as info:
        mstok.create_tokenizer("zzz")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "field", "cls"),
    [("mstok_tiny", "foo", "MsTokConfig"), ("titok_tiny", "memory_layers", "TiTokConfig")],
)
def test_unknown_override_field(name: str, field: str, cls: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown {cls} field\(s\) \['{field}'\]; valid fields: image_size"):
        mstok.create_tokenizer(name, **{field: 1})


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [
        ("titok_tiny", {"image_size": 60}, "image_size 60 is not a multiple of patch_size 8"),
        ("mstok_tiny", {"width": 130}, "width 130 is not a multiple of num_heads 4"),
        ("titok_tiny", {"num_heads": 0}, "num_heads must be a positive integer, got 0"),
        ("titok_tiny", {"num_latent_tokens": 0}, "num_latent_tokens must be a positive integer, got 0"),
        ("titok_tiny", {"codebook_size": -3}, "codebook_size must be a positive integer, got -3"),
        ("titok_tiny", {"head": "rgb"}, "head must be one of .*got 'rgb'"),
        ("mstok_tiny", {"memory_layers": (1, 3)}, r"memory_layers \[1, 3\] must .*end at the last block \(4\)"),
        ("mstok_tiny", {"memory_layers": (0, 4)}, r"memory_layers \[0, 4\] must lie in 1\.\.depth"),
        ("mstok_tiny", {"memory_layers": (3, 2, 4)}, r"memory_layers must be a non-empty increasing list"),
        ("mstok_tiny", {"memory_layers": (2, 2, 4)}, r"non-empty increasing list, got \[2, 2, 4\]"),
        ("mstok_tiny", {"memory_layers": ()}, r"non-empty increasing list, got \[\]"),
        ("mstok_tiny", {"depth": 6}, r"end at the last block \(6\)"),
        ("mstok_tiny", {"aggregation": "sum"}, "aggregation must be one of .*got 'sum'"),
        ("mstok_tiny", {"readout": "mlp"}, "readout must be one of .*got 'mlp'"),
        ("mstok_tiny", {"head": "tokens"}, "head must be one of .*got 'tokens'"),
        ("mstok_tiny", {"qam_depth": 0}, "qam_depth must be a positive integer, got 0"),
    ],
)
def test_invalid_config_values(name: str, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mstok.create_tokenizer(name, **overrides)


def test_zero_patch_size() -> None:
    with pytest.raises(ValueError, match="patch_size must be a positive integer"):
        mstok.create_tokenizer("titok_tiny", patch_size=0)


# ------------------------------------------------------------------ load_tokenizer: files
def test_load_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*not a saved mstok tokenizer"):
        mstok.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        mstok.load_tokenizer(tmp_path / "does-not-exist")


@pytest.mark.parametrize(
    "text",
    ["{not json", "", "[1, 2]", '{"config": {}}', '{"family": "titok"}'],
    ids=["garbage", "empty", "list", "no-family", "no-config"],
)
def test_load_corrupt_config(checkpoint: Path, text: str) -> None:
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config\.json is not a valid mstok tokenizer config"):
        mstok.load_tokenizer(checkpoint)


def _edit_config(folder: Path, **changes) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta.update({k: v for k, v in changes.items() if k == "family"})
    meta["config"].update({k: v for k, v in changes.items() if k != "family"})
    (folder / "config.json").write_text(json.dumps(meta))


def test_load_unknown_family(checkpoint: Path) -> None:
    _edit_config(checkpoint, family="vqgan")
    with pytest.raises(ValueError, match="unknown tokenizer family 'vqgan'; known: titok, mstok"):
        mstok.load_tokenizer(checkpoint)


def test_load_config_with_unknown_field(checkpoint: Path) -> None:
    _edit_config(checkpoint, colour=True)
    with pytest.raises(ValueError, match=r"unknown TiTokConfig field\(s\) \['colour'\]"):
        mstok.load_tokenizer(checkpoint)


def test_load_config_with_wrong_type(checkpoint: Path) -> None:
    _edit_config(checkpoint, image_size="64")
    with pytest.raises(ValueError, match="image_size"):
        mstok.load_tokenizer(checkpoint)


def test_load_missing_weights(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*model\.safetensors"):
        mstok.load_tokenizer(checkpoint)
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*ema\.safetensors"):
        mstok.load_tokenizer(checkpoint, weights="ema.safetensors")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_load_corrupt_weights(checkpoint: Path, damage: str) -> None:
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    damaged = {"garbage": b"\x8f not a safetensors file" * 40, "truncated": data[: len(data) // 2], "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(ValueError, match=r"cannot read weights file .*model\.safetensors: it is not a valid"):
        mstok.load_tokenizer(checkpoint)


# ------------------------------------------------------------------ load_tokenizer: mismatched weights
def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_weights_with_non_finite_values(checkpoint: Path, bad: float) -> None:
    """A weights file holding NaN/inf is refused by name, not loaded into NaN reconstructions."""

    def edit(t: dict[str, torch.Tensor]) -> None:
        t["decoder.mask_token"] = t["decoder.mask_token"].clone()
        t["decoder.mask_token"].view(-1)[3] = bad

    _edit_weights(checkpoint, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors hold NaN or infinite values.*decoder\.mask_token"):
        mstok.load_tokenizer(checkpoint)


def test_load_mismatched_checkpoint_lists_every_problem(checkpoint: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t["decoder.mask_token"]
        t["encoder.extra_weight"] = torch.zeros(3)
        t["quantizer.embedding.weight"] = torch.zeros(V, 13)

    _edit_weights(checkpoint, edit)
    with pytest.raises(ValueError, match="do not match the model") as info:
        mstok.load_tokenizer(checkpoint)
    message = str(info.value)
    assert "missing keys: decoder.mask_token" in message
    assert "unexpected keys: encoder.extra_weight" in message
    assert "wrong shapes: quantizer.embedding.weight: checkpoint (1024, 13) vs model (1024, 12)" in message


@pytest.mark.parametrize("problem", ["missing keys", "unexpected keys", "wrong shapes"])
def test_load_each_mismatch_alone(checkpoint: Path, problem: str) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        if problem == "missing keys":
            del t["encoder.ln_post.bias"]
        elif problem == "unexpected keys":
            t["decoder.bonus"] = torch.ones(1)
        else:
            t["decoder.pos_embed"] = t["decoder.pos_embed"][:10]

    _edit_weights(checkpoint, edit)
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        mstok.load_tokenizer(checkpoint)
    others = {"missing keys", "unexpected keys", "wrong shapes"} - {problem}
    assert not any(other in str(info.value) for other in others)


def test_load_many_missing_keys_is_summarised(checkpoint: Path) -> None:
    expected = len(mstok.create_tokenizer("titok_tiny").state_dict()) - 1
    _edit_weights(checkpoint, lambda t: [t.pop(k) for k in list(t) if k != "quantizer.embedding.weight"])
    with pytest.raises(ValueError, match=rf"missing keys: .*, \.\.\. \({expected} in all\)"):
        mstok.load_tokenizer(checkpoint)


def test_load_with_edited_num_latent_tokens(checkpoint: Path) -> None:
    _edit_config(checkpoint, num_latent_tokens=16)
    with pytest.raises(ValueError, match="wrong shapes") as info:
        mstok.load_tokenizer(checkpoint)
    message = str(info.value)
    assert "encoder.latent_tokens: checkpoint (32, 128) vs model (16, 128)" in message
    assert "decoder.latent_pos_embed: checkpoint (32, 128) vs model (16, 128)" in message
    assert "missing keys" not in message and "unexpected keys" not in message


def test_undamaged_checkpoint_loads(checkpoint: Path) -> None:
    assert isinstance(mstok.load_tokenizer(checkpoint), mstok.TiTok)
