"""Images in and out of the demo's JSON: PNG data URLs <-> tensors, with size limits."""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..viz import grid_image

PNG_PREFIX = "data:image/png;base64,"
MAX_PNG_BYTES = 1_000_000
MAX_SIDE = 1024          # pixels a side of an uploaded PNG (a drawing canvas is a few hundred)


class BadInput(Exception):
    """A request the demo refuses; its one-line message goes back as {"error": ...} with status 400."""


def to_data_url(images: torch.Tensor, nrow: int | None = None, padding: int = 0) -> str:
    """images [N,C,H,W] in [0,1] -> one PNG grid at the model's resolution (the page enlarges it), as a data URL."""
    buffer = io.BytesIO()
    grid_image(images, nrow=nrow, scale=1, padding=padding).save(buffer, format="PNG")
    return PNG_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def from_data_url(field: str, url: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A PNG data URL of at most MAX_SIDE pixels a side -> uint8 [1,C,H,W] for
    shape (C,H,W) with C 1 or 3: transparent parts count as black (an unpainted canvas), and a
    larger picture is shrunk to H x W by averaging the pixels each output pixel covers."""
    if not url.startswith(PNG_PREFIX):
        raise BadInput(f"{field} must be a PNG data URL ({PNG_PREFIX}...)")
    payload = url[len(PNG_PREFIX):]
    if len(payload) > MAX_PNG_BYTES * 4 // 3 + 4:
        raise BadInput(f"{field} is more than {MAX_PNG_BYTES} bytes; send a smaller PNG")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{field} is not valid base64; send a PNG data URL ({PNG_PREFIX}...)") from None
    try:
        img = Image.open(io.BytesIO(raw), formats=["PNG"])
        if max(img.size) > MAX_SIDE:    # checked on the header, before any pixel is decompressed
            raise BadInput(f"{field} is {img.width}x{img.height}; the limit is {MAX_SIDE} pixels a side")
        img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise BadInput(f"{field} is not a readable PNG image") from None
    c, h, w = shape
    if "A" in img.getbands() or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "black"), img.convert("RGBA"))
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BOX)
    pixels = torch.from_numpy(np.array(img)).reshape(h, w, c)
    return pixels.permute(2, 0, 1)[None].contiguous()
