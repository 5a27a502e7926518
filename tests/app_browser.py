"""Using the web app from the outside, as a person does: ``mstok app`` started on a loopback port,
and a real headless Chromium driving the page.

The browser is Debian's ``chromium`` with its ``chromium-driver``, driven through selenium (a
pip package that uses the installed browser and driver; playwright would download a browser of
its own, which this project's machines cannot fetch). ``$MSTOK_CHROMIUM`` and
``$MSTOK_CHROMEDRIVER`` name other binaries. Used by tests/test_app_e2e.py and
tools/app_screenshots.py (the README's screenshots).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
START_TIMEOUT = 120.0  # seconds for `mstok app` to answer: importing torch and Gradio on a busy 2-core machine
PAGE_TIMEOUT = 90.0  # seconds for the page to show a result
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "apt-get install chromium chromium-driver (Debian), or set MSTOK_CHROMIUM and MSTOK_CHROMEDRIVER"


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(args: Sequence[str], log: Path, cwd: Path | None = None) -> Iterator[str]:
    """Run ``python -m mstok.app ARGS`` (in ``cwd``) on a free loopback port; yields its URL once it
    answers, and stops it (this process's own child, by its id) afterwards. Its output goes to ``log``."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    command = [sys.executable, "-m", "mstok.app", *args, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mstok app exited with code {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mstok app did not answer on {url} in {START_TIMEOUT:.0f} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths of an installed Chromium and its chromedriver, else None."""
    browser = os.environ.get("MSTOK_CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    driver = os.environ.get("MSTOK_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_browser(browser: str, driver: str, size: tuple[int, int] = (1280, 900)) -> Any:
    """A headless Chromium under selenium, with the given binaries (selenium downloads nothing then)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: Chromium's sandbox refuses to run as root, which CI is
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(browser: Any, condition, what: str, timeout: float = PAGE_TIMEOUT) -> Any:
    """Wait until ``condition(browser)`` is truthy; a timeout names ``what`` and the page's status lines."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        status = [e.text for e in browser.find_elements("css selector", "[id$='-status']") if e.text]
        raise AssertionError(f"the page did not show {what} in {timeout:.0f} s; status lines: {status}") from None


def open_tab(browser: Any, title: str) -> None:
    """Click the page's tab named ``title``."""
    browser.find_element("xpath", f"//button[@role='tab'][normalize-space()='{title}']").click()


def text_of(browser: Any, elem_id: str) -> str:
    return browser.find_element("id", elem_id).text


def pick(browser: Any, elem_id: str, value: str) -> None:
    """Type ``value`` into the dropdown ``elem_id`` and press Enter, as a person picks a model."""
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element("css selector", f"#{elem_id} input")
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(value, Keys.ENTER)


def upload(browser: Any, elem_id: str, path: Path) -> None:
    """Choose ``path`` in the file input of the upload component ``elem_id``."""
    browser.find_element("css selector", f"#{elem_id} input[type=file]").send_keys(str(path))


def shown_image(browser: Any, elem_id: str) -> bool:
    """Whether the image component ``elem_id`` shows a loaded picture."""
    return bool(browser.execute_script(
        "const img = document.querySelector(`#${arguments[0]} img`);"
        "return img !== null && img.complete && img.naturalWidth > 0;", elem_id))  # fmt: skip


def move_slider(browser: Any, elem_id: str, fraction: float) -> None:
    """Click the range input of slider ``elem_id`` at ``fraction`` of its width (0: left end), as a
    pointer does: pointer down and up, so the page's release event fires."""
    from selenium.webdriver.common.action_chains import ActionChains

    track = browser.find_element("css selector", f"#{elem_id} input[type=range]")
    offset = round((fraction - 0.5) * (track.size["width"] - 8))
    ActionChains(browser).move_to_element_with_offset(track, offset, 0).click().perform()
