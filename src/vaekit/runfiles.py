"""A run directory's files, written whole or not at all and read back with a one-line RunError:
what the run (runs.py) and its checkpoint store (checkpoints.py) both stand on."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class RunError(Exception):
    """A run directory or checkpoint that cannot be used; the message says which and what to do."""


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise RunError(f"{path} is missing or not a safetensors file ({e}); the run directory is damaged") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_mode() -> int:
    """The mode open() gives a new file here (0666 less the umask): that of the run's other files."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync(path: Path) -> None:
    """Flushes a file, or a folder (a rename is durable once its folder is synced). Windows cannot
    open a folder, and NTFS journals a rename itself: there a folder is left as it is, and a file
    is opened for writing, as its FlushFileBuffers requires."""
    windows = os.name == "nt"
    if windows and path.is_dir():
        return
    fd = os.open(path, os.O_RDWR if windows else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `path` whole or not at all, durably (the rename is synced too)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:   # a full disk: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)
