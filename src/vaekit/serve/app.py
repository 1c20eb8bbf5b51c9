"""The web demo's HTTP app over one loaded run.

Every endpoint calls the generation functions the CLI uses (vaekit.generate) and answers JSON:
images as PNG data URLs, bad requests as {"error": "..."} with a 4xx status. No request names a
file: the page's three files are read once when the app is made, and the run's model and data
are loaded once before it (`load`). Model work runs one request at a time under a lock, so
concurrent requests queue instead of oversubscribing the CPU.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..data import preprocess
from ..distributed import Runtime
from ..generate import (INPAINT_METHODS, MASKS, PATHS, inpaint, interpolate, mean_image, most_active_dims,
                        posterior, reconstruct, region_mask, sample, set_dims)
from ..api import open_run
from ..runs import RunError
from .images import PNG_PREFIX, BadInput, from_data_url, to_data_url

# What one request may ask for: enough to play with, little enough to answer in well under a second on a CPU.
LIMITS = {"samples": 64, "interpolation_steps": 32, "dims": 16, "latent_value": 5.0, "inpaint_steps": 200,
          "chains": 8, "body_bytes": 2_000_000}
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Index = Annotated[int, Field(ge=0)]


@dataclass
class Demo:
    """A run loaded for the demo: images uint8 [N,C,H,W] and labels [N] of the test set on the
    model's device, the latent dimensions ranked by their KL over it (most first) with that KL,
    and `start`, the training set's mean image [C,H,W], where inpainting chains begin."""
    model: torch.nn.Module
    runtime: Runtime
    binarization: str
    test_images: torch.Tensor
    test_labels: torch.Tensor
    ranked_dims: list[int]
    dim_kl: list[float]
    start: torch.Tensor
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.test_images.shape[1:])


def load(run: str | Path, device: str = "auto", data_dir: str | Path | None = None) -> Demo:
    """A run's model with its newest weights and its dataset, ready to serve."""
    model, config, rt, splits = open_run(run, device, data_dir, "serve")
    if config.model.likelihood != "bernoulli":   # the page's inpainting and drawing pad are binary
        raise RunError(f"the demo is for bernoulli models (binary images), and {run} has a "
                       f"{config.model.likelihood} likelihood")
    if splits.test.images.shape[1] not in (1, 3):
        raise RunError(f"the demo shows grey or RGB images; {config.data.dataset} has "
                       f"{splits.test.images.shape[1]} channels")
    b, gen = config.data.binarization, rt.generator(0)
    test = splits.test.images.to(rt.device)
    dims, kl = most_active_dims(model, preprocess(test, b, gen), model.latent_dim)
    start = mean_image(preprocess(splits.train.images.to(rt.device), b, gen))
    return Demo(model, rt, b, test, splits.test.labels, dims, kl, start)


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


class ReconstructRequest(Strict):
    image: str = Field(description="a PNG data URL, up to 1024 pixels a side, shrunk to the model's size")
    seed: Seed = 0


class InpaintRequest(Strict):
    index: Index
    mask: str = Field(description="top, bottom, left, right, centre, or a PNG data URL, white = missing")
    steps: int = Field(30, ge=1, le=LIMITS["inpaint_steps"])
    chains: int = Field(4, ge=1, le=LIMITS["chains"])
    method: Literal[INPAINT_METHODS] = "pseudo-gibbs"
    seed: Seed = 0


def create_app(demo: Demo) -> FastAPI:
    app = FastAPI(title="vaekit demo", docs_url=None, redoc_url=None, openapi_url=None)
    static = files(__package__) / "static"
    pages = {name: (static / name).read_bytes() for name in ("index.html", "app.js", "style.css")}
    c, h, w = demo.shape

    @contextmanager
    def model_work():
        with demo.lock, torch.inference_mode():
            yield

    def test_image(field: str, index: int) -> torch.Tensor:
        """Test image `index` as uint8 [1,C,H,W]."""
        if index >= len(demo.test_images):
            raise BadInput(f"{field} {index} is out of range: the test set has {len(demo.test_images)} images "
                           f"(0..{len(demo.test_images) - 1})")
        return demo.test_images[index:index + 1]

    def binary(images: torch.Tensor) -> torch.Tensor:
        return preprocess(images, demo.binarization, demo.runtime.generator(0))

    # -- errors: always {"error": one line} ------------------------------------------------
    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return JSONResponse({"error": f"{where}: {first['msg']}" if where else first["msg"]}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"},
                            status_code=exc.status_code)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        """Refuses a body before reading it when it says it is too large (h11 holds it to its length)."""
        if request.method == "POST":
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return JSONResponse({"error": "send the body with a Content-Length header"}, status_code=411)
            if int(length) > LIMITS["body_bytes"]:
                return JSONResponse({"error": f"the body is {length} bytes; the limit is {LIMITS['body_bytes']}"},
                                    status_code=413)
        return await call_next(request)

    # -- the page ----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(pages["index.html"])

    @app.get("/app.js")
    def script():
        return Response(pages["app.js"], media_type="text/javascript")

    @app.get("/style.css")
    def style():
        return Response(pages["style.css"], media_type="text/css")

    # -- the API -----------------------------------------------------------------------------
    @app.get("/api/info")
    def info():
        return {"shape": [c, h, w], "latent_dim": demo.model.latent_dim, "test_size": len(demo.test_images),
                "limits": LIMITS, "paths": PATHS, "masks": MASKS, "methods": INPAINT_METHODS}

    @app.post("/api/sample")
    def api_sample(req: SampleRequest):
        with model_work():
            images = sample(demo.model, req.n, demo.runtime.generator(req.seed))
        return {"image": to_data_url(images, padding=1)}

    @app.post("/api/test-image")
    def api_test_image(req: IndexRequest):
        image = test_image("index", req.index)
        return {"image": to_data_url(binary(image)), "label": int(demo.test_labels[req.index])}

    @app.post("/api/latent")
    def api_latent(req: LatentRequest):
        """The k most active dimensions (most KL over the test set first) and the posterior mean of
        test image `index` on them: where the page's sliders start."""
        image = test_image("index", req.index)
        k = min(req.k, demo.model.latent_dim)
        dims = demo.ranked_dims[:k]
        with model_work():
            code = posterior(demo.model, binary(image))[0][0]
        return {"dims": dims, "kl": demo.dim_kl[:k], "values": code[dims].tolist(),
                "image": to_data_url(binary(image)), "label": int(demo.test_labels[req.index])}

    @app.post("/api/traverse")
    def api_traverse(req: TraverseRequest):
        image = test_image("index", req.index)
        if len(req.dims) != len(req.values):
            raise BadInput(f"dims has {len(req.dims)} entries but values has {len(req.values)}; give one value per dim")
        if len(set(req.dims)) != len(req.dims) or not all(0 <= d < demo.model.latent_dim for d in req.dims):
            raise BadInput(f"dims must be distinct latent dimensions 0..{demo.model.latent_dim - 1}; got {req.dims}")
        with model_work():
            decoded = set_dims(demo.model, image, req.dims, torch.tensor(req.values), demo.binarization,
                               demo.runtime.generator(0))
        return {"image": to_data_url(decoded)}

    @app.post("/api/interpolate")
    def api_interpolate(req: InterpolateRequest):
        """The path's decodes framed by the two binary originals, as a row of the CLI's picture."""
        images = torch.cat([test_image("a", req.a), test_image("b", req.b)])
        with model_work():
            path = interpolate(demo.model, images, req.steps, req.path, demo.binarization, demo.runtime.generator(0))
        ends = binary(images)
        return {"image": to_data_url(torch.cat([ends[:1], path, ends[1:]]), nrow=req.steps + 2, padding=1)}

    @app.post("/api/reconstruct")
    def api_reconstruct(req: ReconstructRequest):
        """A drawing, shrunk to the model's size: its binarized input and its decode (z ~ q(z|x))."""
        drawing = from_data_url("image", req.image, demo.shape).to(demo.runtime.device)
        with model_work():
            x, decoded = reconstruct(demo.model, drawing, demo.binarization, demo.runtime.generator(req.seed))
        return {"input": to_data_url(x), "image": to_data_url(decoded)}

    @app.post("/api/inpaint")
    def api_inpaint(req: InpaintRequest):
        """Fills the masked pixels of test image `index`; the observed pixels stay as they are. Returns
        the binary original, the input (missing pixels grey), the completion (missing pixels show their
        predictive probability) and the mask used (white = missing)."""
        image = test_image("index", req.index)
        if req.mask in MASKS:
            mask = region_mask(req.mask, demo.shape)
        elif not req.mask.startswith(PNG_PREFIX):
            raise BadInput(f"mask must be one of {', '.join(MASKS)} or a PNG data URL ({PNG_PREFIX}...)")
        else:
            mask = (from_data_url("mask", req.mask, (1, h, w))[0] >= 128).expand(demo.shape)
        if not mask.any():
            raise BadInput("the mask is empty: paint the pixels to fill (white = missing)")
        mask = mask.to(demo.runtime.device)
        with model_work():
            x, filled, _ = inpaint(demo.model, image, mask, req.steps, req.chains, req.method, demo.start,
                                   demo.binarization, demo.runtime.generator(req.seed))
        return {"original": to_data_url(x), "input": to_data_url(torch.where(mask, 0.5, x)),
                "image": to_data_url(filled), "mask": to_data_url(mask[None].float()),
                "missing_pixels": int(mask[0].sum())}

    return app
