"""Any folder of PNG/JPEG images as a dataset, decoded once into uint8 arrays and cached.

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
for each (beyond a few, the full list goes to a file beside the cache entry, which the line names);
no usable image at all is a DataError. File names need not be valid UTF-8 (they are hashed as the
bytes they are, and shown with backslash escapes).

Split: a file is a test image when a hash of (split seed, its path relative to the folder) falls
below `test_fraction`, so the split is deterministic and adding or removing files never moves
another file between the splits.

Cache: cache_root()/folders/<folder>-<hash of its absolute path>/<settings>-<content>.npz, where
the content key hashes every image file's relative path and bytes with the decoder's version:
a changed, added or removed file is a miss, never stale data. Writing a new entry removes the
older ones of the same settings. The file is read with allow_pickle=False.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps

from ..errors import DataError
from ..files import replacing
from .sources import Log, cache_root, to_stderr

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")   # 8-bit modes with a meaning as grey or colour
DECODER = f"vaekit-folder-1 pillow-{PIL.__version__}"   # in the cache key: a new decoder re-decodes
NAMED_SKIPS = 5   # skipped files named in the warning itself; more go to a list in a file


@dataclass(frozen=True)
class FolderData:
    """A decoded image folder: images uint8 [N, C, size, size], labels int64 [N] per split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    skipped: tuple[str, ...]   # "relative/path (why)" for each file left out
    cache_file: Path
    source: str


def load_folder(folder: str | Path, size: int, channels: int, test_fraction: float, split_seed: int, *,
                log: Log = to_stderr) -> FolderData:
    """Decode (or read from the cache) the images under `folder`; see the module docstring."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass --data-dir a folder of PNG/JPEG images")
    class_names, files = _list_images(folder, log)
    if not files:
        raise DataError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} images in it or its subfolders; "
                        "pass --data-dir a folder of images (one subfolder per class, or all in one)")
    settings = f"{size}px-{'grey' if channels == 1 else 'rgb'}-test{test_fraction}-seed{split_seed}"
    cache_file = _cache_dir(folder) / f"{settings}-{_content_key(folder, files)}.npz"
    data = _read_cache(cache_file, log)
    if data is None:
        log(f"decoding {len(files)} images from {folder} (once: they are cached in {cache_file})")
        data = _decode_all(folder, files, size, channels, test_fraction, split_seed, class_names, cache_file)
        _write_cache(data, settings, log)
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


def _named(data: FolderData) -> str:
    """The skipped files, each with why: all of them, or beyond NAMED_SKIPS the first few and the
    file (beside the cache entry) that lists them all, one a line."""
    skipped = data.skipped
    if len(skipped) <= NAMED_SKIPS:
        return "; ".join(skipped)
    listing = data.cache_file.with_suffix(".skipped.txt")
    try:
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(line + "\n" for line in skipped))
    except OSError:   # no cache to write to: the line itself names them all
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


def _decode_all(folder: Path, files: list[tuple[str, int]], size: int, channels: int, test_fraction: float,
                split_seed: int, class_names: tuple[str, ...], cache_file: Path) -> FolderData:
    splits = {"train": ([], []), "test": ([], [])}
    skipped = []
    for rel, label in files:
        try:
            image = decode_image(folder / rel, size, channels)
        except ValueError as e:
            skipped.append(f"{_shown(rel)} ({' '.join(str(e).split())})")
            continue
        images, labels = splits["test" if is_test(rel, test_fraction, split_seed) else "train"]
        images.append(image)
        labels.append(label)

    def stack(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = splits[split]
        empty = np.zeros((0, channels, size, size), np.uint8)
        return (np.stack(images) if images else empty), np.array(labels, dtype=np.int64)

    (train_images, train_labels), (test_images, test_labels) = stack("train"), stack("test")
    return FolderData(train_images, train_labels, test_images, test_labels, class_names, tuple(skipped),
                      cache_file, f"decoded from {folder}")


def _read_cache(cache_file: Path, log: Log) -> FolderData | None:
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        return FolderData(
            arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"],
            tuple(arrays["class_names"].tolist()), tuple(arrays["skipped"].tolist()), cache_file,
            f"cache {cache_file}")
    except Exception as e:   # a damaged entry is decoded again, never trusted
        log(f"{cache_file}: unreadable ({type(e).__name__}: {e}); decoding the folder again")
        cache_file.unlink(missing_ok=True)
        return None


def _write_cache(data: FolderData, settings: str, log: Log) -> None:
    """Write atomically (temp file, then rename); remove the older entries of the same settings.
    A cache that cannot be written costs only speed: the next run decodes again."""
    directory = data.cache_file.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with replacing(data.cache_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, train_images=data.train_images, train_labels=data.train_labels,
                     test_images=data.test_images, test_labels=data.test_labels,
                     class_names=np.array(data.class_names, dtype=str), skipped=np.array(data.skipped, dtype=str))
    except OSError as e:
        log(f"warning: could not cache the decoded images in {directory} ({e}); the next run decodes them again")
        return
    for old in directory.glob(f"{settings}-*.npz"):
        if old != data.cache_file:
            old.unlink(missing_ok=True)
