"""What a request to the demo may say: the JSON body of each POST endpoint as a pydantic model,
the limits on its settings, and `json_body`, which reads a body into its model or answers the
first thing wrong with it in one line."""
from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from ..config import SEED_LIMIT
from ..generate import INPAINT_METHODS, PATHS
from .images import BadInput

# What one request may ask for: enough to play with, little enough to answer in well under a second on a CPU.
LIMITS = {"samples": 64, "interpolation_steps": 32, "dims": 16, "latent_value": 5.0, "map_value": 50.0,
          "inpaint_steps": 200, "chains": 8, "body_bytes": 2_000_000}
Seed = Annotated[int, Field(ge=0, le=SEED_LIMIT)]
Index = Annotated[int, Field(ge=0)]
MapValue = Annotated[float, Field(ge=-LIMITS["map_value"], le=LIMITS["map_value"], allow_inf_nan=False)]


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
