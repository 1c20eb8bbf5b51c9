"""In-memory datasets and batch preprocessing.

A split is held as uint8 tensors (60,000 MNIST images are 47 MB); batches are moved to
the device as uint8 and binarised there by `preprocess`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .sources import Log, resolve, to_stderr

BINARIZATIONS = ("static", "dynamic", "none")


@dataclass
class ImageData:
    """One split in memory: images uint8 [N, C, H, W], labels int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {list(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 [{len(self.images)}], got {self.labels.dtype} {list(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Splits:
    """The canonical train and test splits of one dataset."""

    train: ImageData
    test: ImageData


def load_splits(name: str, data_dir: str | Path | None = None, *, log: Log = to_stderr) -> Splits:
    """Fetch (see `vaekit.data.fetch`) and load both splits of dataset `name` into memory."""
    arrays = resolve(name, data_dir, log=log).arrays

    def split(prefix: str) -> ImageData:
        images = torch.from_numpy(arrays[f"{prefix}_images"]).unsqueeze(1)  # [N, H, W] -> [N, 1, H, W]
        labels = torch.from_numpy(arrays[f"{prefix}_labels"].astype(np.int64))
        return ImageData(images, labels)

    return Splits(train=split("train"), test=split("test"))


def preprocess(
    images_uint8: torch.Tensor, binarization: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Binarise a uint8 batch [B, C, H, W] on its own device; returns float32 in {0, 1}
    ("none": in [0, 1]).

    "static": the seed's threshold pixel / 255 >= 0.5, i.e. pixel >= 128.
    "dynamic": a fresh Bernoulli draw with p = pixel / 255 from `generator` (which must
    live on the batch's device), as is standard in the likelihood literature.
    "none": the grey levels pixel / 255, for the likelihoods of 8-bit data.
    """
    if binarization not in BINARIZATIONS:
        raise ValueError(f"binarization must be one of {', '.join(BINARIZATIONS)}; got {binarization!r}")
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"preprocess takes uint8 images, got {images_uint8.dtype}")
    if binarization == "static":
        return (images_uint8 >= 128).float()
    if binarization == "none":
        return images_uint8.float() / 255
    return torch.bernoulli(images_uint8.float() / 255, generator=generator)
