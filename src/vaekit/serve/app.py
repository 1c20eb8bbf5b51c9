"""The web demo's HTTP app over one loaded run.

Every endpoint calls the generation functions the CLI uses (vaekit.generate) and answers JSON:
images as PNG data URLs, bad requests as {"error": "..."} with a 4xx status. No request names a
file: the page's files are read once when the app is made, and the run's model and data are
loaded once before it (`load`).

Requests take one of two lanes, so that at most two use the CPU at once and the page's sliders
stay quick while a long fill runs. A light request (one image: the sliders, the drawing, the map)
runs at once on the server's event loop, a few milliseconds each. A heavy one (a batch: samples,
an interpolation, an inpainting) runs in a worker thread and takes its turn on the model under a
lock: it waits at most `queue_seconds` for its turn, and inpainting, the one task whose time grows
with its settings, stops after `work_seconds` with the chains so far and says how many steps ran.
"""
from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..data import preprocess
from ..distributed import Runtime
from ..generate import (INPAINT_METHODS, MASKS, PATHS, inpaint, inpaint_refusal, interpolate, latent_plane,
                        mean_image, most_active_dims, prior_samples, reconstruct, region_mask, set_dims)
from ..objectives import posterior
from ..runs import RunError, open_for_inference
from ..viz import PALETTE
from .images import PNG_PREFIX, BadInput, as_mnist_digit, from_data_url, read_png, shrunk, to_data_url

# What one request may ask for: enough to play with, little enough to answer in well under a second on a CPU.
LIMITS = {"samples": 64, "interpolation_steps": 32, "dims": 16, "latent_value": 5.0, "map_value": 50.0,
          "inpaint_steps": 200, "chains": 8, "body_bytes": 2_000_000}
WORK_SECONDS = 10.0     # the longest one request may hold the model (inpainting stops there)
QUEUE_SECONDS = 30.0    # the longest a heavy request waits for its turn before a 503
PAGES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
         "favicon.svg": "image/svg+xml"}
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Index = Annotated[int, Field(ge=0)]
MapValue = Annotated[float, Field(ge=-LIMITS["map_value"], le=LIMITS["map_value"], allow_inf_nan=False)]


@dataclass
class Demo:
    """A run loaded for the demo: the test set's images preprocessed once as the run was trained,
    x [N,C,H,W] on the model's device, their labels [N] and the names of the labels; the latent
    dimensions ranked by their KL over the test set (most first) with that KL; `start`, the
    training set's mean image [C,H,W], where inpainting chains begin; the latent map: the plane it
    shows (origin [D], axes [2,D], axis names; see generate.latent_plane) and the test codes'
    coordinates on it [N,2]; and whether a drawing is made into a digit the way MNIST's were
    (else the whole pad is shrunk)."""
    model: torch.nn.Module
    runtime: Runtime
    binarization: str
    test_x: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]
    ranked_dims: list[int]
    dim_kl: list[float]
    start: torch.Tensor
    plane: tuple[torch.Tensor, torch.Tensor, list[str]]
    map_coords: torch.Tensor
    mnist_drawings: bool
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.test_x.shape[1:])


def load(run: str | Path, device: str = "auto", data_dir: str | Path | None = None, precision: str = "auto") -> Demo:
    """A run's model with its newest weights, in `precision`, and its dataset, ready to serve."""
    opened = open_for_inference(run, device, precision, unconditional_task="serve")
    model, config, rt, splits = opened.model, opened.config, opened.runtime, opened.data(data_dir)
    if config.model.likelihood != "bernoulli":   # the page's inpainting and drawing pad are binary
        raise RunError(f"the demo is for bernoulli models (binary images), and {run} has a "
                       f"{config.model.likelihood} likelihood")
    if splits.test.images.shape[1] not in (1, 3):
        raise RunError(f"the demo shows grey or RGB images; {config.data.dataset} has "
                       f"{splits.test.images.shape[1]} channels")
    b, gen = config.data.binarization, rt.generator(0)
    test = splits.test.images.to(rt.device)
    x = preprocess(test, b, gen)
    dims, kl = most_active_dims(model, x, model.latent_dim)
    codes = posterior(model, x)[0]
    origin, axes, names = latent_plane(codes)
    coords = ((codes.double() - origin) @ axes.T).float().cpu()
    start = mean_image(preprocess(splits.train.images.to(rt.device), b, gen))
    return Demo(model, rt, b, x, splits.test.labels, splits.class_names, dims, kl, start, (origin, axes, names),
                coords, config.data.dataset == "mnist")


def host_allowed(host: str, bound: str) -> bool:
    """Whether a request's Host header names this demo: localhost, a loopback address or the
    address it listens on (bound, as given to --host); when that is every interface (0.0.0.0,
    ::), any IP address or this machine's name. A page of another site that reaches the demo by
    DNS rebinding sends its own name, so it is refused."""
    name = urlsplit("//" + host).hostname or ""
    if name in ("localhost", bound.lower()):
        return True
    everywhere = bound in ("0.0.0.0", "::", "")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return everywhere and name == socket.gethostname().lower()
    return address.is_loopback or everywhere


class Strict(BaseModel):
    """A request body: unknown keys are an error, not ignored."""
    model_config = ConfigDict(extra="forbid")


class SampleRequest(Strict):
    n: int = Field(16, ge=1, le=LIMITS["samples"])
    seed: Seed = 0


class IndexRequest(Strict):
    index: Index


class LatentRequest(Strict):
    index: Index
    k: int = Field(8, ge=1, le=LIMITS["dims"])


class TraverseRequest(Strict):
    index: Index
    dims: list[int] = Field(min_length=1, max_length=LIMITS["dims"])
    values: list[Annotated[float, Field(ge=-LIMITS["latent_value"], le=LIMITS["latent_value"],
                                       allow_inf_nan=False)]] = Field(min_length=1, max_length=LIMITS["dims"])


class InterpolateRequest(Strict):
    a: Index
    b: Index
    steps: int = Field(10, ge=2, le=LIMITS["interpolation_steps"])
    path: Literal[PATHS] = "linear"


class MapPointRequest(Strict):
    x: MapValue
    y: MapValue


class ReconstructRequest(Strict):
    image: str = Field(description="a PNG data URL, up to 1024 pixels a side, made the model's size")
    seed: Seed = 0


class InpaintRequest(Strict):
    index: Index
    mask: str = Field(description="top, bottom, left, right, centre, or a PNG data URL, white = missing")
    steps: int = Field(30, ge=1, le=LIMITS["inpaint_steps"])
    chains: int = Field(4, ge=1, le=LIMITS["chains"])
    method: Literal[INPAINT_METHODS] = "pseudo-gibbs"
    seed: Seed = 0


def first_error(error: ValidationError) -> str:
    """pydantic's first complaint in one line, named by its field: "n: Input should be ..."."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def json_body(model: type[Strict]):
    """A dependency that reads the request's body as `model`. The body must say it is JSON (a
    form's content type, which a page of another site may send without asking, is refused), and
    checking stops at the first unknown key."""
    async def parse(request: Request) -> Strict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise BadInput(f"send the body as JSON with the header Content-Type: application/json (this request's "
                           f"is {kind or 'missing'}); with curl: --json '{{...}}'", 415)
        try:
            body = await request.body()
        except ClientDisconnect:      # gone, or cut off by the server's stall guard: nobody to answer
            raise BadInput("the connection closed before the body arrived") from None
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise BadInput("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadInput('the body must be a JSON object of settings, like {"index": 0}', 422)
        unknown = next((key for key in data if key not in model.model_fields), None)
        if unknown is not None:
            raise BadInput(f"{unknown}: not a setting of {request.url.path}, which takes "
                           f"{', '.join(model.model_fields)}", 422)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise BadInput(first_error(e), 422) from None
    return Depends(parse)


def create_app(demo: Demo, host: str = "127.0.0.1", work_seconds: float = WORK_SECONDS,
               queue_seconds: float = QUEUE_SECONDS) -> FastAPI:
    """The demo's app; `host` is the address it listens on, for the Host header check."""
    app = FastAPI(title="vaekit demo", docs_url=None, redoc_url=None, openapi_url=None)
    static = files(__package__) / "static"
    pages = {name: (static / name).read_bytes() for name in PAGES}
    c, h, w = demo.shape
    latent_map = json.dumps({
        "axes": demo.plane[2], "points": [[round(u, 4), round(v, 4)] for u, v in demo.map_coords.tolist()],
        "labels": demo.test_labels.tolist(), "class_names": demo.class_names,
        "colours": ["#%02x%02x%02x" % PALETTE[i % len(PALETTE)] for i in range(len(demo.class_names))]}).encode()

    @contextmanager
    def heavy_turn():
        """Waits its turn on the model (at most queue_seconds), then holds it."""
        if not demo.lock.acquire(timeout=queue_seconds):
            raise BadInput(f"the demo is busy: this request waited {queue_seconds:g} s for the model; try again", 503)
        try:
            with torch.inference_mode():
                yield
        finally:
            demo.lock.release()

    def test_image(field: str, index: int) -> torch.Tensor:
        """Test image `index`, preprocessed: x [1,C,H,W]."""
        if index >= len(demo.test_x):
            raise BadInput(f"{field} {index} is out of range: the test set has {len(demo.test_x)} images "
                           f"(0..{len(demo.test_x) - 1})")
        return demo.test_x[index:index + 1]

    def label_of(index: int) -> dict:
        label = int(demo.test_labels[index])
        return {"label": label, "class": demo.class_names[label]}

    # -- errors: always {"error": one line} ------------------------------------------------
    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"},
                            status_code=exc.status_code, headers=exc.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Refuses a Host header that does not name the demo, and a body that says it is too large
        before reading it (h11 holds a body to its stated length)."""
        if "host" in request.headers and not host_allowed(request.headers["host"], host):
            address, port = request.scope["server"] or (host, 0)
            address = f"[{address}]" if ":" in address else address
            return JSONResponse({"error": f"the Host header {request.headers['host']!r} does not name this demo; "
                                          f"open it as http://{address}:{port}/ (other names are refused against "
                                          "DNS rebinding; vaekit serve --host NAME allows NAME)"}, status_code=403)
        if request.method == "POST":
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return JSONResponse({"error": "send the body with a Content-Length header"}, status_code=411)
            if int(length) > LIMITS["body_bytes"]:
                return JSONResponse({"error": f"the body is {length} bytes; the limit is {LIMITS['body_bytes']}"},
                                    status_code=413)
        return await call_next(request)

    # -- the page (GET, and HEAD for a quick check) ---------------------------------------------
    def page(name: str):
        return lambda: Response(pages[name], media_type=PAGES[name])

    app.add_api_route("/", page("index.html"), methods=["GET", "HEAD"], response_class=HTMLResponse)
    for name in PAGES:
        if name != "index.html":
            app.add_api_route(f"/{name}", page(name), methods=["GET", "HEAD"])

    # -- the API: light requests ------------------------------------------------------------------
    @app.api_route("/api/info", methods=["GET", "HEAD"])
    async def info():
        return {"shape": [c, h, w], "latent_dim": demo.model.latent_dim, "test_size": len(demo.test_x),
                "class_names": demo.class_names, "drawing": "mnist-digit" if demo.mnist_drawings else "whole-pad",
                "limits": LIMITS, "work_seconds": work_seconds, "paths": PATHS, "masks": MASKS,
                "methods": INPAINT_METHODS}

    @app.api_route("/api/map", methods=["GET", "HEAD"])
    async def api_map():
        """The test set's codes on the latent map's plane, with their labels and the axes' names."""
        return Response(latent_map, media_type="application/json")

    @app.post("/api/map-decode")
    async def api_map_decode(req: MapPointRequest = json_body(MapPointRequest)):
        """The decode of the map's point (x, y): the code origin + x axes[0] + y axes[1]."""
        origin, axes, _ = demo.plane
        z = origin + torch.tensor([req.x, req.y], dtype=torch.float64, device=origin.device) @ axes
        with torch.inference_mode():
            decoded = demo.model.decode(z.float()[None], as_image=True)
        return {"image": to_data_url(decoded)}

    @app.post("/api/test-image")
    async def api_test_image(req: IndexRequest = json_body(IndexRequest)):
        image = test_image("index", req.index)
        return {"image": to_data_url(image), **label_of(req.index)}

    @app.post("/api/latent")
    async def api_latent(req: LatentRequest = json_body(LatentRequest)):
        """The k most active dimensions (most KL over the test set first) and the posterior mean of
        test image `index` on them: where the page's sliders start."""
        image = test_image("index", req.index)
        k = min(req.k, demo.model.latent_dim)
        dims = demo.ranked_dims[:k]
        with torch.inference_mode():
            code = posterior(demo.model, image)[0][0]
        return {"dims": dims, "kl": demo.dim_kl[:k], "values": code[dims].tolist(),
                "image": to_data_url(image), **label_of(req.index)}

    @app.post("/api/traverse")
    async def api_traverse(req: TraverseRequest = json_body(TraverseRequest)):
        image = test_image("index", req.index)
        if len(req.dims) != len(req.values):
            raise BadInput(f"dims has {len(req.dims)} entries but values has {len(req.values)}; give one value per dim")
        if len(set(req.dims)) != len(req.dims) or not all(0 <= d < demo.model.latent_dim for d in req.dims):
            raise BadInput(f"dims must be distinct latent dimensions 0..{demo.model.latent_dim - 1}; got {req.dims}")
        decoded = set_dims(demo.model, image, req.dims, torch.tensor(req.values))
        return {"image": to_data_url(decoded)}

    @app.post("/api/reconstruct")
    async def api_reconstruct(req: ReconstructRequest = json_body(ReconstructRequest)):
        """A drawing made the model's size (for MNIST as its digits were made, else shrunk whole):
        its binarized input and its decode (z ~ q(z|x))."""
        img = read_png("image", req.image)
        drawing = as_mnist_digit(img) if demo.mnist_drawings else shrunk(img, demo.shape)
        gen = demo.runtime.generator(req.seed)
        x = preprocess(drawing.to(demo.runtime.device), demo.binarization, gen)    # gen goes on to draw z
        decoded = reconstruct(demo.model, x, gen)
        return {"input": to_data_url(x), "image": to_data_url(decoded)}

    # -- the API: heavy requests, one at a time on the model ------------------------------------
    @app.post("/api/sample")
    def api_sample(req: SampleRequest = json_body(SampleRequest)):
        with heavy_turn():
            images = prior_samples(demo.model, req.n, demo.runtime.generator(req.seed))
        return {"image": to_data_url(images, padding=1)}

    @app.post("/api/interpolate")
    def api_interpolate(req: InterpolateRequest = json_body(InterpolateRequest)):
        """The path's decodes framed by the two binary originals: as a row of the CLI's picture
        (image) and one by one (frames)."""
        images = torch.cat([test_image("a", req.a), test_image("b", req.b)])
        with heavy_turn():
            path = interpolate(demo.model, images, req.steps, req.path)
        row = torch.cat([images[:1], path, images[1:]])
        return {"image": to_data_url(row, nrow=req.steps + 2, padding=1), "frames": [to_data_url(f[None]) for f in row]}

    @app.post("/api/inpaint")
    def api_inpaint(req: InpaintRequest = json_body(InpaintRequest)):
        """Fills the masked pixels of test image `index`; the observed pixels stay as they are. Returns
        the binary original, the input (missing pixels grey), the completion (missing pixels show their
        predictive probability), the mask used (white = missing) and the steps run (fewer than asked
        when the chains were stopped at work_seconds)."""
        refusal = inpaint_refusal(demo.model.config, req.method)
        if refusal:
            raise BadInput(refusal, 422)
        image = test_image("index", req.index)
        if req.mask in MASKS:
            mask = region_mask(req.mask, demo.shape)
        elif not req.mask.startswith(PNG_PREFIX):
            raise BadInput(f"mask must be one of {', '.join(MASKS)} or a PNG data URL ({PNG_PREFIX}...)")
        else:
            mask = (from_data_url("mask", req.mask, (1, h, w))[0] >= 128).expand(demo.shape)
        if not mask.any():
            raise BadInput("the mask is empty: mark the pixels to fill (on the page, paint them red; "
                           "in a mask PNG, white)")
        mask = mask.to(demo.runtime.device)
        done = 0

        def out_of_time(steps: int) -> bool:
            nonlocal done
            done = steps
            return time.monotonic() > deadline

        with heavy_turn():
            deadline = time.monotonic() + work_seconds
            filled, _ = inpaint(demo.model, image, mask, req.steps, req.chains, req.method, demo.start,
                                demo.runtime.generator(req.seed), stop=out_of_time)
        return {"original": to_data_url(image), "input": to_data_url(torch.where(mask, 0.5, image)),
                "image": to_data_url(filled), "mask": to_data_url(mask[None].float()),
                "missing_pixels": int(mask[0].sum()), "steps_done": done}

    return app
