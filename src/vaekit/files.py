"""Files written whole or not at all, durably, and read back with a one-line error: the one way
vaekit writes anything a user keeps (run files, checkpoints, pictures, exports, the data cache).

A write goes to a temporary file beside its target, named `.NAME.PID.RANDOM.tmp`, which is
flushed to disk and then renamed over the target: a crash, a kill -9 or a full disk leaves the
old file or the new one, never half of one, and two writers at once leave one of the two whole.
What a kill -9 leaves of the temporary file is removed by the next write beside it
(remove_stale_temps). A set of files that belong together (an export's pair) is written as a
folder the same way (replacing_folder).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode open() gives a new file here (0666 less the umask): that of the run's other files."""
    return 0o666 & ~_umask()


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


def _temp_owner(temp: Path, name: str) -> int | None:
    """The pid in a temporary name `.NAME.PID.RANDOM.tmp` (None when it is not one)."""
    pid = temp.name[len(name) + 2:].split(".", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)      # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, another user's
        return True
    return True


def remove_stale_temps(path: str | Path) -> None:
    """Removes the temporary files (or folders) of writes to `path` whose writer is dead: what a
    kill -9 in the middle of a write leaves. One glob, done before each write. Not on Windows,
    where os.kill would end the process it asks about."""
    path = Path(path)
    if os.name == "nt":
        return
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = _temp_owner(temp, path.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(temp, ignore_errors=True) if temp.is_dir() else temp.unlink(missing_ok=True)


def _naming(path: Path, error: OSError) -> OSError:
    """`error` naming the target `path` rather than its temporary file (what a user can act on)."""
    return OSError(error.errno, error.strerror, str(path))   # OSError(errno, ...) is its subclass again


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller to write; when the block ends without
    an exception, the file is synced, given the mode of a new file here and renamed over `path`
    (the folder synced too). On an exception (a full disk, a failed check) it is removed and
    `path` is left as it was. An OSError of the temporary file names `path`."""
    path = Path(path)
    remove_stale_temps(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:
        raise _naming(path, e) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())    # mkstemp makes the file private; it is an ordinary file of the user's
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename == str(tmp):
            raise _naming(path, e) from None
        raise
    fsync(path.parent)


@contextlib.contextmanager
def replacing_folder(path: str | Path) -> Iterator[Path]:
    """As replacing, for a folder of files that belong together: yields an empty temporary folder
    beside `path`; when the block ends without an exception, its files are synced and it takes the
    place of `path` (an older `path` is renamed aside first, then removed). A kill at any point
    leaves the old folder or the new one whole (or, between the two renames, neither in place and
    the old one aside, removed by the next write), never files of both."""
    path = Path(path)
    remove_stale_temps(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    except OSError as e:
        raise _naming(path, e) from None
    try:
        yield tmp
        for f in tmp.iterdir():
            os.chmod(f, file_mode())
            fsync(f)
        os.chmod(tmp, 0o777 & ~_umask())    # mkdtemp makes it private; a folder's usual mode
        fsync(tmp)
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
            os.replace(path, aside)     # onto the empty folder just made: a rename, no copy
            os.rename(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def move_aside(path: Path, target: Path) -> Path:
    """Renames `path` to `target`, or to target.2, target.3, ... when that is taken (what was set
    aside before is never overwritten); returns where it went."""
    free, n = target, 1
    while free.exists():
        n += 1
        free = target.with_name(f"{target.name}.{n}")
    os.rename(path, free)
    return free
