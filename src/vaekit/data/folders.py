"""Any folder of PNG/JPEG images as a dataset, decoded once (in parallel processes) into a cache
of uint8 arrays that every process reads memory-mapped.

Labels: each immediate subfolder holding images is a class (sorted names -> 0..n-1), and every
image anywhere below it has its label; images lying loose beside class subfolders are left out
with a warning. A folder without such subfolders is one class (label 0) named after the folder.
Hidden files and folders (".name") are ignored.

Each image is decoded with Pillow, turned upright by its EXIF orientation, converted explicitly
to grey ("L", ITU-R 601 luma) or RGB (grey replicated), transparency composited over black, and
fitted to size x size: the shorter side resized to `size` (bicubic, antialiased), the centre
square kept. Only 8-bit modes are converted (1, L, LA, P, PA, RGB, RGBA); CMYK, 16-bit and float
images are skipped as a wrong mode (Pillow would convert CMYK without its colour profile and clip
16-bit values), as are unreadable and truncated files and images of more pixels than Pillow's guard
against decompression bombs admits: one warning line counts them and names them with the reason
for each (beyond a few, the full list is in the cache entry's skipped.txt, which the line names);
no usable image at all is a DataError. File names need not be valid UTF-8 (they are hashed as the
bytes they are, and shown with backslash escapes).

Split: a file is a test image when a hash of (split seed, its path relative to the folder) falls
below `test_fraction`, so the split is deterministic and adding or removing files never moves
another file between the splits.

Cache: an entry is the folder cache_root()/folders/<folder>-<hash of its absolute path>/
<settings>-<content>/, where the content key hashes every image file's relative path and bytes with
the decoder's version: a changed, added or removed file is a miss, never stale data. It holds
{train,test}_images.npy (uint8 [N, C, size, size], streamed to disk as the images are decoded, so
the decode never holds the data set in memory), {train,test}_labels.npy (int64 [N]), skipped.txt
and, written last, manifest.json (class names, split sizes, and data.fingerprint's SHA-256 taken
once at decode). Each file is written whole or not at all (files.replacing), and an entry without
its manifest is unfinished and decoded again. The images are opened with numpy's mmap (copy on
write), so the ranks of one machine share one copy through the page cache and each touches only
the pages of its batches. Writing a new entry removes the older ones of the same settings.
Files are read with allow_pickle=False.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps
from tqdm import tqdm

from ..cpu import usable_cores
from ..errors import DataError
from ..files import atomic_write_text, replacing
from .sources import Log, cache_root, process_gone, to_stderr

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")   # 8-bit modes with a meaning as grey or colour
DECODER = f"vaekit-folder-1 pillow-{PIL.__version__}"   # in the cache key: a new decoder re-decodes
NAMED_SKIPS = 5   # skipped files named in the warning itself; more go to a list in a file
CHUNK = 256       # images a decoding process takes at a time
NPY_HEADER = 128  # bytes: numpy's .npy header of a 4-d uint8 array (aligned to 64, as numpy writes it)
MANIFEST = "manifest.json"   # written last: a cache entry without it is unfinished


@dataclass(frozen=True)
class FolderData:
    """A decoded image folder: images uint8 [N, C, size, size] (memory-mapped from the cache entry),
    labels int64 [N] per split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    skipped: tuple[str, ...]   # "relative/path (why)" for each file left out
    cache: Path                # the cache entry, a folder (see the module docstring)
    source: str
    sha256: str                # data.fingerprint's SHA-256 of these splits, taken at decode


def load_folder(folder: str | Path, size: int, channels: int, test_fraction: float, split_seed: int, *,
                log: Log = to_stderr, workers: int | None = None) -> FolderData:
    """Decode (or read from the cache) the images under `folder`; see the module docstring.
    `workers`: the processes that decode (default: one per core)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass --data-dir a folder of PNG/JPEG images")
    class_names, files = _list_images(folder, log)
    if not files:
        raise DataError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images in it or its subfolders; "
                        "pass --data-dir a folder of images (one subfolder per class, or all in one)")
    settings = f"{size}px-{'grey' if channels == 1 else 'rgb'}-test{test_fraction}-seed{split_seed}"
    entry = _cache_dir(folder) / f"{settings}-{_content_key(folder, files)}"
    data = _read_cache(entry, log)
    if data is None:
        log(f"decoding {len(files)} images from {folder} (once: they are cached in {entry})")
        decode = (folder, files, size, channels, test_fraction, split_seed, class_names, workers or usable_cores())
        try:
            _decode_into(entry, *decode)
        except OSError as e:   # no cache to write to costs only speed: the next run decodes again
            log(f"warning: could not cache the decoded images in {entry} ({e}); the next run decodes them again")
            with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as scratch:
                _decode_into(Path(scratch), *decode)
                data = _just_decoded(Path(scratch), folder, log)
        else:
            _remove_older(entry, settings)
            data = _just_decoded(entry, folder, log)
    usable = len(files) - len(data.skipped)
    if usable == 0:
        raise DataError(f"{folder}: none of its {len(files)} images can be used ({_named(data)}); "
                        "save them as 8-bit grey or RGB PNG/JPEG")
    if data.skipped:
        log(f"warning: skipped {len(data.skipped)} of {len(files)} images in {folder} that cannot be used: "
            f"{_named(data)}")
    for split in ("train", "test"):
        if len(getattr(data, f"{split}_images")) == 0:
            raise DataError(f"{folder}: the {split} split is empty ({usable} usable images, test fraction "
                            f"{test_fraction}); add images or change --test-fraction")
    return data


def _just_decoded(entry: Path, folder: Path, log: Log) -> FolderData:
    data = _read_cache(entry, log)
    if data is None:
        raise DataError(f"{entry}: the images just decoded from {folder} cannot be read back; "
                        "check the disk of the cache ($VAEKIT_CACHE)")
    return replace(data, source=f"decoded from {folder}")


def _named(data: FolderData) -> str:
    """The skipped files, each with why: all of them, or beyond NAMED_SKIPS the first few and the
    file in the cache entry that lists them all, one a line."""
    skipped = data.skipped
    if len(skipped) <= NAMED_SKIPS:
        return "; ".join(skipped)
    listing = data.cache / "skipped.txt"
    if not listing.is_file():   # no cache to keep it in: the line itself names them all
        return "; ".join(skipped)
    return f"{'; '.join(skipped[:NAMED_SKIPS])}; all {len(skipped)}, each with why, are listed in {listing}"


def _shown(name: str) -> str:
    """A file name for messages: bytes that are not UTF-8 (kept by Python as surrogates) as escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _list_images(folder: Path, log: Log) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """(class names, [(path relative to folder, label)]) in sorted path order."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(sub.name, _images_under(sub, folder)) for sub in subfolders]
    classes = [(name, files) for name, files in classes if files]
    loose = [p.name for p in sorted(folder.iterdir()) if _is_image(p)]
    if not classes:
        return (_shown(folder.resolve().name),), [(name, 0) for name in loose]
    if loose:
        log(f"warning: {len(loose)} images directly in {folder} (e.g. {_shown(loose[0])}) are in no class "
            "subfolder; left out")
    files = [(rel, label) for label, (_, rels) in enumerate(classes) for rel in rels]
    return tuple(_shown(name) for name, _ in classes), files


def _images_under(directory: Path, folder: Path) -> list[str]:
    """Image files anywhere below `directory`, skipping hidden ones, as sorted POSIX paths relative to folder."""
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [(Path(root) / n).relative_to(folder).as_posix() for n in names if _is_image(Path(root) / n)]
    return sorted(found)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _content_key(folder: Path, files: list[tuple[str, int]]) -> str:
    """Hash of the decoder, and each file's relative path and bytes (labels follow from the paths)."""
    key = hashlib.sha256(DECODER.encode())
    for rel, _ in files:
        key.update(os.fsencode(rel) + b"\0" + hashlib.sha256((folder / rel).read_bytes()).digest())
    return key.hexdigest()[:32]


def _cache_dir(folder: Path) -> Path:
    where = hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()[:12]
    return cache_root() / "folders" / f"{_shown(folder.resolve().name)}-{where}"


def is_test(rel: str, test_fraction: float, split_seed: int) -> bool:
    """Whether the file at relative path `rel` belongs to the test split (by its hash alone)."""
    digest = hashlib.sha256(f"{split_seed}/".encode() + os.fsencode(rel)).digest()
    return int.from_bytes(digest[:8], "big") < test_fraction * 2**64


def decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 [channels, size, size]; raises ValueError(why) if it cannot be used."""
    try:
        with warnings.catch_warnings():   # Pillow warns of (and then refuses) images of very many pixels
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.mode not in CONVERTIBLE_MODES:
                    raise ValueError(f"{img.mode} mode; save it as 8-bit grey or RGB")
                img = ImageOps.exif_transpose(img)    # loads the pixels: truncated data fails here
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ValueError(f"too large: more than {Image.MAX_IMAGE_PIXELS:,} pixels, Pillow's guard against "
                         "decompression bombs; scale it down") from None
    except ValueError:
        raise
    except Exception as e:   # untrusted bytes: any failure to decode means an unusable file
        raise ValueError(f"unreadable: {type(e).__name__}: {e}") from None
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")      # the palette's colours, and its transparency as alpha
    if img.mode in ("LA", "RGBA"):
        opaque = Image.new(img.mode[:-1], img.size, 0)     # transparency shows black
        opaque.paste(img.convert(img.mode[:-1]), mask=img.getchannel("A"))
        img = opaque
    img = ImageOps.fit(img.convert("L" if channels == 1 else "RGB"), (size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(img, dtype=np.uint8)              # [size, size] or [size, size, 3]
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _decode_chunk(folder: Path, rels: list[str], size: int, channels: int) -> tuple[np.ndarray, list[str | None]]:
    """A worker's share: (the usable images uint8 [k, C, size, size] in order, for each file None
    when used or why it was skipped)."""
    images, why = [], []
    for rel in rels:
        try:
            images.append(decode_image(folder / rel, size, channels))
            why.append(None)
        except ValueError as e:
            why.append(" ".join(str(e).split()))
    return (np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)), why


def _decoded_chunks(folder: Path, files: list[tuple[str, int]], size: int, channels: int, workers: int):
    """_decode_chunk's results over `files` in order, from `workers` processes (in this one for
    a folder of one chunk), with a progress bar and its ETA on a terminal."""
    rels = [rel for rel, _ in files]
    chunks = [rels[i:i + CHUNK] for i in range(0, len(rels), CHUNK)]
    bar = tqdm(total=len(rels), unit="img", desc="decoding", disable=None, file=sys.stderr)
    with bar, contextlib.ExitStack() as stack:
        if workers > 1 and len(chunks) > 1:
            # spawn: a fork of a rank holding torch's threads and a process group is not safe
            pool = stack.enter_context(ProcessPoolExecutor(min(workers, len(chunks)),
                                                           mp_context=multiprocessing.get_context("spawn")))
            results = _in_order(pool, [(folder, chunk, size, channels) for chunk in chunks], ahead=2 * workers)
        else:
            results = (_decode_chunk(folder, chunk, size, channels) for chunk in chunks)
        for chunk, result in zip(chunks, results):
            yield chunk, result
            bar.update(len(chunk))


def _in_order(pool: ProcessPoolExecutor, jobs: list[tuple], ahead: int):
    """_decode_chunk(*job) for each job, in order, with at most `ahead` chunks decoded or decoding
    beyond the one awaited (pool.map would submit them all, and a slow chunk would leave the rest
    of the data set piling up in memory)."""
    pending = deque()
    for job in jobs:
        pending.append(pool.submit(_decode_chunk, *job))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _decode_into(entry: Path, folder: Path, files: list[tuple[str, int]], size: int, channels: int,
                 test_fraction: float, split_seed: int, class_names: tuple[str, ...], workers: int) -> None:
    """Decodes the folder into cache entry `entry`: each split's images streamed into its .npy as
    they come (never all in memory), then its labels, then manifest.json, written last: an entry
    without one was never finished and is not read."""
    entry.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(entry)
    label_of = dict(files)
    labels = {"train": [], "test": []}
    skipped = []
    with contextlib.ExitStack() as stack:
        out = {}
        for split in ("train", "test"):
            out[split] = stack.enter_context(open(stack.enter_context(replacing(entry / f"{split}_images.npy")), "wb"))
            out[split].seek(NPY_HEADER)                   # the header, once the count is known
        for rels, (images, why) in _decoded_chunks(folder, files, size, channels, workers):
            used = iter(images)
            for rel, problem in zip(rels, why):
                if problem is not None:
                    skipped.append(f"{_shown(rel)} ({problem})")
                    continue
                split = "test" if is_test(rel, test_fraction, split_seed) else "train"
                out[split].write(next(used).tobytes())   # [C, size, size] in C order
                labels[split].append(label_of[rel])
        for split, f in out.items():
            f.seek(0)
            f.write(_npy_header((len(labels[split]), channels, size, size)))
    arrays = {}
    for split in ("train", "test"):
        arrays[f"{split}_labels"] = np.array(labels[split], dtype=np.int64)
        with replacing(entry / f"{split}_labels.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, arrays[f"{split}_labels"])
        arrays[f"{split}_images"] = np.load(entry / f"{split}_images.npy", mmap_mode="r")
    atomic_write_text(entry / "skipped.txt", "".join(line + "\n" for line in skipped))
    manifest = {"decoder": DECODER, "class_names": list(class_names), "skipped": len(skipped),
                "splits": {split: len(labels[split]) for split in labels},
                "sha256": _fingerprint_sha256(arrays)}
    atomic_write_text(entry / MANIFEST, json.dumps(manifest, indent=1))


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """numpy's own .npy header of a uint8 array of `shape`, which is NPY_HEADER bytes long."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    if header.tell() != NPY_HEADER:
        raise DataError(f"cannot cache images of shape {shape}; decode fewer or smaller images")
    return header.getvalue()


def _fingerprint_sha256(arrays: dict[str, np.ndarray]) -> str:
    """data.fingerprint's SHA-256 of the splits (train images, train labels, test images, test
    labels), taken here once, so that a rank reading the entry need not read every image to hash it."""
    digest = hashlib.sha256()
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        array = arrays[name]
        for start in range(0, len(array), CHUNK):
            digest.update(memoryview(np.ascontiguousarray(array[start:start + CHUNK])).cast("B"))
    return digest.hexdigest()


def _read_cache(entry: Path, log: Log) -> FolderData | None:
    """The entry's arrays, its images memory-mapped (copy on write: pages shared with every other
    process reading the entry through the page cache); None if there is no finished entry."""
    manifest = entry / MANIFEST
    if not manifest.is_file():
        return None
    try:
        about = json.loads(manifest.read_text())
        arrays = {}
        for split in ("train", "test"):
            arrays[f"{split}_images"] = np.load(entry / f"{split}_images.npy", mmap_mode="c", allow_pickle=False)
            arrays[f"{split}_labels"] = np.load(entry / f"{split}_labels.npy", allow_pickle=False)
            n = about["splits"][split]
            if arrays[f"{split}_images"].shape[0] != n or arrays[f"{split}_labels"].shape != (n,):
                raise ValueError(f"the {split} split is not the {n} images its manifest records")
        skipped = tuple((entry / "skipped.txt").read_text().splitlines())
        if len(skipped) != about["skipped"]:
            raise ValueError("skipped.txt is not the list its manifest records")
        return FolderData(**arrays, class_names=tuple(about["class_names"]), skipped=skipped, cache=entry,
                          source=f"cache {entry}", sha256=about["sha256"])
    except Exception as e:   # a damaged entry is decoded again, never trusted
        log(f"{entry}: unreadable ({type(e).__name__}: {e}); decoding the folder again")
        manifest.unlink(missing_ok=True)
        return None


def _remove_stale_temps(entry: Path) -> None:
    """The temporary files (files.replacing's `.NAME.PID.RANDOM.tmp`) of a decode that was killed."""
    for tmp in entry.glob(".*.tmp"):
        if process_gone(tmp.name.rsplit(".", 3)[-3]):
            tmp.unlink(missing_ok=True)


def _remove_older(entry: Path, settings: str) -> None:
    """The entries of the same settings other than `entry` (a process still reading one keeps its
    pages: on Unix a removed file lives on while it is mapped)."""
    for old in entry.parent.glob(f"{settings}-*"):
        if old != entry:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
