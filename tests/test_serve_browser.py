"""The demo page in a real browser: Playwright drives Debian's chromium (installed by .ci/run;
`playwright install` is never needed) against the demo served on 127.0.0.1, clicking, moving
sliders, hovering and drawing with the mouse, and checks what the page shows.

Run as a script, it saves a screenshot of the page for a run:
    python tests/test_serve_browser.py RUN docs/images/demo.png
"""
import base64
import io
import json
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_serve import demo, rgb_demo, run, running  # noqa: F401  (fixtures shared with the API tests)
from vaekit.serve import load

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser: {CHROMIUM} is missing "
                                "(.ci/run installs it: apt-get install chromium)")
REBOUND = "rebound.example"     # a name of another site, resolved to 127.0.0.1 as DNS rebinding would
# No sandbox (tests run as root in CI), no GPU, and no calls home: this machine has no internet.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"]
TIMEOUT_MS = 15_000


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@contextmanager
def opened(browser, url: str, width: int = 1400, height: int = 1000):
    """A fresh page of the demo at `url` once everything is drawn; fails on any script error."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    try:
        yield page
    finally:
        context.close()
    assert errors == []


def src(page, selector: str) -> str:
    return page.get_attribute(selector, "src") or ""


def wait_for_new_src(page, selector: str, old: str) -> str:
    """Waits until the image `selector` shows a picture other than `old`; returns it."""
    page.wait_for_function("([sel, old]) => { const s = document.querySelector(sel).getAttribute('src');"
                           " return s && s !== old; }", arg=[selector, old])
    return src(page, selector)


def wait_for_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([sel, text]) => document.querySelector(sel).textContent.includes(text)",
                           arg=[selector, text])


def png_pixels(data_url: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def drag(page, selector: str, points: list[tuple[float, float]]) -> None:
    """Presses the mouse at the first point (fractions of the element's box) and moves through the rest."""
    box = page.locator(selector).bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def point_at(page, selector: str, fx: float, fy: float) -> tuple[float, float]:
    box = page.locator(selector).bounding_box()
    return box["x"] + fx * box["width"], box["y"] + fy * box["height"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def url(demo):  # noqa: F811
    with running(demo) as url:
        yield url


@pytest.fixture
def page(browser, url):
    with opened(browser, url) as page:
        yield page


def test_the_page_plays(page):
    blank = page.evaluate("BLANK")
    # prior samples: a new set on each click
    first = src(page, "#samples")
    assert first.startswith("data:image/png;base64,")
    page.click("#new-samples")
    wait_for_new_src(page, "#samples", first)

    # sliders: as many as asked, and moving the first (most active) one redraws the decode
    assert page.locator("#sliders input[type=range]").count() == 8
    before = src(page, "#traverse-image")
    assert before.startswith("data:image/png;base64,")
    slider = page.locator("#sliders input[type=range]").first
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)     # to the right end
    wait_for_new_src(page, "#traverse-image", before)
    assert float(slider.input_value()) > 4
    page.fill("#latent-k", "3")
    page.dispatch_event("#latent-k", "change")
    page.wait_for_function("document.querySelectorAll('#sliders input').length === 3")

    # drawing: a stroke gives a reconstruction, a second stroke changes it; Clear empties both
    # pictures for good (an answer still on its way is dropped)
    assert src(page, "#draw-output") == blank
    drag(page, "#draw-canvas", [(0.5, 0.15), (0.5, 0.5), (0.5, 0.85)])
    one = wait_for_new_src(page, "#draw-output", blank)
    held = []                                             # the stroke's answer is held back until after Clear
    page.route("**/api/reconstruct", lambda route: held.append(route))
    drag(page, "#draw-canvas", [(0.2, 0.5), (0.5, 0.5), (0.8, 0.5)])
    for _ in range(100):                                  # until the stroke's request is held
        if held:
            break
        page.wait_for_timeout(50)
    page.click("#draw-clear")
    assert len(held) == 1                                 # one request at a time; the later strokes' wait
    held[0].continue_()
    page.unroute("**/api/reconstruct")
    page.wait_for_timeout(400)
    assert src(page, "#draw-output") == blank and src(page, "#draw-input") == blank
    drag(page, "#draw-canvas", [(0.2, 0.5), (0.5, 0.5), (0.8, 0.5)])
    assert wait_for_new_src(page, "#draw-output", blank) != one

    # inpainting: paint a mask with the brush, fill it
    drag(page, "#mask-canvas", [(0.3, 0.6), (0.5, 0.7), (0.7, 0.6)])
    page.fill("#inpaint-steps", "5")
    page.click("#inpaint-run")
    filled = wait_for_new_src(page, "#inpaint-output", blank)
    assert page.text_content("#inpaint-error") == "" and page.text_content("#inpaint-note") == ""
    page.click("#inpaint-presets button:text('top')")                  # a named region, loaded as the mask
    wait_for_new_src(page, "#inpaint-output", filled)

    # interpolation: steps + 2 frames
    page.fill("#interp-steps", "5")
    page.select_option("#interp-path", "slerp")
    page.click("#interp-run")
    page.wait_for_function("document.querySelectorAll('#interp-frames img').length === 7")

    # a bad value is said on the page, in its panel
    page.fill("#samples-n", "500")
    page.click("#new-samples")
    wait_for_text(page, "#samples-error", "less than or equal to 64")


def test_nothing_is_broken_on_load_and_the_page_fits_a_phone(browser, url):
    bad = []
    with opened(browser, url) as page:
        page.on("response", lambda r: bad.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        # every picture shows something (the blank ones a grey box), none a broken-image icon
        assert page.evaluate("[...document.images].filter((i) => !(i.complete && i.naturalWidth > 0))"
                             ".map((i) => i.id)") == []
        icon = page.evaluate("""async () => {
            const href = document.querySelector("link[rel=icon]").href;
            const response = await fetch(href);
            const img = new Image();
            img.src = href;
            await img.decode();
            return [response.status, response.headers.get("content-type"), img.naturalWidth];
        }""")
        assert icon[:2] == [200, "image/svg+xml"] and icon[2] > 0
        assert bad == []

        # a 32-step interpolation: 34 frames, each large enough to see, wrapped onto rows
        page.fill("#interp-steps", "32")
        page.click("#interp-run")
        page.wait_for_function("document.querySelectorAll('#interp-frames img').length === 34")
        boxes = [page.locator("#interp-frames img").nth(i).bounding_box() for i in (0, 33)]
        assert min(b["width"] for b in boxes) >= 40 and boxes[1]["y"] > boxes[0]["y"]

        # the brush's size is held to its range
        page.fill("#inpaint-brush", "50")
        page.dispatch_event("#inpaint-brush", "change")
        assert page.input_value("#inpaint-brush") == "6"
        page.click("#inpaint-clear")
        page.mouse.click(*point_at(page, "#mask-canvas", 0.5, 0.5))
        assert 3.15 * 5 * 5 < page.evaluate("mask.reduce((a, b) => a + b, 0)") <= 3.15 * 7 * 7   # a radius of 6
        page.click("#inpaint-clear")
        page.click("#inpaint-run")                                          # the error speaks of what is painted
        wait_for_text(page, "#inpaint-error",
                      "mask marks no pixel to fill: paint the missing pixels white (on the demo's page, red)")

        # 390 px wide (a phone): no sideways scrolling, the frames still legible
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert page.evaluate("Math.max(...[...document.querySelectorAll('main *')]"
                             ".map((e) => e.getBoundingClientRect().right))") <= 390
        assert page.locator("#interp-frames img").first.bounding_box()["width"] >= 40

        # the API from elsewhere than the page: HEAD on /, and a form's content type refused
        assert page.evaluate("fetch('/', {method: 'HEAD'}).then((r) => r.status)") == 200
        refused = page.evaluate("""fetch("/api/sample", {method: "POST", body: '{"n": 4}',
            headers: {"Content-Type": "application/x-www-form-urlencoded"}}).then(async (r) => [r.status, await r.json()])""")
        assert refused[0] == 415 and "Content-Type: application/json" in refused[1]["error"]


def test_the_latent_panel_shows_its_error_and_nothing_stale(page):
    blank = page.evaluate("BLANK")
    for index, says in (("10000", "index 10000 is out of range: the test set has 500 images"),
                        ("-1", "index: ")):         # the API's refusal names the field (see test_serve)
        page.fill("#latent-index", index)
        page.dispatch_event("#latent-index", "change")
        wait_for_text(page, "#sliders-error", says)
        page.wait_for_timeout(400)                        # nothing comes later to redraw the old image
        assert says in page.text_content("#sliders-error")
        assert page.locator("#sliders input").count() == 0
        assert src(page, "#latent-original") == blank and src(page, "#traverse-image") == blank
        assert page.text_content("#latent-label") == "original"
    page.fill("#latent-index", "3")
    page.dispatch_event("#latent-index", "change")
    page.wait_for_function("document.querySelectorAll('#sliders input').length === 8")
    wait_for_new_src(page, "#traverse-image", blank)
    label = json.loads(urllib.request.urlopen(urllib.request.Request(
        page.url + "api/test-image", data=b'{"index": 3}', headers={"Content-Type": "application/json"})).read())
    assert page.text_content("#latent-label") == f"original: {label['class']}"
    assert page.text_content("#sliders-error") == ""


def test_a_small_digit_drawn_in_a_corner_is_framed_as_mnist(page):
    blank = page.evaluate("BLANK")
    drag(page, "#draw-canvas", [(0.05, 0.06), (0.28, 0.06), (0.14, 0.32)])   # a 7, a quarter of the pad
    page.wait_for_timeout(300)                                              # the last answer is in
    x = png_pixels(wait_for_new_src(page, "#draw-input", blank))
    rows, cols = np.nonzero(x)
    assert abs(rows.mean() - 13.5) < 1.5 and abs(cols.mean() - 13.5) < 1.5
    assert rows.max() - rows.min() + 1 >= 18                                # scaled up to the 20-pixel box


def test_a_long_fill_shows_its_work_and_sliders_pass_it(page, demo):  # noqa: F811
    """The model held (as by other users' fills): the Fill button waits, disabled, counting
    seconds; the sliders still decode; changing the image drops the coming fill."""
    blank = page.evaluate("BLANK")
    drag(page, "#mask-canvas", [(0.3, 0.6), (0.5, 0.7), (0.7, 0.6)])
    page.fill("#inpaint-steps", "5")
    with demo.lock:
        page.click("#inpaint-run")
        wait_for_text(page, "#inpaint-status", "working…")
        assert page.is_disabled("#inpaint-run") and page.is_disabled("#inpaint-presets button >> nth=0")
        before = src(page, "#traverse-image")
        slider = page.locator("#sliders input[type=range]").first
        box = slider.bounding_box()
        page.mouse.click(box["x"] + 2, box["y"] + box["height"] / 2)           # to the left end
        wait_for_new_src(page, "#traverse-image", before)
        assert page.is_disabled("#inpaint-run")                                # the fill still waits
        page.fill("#inpaint-index", "7")
        page.dispatch_event("#inpaint-index", "change")
    page.wait_for_function("!document.querySelector('#inpaint-run').disabled")
    page.wait_for_timeout(200)
    assert src(page, "#inpaint-output") == blank and page.text_content("#inpaint-status") == ""
    page.click("#inpaint-run")                                                   # now for image 7
    wait_for_new_src(page, "#inpaint-output", blank)
    # a fill that shows an image, then a change of image: the old fill goes
    page.fill("#inpaint-index", "8")
    page.dispatch_event("#inpaint-index", "change")
    page.wait_for_function("document.querySelector('#inpaint-output').getAttribute('src') === BLANK")


def test_the_latent_map_decodes_the_point_under_the_pointer(page, url):
    blank = page.evaluate("BLANK")
    data = json.loads(urllib.request.urlopen(url + "api/map").read())
    assert page.locator("#map-legend span").all_text_contents() == list("0123456789")
    assert data["axes"][0] in page.text_content("#map-hint")
    xlo, xhi, ylo, yhi = page.evaluate("map.view")
    x, y = data["points"][11]                                    # hover over test image 11's dot
    with page.expect_request("**/api/map-decode") as sent:
        page.mouse.move(*point_at(page, "#map-canvas", (x - xlo) / (xhi - xlo), (yhi - y) / (yhi - ylo)))
    asked = json.loads(sent.value.post_data)
    pixel = (xhi - xlo) / page.locator("#map-canvas").bounding_box()["width"]
    assert abs(asked["x"] - x) <= pixel and abs(asked["y"] - y) <= pixel
    first = wait_for_new_src(page, "#map-image", blank)
    assert page.text_content("#map-at") == f"({asked['x']:.2f}, {asked['y']:.2f})"
    page.mouse.click(*point_at(page, "#map-canvas", 0.95, 0.05))                  # a click, far away
    assert wait_for_new_src(page, "#map-image", first) != first


def test_an_rgb_folder_run_speaks_of_its_classes(browser, rgb_demo):  # noqa: F811
    with running(rgb_demo) as url, opened(browser, url) as page:
        hint = page.text_content("#draw-hint")
        assert "digit" not in hint and "(rings, strokes)" in hint and "shrunk to 28x28" in hint
        assert page.text_content("#latent-label") in ("original: rings", "original: strokes")
        assert page.locator("#map-legend span").all_text_contents() == ["rings", "strokes"]


def test_a_page_reached_by_another_name_is_refused(browser, url):
    """DNS rebinding: another site's name resolved to the demo's address."""
    context = browser.new_context()
    page = context.new_page()
    response = page.goto(url.replace("127.0.0.1", REBOUND))
    assert response.status == 403 and "DNS rebinding" in json.loads(page.text_content("body"))["error"]
    context.close()


def screenshot(run_dir: str, out: str) -> None:
    """Saves a screenshot of the demo page for `run_dir`, with a drawing, a point of the map and a
    filled mask on it."""
    from playwright.sync_api import sync_playwright

    with running(load(run_dir, "cpu")) as url, sync_playwright() as p:
        browser = launch(p)
        with opened(browser, url) as page:
            blank = page.evaluate("BLANK")
            drag(page, "#draw-canvas", [(0.62, 0.2), (0.38, 0.22), (0.36, 0.48), (0.6, 0.5), (0.62, 0.78),
                                        (0.36, 0.8)])
            wait_for_new_src(page, "#draw-output", blank)
            page.mouse.click(*point_at(page, "#map-canvas", 0.4, 0.6))
            wait_for_new_src(page, "#map-image", blank)
            page.click("#inpaint-presets button:text('bottom')")
            wait_for_new_src(page, "#inpaint-output", blank)
            page.wait_for_timeout(300)
            page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    screenshot(*sys.argv[1:3])
