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
    """A request the demo refuses; its one-line message goes back as {"error": ...} with `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def to_data_url(images: torch.Tensor, nrow: int | None = None, padding: int = 0) -> str:
    """images [N,C,H,W] in [0,1] -> one PNG grid at the model's resolution (the page enlarges it), as a data URL."""
    buffer = io.BytesIO()
    grid_image(images, nrow=nrow, scale=1, padding=padding).save(buffer, format="PNG")
    return PNG_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_png(field: str, url: str) -> Image.Image:
    """A PNG data URL of at most MAX_SIDE pixels a side -> an RGB image, transparent parts black
    (an unpainted canvas)."""
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
    if "A" in img.getbands() or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "black"), img.convert("RGBA"))
    return img.convert("RGB")


def fitted(img: Image.Image, shape: tuple[int, int, int]) -> Image.Image:
    """The whole picture at the model's size, shape (C,H,W) with C 1 (grey) or 3 (RGB), each
    output pixel the mean of those it covers."""
    c, h, w = shape
    img = img.convert("L" if c == 1 else "RGB")
    return img if img.size == (w, h) else img.resize((w, h), Image.BOX)


def shrunk(img: Image.Image, shape: tuple[int, int, int]) -> torch.Tensor:
    """fitted(img, shape) as uint8 [1,C,H,W]."""
    c, h, w = shape
    return torch.from_numpy(np.array(fitted(img, shape))).reshape(h, w, c).permute(2, 0, 1)[None].contiguous()


def as_mnist_digit(img: Image.Image) -> torch.Tensor:
    """A drawing made into a 28x28 digit the way MNIST's were (LeCun et al.): cropped to its ink,
    scaled to fit a 20x20 box keeping its aspect (anti-aliased), then placed in 28x28 with its
    centre of mass at the centre -> uint8 [1,1,28,28]. A drawing without ink stays black."""
    grey = img.convert("L")
    box = grey.getbbox()
    digit = np.zeros((28, 28), dtype=np.uint8)
    if box is not None:
        ink = grey.crop(box)
        scale = 20 / max(ink.size)
        ink = np.array(ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))),
                                  Image.BILINEAR))
        mass = ink.astype(np.float64)
        total = max(mass.sum(), 1.0)             # 0 only when faint ink vanished in the scaling
        rows, cols = np.indices(ink.shape)
        centre = (rows * mass).sum() / total, (cols * mass).sum() / total
        # the offset that moves the centre of mass to the middle (13.5), keeping the box inside
        top, left = (int(np.clip(round(13.5 - c), 0, 28 - n)) for c, n in zip(centre, ink.shape))
        digit[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    return torch.from_numpy(digit)[None, None]
