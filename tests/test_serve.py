"""The web demo's API, served by a real uvicorn on 127.0.0.1 for a model trained briefly on the
shipped MNIST sample: each endpoint against the generation function it calls, every kind of bad
request (a one-line JSON error with a 4xx status), no way out to the file system, and the
`vaekit serve` command itself."""
import base64
import http.client
import importlib.util
import io
import json
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

from conftest import cli_env, sample_config

pytest.importorskip("fastapi", reason="the demo extra is not installed: pip install -e '.[test,demo]'")
import uvicorn  # noqa: E402

from vaekit import ConfigError, RunError, train  # noqa: E402
from vaekit.cli import main  # noqa: E402
from vaekit.data import preprocess  # noqa: E402
from vaekit.generate import (interpolate, most_active_dims, posterior, rate_per_dim, region_mask, sample,  # noqa: E402
                             set_dims, traverse)
from vaekit.serve import create_app, load  # noqa: E402
from vaekit.serve.server import bind, url_of  # noqa: E402
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


@contextmanager
def running(demo):
    """The demo on a free port of 127.0.0.1 in a thread of this process; yields its URL, then stops it."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(demo), log_level="warning"))
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


def binary_test(demo, index: int) -> torch.Tensor:
    return preprocess(demo.test_images[index:index + 1], "static")


# -- the page --------------------------------------------------------------------------------
def test_the_page_and_its_two_files_are_served_and_load_nothing_from_elsewhere(server):
    status, headers, html = request(server, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="app.js"' in html and b'href="style.css"' in html
    for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        status, headers, body = request(server, "GET", path)
        assert status == 200 and headers["content-type"].startswith(kind) and len(body) > 500
    for name in ("index.html", "app.js", "style.css"):
        text = (Path(__file__).parents[1] / "src/vaekit/serve/static" / name).read_text()
        assert "http:" not in text and "https:" not in text and "//cdn" not in text, name


def test_info_describes_the_model_and_the_limits(server, demo):
    status, _, body = request(server, "GET", "/api/info")
    info = json.loads(body)
    assert status == 200
    assert info["shape"] == [1, 28, 28] and info["latent_dim"] == 50 and info["test_size"] == 500
    assert info["masks"] == ["top", "bottom", "left", "right", "centre"] and info["paths"] == ["linear", "slerp"]
    assert info["limits"]["samples"] >= 16 and info["limits"]["dims"] <= info["latent_dim"]


# -- each endpoint is the CLI's function -------------------------------------------------------
def test_samples_are_the_prior_decodes_of_the_seed(server, demo):
    first = ok(server, "/api/sample", {"n": 9, "seed": 5})
    expected = sample(demo.model, 9, demo.runtime.generator(5))
    assert np.array_equal(pixels(first["image"]), grid(expected, padding=1))      # 3 x 3, 1-pixel gaps
    assert pixels(first["image"]).shape == (3 * 29 + 1, 3 * 29 + 1)
    assert first == ok(server, "/api/sample", {"n": 9, "seed": 5})
    assert first != ok(server, "/api/sample", {"n": 9, "seed": 6})


def test_set_dims_sets_all_its_dimensions_at_once_and_agrees_with_traverse(demo):
    image = demo.test_images[2:3]
    code = posterior(demo.model, binary_test(demo, 2))[0]
    _, row = traverse(demo.model, image, [7], torch.tensor([2.5]))
    torch.testing.assert_close(set_dims(demo.model, image, [7], torch.tensor([2.5])), row[0])
    z = code.clone()
    z[0, [7, 30]] = torch.tensor([2.5, -1.0])
    with torch.inference_mode():
        expected = demo.model.decode(z, as_image=True)
    torch.testing.assert_close(set_dims(demo.model, image, [7, 30], torch.tensor([2.5, -1.0])), expected)


def test_most_active_dims_are_those_of_the_most_kl(demo):
    x = preprocess(demo.test_images, "static")
    dims, kl = most_active_dims(demo.model, x, 6)
    rate = rate_per_dim(*posterior(demo.model, x))
    assert kl == sorted(rate.tolist(), reverse=True)[:6] and rate[dims].tolist() == kl


def test_sliders_start_at_the_code_on_the_most_active_dimensions_and_decode_it(server, demo):
    latent = ok(server, "/api/latent", {"index": 3, "k": 5})
    x = preprocess(demo.test_images, "static")
    assert latent["dims"] == most_active_dims(demo.model, x, 5)[0]
    assert latent["kl"] == sorted(latent["kl"], reverse=True) and latent["kl"][0] > 0.05
    code = posterior(demo.model, binary_test(demo, 3))[0][0]
    assert latent["values"] == pytest.approx(code[latent["dims"]].tolist(), abs=1e-6)
    assert latent["label"] == int(demo.test_labels[3])
    assert np.array_equal(pixels(latent["image"]), grid(binary_test(demo, 3)))

    dims = latent["dims"]
    at_code = ok(server, "/api/traverse", {"index": 3, "dims": dims, "values": latent["values"]})
    with torch.inference_mode():
        code_decoded = demo.model.decode(code[None], as_image=True)
    assert np.abs(pixels(at_code["image"]).astype(int) - grid(code_decoded).astype(int)).max() <= 1
    moved = [3.0] + latent["values"][1:]
    slid = ok(server, "/api/traverse", {"index": 3, "dims": dims, "values": moved})
    expected = set_dims(demo.model, demo.test_images[3:4], dims, torch.tensor(moved))
    assert np.array_equal(pixels(slid["image"]), grid(expected))
    assert np.abs(pixels(slid["image"]).astype(int) - pixels(at_code["image"])).mean() > 1     # the picture moved


def test_interpolation_is_framed_by_the_binary_originals(server, demo):
    data = ok(server, "/api/interpolate", {"a": 0, "b": 1, "steps": 6, "path": "slerp"})
    path = interpolate(demo.model, demo.test_images[:2], 6, "slerp")
    ends = preprocess(demo.test_images[:2], "static")
    expected = torch.cat([ends[:1], path, ends[1:]])
    assert np.array_equal(pixels(data["image"]), grid(expected, nrow=8, padding=1))
    assert data != ok(server, "/api/interpolate", {"a": 0, "b": 1, "steps": 6, "path": "linear"})


def drawing(points: list[tuple[int, int]], size: int = 280, mode: str = "RGB") -> Image.Image:
    """A canvas like the page's: black, a white stroke 22 pixels wide through `points`."""
    img = Image.new(mode, (size, size), "black")
    ImageDraw.Draw(img).line(points, fill="white", width=22, joint="curve")
    return img


def test_a_drawing_is_shrunk_binarized_and_reconstructed(server):
    one = ok(server, "/api/reconstruct", {"image": png_url(drawing([(140, 40), (140, 240)]))})
    x = pixels(one["input"])
    assert x.shape == (28, 28) and set(np.unique(x)) == {0, 255}
    assert (x[5:23, 13:15] == 255).all() and (x[:, :10] == 0).all() and (x[:, 18:] == 0).all()   # a vertical bar
    assert pixels(one["image"]).shape == (28, 28)
    other = ok(server, "/api/reconstruct", {"image": png_url(drawing([(40, 140), (240, 140)]))})
    assert np.abs(pixels(other["image"]).astype(int) - pixels(one["image"])).mean() > 5
    # a canvas at the model's own size is used as it is; transparent parts count as black
    small = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    small.paste((255, 255, 255, 255), (10, 10, 18, 18))
    x = pixels(ok(server, "/api/reconstruct", {"image": png_url(small)})["input"])
    assert (x[10:18, 10:18] == 255).all() and x.sum() == 64 * 255


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
    assert np.array_equal(original, grid(binary_test(demo, 4)))
    assert np.array_equal(filled[~missing], original[~missing])           # observed pixels untouched
    assert (shown[missing] == 128).all() and np.array_equal(shown[~missing], original[~missing])
    assert np.abs(filled[missing].astype(int) - 128).mean() > 20          # decided pixels, not a grey fill


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
    ("/api/sample", {"n": 0}, 422, "n: Input should be greater than or equal to 1"),
    ("/api/sample", {"n": 65}, 422, "n: Input should be less than or equal to 64"),
    ("/api/sample", {"n": 4, "seed": -1}, 422, "seed:"),
    ("/api/sample", {"n": "many"}, 422, "n: Input should be a valid integer"),
    ("/api/sample", {"n": 4, "path": "/etc/passwd"}, 422, "path: Extra inputs are not permitted"),
    ("/api/test-image", {"index": 500}, 400, "index 500 is out of range: the test set has 500 images (0..499)"),
    ("/api/test-image", {"index": -1}, 422, "index: Input should be greater than or equal to 0"),
    ("/api/test-image", {}, 422, "index: Field required"),
    ("/api/latent", {"index": 0, "k": 17}, 422, "k: Input should be less than or equal to 16"),
    ("/api/traverse", {"index": 0, "dims": [1, 2], "values": [0.5]}, 400, "dims has 2 entries but values has 1"),
    ("/api/traverse", {"index": 0, "dims": [1, 1], "values": [0, 0]}, 400, "dims must be distinct latent dimensions"),
    ("/api/traverse", {"index": 0, "dims": [50], "values": [0]}, 400, "latent dimensions 0..49; got [50]"),
    ("/api/traverse", {"index": 0, "dims": [1], "values": [9]}, 422, "values.0: Input should be less than or equal to 5"),
    ("/api/traverse", {"index": 0, "dims": list(range(17)), "values": [0] * 17}, 422, "dims: List should have at most 16"),
    ("/api/interpolate", {"a": 0, "b": 1, "steps": 1}, 422, "steps: Input should be greater than or equal to 2"),
    ("/api/interpolate", {"a": 0, "b": 600}, 400, "b 600 is out of range"),
    ("/api/interpolate", {"a": 0, "b": 1, "path": "curved"}, 422, "path: Input should be 'linear' or 'slerp'"),
    ("/api/reconstruct", {"image": "iVBORw0KGgo="}, 400, "image must be a PNG data URL (data:image/png;base64,...)"),
    ("/api/reconstruct", {"image": "data:image/png;base64,@@@@"}, 400, "image is not valid base64"),
    ("/api/reconstruct", {"image": png_bytes_url(b"GIF89a not a png")}, 400, "image is not a readable PNG image"),
    ("/api/reconstruct", {"image": "data:image/png;base64," + "A" * 1_400_000}, 400,
     "image is more than 1000000 bytes; send a smaller PNG"),
    ("/api/reconstruct", {"image": png_url(Image.new("L", (2000, 10)))}, 400,
     "image is 2000x10; the limit is 1024 pixels a side"),
    ("/api/inpaint", {"index": 0, "mask": "middle"}, 400, "mask must be one of top, bottom, left, right, centre or a PNG"),
    ("/api/inpaint", {"index": 0, "mask": png_url(Image.new("L", (28, 28)))}, 400, "the mask is empty"),
    ("/api/inpaint", {"index": 0, "mask": "top", "chains": 9}, 422, "chains: Input should be less than or equal to 8"),
    ("/api/inpaint", {"index": 0, "mask": "top", "steps": 201}, 422, "steps: Input should be less than or equal to 200"),
    ("/api/inpaint", {"index": 0, "mask": "top", "method": "gibbs"}, 422, "method: Input should be 'pseudo-gibbs'"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{p}-{m[:30]}" for p, _, _, m in BAD])
def test_bad_requests_get_a_one_line_json_error(server, path, body, status, message):
    got, data = post(server, path, body)
    assert got == status and set(data) == {"error"}
    assert message in data["error"] and "\n" not in data["error"]


def test_malformed_bodies_get_json_errors(server):
    for body, status, message in [(b"{not json", 400, "the request body is not valid JSON"),
                                  (b'{"index": 0, "dims": [1], "values": [NaN]}', 422, "values.0:"),
                                  (b"[1, 2]", 422, "Input should be a valid dictionary")]:
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
    status, _, body = request(server, "GET", "/api/sample")
    assert status == 405 and json.loads(body)["error"] == "Method Not Allowed: GET /api/sample"


# -- the command -----------------------------------------------------------------------------------
def test_the_core_never_imports_the_demo():
    code = ("import sys, vaekit, vaekit.cli, vaekit.api; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette') "
            "or m.startswith('vaekit.serve')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=cli_env())
    assert out.stdout.strip() == "[]"


def test_serve_without_the_extra_says_how_to_install_it(run, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
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
