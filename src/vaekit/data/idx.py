"""The IDX file format of MNIST, Fashion-MNIST and KMNIST.

Layout (big-endian): two zero bytes, one dtype code, one byte `ndim`, then `ndim`
uint32 sizes, then the payload in C order. Files may be gzipped; we tell by the gzip
magic bytes, never by the file name.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import replacing


_GZIP_MAGIC = b"\x1f\x8b"
_DTYPES = {  # IDX dtype code -> big-endian numpy dtype
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_FIX = "re-download it, or delete it and fetch the dataset again"


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a writable, native-endian array.

    Checks the magic number, the dtype code, the sizes and that the payload is exactly
    as long as the sizes say. Any problem (missing, unreadable, corrupt gzip, truncated,
    trailing bytes) raises DataError naming the file.
    """
    path = Path(path)
    gzipped = False
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if gzipped:
                with gzip.GzipFile(fileobj=raw) as f:
                    data = f.read()
            else:
                data = raw.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        kind = "corrupt or truncated gzip data" if gzipped else "unreadable file"
        raise DataError(f"{path}: {kind} ({e}); {_FIX}") from None

    def bad(what: str) -> DataError:
        return DataError(f"{path}: not a valid IDX file: {what}; {_FIX}")

    if not data:
        raise bad("the file is empty (0 bytes)")
    if len(data) < 4:
        raise bad(f"header cut short ({len(data)} bytes)")
    if data[:2] != b"\x00\x00":
        raise bad("wrong magic number")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise bad(f"unknown dtype code 0x{code:02x}")
    if ndim == 0:
        raise bad("zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise bad("header cut short")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize    # Python ints: sizes of 2**32 - 1 do not overflow
    if len(data) - header != expected:
        raise bad(f"payload is {len(data) - header} bytes, sizes {shape} need {expected} bytes")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def idx_bytes(array: np.ndarray) -> bytes:
    """The uncompressed IDX encoding of a uint8 array (header + C-order payload)."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim == 0:
        raise ValueError(f"write_idx takes a uint8 array with at least 1 dim, got {array.dtype} {array.shape}")
    header = struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, gzipped when the name ends in ".gz".

    The gzip stream is deterministic (no name, mtime 0). The write is atomic (files.replacing):
    an interruption leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    data = idx_bytes(array)
    with replacing(path) as tmp, open(tmp, "wb") as raw:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
                f.write(data)
        else:
            raw.write(data)
