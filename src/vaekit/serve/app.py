"""The web demo's HTTP app over one loaded run.

Every endpoint calls the generation functions the CLI uses (vaekit.generate) and answers JSON:
images as PNG data URLs, bad requests as {"error": "..."} with a 4xx status. No request names a
file: the page's files are read once when the app is made, and the run's model and data are
loaded once before it (`load`). `Endpoints.routes` lists the demo's HTTP surface, one
(methods, path, handler) a line; each POST handler takes its body already read and checked
(bodies.py) and answers a dict. Every request first passes `guard` (the Host header, the body's
size), and any refusal answers {"error": one line}.

Requests take one of two lanes, so that at most two use the CPU at once and the page's sliders
stay quick while a long fill runs. A light request (one image: the sliders, the drawing, the map)
runs at once on the server's event loop, a few milliseconds each. A heavy one (a batch: samples,
an interpolation, an inpainting) runs in a worker thread and takes its turn on the model under a
lock: it waits at most `queue_seconds` for its turn, and inpainting, the one task whose time grows
with its settings, stops after `work_seconds` with the chains so far and says how many steps ran.
A handler's lane is its kind, as FastAPI runs them: `async def` on the event loop, plain `def` in
a worker thread.
"""
from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..data import preprocess
from ..distributed import Runtime
from ..errors import ConfigError, RunError
from ..generate import (INPAINT_METHODS, MASKS, PATHS, LatentPlane, check_index, code_prior_samples, inpaint,
                        inpaint_refusal, inpainting_mask, interpolate, interpolate_codes, mean_image, prior_samples,
                        ranked_dims, reconstruct, set_dims)
from ..loading import load_prior, open_for_inference
from ..models.code_prior import inpaint_codes
from ..viz import PALETTE
from .bodies import (LIMITS, IndexRequest, InpaintRequest, InterpolateRequest, LatentRequest, MapPointRequest,
                     ReconstructRequest, SampleRequest, TraverseRequest, json_body)
from .images import PNG_PREFIX, BadInput, as_mnist_digit, fitted, read_png, shrunk, to_data_url

WORK_SECONDS = 10.0     # the longest one request may hold the model (inpainting stops there)
QUEUE_SECONDS = 30.0    # the longest a heavy request waits for its turn before a 503
PAGES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
         "favicon.svg": "image/svg+xml"}
GET, POST = ["GET", "HEAD"], ["POST"]     # a GET answers HEAD too, for a quick check


@dataclass
class Demo:
    """A run loaded for the demo: the test set's images preprocessed once as the run was trained,
    x [N,C,H,W] on the model's device, their labels [N] and the names of the labels; the latent
    dimensions ranked by their KL over the test set (most first) with that KL; `start`, the
    training set's mean image [C,H,W], where inpainting chains begin; the latent map: the plane it
    shows (generate.LatentPlane) and the test codes' coordinates on it [N,2]; and whether a drawing is made into a digit the way MNIST's were
    (else the whole pad is shrunk). A vq model has no continuous z: no ranked dimensions and no
    plane (the sliders and the map are refused), and `prior`, its code prior (None until trained)."""
    model: torch.nn.Module
    runtime: Runtime
    binarization: str
    test_x: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]
    ranked_dims: list[int]
    dim_kl: list[float]
    start: torch.Tensor
    plane: LatentPlane | None
    map_coords: torch.Tensor
    mnist_drawings: bool
    prior: torch.nn.Module | None = None
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
    start = mean_image(preprocess(splits.train.images.to(rt.device), b, gen))
    if config.model.family == "vq":
        return Demo(model, rt, b, x, splits.test.labels, splits.class_names, [], [], start, None, torch.zeros(0, 2),
                    config.data.dataset == "mnist", prior=load_prior(opened))
    codes, logvar = model.posterior(x)              # [N,D] each: encoded once, for the sliders and the map
    dims, kl = ranked_dims(codes, logvar, model.latent_dim)
    plane = LatentPlane.of(codes)
    return Demo(model, rt, b, x, splits.test.labels, splits.class_names, dims, kl, start, plane,
                plane.project(codes).cpu(), config.data.dataset == "mnist")


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


# -- before and after the endpoints: the guard and the errors, always {"error": one line} -------------
async def guard(request: Request, call_next, host: str):
    """Refuses a Host header that does not name the demo (`host` is the address it listens on),
    and a body that says it is too large before reading it (h11 holds a body to its stated length)."""
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


async def bad_input(request: Request, exc: BadInput) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


async def bad_setting(request: Request, exc: ConfigError) -> JSONResponse:
    """A setting the generation tasks refuse (vaekit.generate's checks, shared with the CLI)."""
    return JSONResponse({"error": str(exc)}, status_code=400)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """No such path (404), or a method the path does not take (405)."""
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"},
                        status_code=exc.status_code, headers=exc.headers)


class Endpoints:
    """The demo's endpoints over one Demo, with its time limits (see the module's docstring)."""

    def __init__(self, demo: Demo, work_seconds: float = WORK_SECONDS, queue_seconds: float = QUEUE_SECONDS):
        self.demo, self.work_seconds, self.queue_seconds = demo, work_seconds, queue_seconds
        static = files(__package__) / "static"
        self.pages = {name: (static / name).read_bytes() for name in PAGES}
        self.latent_map_json = b"" if demo.plane is None else json.dumps({
            "axes": demo.plane.names, "points": [[round(u, 4), round(v, 4)] for u, v in demo.map_coords.tolist()],
            "labels": demo.test_labels.tolist(), "class_names": demo.class_names,
            "colours": ["#%02x%02x%02x" % PALETTE[i % len(PALETTE)] for i in range(len(demo.class_names))]}).encode()

    def routes(self) -> list[tuple[list[str], str, Callable]]:
        """(methods, path, handler) for every path the demo answers; any other is a 404."""
        pages = [(GET, "/" if name == "index.html" else f"/{name}", self.page(name)) for name in PAGES]
        return [*pages,
                # light: async, on the event loop
                (GET, "/api/info", self.info),
                (GET, "/api/map", self.latent_map),
                (POST, "/api/map-decode", self.map_decode),
                (POST, "/api/test-image", self.test_image),
                (POST, "/api/latent", self.latent),
                (POST, "/api/traverse", self.traversal),
                (POST, "/api/reconstruct", self.reconstruction),
                # heavy: in a worker thread, one at a time on the model
                (POST, "/api/sample", self.samples),
                (POST, "/api/interpolate", self.interpolation),
                (POST, "/api/inpaint", self.inpainting)]

    # -- helpers ----------------------------------------------------------------------------------
    @contextmanager
    def heavy_turn(self):
        """Waits its turn on the model (at most queue_seconds), then holds it."""
        if not self.demo.lock.acquire(timeout=self.queue_seconds):
            raise BadInput(f"the demo is busy: this request waited {self.queue_seconds:g} s for the model; "
                           "try again", 503)
        try:
            with torch.inference_mode():
                yield
        finally:
            self.demo.lock.release()

    def image_at(self, field: str, index: int) -> torch.Tensor:
        """Test image `index` (named `field` in the request), preprocessed: x [1,C,H,W]."""
        check_index(field, index, len(self.demo.test_x))
        return self.demo.test_x[index:index + 1]

    @property
    def vq(self) -> bool:
        return self.demo.plane is None

    def continuous_only(self, what: str) -> None:
        """The one-line refusal of a continuous-z panel for a vq model."""
        if self.vq:
            raise BadInput(f"{what} moves through a continuous z, and this is a vq model, whose codes are discrete", 422)

    def code_prior(self):
        """The vq model's code prior, or the one-line refusal when it has none."""
        if self.demo.prior is None:
            raise BadInput("this vq model has no code prior yet: train its prior first: vaekit train-prior RUN", 422)
        return self.demo.prior

    def label_of(self, index: int) -> dict:
        label = int(self.demo.test_labels[index])
        return {"label": label, "class": self.demo.class_names[label]}

    # -- the page's files, read when the app was made ---------------------------------------------
    def page(self, name: str) -> Callable[[], Response]:
        body, media_type = self.pages[name], PAGES[name]

        def answer() -> Response:
            return Response(body, media_type=media_type)
        return answer

    # -- light requests ---------------------------------------------------------------------------
    async def info(self) -> dict:
        demo = self.demo
        if self.vq:
            c = demo.model.config
            model = {"family": "vq", "latent_dim": 0, "grid": c.grid_size, "codebook_size": c.codebook_size,
                     "prior": demo.prior is not None}
        else:
            model = {"family": demo.model.config.family, "latent_dim": demo.model.latent_dim}
        return {"shape": list(demo.shape), **model, "test_size": len(demo.test_x),
                "class_names": demo.class_names, "drawing": "mnist-digit" if demo.mnist_drawings else "whole-pad",
                "limits": LIMITS, "work_seconds": self.work_seconds, "paths": PATHS, "masks": MASKS,
                "methods": INPAINT_METHODS}

    async def latent_map(self) -> Response:
        """The test set's codes on the latent map's plane, with their labels and the axes' names."""
        self.continuous_only("the latent map")
        return Response(self.latent_map_json, media_type="application/json")

    async def map_decode(self, req: MapPointRequest = json_body(MapPointRequest)) -> dict:
        """The decode of the map's point (x, y) (see generate.LatentPlane)."""
        self.continuous_only("the latent map")
        z = self.demo.plane.code(torch.tensor([[req.x, req.y]]))
        with torch.inference_mode():
            decoded = self.demo.model.decode(z, as_image=True)
        return {"image": to_data_url(decoded)}

    async def test_image(self, req: IndexRequest = json_body(IndexRequest)) -> dict:
        image = self.image_at("index", req.index)
        return {"image": to_data_url(image), **self.label_of(req.index)}

    async def latent(self, req: LatentRequest = json_body(LatentRequest)) -> dict:
        """The k most active dimensions (most KL over the test set first) and the posterior mean of
        test image `index` on them: where the page's sliders start."""
        self.continuous_only("the latent sliders")
        demo = self.demo
        image = self.image_at("index", req.index)
        k = min(req.k, demo.model.latent_dim)
        dims = demo.ranked_dims[:k]
        with torch.inference_mode():
            code = demo.model.posterior(image)[0][0]
        return {"dims": dims, "kl": demo.dim_kl[:k], "values": code[dims].tolist(),
                "image": to_data_url(image), **self.label_of(req.index)}

    async def traversal(self, req: TraverseRequest = json_body(TraverseRequest)) -> dict:
        self.continuous_only("the latent sliders")
        latent_dim = self.demo.model.latent_dim
        image = self.image_at("index", req.index)
        if len(req.dims) != len(req.values):
            raise BadInput(f"dims has {len(req.dims)} entries but values has {len(req.values)}; give one value per dim")
        if len(set(req.dims)) != len(req.dims) or not all(0 <= d < latent_dim for d in req.dims):
            raise BadInput(f"dims must be distinct latent dimensions 0..{latent_dim - 1}; got {req.dims}")
        decoded = set_dims(self.demo.model, image, req.dims, torch.tensor(req.values))
        return {"image": to_data_url(decoded)}

    async def reconstruction(self, req: ReconstructRequest = json_body(ReconstructRequest)) -> dict:
        """A drawing made the model's size (for MNIST as its digits were made, else shrunk whole):
        its binarized input and its decode (z ~ q(z|x))."""
        demo = self.demo
        img = read_png("image", req.image)
        drawing = as_mnist_digit(img) if demo.mnist_drawings else shrunk(img, demo.shape)
        gen = demo.runtime.generator(req.seed)
        x = preprocess(drawing.to(demo.runtime.device), demo.binarization, gen)    # gen goes on to draw z
        decoded = reconstruct(demo.model, x, gen)
        return {"input": to_data_url(x), "image": to_data_url(decoded)}

    # -- heavy requests, one at a time on the model ---------------------------------------------------
    def samples(self, req: SampleRequest = json_body(SampleRequest)) -> dict:
        gen = self.demo.runtime.generator(req.seed)
        if self.vq:
            prior = self.code_prior()
            with self.heavy_turn():
                images = code_prior_samples(self.demo.model, prior, req.n, gen)
            return {"image": to_data_url(images, padding=1)}
        with self.heavy_turn():
            images = prior_samples(self.demo.model, req.n, gen)
        return {"image": to_data_url(images, padding=1)}

    def interpolation(self, req: InterpolateRequest = json_body(InterpolateRequest)) -> dict:
        """The path's decodes framed by the two binary originals: as a row of the CLI's picture
        (image) and one by one (frames)."""
        images = torch.cat([self.image_at("a", req.a), self.image_at("b", req.b)])
        with self.heavy_turn():   # a vq model's one path: linear in z_e, quantised (generate.interpolate_codes)
            path = (interpolate_codes(self.demo.model, images, req.steps) if self.vq
                    else interpolate(self.demo.model, images, req.steps, req.path))
        row = torch.cat([images[:1], path, images[1:]])
        return {"image": to_data_url(row, nrow=req.steps + 2, padding=1), "frames": [to_data_url(f[None]) for f in row]}

    def inpainting(self, req: InpaintRequest = json_body(InpaintRequest)) -> dict:
        """Fills the masked pixels of test image `index`; the observed pixels stay as they are. Returns
        the binary original, the input (missing pixels grey), the completion (missing pixels show their
        predictive probability), the mask used (white = missing) and the steps run (fewer than asked
        when the chains were stopped at work_seconds)."""
        demo = self.demo
        if self.vq:
            return self.inpainting_vq(req)
        refusal = inpaint_refusal(demo.model.config, req.method)
        if refusal:
            raise BadInput(refusal, 422)
        image = self.image_at("index", req.index)
        mask = self.mask_of(req.mask).to(demo.runtime.device)
        done = 0

        def out_of_time(steps: int) -> bool:
            nonlocal done
            done = steps
            return time.monotonic() > deadline

        with self.heavy_turn():
            deadline = time.monotonic() + self.work_seconds
            filled, _ = inpaint(demo.model, image, mask, req.steps, req.chains, req.method, demo.start,
                                demo.runtime.generator(req.seed), stop=out_of_time)
        return {"original": to_data_url(image), "input": to_data_url(torch.where(mask, 0.5, image)),
                "image": to_data_url(filled), "mask": to_data_url(mask[None].float()),
                "missing_pixels": int(mask[0].sum()), "steps_done": done}

    def inpainting_vq(self, req: InpaintRequest) -> dict:
        """inpainting for a vq model: its codes drawn by importance resampling of `chains` prior
        proposals against the observed pixels (models/code_prior.inpaint_codes); `steps` is unused."""
        demo = self.demo
        prior = self.code_prior()
        image = self.image_at("index", req.index)
        mask = self.mask_of(req.mask).to(demo.runtime.device)
        with self.heavy_turn():
            codes = inpaint_codes(demo.model, prior, image, ~mask[None], demo.runtime.generator(req.seed), req.chains)
            filled = torch.where(mask, demo.model.decode_indices(codes, as_image=True), image)
        return {"original": to_data_url(image), "input": to_data_url(torch.where(mask, 0.5, image)),
                "image": to_data_url(filled), "mask": to_data_url(mask[None].float()),
                "missing_pixels": int(mask[0].sum()), "steps_done": 0}

    def mask_of(self, mask: str) -> torch.Tensor:
        """An inpainting request's mask, a region's name or a PNG (white = missing): bool [C,H,W]."""
        shape = self.demo.shape
        if mask in MASKS:
            return inpainting_mask(mask, shape)
        if not mask.startswith(PNG_PREFIX):
            raise BadInput(f"mask must be one of {', '.join(MASKS)} or a PNG data URL ({PNG_PREFIX}...)")
        return inpainting_mask(fitted(read_png("mask", mask), (1, *shape[1:])), shape)


def create_app(demo: Demo, host: str = "127.0.0.1", work_seconds: float = WORK_SECONDS,
               queue_seconds: float = QUEUE_SECONDS) -> FastAPI:
    """The demo's app; `host` is the address it listens on, for the Host header check."""
    app = FastAPI(title="vaekit demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(BadInput, bad_input)
    app.add_exception_handler(ConfigError, bad_setting)
    app.add_exception_handler(HTTPException, http_error)
    app.middleware("http")(partial(guard, host=host))
    for methods, path, handler in Endpoints(demo, work_seconds, queue_seconds).routes():
        app.add_api_route(path, handler, methods=methods)
    return app
