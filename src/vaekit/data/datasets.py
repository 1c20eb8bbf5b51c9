"""Datasets as uint8 tensors, and batch preprocessing.

A split is held as uint8 tensors: an IDX dataset in memory (60,000 MNIST images are 47 MB), an
image folder memory-mapped from its cache entry (folders.py), which the ranks of a machine share
through the page cache. Batches are moved to the device as uint8 and binarised (or scaled) there
by `preprocess`.

`splits_for(DataConfig)` is the one entry point of training and the commands: it reads an IDX
dataset through the fetch chain (sources.py) or an image folder (folders.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import BINARIZATIONS, FOLDER, DataConfig
from ..errors import ConfigError, DataError
from ..models import ModelConfig
from .folders import FolderData, load_folder
from .sources import DATASETS, Log, fetch_idx, idx_info, resolve, to_stderr


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
    """The train and test splits of one dataset, and the names of its labels."""

    train: ImageData
    test: ImageData
    class_names: tuple[str, ...]   # label i is class_names[i]
    sha256: str | None = None      # fingerprint's SHA-256 of both splits, where a cache recorded it

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, for checking a model against the data."""
        return tuple(self.train.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def splits_for(data: DataConfig, data_dir: str | Path | None = None, *, log: Log = to_stderr) -> Splits:
    """Both splits of the dataset `data` describes, in memory. `data_dir`, if given, stands in
    for data.data_dir (the commands that read a run take --data-dir for data that has moved)."""
    data = data_config(data, data_dir)
    if data.dataset == FOLDER:
        folder = _load_folder(data, log)
        # the images stay memory-mapped: torch.from_numpy shares the mapping, no copy
        return Splits(ImageData(torch.from_numpy(folder.train_images), torch.from_numpy(folder.train_labels)),
                      ImageData(torch.from_numpy(folder.test_images), torch.from_numpy(folder.test_labels)),
                      folder.class_names, folder.sha256)
    return load_splits(data.dataset, data.data_dir, log=log)


def load_splits(name: str, data_dir: str | Path | None = None, *, log: Log = to_stderr) -> Splits:
    """Fetch (see `vaekit.data.fetch`) and load both splits of IDX dataset `name` into memory."""
    arrays = resolve(name, data_dir, log=log).arrays

    def split(prefix: str) -> ImageData:
        images = torch.from_numpy(arrays[f"{prefix}_images"]).unsqueeze(1)  # [N, H, W] -> [N, 1, H, W]
        labels = torch.from_numpy(arrays[f"{prefix}_labels"].astype(np.int64))
        return ImageData(images, labels)

    return Splits(train=split("train"), test=split("test"), class_names=DATASETS[name].class_names)


def check_data_fits(config: ModelConfig, splits: Splits, source: str) -> None:
    """Raises ConfigError (one line: both shapes, the fix) unless the images of both splits and
    their labels are what the model is configured for."""
    c, h, w = splits.image_shape
    if (c, h, w) != (config.image_channels, config.image_size, config.image_size):
        square = "" if h == w else " (the models take square images: resize them)"
        raise ConfigError(f"{source} has {c}-channel {h}x{w} images; the model is configured for "
                          f"{config.image_channels}-channel {config.image_size}x{config.image_size}: "
                          f"pass --image-channels {c} --image-size {h}{square}")
    if not config.conditional:
        return
    top = max(int(split.labels.max()) for split in (splits.train, splits.test) if len(split))
    if top >= config.num_classes:
        raise ConfigError(f"{source} has label {top}; the conditional model knows "
                          f"{config.num_classes} classes (0..{config.num_classes - 1}): train a new run on it")


def hold_out(split: ImageData, n: int) -> tuple[ImageData, ImageData]:
    """(the first len - n images, the last n): a training split and the validation split held out
    of it (MNIST's 50,000/10,000 of the literature with n = 10000). n = 0: (split, an empty split)."""
    if n >= len(split):
        raise DataError(f"--validation {n} holds out every one of the {len(split)} training images; "
                        f"pass fewer (10000 for MNIST)")
    keep = len(split) - n
    return (ImageData(split.images[:keep], split.labels[:keep]),
            ImageData(split.images[keep:], split.labels[keep:]))


def fingerprint(splits: Splits) -> dict:
    """What identifies a dataset in memory: the split sizes and one SHA-256 over both splits'
    images and labels. A run records it (data.json) and a resume checks the data it is given
    against it, so a --data-dir given again can only be the same data. An image folder's cache
    entry recorded the SHA-256 when it was decoded: then no image is read to hash it here."""
    sizes = {"train": len(splits.train), "test": len(splits.test)}
    if splits.sha256 is not None:
        return {**sizes, "sha256": splits.sha256}
    digest = hashlib.sha256()
    for split in (splits.train, splits.test):
        for tensor in (split.images, split.labels):
            digest.update(memoryview(tensor.contiguous().numpy()).cast("B"))
    return {**sizes, "sha256": digest.hexdigest()}


def fetch(dataset: str | DataConfig, data_dir: str | Path | None = None, *, log: Log = to_stderr) -> Path:
    """Make `dataset` ready for training; returns where it is: the directory of its verified IDX
    files, or for an image folder the cache file of its decoded images."""
    data = data_config(dataset, data_dir)
    if data.dataset == FOLDER:
        return _load_folder(data, log).cache
    return fetch_idx(data.dataset, data.data_dir, log=log)


def dataset_info(dataset: str | DataConfig, data_dir: str | Path | None = None, *, log: Log = to_stderr) -> dict:
    """Where `dataset` is, its source, split sizes, image shape (C, H, W) and class names; for IDX
    datasets the array SHA-256s too, for an image folder its cache file and skipped files."""
    data = data_config(dataset, data_dir)
    if data.dataset != FOLDER:
        return idx_info(data.dataset, data.data_dir, log=log)
    folder = _load_folder(data, log)
    return {
        "name": FOLDER,
        "path": str(Path(data.data_dir).expanduser()),
        "source": folder.source,
        "cache": str(folder.cache),
        "splits": {"train": len(folder.train_images), "test": len(folder.test_images)},
        "image_shape": list(folder.train_images.shape[1:]),
        "num_classes": len(folder.class_names),
        "class_names": list(folder.class_names),
        "skipped": len(folder.skipped),
    }


def data_config(dataset: str | DataConfig, data_dir: str | Path | None = None) -> DataConfig:
    """A DataConfig from a dataset name or a DataConfig, with `data_dir` (if given) standing in
    for its data_dir."""
    if isinstance(dataset, DataConfig):
        return dataset if data_dir is None else replace(dataset, data_dir=str(data_dir))
    return DataConfig(dataset=dataset, data_dir=None if data_dir is None else str(data_dir))


def _load_folder(data: DataConfig, log: Log) -> FolderData:
    return load_folder(data.data_dir, data.resize, data.channels, data.test_fraction, data.split_seed, log=log)


def preprocess(
    images_uint8: torch.Tensor, binarization: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Binarise (or scale) a uint8 batch [B, C, H, W] on its own device; returns float32.

    "static": the seed's threshold pixel / 255 >= 0.5, i.e. pixel >= 128; values in {0, 1}.
    "dynamic": a fresh Bernoulli draw with p = pixel / 255 from `generator` (which must
    live on the batch's device), as is standard in the likelihood literature; values in {0, 1}.
    "none": pixel / 255 in [0, 1], no draw; x * 255 rounds back to the exact 8-bit value
    (what Gaussian and discretized-logistic likelihoods of 8-bit images need).
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
