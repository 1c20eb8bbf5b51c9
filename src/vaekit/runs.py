"""The run directory: the unit a user keeps. Data only, never code, never pickle.

RUN/
  config.json                  the Config that made it
  metrics.jsonl                one JSON object per epoch
  fixed_z.safetensors          the 16 codes decoded into every progress grid
  data.json                    the data it was trained on: split sizes, SHA-256 (data.fingerprint)
  images/image_at_epoch_NNNN.png
  training.gif
  checkpoints/                 epoch and step checkpoints, `latest`, set-aside/, best/ (checkpoints.py)
  samples/                     the pictures the generation commands write (Run.samples_path)
  eval.json                    what `vaekit eval` measured, one entry per protocol (Run.save_eval)
  .lock, .lock.pid             an OS file lock held by the one training process writing here; its pid
  tensorboard/                 event files for TensorBoard (train --tensorboard)

A model shipped in vaekit/pretrained is a run reduced to config.json, metrics.jsonl and
model.safetensors (the weights alone, no checkpoints/), named `pretrained:NAME`. Commands write
what they make of a shipped model under ./pretrained-NAME (samples/, eval.json), and what they make
of RUN@best (the best validation epoch's weights) under RUN/best.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file

from . import pretrained
from .checkpoints import BEST, CheckpointStore
from .config import Config
from .errors import ConfigError, RunError
from .files import atomic_write_text, file_mode, load_tensors

BEST_SUFFIX = "@" + BEST
EVAL_FILE = "eval.json"


class Run:
    """The run in directory `path`. `name` is how a command named it (default: the path): for
    RUN@best or pretrained:NAME, `out` is where commands write what they make of it (see
    output_dir) and `best` says to read the best validation epoch's weights."""

    def __init__(self, path: str | Path, name: str | Path | None = None) -> None:
        self.path = Path(path)
        self.name = str(name or path)
        self.out = output_dir(self.name)
        self.best = is_best(self.name)
        self.images = self.path / "images"
        self.checkpoints = CheckpointStore(self.path)
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.fixed_z_path = self.path / "fixed_z.safetensors"
        self.gif_path = self.path / "training.gif"
        self.data_path = self.path / "data.json"
        self.created = False     # whether this object made the run directory (see remove_unstarted)
        self._lock = None        # the FileLock held while training (see lock)
        self._lock_pid = self.path / ".lock.pid"

    # -- creating and opening -------------------------------------------------------------
    def check_new(self) -> None:
        """Raises RunError unless `path` is free for a new run (missing, or an empty folder) and
        can be made: checked by making a file in the nearest folder that exists, as permission
        bits say nothing for root or a read-only mount."""
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise RunError(f"{self.path} already exists and is not empty: resume it with "
                           f"`vaekit train --resume {self.path}` or choose another --out")
        nearest = self.path.absolute()
        while not nearest.exists():
            nearest = nearest.parent
        try:
            if not nearest.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            tempfile.TemporaryFile(dir=nearest).close()
        except OSError as e:
            raise RunError(f"cannot write the run directory {self.path}: {e.strerror}; choose a writable --out") from None

    @classmethod
    def create(cls, path: str | Path, config: Config, data: dict | None = None) -> "Run":
        run = cls(path)
        run.make(config, data)
        return run

    def make(self, config: Config, data: dict | None = None) -> None:
        """Makes the run directory with its config.json (and `data`, the fingerprint of its data,
        as data.json). Training calls this only once the data and the model are known good, so a
        start that fails on them leaves nothing behind."""
        self.check_new()
        made_folder = not self.path.exists()
        try:
            self.images.mkdir(parents=True, exist_ok=True)
            self.created = "folder" if made_folder else "contents"
            self.checkpoints.path.mkdir(exist_ok=True)
            self.save_config(config)
            if data is not None:
                atomic_write_text(self.data_path, json.dumps(data, indent=1) + "\n")
        except OSError as e:
            raise RunError(f"cannot write the run directory {self.path}: {e.strerror}; choose a writable --out") from None

    def remove_unstarted(self) -> None:
        """Undoes `make` when training failed before its first checkpoint: nothing of value is in
        the run yet, and a retry with the same --out must not be refused. Only what `make` made goes
        (the folder, or its contents when the folder was there, empty)."""
        if not self.created or self.checkpoints.dirs():
            return
        if self.created == "folder":
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for child in self.path.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)

    def data_fingerprint(self) -> dict | None:
        """What data.json recorded of the data the run was trained on (None for runs made before it)."""
        try:
            return json.loads(self.data_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise RunError(f"{self.data_path} is damaged ({e}); the run directory was altered") from None

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """The run in directory `path`, or the shipped model `pretrained:NAME`."""
        run = cls(resolve(path), path)
        if not run.config_path.is_file():
            raise RunError(f"{run.path} is not a vaekit run directory (no config.json); "
                           "pass the folder `vaekit train` made")
        return run

    def save_config(self, config: Config) -> None:
        atomic_write_text(self.config_path, config.to_json())

    def config(self) -> Config:
        try:
            return Config.load(self.config_path)
        except ConfigError as e:
            raise RunError(str(e)) from None

    def lock(self) -> None:
        """Refuses a second training process on this run. An OS file lock (flock on Unix, LockFileEx
        on Windows, through `filelock`), not a file's existence, is the lock: the OS releases it when
        its process dies, even by kill -9, so no stale lock remains. The holder's pid is written
        beside it (`.lock.pid`) to name it in the refusal: Windows bars reading a locked file."""
        if self.checkpoints.shipped_weights.is_file():
            raise RunError(f"{self.path} is a model shipped with vaekit (weights only, no optimizer state) and "
                           "cannot be trained further; train a new run with `vaekit train --out DIR`")
        lock = FileLock(self.path / ".lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            try:
                owner = self._lock_pid.read_text().strip()
            except OSError:
                owner = ""
            raise RunError(f"{self.path} is being trained by pid {owner or 'another process'}; wait for it or "
                           "stop it first") from None
        except OSError as e:
            raise RunError(f"cannot write the run directory {self.path}: {e.strerror}; fix its permissions") from None
        self._lock = lock
        self._lock_pid.write_text(str(os.getpid()))

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock_pid.unlink(missing_ok=True)   # before the release: a next holder's pid is never removed
            self._lock.release()
            self._lock = None

    # -- metrics and images ---------------------------------------------------------------
    def image_path(self, epoch: int) -> Path:
        return self.images / f"image_at_epoch_{epoch:04d}.png"

    def metrics(self) -> list[dict]:
        """The metrics lines. A last line without its newline is a write cut short (a crash, a full
        disk) and is left out; the next resume rewrites the file without it."""
        if not self.metrics_path.exists():
            return []
        complete = self.metrics_path.read_text().split("\n")[:-1]
        try:
            return [json.loads(line) for line in complete if line.strip()]
        except json.JSONDecodeError as e:
            raise RunError(f"{self.metrics_path} is damaged ({e}); remove its broken lines") from None

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drops lines written after the checkpoint being resumed (a crash can leave them)."""
        kept = [m for m in self.metrics() if m["epoch"] <= last_epoch]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def save_fixed_z(self, z: torch.Tensor) -> None:
        save_file({"z": z.detach().cpu().contiguous()}, str(self.fixed_z_path))
        os.chmod(self.fixed_z_path, file_mode())

    def fixed_z(self) -> torch.Tensor:
        return load_tensors(self.fixed_z_path)["z"]

    # -- what commands make of it ---------------------------------------------------------
    def samples_path(self, filename: str) -> Path:
        """Where a generation command writes its picture `filename` by default: OUT/samples/."""
        return self.out / "samples" / filename

    @property
    def eval_path(self) -> Path:
        return self.out / EVAL_FILE

    def check_eval_writable(self) -> None:
        """Raises RunError unless eval.json can be written, by making a file beside it (permission
        bits do not say it for root, nor for a read-only mount): checked before the work (hours at
        K = 5000), not after it. Makes ./pretrained-NAME for a shipped model."""
        path = self.eval_path
        if path.is_dir():
            raise RunError(f"cannot write {path}: it is a folder; move it away")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path.parent).close()
        except OSError as e:
            raise RunError(f"cannot write {path}: {e.strerror}; fix the permissions of {path.parent}") from None

    def save_eval(self, record: dict) -> Path:
        """Keeps `record` (a likelihood_report() result) in eval.json under its protocol's key (eval_key),
        beside the other protocols' entries, replacing that protocol's older one: the file is read,
        merged and replaced whole (atomic). A damaged file is kept beside it as eval.json.unreadable,
        never overwritten; entries an older vaekit keyed by their binarization alone take their key."""
        path = self.eval_path
        try:
            try:
                saved = json.loads(path.read_text()) if path.exists() else {}
                if not isinstance(saved, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                saved = {}
                os.replace(path, path.with_name(path.name + ".unreadable"))
            entries = {_stored_key(key, entry): entry for key, entry in saved.items()}
            entries[eval_key(record)] = record
            atomic_write_text(path, json.dumps(entries, indent=1) + "\n")
        except OSError as e:
            raise RunError(f"cannot write {path}: {e.strerror}; the result is not saved") from None
        return path


def is_best(run: str | Path) -> bool:
    """Whether `run` names a run's best validation checkpoint: RUN@best."""
    return str(run).endswith(BEST_SUFFIX)


def resolve(run: str | Path) -> Path:
    """The directory of `run`: itself (RUN@best: RUN), or for `pretrained:NAME` the shipped model's folder."""
    if is_best(run):
        return Path(str(run)[:-len(BEST_SUFFIX)])
    if not pretrained.is_pretrained(run):
        return Path(run)
    name = str(run)[len(pretrained.PREFIX):]
    if name not in pretrained.names():
        shipped = ", ".join(pretrained.PREFIX + n for n in pretrained.names()) or "none"
        raise RunError(f"{run} is not a model shipped with vaekit (shipped: {shipped}); pass one of them "
                       "or a run directory")
    return pretrained.FOLDER / name


def output_dir(run: str | Path) -> Path:
    """Where commands write what they make of `run` (samples/, eval.json, ...): the run directory,
    or for a shipped model (read-only, inside the installed package) ./pretrained-NAME; for RUN@best, RUN/best."""
    if is_best(run):
        return resolve(run) / BEST
    if pretrained.is_pretrained(run):
        return Path("pretrained-" + str(run)[len(pretrained.PREFIX):])
    return Path(run)


def eval_key(record: dict) -> str:
    """The key of an evaluation's entry in eval.json: its protocol, BINARIZATION_kK_nN (e.g.
    dynamic_k5000_n10000), so that evaluations with another K or on fewer images sit beside it."""
    return f"{record['binarization']}_k{record['k']}_n{record['n']}"


def _stored_key(key: str, entry) -> str:
    """The key of an entry read from eval.json: eval_key, for those an older vaekit stored under
    BINARIZATION or BINARIZATION_nN; `key` as it is for an entry that does not say its protocol."""
    try:
        return eval_key(entry)
    except (KeyError, TypeError):
        return key
