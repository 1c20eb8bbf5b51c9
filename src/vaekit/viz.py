"""Pictures: image grids (PNG) and animations (GIF), with Pillow. Every picture is written whole or
not at all (save_image, through files.replacing): a kill, a full disk or a second writer of the
same path never leaves half a picture, nor takes the old one away."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from .errors import RunError
from .files import replacing

# matplotlib's "tab10": ten colours that stay apart, one per class
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


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


def labelled_grid(images: torch.Tensor, nrow: int | None = None, row_labels: list[str] | None = None,
                  col_labels: list[str] | None = None, scale: int = 4, padding: int = 2) -> Image.Image:
    """grid_image with a label left of each row and/or above each column: what a row or column
    shows (a latent dimension, a path, a strength), so the picture explains itself."""
    grid = grid_image(images, nrow=nrow, scale=scale, padding=padding)
    if not row_labels and not col_labels:
        return grid
    font = ImageFont.load_default(size=4 * scale)
    h, w = images.shape[-2:]
    left = 8 + int(max(font.getlength(t) for t in row_labels)) if row_labels else 0
    top = 2 * 4 * scale if col_labels else 0
    canvas = Image.new(grid.mode, (grid.width + left, grid.height + top), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(row_labels or []):
        draw.text((left - 4, top + (padding + r * (h + padding) + h / 2) * scale), text, fill="black", font=font,
                  anchor="rm")
    for c, text in enumerate(col_labels or []):
        draw.text((left + (padding + c * (w + padding) + w / 2) * scale, top / 2), text, fill="black", font=font,
                  anchor="mm")
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4,
              row_labels: list[str] | None = None, col_labels: list[str] | None = None) -> Path:
    """Writes the grid of `images` as a PNG, with row and column labels where given."""
    return save_image(labelled_grid(images, nrow, row_labels, col_labels, scale), path)


def save_image(image: Image.Image, path: str | Path, **options) -> Path:
    """Writes `image` to `path` (its folder made if need be) in the format its extension names,
    whole or not at all; `options` go to Pillow's save (e.g. an animation's frames)."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:      # the temporary file's name cannot say it
        raise ValueError(f"unknown file extension: {path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        image.save(tmp, format=image_format, **options)
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
    """Writes `frames` as an animated GIF that loops, `duration_ms` a frame."""
    first, *rest = [f.convert("P") if f.mode not in ("L", "P") else f for f in frames]
    return save_image(first, path, save_all=True, append_images=rest, duration=duration_ms, loop=0)


def _read_frame(path: Path) -> Image.Image:
    """The picture in `path`, read whole; RunError naming the file when it is not a readable image
    (damaged, cut short, or another kind of file)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except PermissionError as e:
        raise RunError(f"cannot read {path}: {e.strerror}; fix its permissions and run again") from None
    except UnidentifiedImageError:
        reason = "not an image"
    except (OSError, ValueError) as e:       # cut short, or damaged inside
        reason = getattr(e, "strerror", None) or str(e)
    raise RunError(f"{path} is not a readable PNG ({reason}); delete or replace it and run again")


def gif_from_pngs(pngs: list[Path], path: str | Path, duration_ms: int = 100) -> Path:
    """`training.gif` from the epoch images, with the seed's frame choice; RunError naming an epoch
    image that cannot be read."""
    frames = [_read_frame(p) for p in seed_gif_frames(sorted(pngs))]
    if not frames:
        raise ValueError(f"no images to animate for {path}")
    return save_gif(frames, path, duration_ms)


def scatter_image(coords: torch.Tensor, labels: torch.Tensor, axes: list[str], size: int = 640,
                  radius: int = 2) -> Image.Image:
    """A scatter plot of points coords [N,2] coloured by integer labels [N] (classes beyond ten reuse
    colours), with axis names and a legend, drawn with Pillow (no plotting library needed)."""
    coords, labels = coords.detach().double().cpu(), labels.cpu()
    margin, legend = 40, 70
    lo, hi = coords.min(0).values, coords.max(0).values
    span = (hi - lo).clamp_min(1e-12)
    inner = size - 2 * margin
    px = margin + (coords - lo) / span * inner                   # [N,2] in pixels
    px[:, 1] = size - px[:, 1]                                   # y grows upward
    img = Image.new("RGB", (size + legend, size), "white")
    font = ImageFont.load_default()
    vertical = Image.new("RGB", (size, margin), "white")
    ImageDraw.Draw(vertical).text((size / 2, margin / 2), axes[1], fill="black", font=font, anchor="mm")
    img.paste(vertical.rotate(90, expand=True), (0, 0))
    draw = ImageDraw.Draw(img)
    draw.rectangle([margin - radius - 1, margin - radius - 1, size - margin + radius + 1, size - margin + radius + 1],
                   outline="black")
    for (x, y), label in zip(px.tolist(), labels.tolist()):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=PALETTE[label % len(PALETTE)])
    draw.text((size / 2, size - margin / 2), axes[0], fill="black", font=font, anchor="mm")
    for i, label in enumerate(sorted(set(labels.tolist()))):
        y = margin + 18 * i
        draw.ellipse([size + 8, y - 5, size + 18, y + 5], fill=PALETTE[label % len(PALETTE)])
        draw.text((size + 26, y), str(label), fill="black", font=font, anchor="lm")
    return img
