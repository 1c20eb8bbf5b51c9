"""The web demo's API, served by a real uvicorn on 127.0.0.1 for a model trained briefly on the
shipped MNIST sample: each endpoint against the generation function it calls, every kind of bad
request (a one-line JSON error with a 4xx status), no way out to the file system, the hardening
(Host header, stalled connections, the model's two lanes and time bounds), every curl call of
docs/demo.md, and the `vaekit serve` command itself."""
import base64
import http.client
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import SAMPLE, cli_env, sample_config
from vaekit.models import ModelConfig

pytest.importorskip("fastapi", reason="the demo extra is not installed: pip install -e '.[test,demo]'")
import uvicorn  # noqa: E402

from vaekit import ConfigError, DataConfig, RunError, train  # noqa: E402
from vaekit.cli import main  # noqa: E402
from vaekit.data import preprocess, read_idx  # noqa: E402
from vaekit.generate import interpolate, most_active_dims, prior_samples, region_mask, set_dims, traverse  # noqa: E402
from vaekit.objectives import rate_per_dim  # noqa: E402
from vaekit.serve import create_app, load  # noqa: E402
from vaekit.serve.app import host_allowed  # noqa: E402
from vaekit.serve.server import STALL_SECONDS, bind, server_config, url_of  # noqa: E402
from vaekit.viz import grid_image  # noqa: E402


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = sample_config(epochs=1, lr=1e-3, batch_size=32)        # 63 steps: blurry digits, a few seconds
    return train(config, out=tmp_path_factory.mktemp("serve") / "run", log=quiet).path


@pytest.fixture(scope="module")
def demo(run):
    return load(run, "cpu")


@pytest.fixture(scope="module")
def rgb_demo(tmp_path_factory):
    """A run on a folder of RGB pictures in two classes: the sample's 0s ("rings") and 1s
    ("strokes"), tinted."""
    root = tmp_path_factory.mktemp("rgb") / "pictures"
    images, labels = read_idx(SAMPLE / "train-images-idx3-ubyte.gz"), read_idx(SAMPLE / "train-labels-idx1-ubyte.gz")
    for i in np.flatnonzero(labels[:800] <= 1):
        folder = root / ("rings", "strokes")[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([images[i], images[i] // 2, 255 - images[i]], axis=-1), "RGB").save(folder / f"{i}.png")
    config = sample_config(epochs=1, lr=1e-3, batch_size=32)
    config.data = DataConfig(dataset="folder", data_dir=str(root), channels=3)
    config.model.image_channels = 3
    return load(train(config, out=tmp_path_factory.mktemp("rgb-run") / "run", log=quiet).path, "cpu")


@contextmanager
def running(demo, stall_seconds: float = STALL_SECONDS, **app_settings):
    """The demo on a free port of 127.0.0.1 in a thread of this process, as `vaekit serve` runs it;
    yields its URL, then stops it."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(server_config(create_app(demo, **app_settings), stall_seconds))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the demo server did not start"
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(demo):
    with running(demo) as url:
        yield url


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one raw HTTP request; the path is sent as given, unnormalized."""
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    status, _, data = request(url, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return status, json.loads(data)


def ok(url: str, path: str, body: dict) -> dict:
    status, data = post(url, path, body)
    assert status == 200, data
    return data


def pixels(data_url: str) -> np.ndarray:
    """A PNG data URL -> its pixels, uint8 [H,W] (grey)."""
    assert data_url.startswith("data:image/png;base64,")
    return np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def png_url(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def grid(images: torch.Tensor, nrow: int | None = None, padding: int = 0) -> np.ndarray:
    """What the demo sends for images [N,C,H,W]: the CLI's grid at scale 1."""
    return np.array(grid_image(images, nrow=nrow, scale=1, padding=padding))


def binary_test(index: int | slice | None = None) -> torch.Tensor:
    """The sample's test images binarised here as the run was trained ("static"): all, or test image
    `index` as [1,C,H,W]."""
    x = preprocess(torch.from_numpy(read_idx(SAMPLE / "t10k-images-idx3-ubyte.gz"))[:, None], "static")
    return x if index is None else x[index:index + 1]


def test_the_demo_holds_the_test_set_preprocessed_once_as_the_run_was_trained(demo):
    assert torch.equal(demo.test_x, binary_test()) and demo.test_x.dtype == torch.float32


# -- the page --------------------------------------------------------------------------------
def test_the_page_and_its_files_are_served_and_load_nothing_from_elsewhere(server):
    status, headers, html = request(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="app.js"' in html and b'href="style.css"' in html and b'href="favicon.svg"' in html
    for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css"), ("/favicon.svg", "image/svg+xml")):
        status, headers, body = request(server, "GET", path)
        assert status == 200 and headers["content-type"].startswith(kind) and len(body) > 200
    for name in ("index.html", "app.js", "style.css", "favicon.svg"):
        text = (Path(__file__).parents[1] / "src/vaekit/serve/static" / name).read_text()
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")      # the SVG namespace's name, never fetched
        assert "http:" not in text and "https:" not in text and "//cdn" not in text, name


def test_head_answers_as_get_would_without_the_body(server):
    for path in ("/", "/favicon.svg", "/api/info"):
        status, headers, body = request(server, "GET", path)
        head_status, head_headers, head_body = request(server, "HEAD", path)
        assert (head_status, head_body) == (200, b"") and status == 200
        assert head_headers["content-type"] == headers["content-type"]
        assert head_headers["content-length"] == str(len(body))


def test_info_describes_the_model_and_the_limits(server, demo):
    status, _, body = request(server, "GET", "/api/info")
    info = json.loads(body)
    assert status == 200
    assert info["shape"] == [1, 28, 28] and info["latent_dim"] == 50 and info["test_size"] == 500
    assert info["class_names"] == list("0123456789") and info["drawing"] == "mnist-digit"
    assert info["masks"] == ["top", "bottom", "left", "right", "centre"] and info["paths"] == ["linear", "slerp"]
    assert info["limits"]["samples"] >= 16 and info["limits"]["dims"] <= info["latent_dim"]


# -- each endpoint is the CLI's function -------------------------------------------------------
def test_samples_are_the_prior_decodes_of_the_seed(server, demo):
    first = ok(server, "/api/sample", {"n": 9, "seed": 5})
    expected = prior_samples(demo.model, 9, demo.runtime.generator(5))
    assert np.array_equal(pixels(first["image"]), grid(expected, padding=1))      # 3 x 3, 1-pixel gaps
    assert pixels(first["image"]).shape == (3 * 29 + 1, 3 * 29 + 1)
    assert first == ok(server, "/api/sample", {"n": 9, "seed": 5})
    assert first != ok(server, "/api/sample", {"n": 9, "seed": 6})


def test_set_dims_sets_all_its_dimensions_at_once_and_agrees_with_traverse(demo):
    image = binary_test(2)
    code = demo.model.posterior(image)[0]
    _, row = traverse(demo.model, image, [7], torch.tensor([2.5]))
    torch.testing.assert_close(set_dims(demo.model, image, [7], torch.tensor([2.5])), row[0])
    z = code.clone()
    z[0, [7, 30]] = torch.tensor([2.5, -1.0])
    with torch.inference_mode():
        expected = demo.model.decode(z, as_image=True)
    torch.testing.assert_close(set_dims(demo.model, image, [7, 30], torch.tensor([2.5, -1.0])), expected)


def test_most_active_dims_are_those_of_the_most_kl(demo):
    x = binary_test()
    dims, kl = most_active_dims(demo.model, x, 6)
    rate = rate_per_dim(*demo.model.posterior(x))
    assert kl == sorted(rate.tolist(), reverse=True)[:6] and rate[dims].tolist() == kl


def test_sliders_start_at_the_code_on_the_most_active_dimensions_and_decode_it(server, demo):
    latent = ok(server, "/api/latent", {"index": 3, "k": 5})
    x = binary_test()
    assert latent["dims"] == most_active_dims(demo.model, x, 5)[0]
    assert latent["kl"] == sorted(latent["kl"], reverse=True) and latent["kl"][0] > 0.05
    code = demo.model.posterior(binary_test(3))[0][0]
    assert latent["values"] == pytest.approx(code[latent["dims"]].tolist(), abs=1e-6)
    assert latent["label"] == int(demo.test_labels[3])
    assert np.array_equal(pixels(latent["image"]), grid(binary_test(3)))

    dims = latent["dims"]
    at_code = ok(server, "/api/traverse", {"index": 3, "dims": dims, "values": latent["values"]})
    with torch.inference_mode():
        code_decoded = demo.model.decode(code[None], as_image=True)
    assert np.abs(pixels(at_code["image"]).astype(int) - grid(code_decoded).astype(int)).max() <= 1
    moved = [3.0] + latent["values"][1:]
    slid = ok(server, "/api/traverse", {"index": 3, "dims": dims, "values": moved})
    expected = set_dims(demo.model, binary_test(3), dims, torch.tensor(moved))
    assert np.array_equal(pixels(slid["image"]), grid(expected))
    assert np.abs(pixels(slid["image"]).astype(int) - pixels(at_code["image"])).mean() > 1     # the picture moved


def test_interpolation_is_framed_by_the_binary_originals(server, demo):
    data = ok(server, "/api/interpolate", {"a": 0, "b": 1, "steps": 6, "path": "slerp"})
    ends = binary_test()[:2]
    path = interpolate(demo.model, ends, 6, "slerp")
    expected = torch.cat([ends[:1], path, ends[1:]])
    assert np.array_equal(pixels(data["image"]), grid(expected, nrow=8, padding=1))
    assert len(data["frames"]) == 8                                        # and one by one, for the page's layout
    assert all(np.array_equal(pixels(frame), grid(expected[i:i + 1])) for i, frame in enumerate(data["frames"]))
    assert data != ok(server, "/api/interpolate", {"a": 0, "b": 1, "steps": 6, "path": "linear"})


def drawing(points: list[tuple[float, float]], size: int = 280, width: int = 22) -> Image.Image:
    """A canvas like the page's: black, a white stroke `width` pixels wide through `points`."""
    img = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(img).line(points, fill="white", width=width, joint="curve")
    return img


SEVEN = [(0.15, 0.1), (0.85, 0.1), (0.4, 0.95)]    # a 7 in fractions of its box


def seven(left: float, top: float, side: float) -> Image.Image:
    """A 7 drawn in the box of `side` pixels at (left, top), its stroke a tenth of the side wide."""
    return drawing([(left + fx * side, top + fy * side) for fx, fy in SEVEN], width=round(side / 10))


def test_a_drawing_is_made_a_digit_as_mnist_digits_were(server):
    """Cropped to its ink, scaled to fit 20x20 keeping its aspect, centred by mass in 28x28: a
    small 7 drawn in a corner is the same input as a large 7 drawn in the middle."""
    large = ok(server, "/api/reconstruct", {"image": png_url(seven(40, 40, 200))})
    small = ok(server, "/api/reconstruct", {"image": png_url(seven(5, 200, 60))})
    x, y = pixels(small["input"]), pixels(large["input"])
    assert x.shape == (28, 28) and set(np.unique(x)) == {0, 255}
    rows, cols = np.nonzero(x)
    assert 18 <= rows.max() - rows.min() + 1 <= 20                       # the taller side fills the 20-pixel box
    assert abs(rows.mean() - 13.5) < 1 and abs(cols.mean() - 13.5) < 1    # its mass in the middle
    box = lambda image: np.ptp(np.nonzero(image), axis=1)                 # noqa: E731  (height, width) - 1
    assert np.abs(box(x) - box(y)).max() <= 1
    assert np.abs(pixels(small["image"]).astype(int) - pixels(large["image"])).mean() < 3
    bar = pixels(ok(server, "/api/reconstruct", {"image": png_url(drawing([(255, 20), (255, 260)]))})["input"])
    rows, cols = np.nonzero(bar)
    assert rows.min() == 4 and rows.max() == 23 and 1 <= len(set(cols)) <= 3 and abs(cols.mean() - 13.5) < 1
    # transparent parts count as black; a drawing without ink stays black
    square = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    square.paste((255, 255, 255, 255), (10, 10, 18, 18))
    x = pixels(ok(server, "/api/reconstruct", {"image": png_url(square)})["input"])
    assert (x[4:24, 4:24] == 255).all() and x.sum() == 400 * 255
    empty = ok(server, "/api/reconstruct", {"image": png_url(Image.new("L", (280, 280)))})
    assert pixels(empty["input"]).max() == 0 and pixels(empty["image"]).shape == (28, 28)


def test_an_rgb_folder_run_names_its_classes_and_shrinks_the_whole_pad(rgb_demo):
    with running(rgb_demo) as url:
        info = json.loads(request(url, "GET", "/api/info")[2])
        assert info["shape"] == [3, 28, 28] and info["class_names"] == ["rings", "strokes"]
        assert info["drawing"] == "whole-pad"
        for index in range(4):
            shown = ok(url, "/api/test-image", {"index": index})
            assert shown["class"] == ["rings", "strokes"][shown["label"]] == ("rings", "strokes")[
                int(rgb_demo.test_labels[index])]
        pad = Image.new("RGB", (280, 280), "black")
        pad.paste((255, 255, 255), (0, 0, 100, 100))                     # a square in the top left corner
        x = pixels(ok(url, "/api/reconstruct", {"image": png_url(pad)})["input"])
        assert x.shape == (28, 28, 3) and (x[:10, :10] == 255).all() and x[10:].max() == 0 and x[:, 10:].max() == 0


@pytest.mark.parametrize("which", ["brush", "centre"])
def test_inpainting_fills_the_mask_and_leaves_the_observed_pixels(server, demo, which):
    if which == "brush":
        painted = Image.new("L", (28, 28), "black")
        ImageDraw.Draw(painted).ellipse((6, 14, 20, 26), fill="white")
        mask_field, expected_mask = png_url(painted), torch.from_numpy(np.array(painted) >= 128)
    else:
        mask_field, expected_mask = "centre", region_mask("centre", (1, 28, 28))[0]
    data = ok(server, "/api/inpaint", {"index": 4, "mask": mask_field, "steps": 5, "chains": 2, "seed": 1})
    missing = expected_mask.numpy()
    assert np.array_equal(pixels(data["mask"]) >= 128, missing) and data["missing_pixels"] == missing.sum()
    original, filled, shown = pixels(data["original"]), pixels(data["image"]), pixels(data["input"])
    assert np.array_equal(original, grid(binary_test(4)))
    assert np.array_equal(filled[~missing], original[~missing])           # observed pixels untouched
    assert (shown[missing] == 128).all() and np.array_equal(shown[~missing], original[~missing])
    assert np.abs(filled[missing].astype(int) - 128).mean() > 20          # decided pixels, not a grey fill
    assert data["steps_done"] == 5


def test_the_latent_map_is_the_test_codes_on_their_principal_plane_and_decodes_its_points(server, demo):
    data = json.loads(request(server, "GET", "/api/map")[2])
    codes = demo.model.posterior(binary_test())[0].double().numpy()
    centred = codes - codes.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)              # numpy's PCA, beside torch's
    expected = centred @ vt[:2].T
    points = np.array(data["points"])
    signs = np.sign((points * expected).sum(0))                          # an axis is known up to its sign
    assert np.abs(points - expected * signs).max() < 1e-3
    assert data["labels"] == demo.test_labels.tolist() and data["class_names"] == list("0123456789")
    assert data["axes"] == [f"PC{i + 1} ({100 * s[i] ** 2 / (s ** 2).sum():.0f}% of variance)" for i in range(2)]
    assert len(set(data["colours"])) == 10
    decodes = []
    for x, y in (points[7], (-1.5, 2.0)):
        z = codes.mean(0) + (np.array([x, y]) * signs) @ vt[:2]
        with torch.inference_mode():
            decoded = demo.model.decode(torch.tensor(z, dtype=torch.float32)[None], as_image=True)
        decodes.append(pixels(ok(server, "/api/map-decode", {"x": x, "y": y})["image"]))
        assert np.abs(decodes[-1].astype(int) - grid(decoded).astype(int)).max() <= 1
    assert np.abs(decodes[0].astype(int) - decodes[1]).mean() > 5


def test_concurrent_requests_are_all_answered(server):
    bodies = [{"n": 16, "seed": s} for s in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: post(server, "/api/sample", body), bodies))
    assert [status for status, _ in answers] == [200] * 8
    assert len({data["image"] for _, data in answers}) == 8


# -- bad requests: one-line JSON errors with 4xx --------------------------------------------------
def png_bytes_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


BAD = [
    ("/api/sample", {"n": 0}, 422, "n: … 1"),
    ("/api/sample", {"n": 65}, 422, "n: … 64"),
    ("/api/sample", {"n": 4, "seed": -1}, 422, "seed:"),
    ("/api/sample", {"n": 4, "seed": 2**31}, 422, "seed: … 2147483647"),          # the range of --seed
    ("/api/sample", {"n": "many"}, 422, "n: … integer"),
    ("/api/sample", {"n": 4, "path": "/etc/passwd"}, 422, "path: not a setting of /api/sample, which takes n, seed"),
    ("/api/test-image", {"index": 500}, 400, "index 500 is out of range: the test set has 500 images (0..499)"),
    ("/api/test-image", {"index": -1}, 422, "index: … 0"),
    ("/api/test-image", {}, 422, "index: … required"),
    ("/api/latent", {"index": 0, "k": 17}, 422, "k: … 16"),
    ("/api/traverse", {"index": 0, "dims": [1, 2], "values": [0.5]}, 400, "dims has 2 entries but values has 1"),
    ("/api/traverse", {"index": 0, "dims": [1, 1], "values": [0, 0]}, 400, "dims must be distinct latent dimensions"),
    ("/api/traverse", {"index": 0, "dims": [50], "values": [0]}, 400, "latent dimensions 0..49; got [50]"),
    ("/api/traverse", {"index": 0, "dims": [1], "values": [9]}, 422, "values.0: … 5"),
    ("/api/traverse", {"index": 0, "dims": list(range(17)), "values": [0] * 17}, 422, "dims: … 16"),
    ("/api/interpolate", {"a": 0, "b": 1, "steps": 1}, 422, "steps: … 2"),
    ("/api/interpolate", {"a": 0, "b": 600}, 400, "b 600 is out of range"),
    ("/api/interpolate", {"a": 0, "b": 1, "path": "curved"}, 422, "path: … 'linear' … 'slerp'"),
    ("/api/reconstruct", {"image": "iVBORw0KGgo="}, 400, "image must be a PNG data URL (data:image/png;base64,...)"),
    ("/api/reconstruct", {"image": "data:image/png;base64,@@@@"}, 400, "image is not valid base64"),
    ("/api/reconstruct", {"image": png_bytes_url(b"GIF89a not a png")}, 400, "image is not a readable PNG image"),
    ("/api/reconstruct", {"image": "data:image/png;base64," + "A" * 1_400_000}, 400,
     "image is more than 1000000 bytes; send a smaller PNG"),
    ("/api/reconstruct", {"image": png_url(Image.new("L", (2000, 10)))}, 400,
     "image is 2000x10; the limit is 1024 pixels a side"),
    ("/api/inpaint", {"index": 0, "mask": "middle"}, 400, "mask must be one of top, bottom, left, right, centre or a PNG"),
    ("/api/inpaint", {"index": 0, "mask": png_url(Image.new("L", (28, 28)))}, 400,
     "mask marks no pixel to fill: paint the missing pixels white (on the demo's page, red)"),
    ("/api/inpaint", {"index": 0, "mask": "top", "chains": 9}, 422, "chains: … 8"),
    ("/api/inpaint", {"index": 0, "mask": "top", "steps": 201}, 422, "steps: … 200"),
    ("/api/inpaint", {"index": 0, "mask": "top", "method": "gibbs"}, 422, "method: … 'pseudo-gibbs'"),
    ("/api/map-decode", {"x": 51, "y": 0}, 422, "x: … 50"),
    ("/api/map-decode", {"x": 0, "y": float("nan")}, 422, "y: … finite"),
    ("/api/map-decode", {"x": 0}, 422, "y: … required"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{p}-{m[:30]}" for p, _, _, m in BAD])
def test_bad_requests_get_a_one_line_json_error(server, path, body, status, message):
    """`message`'s parts, in order (… stands for any words): a refused setting is named, with the
    limit or the kind of value it takes, in whatever words the validator puts it."""
    got, data = post(server, path, body)
    assert got == status and set(data) == {"error"}
    assert re.search(".*".join(map(re.escape, message.split("…"))), data["error"]), data["error"]
    assert "\n" not in data["error"]


def test_malformed_bodies_get_json_errors(server):
    for body, status, message in [(b"{not json", 400, "the request body is not valid JSON"),
                                  (b"[" * 100_000 + b"]" * 100_000, 400, "the request body is not valid JSON"),
                                  (b'{"index": 0, "dims": [1], "values": [NaN]}', 422, "values.0:"),
                                  (b"[1, 2]", 422, 'the body must be a JSON object of settings, like {"index": 0}')]:
        got, _, data = request(server, "POST", "/api/traverse", body, {"Content-Type": "application/json"})
        assert got == status and message in json.loads(data)["error"], data
    big = json.dumps({"image": "data:image/png;base64," + "A" * 2_100_000}).encode()
    got, _, data = request(server, "POST", "/api/reconstruct", big, {"Content-Type": "application/json"})
    assert got == 413 and "the limit is 2000000" in json.loads(data)["error"]
    got, _, data = request(server, "POST", "/api/sample", iter([b'{"n": 4}']), {"Transfer-Encoding": "chunked"})
    assert got == 411 and "Content-Length" in json.loads(data)["error"]


@pytest.mark.parametrize("path", ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../../pyproject.toml",
                                  "/app.js/../../../config.json", "/..%2f..%2fpyproject.toml", "/api/../../README.md",
                                  "/index.html", "/static/app.js", "/api/nothing"])
def test_no_path_reaches_the_file_system(server, path):
    status, _, body = request(server, "GET", path)
    assert status == 404 and set(json.loads(body)) == {"error"}
    assert b"root:" not in body and b"vaekit" not in body


def test_a_get_on_a_post_endpoint_is_a_json_405(server):
    status, headers, body = request(server, "GET", "/api/sample")
    assert status == 405 and json.loads(body)["error"] == "Method Not Allowed: GET /api/sample"
    assert headers["allow"] == "POST"


def test_a_body_must_say_it_is_json(server):
    """curl -d sends a form's content type; a page of another site can send a form without asking."""
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}, {}):
        status, _, data = request(server, "POST", "/api/sample", b'{"n": 4}', headers)
        error = json.loads(data)["error"]
        assert status == 415 and "with the header Content-Type: application/json" in error and "\n" not in error
        assert (headers.get("Content-Type") or "missing") in error
    status, _, data = request(server, "POST", "/api/sample", b'{"n": 4}',
                              {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200 and "image" in json.loads(data)


def test_validation_stops_at_the_first_unknown_key(server):
    body = json.dumps({"n": 4, **{f"x{i:05d}": 0 for i in range(150_000)}}, separators=(",", ":")).encode()
    assert len(body) < 2_000_000                                            # within the body limit
    status, _, data = request(server, "POST", "/api/sample", body, {"Content-Type": "application/json"})
    assert status == 422 and json.loads(data)["error"] == "x00000: not a setting of /api/sample, which takes n, seed"


def test_a_host_header_that_does_not_name_the_demo_is_refused(server):
    """Against DNS rebinding: a page of another site that resolves its own name to 127.0.0.1."""
    port = int(server.rstrip("/").rsplit(":", 1)[1])
    for host in ("rebound.example", f"rebound.example:{port}", f"127.0.0.1.nip.io:{port}"):
        for method, path, body in (("GET", "/", None), ("POST", "/api/sample", b'{"n": 4}')):
            status, _, data = request(server, method, path, body, {"Host": host, "Content-Type": "application/json"})
            error = json.loads(data)["error"]
            assert status == 403 and f"the Host header {host!r} does not name this demo" in error
            assert f"open it as http://127.0.0.1:{port}/" in error and "DNS rebinding" in error
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert request(server, "GET", "/api/info", headers={"Host": host})[0] == 200, host


def test_which_host_names_a_demo_listening_where():
    assert host_allowed("127.0.0.1:8000", "127.0.0.1") and host_allowed("localhost", "127.0.0.1")
    assert not host_allowed("10.0.0.5:8000", "127.0.0.1") and not host_allowed("gpu-box:8000", "127.0.0.1")
    assert host_allowed("gpu-box:8000", "gpu-box") and host_allowed("10.0.0.5:8000", "10.0.0.5")
    for everywhere in ("0.0.0.0", "::"):
        assert host_allowed("10.0.0.5:8000", everywhere) and host_allowed("[fe80::1]:8000", everywhere)
        assert host_allowed(f"{socket.gethostname()}:8000", everywhere)
        assert not host_allowed("rebound.example:8000", everywhere)


def test_a_connection_that_stalls_is_closed(demo):
    """Headers or a body that never finish are cut off after the stall time; a request that has
    fully arrived is answered however long its work takes."""
    with running(demo, stall_seconds=0.5) as url:
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        post_head = b"POST /api/sample HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        for sent in (b"", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n", post_head + b"Content-Length: 100\r\n\r\n{"):
            with socket.create_connection((host, int(port)), timeout=20) as sock:
                sock.sendall(sent)
                assert sock.recv(1000) == b""            # closed without an answer (a hang raises TimeoutError)
        demo.lock.acquire()
        threading.Timer(1.0, demo.lock.release).start()    # the model busy for twice the stall time
        conn = http.client.HTTPConnection(host, int(port), timeout=20)
        conn.request("POST", "/api/sample", json.dumps({"n": 4}), {"Content-Type": "application/json"})
        slow = conn.getresponse()
        assert slow.status == 200 and "image" in json.loads(slow.read())
        conn.sock.sendall(b"GET / HTTP/1.1\r\n")        # the same connection, then a stall
        assert conn.sock.recv(1000) == b""
        conn.close()


def test_light_requests_pass_a_busy_model_and_heavy_ones_wait_a_bounded_time(demo):
    with running(demo, queue_seconds=0.3) as url:
        with demo.lock:                                  # the model held, as by a long fill
            for path, body in (("/api/traverse", {"index": 0, "dims": [1], "values": [1.0]}),
                               ("/api/latent", {"index": 1}), ("/api/test-image", {"index": 2}),
                               ("/api/map-decode", {"x": 0.1, "y": 0.2}),
                               ("/api/reconstruct", {"image": png_url(seven(40, 40, 200))})):
                ok(url, path, body)
            for path, body in (("/api/sample", {"n": 4}), ("/api/interpolate", {"a": 0, "b": 1}),
                               ("/api/inpaint", {"index": 0, "mask": "top"})):
                status, data = post(url, path, body)
                assert status == 503 and data["error"] == ("the demo is busy: this request waited 0.3 s for the "
                                                           "model; try again")
        ok(url, "/api/sample", {"n": 4})


def test_inpainting_stops_at_the_time_bound_with_the_steps_it_ran(demo):
    with running(demo, work_seconds=0) as url:           # out of time after the first step
        data = ok(url, "/api/inpaint", {"index": 4, "mask": "centre", "steps": 200, "chains": 8, "seed": 1})
        info = json.loads(request(url, "GET", "/api/info")[2])
    assert data["steps_done"] == 1 and info["work_seconds"] == 0
    missing = region_mask("centre", (1, 28, 28))[0].numpy()
    filled, original = pixels(data["image"]), pixels(data["original"])
    assert np.array_equal(filled[~missing], original[~missing])


def curl_calls(markdown: str) -> list[str]:
    """The curl commands of the section "## The API" of a Markdown page."""
    section = markdown.split("\n## The API\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("curl ")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_every_curl_call_in_the_docs_works_and_every_endpoint_has_one(server, demo, tmp_path):
    calls = curl_calls((Path(__file__).parents[1] / "docs" / "demo.md").read_text())
    seven(40, 40, 200).save(tmp_path / "digit.png")
    mask = Image.new("L", (28, 28))
    ImageDraw.Draw(mask).rectangle((4, 14, 24, 24), fill="white")
    mask.save(tmp_path / "mask.png")
    for call in calls:
        out = subprocess.run(["bash", "-c", call.replace("http://127.0.0.1:8000/", server)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (call, out.stderr)
        if " -I " in call:
            assert out.stdout.startswith("HTTP/1.1 200 OK"), (call, out.stdout)
        elif "| python3" in call:
            assert Image.open(tmp_path / "samples.png").size == (8 * 29 + 1, 8 * 29 + 1)
        else:
            assert "error" not in json.loads(out.stdout), (call, out.stdout[:300])
    routes = {route.path for route in create_app(demo).routes if route.path.startswith("/api/")}
    assert {path for path in routes if not any(f"8000{path} " in call + " " for call in calls)} == set()


# -- the command -----------------------------------------------------------------------------------
def test_the_core_never_imports_the_demo():
    code = ("import sys, vaekit, vaekit.cli, vaekit.api; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette') "
            "or m.startswith('vaekit.serve')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=cli_env())
    assert out.stdout.strip() == "[]"


def test_serve_without_the_extra_says_how_to_install_it(run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)      # as if it were not installed: find_spec says None
    assert main(["serve", str(run)]) == 2
    assert capsys.readouterr().err == "vaekit: error: the web demo needs uvicorn: pip install 'vaekit[demo]'\n"


def test_serve_warns_off_loopback_and_names_a_taken_port(run, capsys):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run), "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["vaekit: warning: --host 0.0.0.0 lets other machines reach the demo, which has no login",
                   f"vaekit: error: cannot listen on 0.0.0.0:{port} (Address already in use); "
                   "choose another --port or --host"]
    assert main(["serve", str(run), "--port", "70000"]) == 2
    assert "--port 70000 is not a TCP port" in capsys.readouterr().err


def test_vaekit_serve_serves_until_ctrl_c(run):
    proc = subprocess.Popen([sys.executable, "-m", "vaekit", "serve", str(run), "--port", "0", "--device", "cpu"],
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        line = ""
        while " is on http://" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "vaekit serve exited before serving"
        url = line.split(" is on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        status, _, body = request(url, "GET", "/api/info")
        assert status == 200 and json.loads(body)["latent_dim"] == 50
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0                   # Ctrl-C is how the demo is meant to stop
        assert proc.stderr.read() == "vaekit: the demo stopped\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("change, says", [({"conditional": True}, "class-conditional"),
                                          ({"likelihood": "logistic"}, "for bernoulli models")])
def test_the_demo_refuses_in_one_line_a_model_its_page_cannot_drive(tmp_path, change, says):
    config = sample_config(epochs=1, batch_size=500)                # 4 steps: only the model's kind matters
    if "likelihood" in change:
        config.data.binarization = "none"
    for key, value in change.items():
        setattr(config.model, key, value)
    other = train(config, out=tmp_path / "run", log=quiet).path
    with pytest.raises((ConfigError, RunError), match=says) as refused:
        load(other, "cpu")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("family", ["ladder", "spatial"])
def test_a_hierarchical_model_is_served_and_its_inpainting_refused_in_one_line(tmp_path, family):
    """A hierarchical model (layers of vectors, or of grids): the demo samples, decodes and moves
    its top codes, and refuses inpainting (its chains encode and decode one layer of z) with a
    one-line error the page shows."""
    from test_hierarchical import ladder_config

    config = ladder_config(epochs=1)
    if family == "spatial":
        config.model = ModelConfig(family="spatial", latent_dim=8, hidden_channels=16, res_blocks=1, latent_channels=2)
    run = train(config, out=tmp_path / "run", log=lambda *_: None)
    with running(load(run.path, "cpu")) as url:
        status, data = post(url, "/api/inpaint", {"index": 0, "mask": "centre"})
        assert status == 422 and "one layer of z" in data["error"] and "\n" not in data["error"]
        assert ok(url, "/api/sample", {"n": 4})["image"].startswith("data:image/png;base64,")
        assert len(ok(url, "/api/interpolate", {"a": 0, "b": 1, "steps": 3})["frames"]) == 5
