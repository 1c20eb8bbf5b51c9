"""The demo page in a real browser: Playwright drives Debian's chromium (installed by .ci/run;
`playwright install` is never needed) against the demo served on 127.0.0.1, clicking, moving a
slider and drawing with the mouse, and checks that the pictures change.

Run as a script, it saves a screenshot of the page for a run:
    python tests/test_serve_browser.py RUN docs/images/demo.png
"""
import sys
import tempfile
from pathlib import Path

import pytest

from test_serve import demo, run, running  # noqa: F401  (fixtures shared with the API tests)
from vaekit.serve import load

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser: {CHROMIUM} is missing "
                                "(.ci/run installs it: apt-get install chromium)")
# No sandbox (tests run as root in CI), no GPU, and no calls home: this machine has no internet.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 15_000


def open_page(playwright, url: str, profile: Path):
    """A fresh chromium with its own profile folder, on the demo page once everything is drawn."""
    browser = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 1000})
    page = browser.pages[0] if browser.pages else browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    return browser, page, errors


def src(page, selector: str) -> str:
    return page.get_attribute(selector, "src") or ""


def wait_for_new_src(page, selector: str, old: str) -> str:
    """Waits until the image `selector` shows a picture other than `old`; returns it."""
    page.wait_for_function("([sel, old]) => { const s = document.querySelector(sel).getAttribute('src');"
                           " return s && s !== old; }", arg=[selector, old])
    return src(page, selector)


def drag(page, selector: str, points: list[tuple[float, float]]) -> None:
    """Presses the mouse at the first point (fractions of the element's box) and moves through the rest."""
    box = page.locator(selector).bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture
def page(playwright, demo, tmp_path):  # noqa: F811
    with running(demo) as url:
        browser, page, errors = open_page(playwright, url, tmp_path / "profile")
        try:
            yield page
        finally:
            browser.close()
        assert errors == []


def test_the_page_plays(page):
    # prior samples: a new set on each click
    first = src(page, "#samples")
    assert first.startswith("data:image/png;base64,")
    page.click("#new-samples")
    wait_for_new_src(page, "#samples", first)

    # sliders: as many as asked, and moving the first (most active) one redraws the decode
    assert page.locator("#sliders input[type=range]").count() == 8
    before = src(page, "#traverse-image")
    assert before
    slider = page.locator("#sliders input[type=range]").first
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)     # to the right end
    wait_for_new_src(page, "#traverse-image", before)
    assert float(slider.input_value()) > 4
    page.fill("#latent-k", "3")
    page.dispatch_event("#latent-k", "change")
    page.wait_for_function("document.querySelectorAll('#sliders input').length === 3")

    # drawing: a stroke gives a reconstruction, a second stroke changes it
    assert src(page, "#draw-output") == ""
    drag(page, "#draw-canvas", [(0.5, 0.15), (0.5, 0.5), (0.5, 0.85)])
    one = wait_for_new_src(page, "#draw-output", "")
    drag(page, "#draw-canvas", [(0.2, 0.5), (0.5, 0.5), (0.8, 0.5)])
    wait_for_new_src(page, "#draw-output", one)
    page.click("#draw-clear")
    assert src(page, "#draw-output") == ""

    # inpainting: paint a mask with the brush, fill it
    drag(page, "#mask-canvas", [(0.3, 0.6), (0.5, 0.7), (0.7, 0.6)])
    page.fill("#inpaint-steps", "5")
    page.click("#inpaint-run")
    filled = wait_for_new_src(page, "#inpaint-output", "")
    assert page.text_content("#inpaint-error") == ""
    page.click("#inpaint-presets button:text('top')")                  # a named region, loaded as the mask
    wait_for_new_src(page, "#inpaint-output", filled)
    page.click("#inpaint-clear")
    page.click("#inpaint-run")
    page.wait_for_function("document.querySelector('#inpaint-error').textContent.includes('the mask is empty')")

    # interpolation: a strip of steps + 2 frames
    strip = src(page, "#interp-image")
    page.fill("#interp-steps", "5")
    page.select_option("#interp-path", "slerp")
    page.click("#interp-run")
    wait_for_new_src(page, "#interp-image", strip)
    width = page.evaluate("document.querySelector('#interp-image').naturalWidth")
    assert width == 7 * 29 + 1

    # a bad value is said on the page, in its panel
    page.fill("#samples-n", "500")
    page.click("#new-samples")
    page.wait_for_function("document.querySelector('#samples-error').textContent.includes('less than or equal to 64')")


def screenshot(run_dir: str, out: str) -> None:
    """Saves a screenshot of the demo page for `run_dir`, with a drawing and a filled mask on it."""
    from playwright.sync_api import sync_playwright

    with running(load(run_dir, "cpu")) as url, sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser, page, _ = open_page(p, url, Path(profile))
        drag(page, "#draw-canvas", [(0.62, 0.2), (0.38, 0.22), (0.36, 0.48), (0.6, 0.5), (0.62, 0.78),
                                    (0.36, 0.8)])
        wait_for_new_src(page, "#draw-output", "")
        page.click("#inpaint-presets button:text('bottom')")
        wait_for_new_src(page, "#inpaint-output", "")
        page.wait_for_timeout(300)
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    screenshot(*sys.argv[1:3])
