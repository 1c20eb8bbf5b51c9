"""Files written whole or not at all, durably, and read back with a one-line error: the one way
vaekit writes anything a user keeps (run files, checkpoints, pictures, exports, the data cache).

A write goes to a temporary file beside its target, named `.NAME.PID.RANDOM.tmp`, which is
flushed to disk and then renamed over the target: a crash, a kill -9 or a full disk leaves the
old file or the new one, never half of one, and two writers at once leave one of the two whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import RunError


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


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller to write; when the block ends without
    an exception, the file is synced, given the mode of a new file here and renamed over `path`
    (the folder synced too). On an exception (a full disk, a failed check) it is removed and
    `path` is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())    # mkstemp makes the file private; it is an ordinary file of the user's
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` whole or not at all, durably."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` whole or not at all, durably."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
