"""Image-folder datasets (vaekit.data.folders): real PNG/JPEG files written from the shipped MNIST
sample, labels from subfolders, explicit mode conversion, resize and crop, a deterministic and
stable split, bad files, the decoded-array cache; and `--binarization none`."""
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLE, Log, cli_env
from test_cli import vaekit
from vaekit import Config, ConfigError, DataConfig
from vaekit.errors import DataError
from vaekit.data import (cache_root, dataset_info, fingerprint, hold_out, load_folder, preprocess, read_idx,
                         splits_for)


def sample_digits(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Training images [n, 28, 28] uint8 and labels [n] of the shipped MNIST sample."""
    images = read_idx(SAMPLE / "train-images-idx3-ubyte.gz")[start:start + n]
    labels = read_idx(SAMPLE / "train-labels-idx1-ubyte.gz")[start:start + n]
    return images, labels


def write_digit_folder(root: Path, n: int = 300, start: int = 0, suffix: str = ".png") -> dict[str, np.ndarray]:
    """root/<digit>/<index>.png for sample images start..start+n; returns {relative path: pixels}."""
    images, labels = sample_digits(n, start)
    written = {}
    for i, (image, label) in enumerate(zip(images, labels), start):
        rel = f"{label}/{i:04d}{suffix}"
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(root / rel, quality=95)
        written[rel] = image
    return written


def folder_config(root: Path, **settings) -> DataConfig:
    return DataConfig(dataset="folder", data_dir=str(root), **settings)


def rows(images: torch.Tensor) -> set[bytes]:
    """Each image's bytes: identifies the sample's (distinct) images whatever their order."""
    return {image.numpy().tobytes() for image in images}


def test_a_png_folder_loads_exactly_with_labels_from_sorted_subfolders(tmp_path):
    written = write_digit_folder(tmp_path / "digits")
    splits = splits_for(folder_config(tmp_path / "digits"), log=Log())
    assert splits.image_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.class_names == tuple("0123456789")
    assert len(splits.train) + len(splits.test) == 300
    assert 10 <= len(splits.test) <= 60    # about 10% of 300
    by_pixels = {image.tobytes(): int(rel.split("/")[0]) for rel, image in written.items()}
    for split in (splits.train, splits.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        for image, label in zip(split.images, split.labels):
            assert by_pixels[image[0].numpy().tobytes()] == label    # PNG is lossless; no resize at 28
    assert not rows(splits.train.images) & rows(splits.test.images)


def test_rgb_and_grey_conversion_jpeg_and_one_class_folder(tmp_path):
    images, _ = sample_digits(40)
    rgb = np.stack([images, 255 - images, np.full_like(images, 60)], axis=-1)    # [40, 28, 28, 3]
    folder = tmp_path / "colour"
    folder.mkdir()
    for i, pixels in enumerate(rgb):
        Image.fromarray(pixels, "RGB").save(folder / f"{i:02d}.png")
    Image.fromarray(images[0], "L").save(folder / "grey.jpg", quality=95)
    as_rgb = splits_for(folder_config(folder, channels=3), log=Log())
    assert as_rgb.image_shape == (3, 28, 28) and as_rgb.class_names == ("colour",)
    everything = torch.cat([as_rgb.train.images, as_rgb.test.images])
    assert set(torch.cat([as_rgb.train.labels, as_rgb.test.labels]).tolist()) == {0}
    assert rows(torch.from_numpy(rgb.transpose(0, 3, 1, 2))) <= rows(everything)   # RGB kept exactly
    greys = [image for image in everything if torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])]
    assert len(greys) == 1 and (greys[0][0].int() - torch.from_numpy(images[0]).int()).abs().float().mean() < 3

    as_grey = splits_for(folder_config(folder, channels=1), log=Log())
    assert as_grey.image_shape == (1, 28, 28)
    r, g, b = (torch.from_numpy(rgb[..., c]).double() for c in range(3))
    luma = (r * 299 + g * 587 + b * 114) / 1000                         # ITU-R 601-2, as Pillow
    loaded = torch.cat([as_grey.train.images, as_grey.test.images])[:, 0].double()
    for expected in luma:
        assert (loaded - expected).abs().amax(dim=(1, 2)).min() <= 1


def test_resize_shorter_side_then_centre_crop(tmp_path):
    folder = tmp_path / "shapes"
    folder.mkdir()
    tall = np.full((112, 56), 200, np.uint8)      # H=112, W=56: the centre half rows are 200
    tall[:28], tall[84:] = 50, 100
    Image.fromarray(tall, "L").save(folder / "tall.png")
    wide = np.tile(np.arange(40, dtype=np.uint8) * 5, (28, 1))     # H=28, W=40: columns 0, 5, .., 195
    Image.fromarray(wide, "L").save(folder / "wide.png")
    data = load_folder(folder, 28, 1, 0.5, 0, log=Log())
    by_shape = {}
    for image in np.concatenate([data.train_images, data.test_images]):
        by_shape["wide" if image[0, 0, 0] != image[0, 0, 27] else "tall"] = image[0]
    np.testing.assert_array_equal(by_shape["wide"], wide[:, 6:34])    # no resize: the centre 28 columns
    assert by_shape["tall"].shape == (28, 28)
    # 56x112 -> 28x56 (bicubic), rows 14..41 kept: 200, but at the crop's edges, where the kernel
    # also reaches the 50 above and the 100 below (as a resize of the whole image does)
    assert (by_shape["tall"][2:-2] == 200).all()
    assert 150 < by_shape["tall"][0].mean() < 200 and 150 < by_shape["tall"][-1].mean() < 200


def test_bad_files_are_skipped_with_a_count_and_named(tmp_path):
    folder = tmp_path / "mixed"
    write_digit_folder(folder, n=40)
    (folder / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    whole = (folder / "3" / os.listdir(folder / "3")[0]).read_bytes()
    (folder / "3" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.new("CMYK", (28, 28), (0, 255, 0, 0)).save(folder / "5" / "cmyk.jpg")
    Image.fromarray(np.full((28, 28), 40000, np.uint16)).save(folder / "5" / "sixteen-bit.png")
    palette = Image.new("P", (28, 28), 1)
    palette.putpalette([0, 0, 0, 30, 90, 150] + [0] * 762)
    palette.save(folder / "7" / "palette.png")
    grey_alpha = Image.new("LA", (28, 28), (255, 0))       # white but fully transparent -> black
    grey_alpha.paste((255, 255), (0, 0, 14, 28))           # the left half opaque white
    grey_alpha.save(folder / "7" / "alpha.png")
    (folder / "7" / ".hidden.png").write_bytes(b"not an image, and ignored")

    log = Log()
    data = load_folder(folder, 28, 3, 0.1, 0, log=log)
    warnings = [line for line in log if line.startswith("warning: skipped")]
    assert len(warnings) == 1
    assert "skipped 4 of 46 images" in warnings[0]
    for named in ("3/corrupt.png (unreadable", "3/truncated.png (unreadable", "5/cmyk.jpg (CMYK mode",
                  "5/sixteen-bit.png (I;16 mode"):   # every one, each with why
        assert named in warnings[0]
    assert sorted(name.split(" ")[0] for name in data.skipped) == [
        "3/corrupt.png", "3/truncated.png", "5/cmyk.jpg", "5/sixteen-bit.png"]
    images = np.concatenate([data.train_images, data.test_images])
    assert len(images) == 40 + 2
    assert any((image == np.array([30, 90, 150], np.uint8)[:, None, None]).all() for image in images)
    alpha = [image for image in images if (image[:, :, :14] == 255).all()]
    assert len(alpha) == 1 and (alpha[0][:, :, 14:] == 0).all()


def test_many_skipped_files_are_all_listed_with_why_in_a_file_the_warning_names(tmp_path):
    folder = tmp_path / "mixed"
    write_digit_folder(folder, n=30)
    for i in range(12):
        (folder / "4" / f"broken-{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    log = Log()
    load_folder(folder, 28, 1, 0.1, 0, log=log)
    [warning] = [line for line in log if line.startswith("warning: skipped 12 of 42")]
    listing = Path(warning.rsplit(" are listed in ", 1)[1])
    assert "all 12, each with why" in warning and "4/broken-00.png (unreadable" in warning
    lines = listing.read_text().splitlines()
    assert [line.split(" ")[0] for line in lines] == [f"4/broken-{i:02d}.png" for i in range(12)]
    assert all("(unreadable: " in line for line in lines)


def test_a_file_name_that_is_not_utf8_is_read_and_shown_escaped(tmp_path):
    folder = tmp_path / "names"
    write_digit_folder(folder, n=30)
    os.rename(folder / "1" / "0003.png", os.fsencode(folder / "1") + b"/caf\xe9.png")   # Latin-1, not UTF-8
    (folder / "2" / "0005.png").unlink()
    with open(os.fsencode(folder / "2") + b"/bad-\xff.png", "wb") as f:
        f.write(b"not an image")
    log = Log()
    data = load_folder(folder, 28, 1, 0.1, 0, log=log)
    assert len(data.train_images) + len(data.test_images) == 29
    [warning] = [line for line in log if line.startswith("warning: skipped")]
    assert "2/bad-\\xff.png (unreadable" in warning
    assert len(load_folder(folder, 28, 1, 0.1, 0, log=Log()).skipped) == 1   # the cache is found again


def test_an_image_of_too_many_pixels_is_skipped_saying_why(tmp_path, recwarn):
    folder = tmp_path / "big"
    write_digit_folder(folder, n=30)
    Image.new("L", (9750, 9750)).save(folder / "3" / "95-megapixels.png")   # over Pillow's 89.5 M guard
    log = Log()
    load_folder(folder, 28, 1, 0.1, 0, log=log)
    [warning] = [line for line in log if line.startswith("warning: skipped 1 of 31")]
    assert "3/95-megapixels.png (too large: more than 89,478,485 pixels" in warning
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_folder_without_usable_images_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg images") as error:
        splits_for(folder_config(tmp_path / "empty"), log=Log())
    assert "\n" not in str(error.value)
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of its 1 images can be used .*a/x.jpg"):
        splits_for(folder_config(tmp_path / "broken"), log=Log())
    with pytest.raises(DataError, match="not a folder"):
        splits_for(folder_config(tmp_path / "nowhere"), log=Log())
    write_digit_folder(tmp_path / "few", n=3)
    with pytest.raises(DataError, match="the test split is empty .*--test-fraction"):
        splits_for(folder_config(tmp_path / "few", test_fraction=0.01), log=Log())


def test_split_is_deterministic_stable_when_files_are_added_and_follows_the_seed(tmp_path):
    folder = tmp_path / "digits"
    write_digit_folder(folder, n=200)
    first = splits_for(folder_config(folder), log=Log())
    again = load_folder(folder, 28, 1, 0.1, 0, log=Log())
    assert np.array_equal(first.test.images.numpy(), again.test_images)

    write_digit_folder(folder, n=100, start=200)         # 100 more files, some in existing classes
    grown = splits_for(folder_config(folder), log=Log())
    assert rows(first.test.images) <= rows(grown.test.images)
    assert rows(first.train.images) <= rows(grown.train.images)
    assert len(grown.test) > len(first.test)

    reseeded = splits_for(folder_config(folder, split_seed=1), log=Log())
    assert rows(reseeded.test.images) != rows(grown.test.images)
    half = splits_for(folder_config(folder, test_fraction=0.5), log=Log())
    assert 100 <= len(half.test) <= 200


def test_decoded_arrays_are_cached_and_a_changed_file_is_never_served_stale(tmp_path):
    folder = tmp_path / "digits"
    written = write_digit_folder(folder, n=60)
    log = Log()
    first = load_folder(folder, 28, 1, 0.2, 0, log=log)
    assert log.has("decoding 60 images") and first.source.startswith("decoded")
    log = Log()
    cached = load_folder(folder, 28, 1, 0.2, 0, log=log)
    assert log == [] and cached.source == f"cache {first.cache}"
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(cached, name), getattr(first, name))
    assert cached.class_names == first.class_names

    # Same size and mtime, other pixels: the content key still sees it.
    rel = next(iter(written))
    path = folder / rel
    stat = path.stat()
    inverted = 255 - written[rel]
    Image.fromarray(inverted, "L").save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    log = Log()
    changed = load_folder(folder, 28, 1, 0.2, 0, log=log)
    assert log.has("decoding 60 images") and changed.cache != first.cache
    everything = np.concatenate([changed.train_images, changed.test_images])[:, 0]
    assert any((image == inverted).all() for image in everything)
    assert not first.cache.exists()                 # the stale entry is gone
    assert [p.name for p in changed.cache.parent.iterdir()] == [changed.cache.name]

    load_folder(folder, 14, 1, 0.2, 0, log=Log())        # other settings: their own entry
    assert len(list(changed.cache.parent.iterdir())) == 2
    assert changed.cache.is_relative_to(cache_root())


def test_a_damaged_cache_entry_is_decoded_again(tmp_path):
    write_digit_folder(tmp_path / "digits", n=30)
    first = load_folder(tmp_path / "digits", 28, 1, 0.2, 0, log=Log())
    decoded = np.array(first.train_images)     # a copy: the mapping of a file cut short faults (SIGBUS)
    images = first.cache / "train_images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    log = Log()
    again = load_folder(tmp_path / "digits", 28, 1, 0.2, 0, log=log)
    assert log.has("unreadable") and log.has("decoding 30 images")
    np.testing.assert_array_equal(again.train_images, decoded)


def test_loose_images_beside_class_folders_are_left_out_with_a_warning(tmp_path):
    write_digit_folder(tmp_path / "digits", n=30)
    Image.new("L", (28, 28)).save(tmp_path / "digits" / "stray.png")
    log = Log()
    splits = splits_for(folder_config(tmp_path / "digits"), log=log)
    assert len(splits.train) + len(splits.test) == 30
    assert log.has("1 images directly in") and log.has("stray.png")


def test_dataset_info_of_a_folder(tmp_path):
    write_digit_folder(tmp_path / "digits", n=50)
    info = dataset_info(folder_config(tmp_path / "digits", resize=14, channels=3), log=Log())
    assert info["name"] == "folder" and info["image_shape"] == [3, 14, 14]
    assert info["num_classes"] == 10 and info["class_names"] == list("0123456789")
    assert info["splits"]["train"] + info["splits"]["test"] == 50 and info["skipped"] == 0
    assert (Path(info["cache"]) / "manifest.json").is_file()


def test_data_config_checks_folder_settings():
    with pytest.raises(ConfigError, match="--data-dir"):
        DataConfig(dataset="folder")
    with pytest.raises(ConfigError, match="--resize, --channels apply to --dataset folder only"):
        DataConfig(dataset="mnist", resize=32, channels=3)
    with pytest.raises(ConfigError, match="channels must be one of 1, 3"):
        DataConfig(dataset="folder", data_dir="x", channels=2)
    with pytest.raises(ConfigError, match="test_fraction"):
        DataConfig(dataset="folder", data_dir="x", test_fraction=1.0)
    grey_levels = {"data": {"binarization": "none"}, "model": {"likelihood": "logistic"}}
    assert Config.from_dict(grey_levels).data.binarization == "none"


def test_binarization_none_keeps_the_8_bit_value_exactly():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = preprocess(pixels, "none")
    assert x.dtype == torch.float32 and x.min() == 0 and x.max() == 1
    assert torch.equal(torch.round(x * 255).to(torch.uint8), pixels)


def test_cli_trains_on_an_image_folder_and_shows_its_info(tmp_path):
    write_digit_folder(tmp_path / "digits", n=300)
    info = vaekit("data", "info", "folder", "--data-dir", tmp_path / "digits").stdout
    assert "image_shape: [1, 28, 28]" in info and "class_names: ['0', '1'," in info
    run = tmp_path / "run"
    result = vaekit("train", "--dataset", "folder", "--data-dir", tmp_path / "digits", "--epochs", 1,
                    "--batch-size", 50, "--lr", 1e-3, "--device", "cpu", "--out", run)
    assert "Epoch: 1, Test set ELBO: -" in result.stdout
    assert "decoding" not in result.stdout + result.stderr     # `data info` filled the cache
    config = Config.load(run / "config.json")
    assert config.data.dataset == "folder" and config.data.data_dir == str(tmp_path / "digits")
    assert (run / "images" / "image_at_epoch_0001.png").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def hashed_afresh(splits) -> dict:
    """data.fingerprint as it hashes the images themselves (no SHA-256 recorded by a cache)."""
    return fingerprint(replace(splits, sha256=None))


def test_parallel_decode_equals_one_process_and_the_recorded_fingerprint_is_the_hash_of_the_data(tmp_path,
                                                                                                   monkeypatch):
    write_digit_folder(tmp_path / "digits", n=600)    # 3 chunks of up to 256 images
    parallel = load_folder(tmp_path / "digits", 28, 1, 0.2, 0, log=Log(), workers=2)
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "other-cache"))
    serial = load_folder(tmp_path / "digits", 28, 1, 0.2, 0, log=Log(), workers=1)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(parallel, name), getattr(serial, name))
    splits = splits_for(folder_config(tmp_path / "digits", test_fraction=0.2), log=Log())   # the 2nd entry
    assert splits.sha256 == parallel.sha256
    assert fingerprint(splits) == hashed_afresh(splits)


def test_the_images_are_read_memory_mapped_from_the_cache_entry(tmp_path):
    write_digit_folder(tmp_path / "digits", n=60)
    splits_for(folder_config(tmp_path / "digits"), log=Log())              # decodes
    splits = splits_for(folder_config(tmp_path / "digits"), log=Log())     # reads the entry
    [entry] = [p for p in (cache_root() / "folders").glob("*/*") if p.is_dir()]
    mapped = Path("/proc/self/maps").read_text()
    assert str(entry / "train_images.npy") in mapped and str(entry / "test_images.npy") in mapped
    hold, held_out = hold_out(splits.train, 10)          # views of the mapping: splits, validation
    assert len(hold) + len(held_out) == len(splits.train) and torch.equal(held_out.images, splits.train.images[-10:])


DECODE = """
import sys
from vaekit.data import load_folder
load_folder(sys.argv[1], 28, 1, 0.2, 0, workers=1)
"""


def test_a_decode_killed_midway_leaves_no_entry_that_is_read_and_the_next_decode_finishes(tmp_path):
    write_digit_folder(tmp_path / "digits", n=2000)
    proc = subprocess.Popen([sys.executable, "-c", DECODE, str(tmp_path / "digits")], env=cli_env(),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((cache_root() / "folders").glob("*/*/.train_images.npy.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    [entry] = (cache_root() / "folders").glob("*/*")
    assert not (entry / "manifest.json").exists()
    log = Log()
    data = load_folder(tmp_path / "digits", 28, 1, 0.2, 0, log=log, workers=1)
    assert log.has("decoding 2000 images")
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "skipped.txt", "test_images.npy",
                                                       "test_labels.npy", "train_images.npy", "train_labels.npy"]
    assert len(data.train_images) + len(data.test_images) == 2000
