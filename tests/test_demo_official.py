"""``mstok demo --official``: an official TiTok release on the bundled photos, from a local copy
(the small official-layout fixture of tests/test_convert_titok.py), and what it says offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mstok.app.models import ModelCache, Runtime
from mstok.cli import main
from mstok.demo_official import PHOTOS, OfficialUnavailableError, load_official, run_official_demo

FIXTURE = Path(__file__).parent / "fixtures" / "titok" / "legacy_s"  # official layout, 32 px, K = 16, V = 256


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face hub unreachable and nothing cached, as on a machine without internet."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)


def test_a_local_copy_reconstructs_every_bundled_photo(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["demo", "--official", str(FIXTURE), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["tokens_per_image"], metrics["bits_per_image"], metrics["image_size"]) == (16, 128.0, 32)
    assert list(metrics["photos"]) == list(PHOTOS) and all(m["psnr"] > 0 for m in metrics["photos"].values())
    report = (tmp_path / "out" / "report.md").read_text()
    assert "16 tokens per 32x32 image (128 bits)" in report and "| chelsea |" in report
    assert (tmp_path / "out" / "grid.png").is_file()
    printed = capsys.readouterr().out
    assert f"16 tokens (128 bits) per 32x32 image: PSNR {metrics['psnr']:.2f} dB" in printed
    assert f"report written to {tmp_path / 'out' / 'report.md'}" in printed


def test_offline_a_release_name_fails_in_one_line_that_says_how_to_give_a_copy(
    offline: None, capsys: pytest.CaptureFixture
) -> None:
    assert main(["demo", "--official", "titok_l32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mstok demo: error: the weights of titok_l32 cannot be fetched")
    assert "hf download yucornetto/tokenizer_titok_l32_imagenet --local-dir tokenizer_titok_l32_imagenet" in err
    assert "mstok demo --official tokenizer_titok_l32_imagenet" in err


def test_the_app_picker_loads_official_releases_the_same_way(offline: None) -> None:
    cache = ModelCache(Runtime(torch.device("cpu")))
    loaded = cache.get(f"official:{FIXTURE}")
    assert loaded.model.config.num_latent_tokens == 16 and "official TiTok tokenizer, local copy" in loaded.label
    with pytest.raises(OfficialUnavailableError, match=r"official:tokenizer_titok_b64_imagenet\)$"):
        cache.get("official:titok_b64")
    with pytest.raises(OfficialUnavailableError, match="the weights of titok_s128 cannot be fetched"):
        load_official("titok_s128", "generator")


def test_unknown_releases_and_mixed_flags_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'titok_xl7' is neither a folder nor an official TiTok tokenizer release; "):
        run_official_demo("titok_xl7", tmp_path)
    assert main(["demo", "--official", "titok_l32", "--steps", "10"]) == 2
