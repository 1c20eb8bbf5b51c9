"""Datasets: the IDX format, where the data comes from (verified, cached), in-memory splits."""
from .datasets import ImageData, Splits, load_splits, preprocess
from .idx import DataError, read_idx, write_idx
from .sources import DATASETS, cache_root, dataset_info, fetch

__all__ = [
    "DATASETS",
    "DataError",
    "ImageData",
    "Splits",
    "cache_root",
    "dataset_info",
    "fetch",
    "load_splits",
    "preprocess",
    "read_idx",
    "write_idx",
]
