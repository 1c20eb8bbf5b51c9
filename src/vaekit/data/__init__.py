"""Datasets: the IDX format, where the data comes from (verified, cached), image folders, in-memory splits."""
from .datasets import (ImageData, Splits, check_data_fits, dataset_info, fetch, fingerprint, hold_out, load_splits,
                       preprocess, splits_for)
from .folders import load_folder
from ..errors import DataError
from .idx import read_idx, write_idx
from .sources import DATASETS, cache_root

__all__ = [
    "DATASETS",
    "DataError",
    "ImageData",
    "Splits",
    "cache_root",
    "check_data_fits",
    "dataset_info",
    "fetch",
    "fingerprint",
    "hold_out",
    "load_folder",
    "load_splits",
    "preprocess",
    "read_idx",
    "splits_for",
    "write_idx",
]
