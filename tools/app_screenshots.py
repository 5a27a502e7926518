"""The README's screenshots of ``mstok app``, one per tab, taken by the browser of the app's
end-to-end test (tests/app_browser.py: Debian's Chromium through selenium).

Run it in a folder whose ``runs/`` holds trained models (the pickers show their paths as given):

    cd WORKDIR && python /path/to/mstok/tools/app_screenshots.py --tokenizer runs/titok_vq \\
        --other runs/titok_bsq --generator runs/maskgit_tiny --out /path/to/mstok/docs/images

Each PNG is cropped to the page and reduced to 256 colours, so it stays well under 200 KB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from app_browser import (  # tests/ holds the browser helpers of the end-to-end test
    find_chromium,
    open_tab,
    pick,
    serving,
    shown_image,
    start_browser,
    text_of,
    wait_for,
)

SIZE = (1280, 1000)


def _save(browser, path: Path) -> None:
    browser.save_screenshot(str(path))
    image = Image.open(path).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size / 1024:.0f} KB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="the Tokenize tab's model (and Compare's A)")
    parser.add_argument("--other", required=True, help="Compare's model B")
    parser.add_argument("--generator", required=True, help="a generator trained on --tokenizer's tokens")
    parser.add_argument("--class-name", default="goldfish", help="the class to sample (typed into its picker)")
    parser.add_argument("--out", type=Path, required=True, help="folder of app_tokenize.png, app_compare.png, ...")
    args = parser.parse_args(argv)
    found = find_chromium()
    if found is None:
        raise SystemExit("no Chromium with chromedriver: apt-get install chromium chromium-driver")
    args.out.mkdir(parents=True, exist_ok=True)
    served = ["--model", args.tokenizer, "--model", args.other, "--generator", args.generator]
    with serving(served, args.out / "app.log", cwd=Path.cwd()) as url:
        browser = start_browser(*found, size=SIZE)
        try:
            browser.get(url)
            wait_for(browser, lambda b: b.find_elements("id", "tok-run"), "the page")
            pick(browser, "tok-model", args.tokenizer)
            browser.find_element("id", "tok-run").click()
            wait_for(browser, lambda b: "PSNR" in text_of(b, "tok-metrics") and shown_image(b, "tok-recon"), "a result")
            _save(browser, args.out / "app_tokenize.png")

            open_tab(browser, "Compare")
            pick(browser, "cmp-example", "coffee")
            browser.find_element("id", "cmp-run").click()
            wait_for(browser, lambda b: "B:" in text_of(b, "cmp-table"), "the scores")
            wait_for(browser, lambda b: shown_image(b, "cmp-recon-b"), "B's reconstruction")
            _save(browser, args.out / "app_compare.png")

            open_tab(browser, "Generate")
            pick(browser, "gen-model", args.generator)
            pick(browser, "gen-tokenizer", args.tokenizer)
            browser.find_element("id", "gen-load").click()
            wait_for(browser, lambda b: "classes" in text_of(b, "gen-caption"), "the generator's classes")
            pick(browser, "gen-class", args.class_name)
            samples = browser.find_element("css selector", "#gen-samples input[type=number]")
            samples.clear()
            samples.send_keys("8")
            browser.find_element("id", "gen-run").click()
            wait_for(browser, lambda b: "samples of class" in text_of(b, "gen-caption"), "samples", timeout=300)
            _save(browser, args.out / "app_generate.png")
        finally:
            browser.quit()
    (args.out / "app.log").unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
