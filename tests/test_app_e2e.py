"""The web app end to end, as a person uses it: ``mstok app`` started on a loopback port, driven
through its API with the Gradio client, and through the page by a real headless Chromium that
uploads an image, moves the slider and takes a screenshot.

Where Gradio, selenium or Chromium is missing the tests skip and say what to install; under
CI (``CI=true``) they fail instead, since ``.ci/run`` installs all of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mstok
from app_browser import (
    INSTALL_HINT,
    find_chromium,
    move_slider,
    pick,
    serving,
    shown_image,
    start_browser,
    text_of,
    upload,
    wait_for,
)
from mstok.generators import create_generator

pytestmark = pytest.mark.slow  # starting the app imports torch and Gradio in a new process (~10 s)


def _required(message: str) -> None:
    """Skip with ``message``, or fail under CI, which must provide what the test needs."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI must provide it (.ci/run installs it)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved random-weight models (the page refuses presets, not saved models) and upload files."""
    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    mstok.create_tokenizer("hieratok_tiny").save_pretrained(root / "hiera")
    mstok.create_tokenizer("titok_tiny").save_pretrained(root / "titok")
    create_generator("maskgit_tiny").save_pretrained(root / "gen")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(root / "photo.png")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(root / "deep.png")
    (root / "notes.png").write_text("not an image")
    (root / "junk").mkdir()
    return {name: root / name for name in ("hiera", "titok", "gen", "photo.png", "deep.png", "notes.png", "junk")}


@pytest.fixture(scope="module")
def app_url(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        import gradio  # noqa: F401
        import gradio_client  # noqa: F401
    except ImportError:
        _required('Gradio is not installed (pip install "mstok[app]")')
    args = ["--model", str(files["hiera"]), "--model", str(files["titok"]), "--generator", str(files["gen"]),
            "--runs", str(tmp_path_factory.mktemp("no_runs"))]  # fmt: skip
    with serving(args, tmp_path_factory.mktemp("log") / "app.log") as url:
        yield url


def test_the_gradio_client_drives_every_tab(app_url: str, files: dict[str, Path]) -> None:
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    status, original, recon, heat, metrics, slider, ids = client.predict(
        str(files["hiera"]), handle_file(files["photo.png"]), "chelsea", api_name="/tokenize"
    )
    assert status == "" and all(Path(p).is_file() for p in (original, recon, heat))
    assert "PSNR" in metrics and "photo.png: 120x90 RGB" in metrics
    assert (slider["label"], slider["maximum"], slider["interactive"]) == ("scales decoded", 4, True)
    assert len(ids["value"]["data"]) == 85
    status, recon, heat, metrics = client.predict(2, api_name="/redraw")  # the session's tokens
    assert status == "" and "decoded: 2 of 4 scales" in metrics and Image.open(recon).size == (256, 256)

    uploads = [
        ("notes.png", "⚠️ notes.png is not an image file mstok can read"),
        ("deep.png", ""),  # a 16-bit PNG is read, scaled to 8 bits
    ]
    for name, expected in uploads:
        status = client.predict(str(files["titok"]), handle_file(files[name]), None, api_name="/tokenize")[0]
        assert status.startswith(expected) and (expected or status == "")
    for spec, expected in (("titok_tiny", "titok_tiny is a preset"), (str(files["junk"]), "not a saved mstok")):
        message = client.predict(spec, None, "coffee", api_name="/tokenize")[0]
        assert expected in message and "Traceback" not in message

    status, *images, table = client.predict(
        str(files["hiera"]), str(files["titok"]), None, "coffee", api_name="/compare"
    )
    assert status == "" and len(images) == 5 and "| A: " in table and "| B: " in table

    status, classes, guidance, steps, note = client.predict(
        str(files["gen"]), str(files["titok"]), api_name="/generator_settings"
    )
    assert status == "" and classes["value"] == "0" and len(classes["choices"]) == 200
    assert (guidance, steps) == (0.0, 8) and "a MaskGIT generator of 200 classes" in note
    status, gallery, caption = client.predict(
        str(files["gen"]), str(files["titok"]), "3", 1.0, 2, 2, 0, api_name="/generate"
    )
    assert status == "" and len(gallery) == 2 and "2 samples of class 3" in caption


def test_a_browser_uploads_an_image_and_moves_the_slider(app_url: str, files: dict[str, Path], tmp_path: Path) -> None:
    found = find_chromium()
    if found is None:
        _required(f"no Chromium with chromedriver on this machine ({INSTALL_HINT})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _required('selenium is not installed (pip install -e ".[dev]")')
    browser = start_browser(*found)
    try:
        browser.get(app_url)
        wait_for(browser, lambda b: b.find_elements("css selector", "#tok-upload input[type=file]"), "the upload box")
        pick(browser, "tok-model", str(files["hiera"]))
        upload(browser, "tok-upload", files["photo.png"])
        wait_for(browser, lambda b: "photo.png: 120x90" in text_of(b, "tok-metrics"), "the upload's reconstruction")
        assert shown_image(browser, "tok-recon") and shown_image(browser, "tok-heat")
        move_slider(browser, "tok-slider", 0.0)
        wait_for(browser, lambda b: "decoded: 1 of 4 scales" in text_of(b, "tok-metrics"), "the coarsest scale")
        assert shown_image(browser, "tok-recon") and text_of(browser, "tok-status") == ""
        shot = tmp_path / "tokenize.png"
        assert browser.save_screenshot(str(shot))
        box = browser.find_element("css selector", "#tok-recon img").rect
    finally:
        browser.quit()
    page = np.asarray(Image.open(shot).convert("RGB"))
    x, y, w, h = (round(box[k]) for k in ("x", "y", "width", "height"))
    region = page[y : y + h, x : x + w]
    assert region.size and region.std() > 10, "the screenshot shows no reconstruction where the page put it"
