"""Task-level functions over run directories: what the CLI calls, one function per command."""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError
from .data import dataset_info, fetch, load_splits
from .generate import interleave, reconstruct, sample
from .runs import Run, load_model
from .train import train
from .viz import gif_from_pngs, save_grid

__all__ = ["train", "fetch", "dataset_info", "sample_to_png", "reconstruct_to_png", "make_gif"]


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"--{name} must be at least 1, got {value}")


def sample_to_png(run: str | Path, n: int = 100, seed: int = 0, out: str | Path | None = None,
                  device: str = "auto") -> Path:
    """A grid of `n` images decoded from prior draws; returns the PNG's path."""
    _positive("n", n)
    model, _, rt = load_model(run, device)
    images = sample(model, n, rt.generator(seed))
    return save_grid(images, out or Path(run) / "samples" / f"prior_n{n}_seed{seed}.png")


def reconstruct_to_png(run: str | Path, n: int = 16, seed: int = 0, out: str | Path | None = None,
                       data_dir: str | Path | None = None, device: str = "auto") -> Path:
    """The first `n` test images beside their decodes (z ~ q(z|x)); returns the PNG's path."""
    _positive("n", n)
    model, config, rt = load_model(run, device)
    test = load_splits(config.data.dataset, data_dir or config.data.data_dir).test
    if n > len(test):
        raise ConfigError(f"--n {n} is more than the {len(test)} test images")
    x, decoded = reconstruct(model, test.images[:n].to(rt.device), config.data.binarization, rt.generator(seed))
    cols = 2 * min(4, n)   # pairs side by side, four pairs a row
    return save_grid(interleave(x, decoded), out or Path(run) / "samples" / f"reconstruct_n{n}_seed{seed}.png",
                     nrow=cols)


def make_gif(run: str | Path) -> Path:
    """RUN/training.gif from RUN/images/image_at_epoch_*.png, with the seed's frame choice."""
    r = Run.open(run)
    pngs = sorted(r.images.glob("image_at_epoch_*.png"))
    if not pngs:
        raise ConfigError(f"{r.images} holds no image_at_epoch_*.png; train the run first")
    return gif_from_pngs(pngs, r.gif_path)
