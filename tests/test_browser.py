"""A real browser: headless Chromium (Debian's, driven by Playwright) runs the studio's flow end to end.

Needs /usr/bin/chromium (the README's test command installs it). SERIALGEN_FIGURES=1 runs the flow on the shipped
demo models instead of the tiny test ones and writes the screenshots to assets/figures for the README.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio import build_demo

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "assets" / "examples" / "mia.png")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def app(tiny_full_engine):
    engine = tiny_full_engine
    if os.environ.get("SERIALGEN_FIGURES") == "1":  # the README's figures show the shipped demo models at work
        from engine import load_engine

        engine = load_engine("demo", device="cpu")
    demo = build_demo(engine)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield demo
    demo.close()


def _check_screenshot(path: Path, min_size=(900, 500)):
    image = np.asarray(Image.open(path).convert("RGB"), np.float32)
    assert image.shape[1] >= min_size[0] and image.shape[0] >= min_size[1]
    assert image.std() > 10  # not a blank page
    return image


def test_browser_runs_the_whole_flow(app, tmp_path):
    if CHROMIUM is None:
        pytest.fail("Chromium is missing: install it with `apt-get install -y chromium` (see the README test command)")
    from playwright.sync_api import sync_playwright

    shots = ROOT / "assets" / "figures" if os.environ.get("SERIALGEN_FIGURES") == "1" else tmp_path
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app.local_url, wait_until="load")  # Gradio keeps a connection open: never "networkidle"
        page.wait_for_selector("#engine-status", timeout=30_000)
        assert "SerialGen Studio" in page.content() and "preset demo" in page.inner_text("#engine-status")

        # 1. a character: upload, name, standardize, review, accept
        page.set_input_files("#char-image input[type=file]", EXAMPLE)
        page.locator("#char-name textarea, #char-name input").first.fill("Mia")
        page.click("#btn-standardize")
        page.wait_for_selector("#char-status:has-text('sheet ready')", timeout=90_000)
        page.click("#btn-accept")
        page.wait_for_selector("#char-status:has-text('accepted')", timeout=30_000)
        page.screenshot(path=str(shots / "studio_characters.png"))
        _check_screenshot(shots / "studio_characters.png")

        # 2. the script (the example script uses [Mia])
        page.get_by_role("tab", name="2. Script").click()
        page.click("#btn-check")
        page.wait_for_selector("#script-status:has-text('4 panels, ready to draw')", timeout=30_000)

        # 3. panels
        page.get_by_role("tab", name="3. Panels").click()
        page.click("#btn-draw")
        page.wait_for_selector("#panel-status:has-text('4 of 4 panels drawn')", timeout=120_000)
        assert page.locator("#panel-gallery img").count() >= 4

        # 4. pages
        page.get_by_role("tab", name="4. Pages").click()
        page.click("#btn-pages")
        page.wait_for_selector("#pages img", timeout=60_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / "studio_pages.png"), full_page=True)
        image = _check_screenshot(shots / "studio_pages.png")
        browser.close()
    # the page gallery shows a white comic page with dark panel borders
    assert (image > 240).all(axis=2).mean() > 0.2 and (image < 40).all(axis=2).mean() > 0.001
