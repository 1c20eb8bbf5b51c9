"""Pictures: image grids (PNG) and animations (GIF), with Pillow."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def grid_image(images: torch.Tensor, nrow: int | None = None, scale: int = 4, padding: int = 2) -> Image.Image:
    """images [N,C,H,W] with values in [0,1] (C = 1 or 3) -> one PIL image, `nrow` images per row,
    each enlarged `scale` times (nearest neighbour, so pixels stay sharp), white gaps of `padding`."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        canvas[:, top:top + h, left:left + w] = images[i]
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale != 1 else img


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, nrow=nrow, scale=scale).save(path)
    return path


def seed_gif_frames(paths: list[Path]) -> list[Path]:
    """The seed's frame choice: frame i is kept when round(2*sqrt(i)) grows, so early epochs
    (where the picture changes most) get more frames; the last frame is repeated so it lingers."""
    kept, last = [], -1.0
    for i, p in enumerate(paths):
        frame = 2 * math.sqrt(i)
        if round(frame) > round(last):
            last = frame
            kept.append(p)
    return kept + paths[-1:] if paths else []


def save_gif(frames: list[Image.Image], path: str | Path, duration_ms: int = 100) -> Path:
    path = Path(path)
    first, *rest = [f.convert("P") if f.mode not in ("L", "P") else f for f in frames]
    first.save(path, save_all=True, append_images=rest, duration=duration_ms, loop=0)
    return path


def gif_from_pngs(pngs: list[Path], path: str | Path, duration_ms: int = 100) -> Path:
    """`training.gif` from the epoch images, with the seed's frame choice."""
    frames = [Image.open(p).copy() for p in seed_gif_frames(sorted(pngs))]
    if not frames:
        raise ValueError(f"no images to animate for {path}")
    return save_gif(frames, path, duration_ms)
