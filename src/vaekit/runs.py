"""The run directory: the unit a user keeps. Data only, never code, never pickle.

RUN/
  config.json                  the Config that made it
  metrics.jsonl                one JSON object per epoch
  fixed_z.safetensors          the 16 codes decoded into every progress grid
  data.json                    the data it was trained on: split sizes, SHA-256 (data.fingerprint)
  images/image_at_epoch_NNNN.png
  training.gif
  checkpoints/epoch_NNNN/      after epoch NNNN: model.safetensors, optimizer.safetensors,
                               rng.safetensors, state.json (where training stands, optimizer scalars),
                               SHA256SUMS (of those four, as `sha256sum` writes them; checked on load)
  checkpoints/step_NNNNNNNN/   the same, within an epoch (--checkpoint-every, or on a stop signal);
                               only the newest is kept
  checkpoints/latest           the name of the newest complete checkpoint (a hint: loading takes the
                               newest checkpoint whose checksums hold, whatever `latest` says)
  checkpoints/set-aside/       damaged checkpoints moved out of the way by `--fall-back`, never deleted
  checkpoints/best/            with a validation split: the weights of the epoch with the best validation
                               ELBO (model-epoch_NNNN.safetensors) and best.json naming that file, its epoch,
                               validation ELBO and SHA-256; commands read it as RUN@best
  .lock, .lock.pid             an OS file lock held by the one training process writing here; its pid
  tensorboard/                 event files for TensorBoard (train --tensorboard)

A model shipped in vaekit/pretrained is a run reduced to config.json, metrics.jsonl and
model.safetensors (the weights alone, no checkpoints/), named `pretrained:NAME`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import pretrained
from .config import Config, ConfigError

CHECKPOINT_NAME = re.compile(r"(epoch_\d{4,}|step_\d{8,})")
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
CHECKSUMS = "SHA256SUMS"   # written last into each checkpoint; `sha256sum -c SHA256SUMS` checks it too
SET_ASIDE = "set-aside"    # under checkpoints/: damaged checkpoints a --fall-back resume moved away
BEST = "best"              # under checkpoints/: the best validation epoch's weights; RUN@best names them
BEST_SUFFIX = "@" + BEST


class RunError(Exception):
    """A run directory or checkpoint that cannot be used; the message says which and what to do."""


@dataclass
class Progress:
    """Where training stands: `epoch` epochs done, `batch` batches of the next one done, `step`
    optimizer steps in all."""
    epoch: int = 0
    batch: int = 0
    step: int = 0

    @property
    def checkpoint_name(self) -> str:
        return f"epoch_{self.epoch:04d}" if self.batch == 0 else f"step_{self.step:08d}"


@dataclass
class Checkpoint:
    """Everything an exact resume needs. rng["order"] is the epoch-order generator's state at the
    start of the epoch in progress, so a resume draws the same permutation and skips `batch`
    batches of it; `step_losses` are those batches' summed losses (for the epoch's mean)."""
    progress: Progress
    model: dict[str, torch.Tensor]
    optimizer: dict            # a torch optimizer state_dict
    rng: dict[str, torch.Tensor]
    step_losses: list[float] = field(default_factory=list)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                generators: dict[str, torch.Generator], source: Path) -> None:
        """Loads the weights, optimizer and generator states; RunError when they do not fit."""
        load_weights_into(model, self.model, source)
        try:
            optimizer.load_state_dict(self.optimizer)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state.get(p, {})
                    for key, value in state.items():
                        if torch.is_tensor(value) and value.dim():
                            if value.shape != p.shape:
                                raise ValueError(f"optimizer {key} of shape {list(value.shape)} "
                                                 f"for a parameter of shape {list(p.shape)}")
                            # the parameter's memory layout (channels_last): the fused optimizer pairs
                            # elements by memory position, and the checkpoint stores them contiguous
                            state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
            for name, generator in generators.items():
                generator.set_state(self.rng[name])
        except (KeyError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunError(f"checkpoint {source} does not fit this run ({first}); it belongs to another "
                           "model or device: resume on the device it was trained on, or start a new run") from None


class Run:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.images = self.path / "images"
        self.checkpoints = self.path / "checkpoints"
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.fixed_z_path = self.path / "fixed_z.safetensors"
        self.gif_path = self.path / "training.gif"
        self.data_path = self.path / "data.json"
        self.created = False     # whether this object made the run directory (see remove_unstarted)
        self.packaged_weights = self.path / "model.safetensors"    # a shipped model's (see vaekit.pretrained)
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
            self.checkpoints.mkdir(exist_ok=True)
            self.save_config(config)
            if data is not None:
                _atomic_write_text(self.data_path, json.dumps(data, indent=1) + "\n")
        except OSError as e:
            raise RunError(f"cannot write the run directory {self.path}: {e.strerror}; choose a writable --out") from None

    def remove_unstarted(self) -> None:
        """Undoes `make` when training failed before its first checkpoint: nothing of value is in
        the run yet, and a retry with the same --out must not be refused. Only what `make` made goes
        (the folder, or its contents when the folder was there, empty)."""
        if not self.created or self.checkpoint_dirs():
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
        run = cls(resolve(path))
        if not run.config_path.is_file():
            raise RunError(f"{run.path} is not a vaekit run directory (no config.json); "
                           "pass the folder `vaekit train` made")
        return run

    def save_config(self, config: Config) -> None:
        _atomic_write_text(self.config_path, config.to_json())

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
        if self.packaged_weights.is_file():
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
        _atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def save_fixed_z(self, z: torch.Tensor) -> None:
        save_file({"z": z.detach().cpu().contiguous()}, str(self.fixed_z_path))
        os.chmod(self.fixed_z_path, _file_mode())

    def fixed_z(self) -> torch.Tensor:
        return _load_tensors(self.fixed_z_path)["z"]

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, ckpt: Checkpoint, keep: int) -> Path:
        """Writes a complete checkpoint directory, then moves `latest` to it; both steps atomic,
        so a crash at any point leaves the previous checkpoint as `latest`. The caller holds the
        lock, so any `.tmp-*` directory is a crashed write's leftover."""
        name = ckpt.progress.checkpoint_name
        final = self.checkpoints / name
        tmp = self.checkpoints / f".tmp-{name}"
        opt_tensors, opt_meta = _flatten_optimizer(ckpt.optimizer)
        state = {**vars(ckpt.progress), "step_losses": ckpt.step_losses, "optimizer": opt_meta}
        try:
            for leftover in self.checkpoints.glob(".tmp-*"):
                shutil.rmtree(leftover)
            tmp.mkdir(parents=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in ckpt.model.items()}, str(tmp / "model.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            save_file({k: v.cpu().contiguous() for k, v in ckpt.rng.items()}, str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            # hashed from the disk, so the sums vouch for what was written
            (tmp / CHECKSUMS).write_text("".join(f"{_sha256(tmp / f)}  {f}\n" for f in CHECKPOINT_FILES))
            for f in tmp.iterdir():
                os.chmod(f, _file_mode())   # safetensors writes 0600; a run's files share one mode
                _fsync(f)
            _fsync(tmp)
            if final.exists():   # not written by this process (a resume starts after the newest intact one)
                self.set_aside(final)
            os.rename(tmp, final)
            _fsync(self.checkpoints)
            _atomic_write_text(self.checkpoints / "latest", name + "\n")
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            previous = self.latest_checkpoint()
            kept = f"the last checkpoint, {previous.name}, is intact" if previous else "no checkpoint was written yet"
            raise RunError(f"cannot write a checkpoint in {self.checkpoints}: {reason}; free disk space or fix "
                           f"permissions, then `vaekit train --resume {self.path}` ({kept})") from None
        self._prune(keep, latest=name)
        return final

    def _prune(self, keep: int, latest: str) -> None:
        """Keeps the newest `keep` epoch checkpoints, and of the within-epoch ones only `latest`."""
        epochs = sorted(p for p in self.checkpoints.glob("epoch_*") if p.is_dir())
        steps = [p for p in self.checkpoints.glob("step_*") if p.is_dir() and p.name != latest]
        for old in epochs[:-keep] + steps:
            shutil.rmtree(old, ignore_errors=True)

    def checkpoint_dirs(self) -> list[Path]:
        """Every checkpoint directory, complete or not, newest first: by the step its state.json
        records (an epoch's end after a step checkpoint of the same step); a checkpoint whose
        state cannot be read counts as the newest of its kind, so it is never passed over unseen."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]

        def newness(path: Path) -> tuple:
            try:
                step = int(json.loads((path / "state.json").read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
                step = int(path.name[5:]) if path.name.startswith("step_") else float("inf")
            return step, path.name.startswith("epoch_"), path.name

        return sorted(found, key=newness, reverse=True)

    def verify_checkpoint(self, path: Path) -> None:
        """Raises RunError, naming the file, unless every file of checkpoint `path` is there and
        has the SHA-256 recorded when it was written (a checkpoint of a vaekit that recorded no
        sums is checked for its files only)."""
        missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        if missing:
            raise RunError(f"checkpoint file {path / missing[0]} is missing")
        if not (path / CHECKSUMS).exists():
            return
        recorded = {}
        try:
            for line in (path / CHECKSUMS).read_text().splitlines():
                digest, _, name = line.partition("  ")
                recorded[name] = digest
        except (OSError, UnicodeDecodeError):
            pass
        for f in CHECKPOINT_FILES:
            if f not in recorded:
                raise RunError(f"checkpoint file {path / CHECKSUMS} is damaged (it records no checksum of {f})")
            if _sha256(path / f) != recorded[f]:
                raise RunError(f"checkpoint file {path / f} is damaged (its SHA-256 differs from the one "
                               "recorded when it was written)")

    def find_checkpoint(self, fall_back: bool = False) -> tuple[Path | None, list[Path]]:
        """(the checkpoint to go on from, the damaged ones newer than it). That is the newest one
        whose files verify, whatever `latest` says, when it is also the newest there is; when a
        newer one is damaged, RunError naming its file, unless `fall_back` asks for the newest
        intact one. (None, []) when the run has no checkpoint."""
        damaged = []
        for path in self.checkpoint_dirs():
            try:
                self.verify_checkpoint(path)
            except RunError as e:
                if not damaged:
                    first_error = str(e)
                damaged.append(path)
                continue
            if damaged and not fall_back:
                raise RunError(f"{first_error}; `vaekit train --resume {self.path} --fall-back` goes on from the "
                               f"newest intact checkpoint, {path.name}, and moves the damaged one to "
                               f"{self.checkpoints / SET_ASIDE}") from None
            return path, damaged
        if damaged:
            raise RunError(f"{first_error}, and no checkpoint of {self.path} is intact; start a new run") from None
        return None, []

    def set_aside(self, path: Path) -> Path:
        """Moves checkpoint `path` into checkpoints/set-aside/ (renamed, never deleted)."""
        aside = self.checkpoints / SET_ASIDE
        aside.mkdir(exist_ok=True)
        target, n = aside / path.name, 1
        while target.exists():
            n += 1
            target = aside / f"{path.name}.{n}"
        os.rename(path, target)
        return target

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names (what the last writer committed last)."""
        pointer = self.checkpoints / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text(errors="replace").strip()
        if not CHECKPOINT_NAME.fullmatch(name):
            raise RunError(f"{pointer} holds {name[:40]!r}, not a checkpoint name; the run directory was altered")
        path = self.checkpoints / name
        if not path.is_dir():
            raise RunError(f"{pointer} names {path.name}, which is missing; the run directory was altered by hand")
        return path

    def load_checkpoint(self, path: Path | None = None) -> Checkpoint:
        """Checkpoint `path` (default: the newest intact one), its checksums verified."""
        path = path or self._newest()
        self.verify_checkpoint(path)
        try:
            state = json.loads((path / "state.json").read_text())
            progress = Progress(*(int(state[k]) for k in ("epoch", "batch", "step")))
            step_losses = [float(v) for v in state["step_losses"]]
            if min(vars(progress).values()) < 0 or len(step_losses) != progress.batch:
                raise ValueError(f"inconsistent progress {vars(progress)} with {len(step_losses)} step losses")
            model = _load_tensors(path / "model.safetensors")
            optimizer = _unflatten_optimizer(_load_tensors(path / "optimizer.safetensors"), state["optimizer"])
            rng = _load_tensors(path / "rng.safetensors")
            return Checkpoint(progress, model, optimizer, rng, step_losses)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as e:
            raise RunError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}), though its checksums hold: it "
                           f"was altered after it was written; restore it, or move it out of {self.checkpoints} "
                           "to go on from an older one") from None

    def save_best(self, weights: dict[str, torch.Tensor], epoch: int, val_elbo: float) -> None:
        """Keeps `weights` as the best epoch's: the file first, then best.json naming it (atomic), then
        the older file goes; a crash at any point leaves a best.json whose file is there and intact."""
        folder = self.checkpoints / BEST
        folder.mkdir(exist_ok=True)
        name = f"model-epoch_{epoch:04d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / name))
        os.chmod(folder / name, _file_mode())
        _fsync(folder / name)
        record = {"file": name, "epoch": epoch, "val_elbo": val_elbo, "sha256": _sha256(folder / name)}
        _atomic_write_text(folder / "best.json", json.dumps(record, indent=1) + "\n")
        for old in folder.glob("model-*.safetensors"):
            if old.name != name:
                old.unlink()

    def best(self) -> dict | None:
        """best.json of checkpoints/best/ (the file, epoch, validation ELBO, SHA-256), or None."""
        path = self.checkpoints / BEST / "best.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{path} is damaged ({e}); the run directory was altered") from None

    def load_best_weights(self) -> dict[str, torch.Tensor]:
        """The weights of the best validation epoch, their SHA-256 verified."""
        best = self.best()
        if best is None:
            raise RunError(f"{self.path} has no best checkpoint: it is kept by runs trained with a validation "
                           "split (--validation 10000); use the run's newest weights (drop @best)")
        path = self.checkpoints / BEST / best["file"]
        if not path.is_file() or _sha256(path) != best["sha256"]:
            raise RunError(f"best checkpoint file {path} is missing or damaged (its SHA-256 differs from the one "
                           "recorded when it was written)")
        return _load_tensors(path)

    def load_weights(self, fall_back: bool = False) -> dict[str, torch.Tensor]:
        """The model weights of the newest checkpoint, its checksums verified (all that generation
        and evaluation need); with `fall_back`, of the newest intact one; or a shipped model's."""
        if self.packaged_weights.is_file() and not self.checkpoints.is_dir():
            return _load_tensors(self.packaged_weights)
        path = self._newest(fall_back)
        return _load_tensors(path / "model.safetensors")

    def _newest(self, fall_back: bool = False) -> Path:
        path, _ = self.find_checkpoint(fall_back)
        if path is None:
            raise RunError(f"{self.path} has no checkpoint yet; train it first (`vaekit train --resume {self.path}`)")
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


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """model.load_state_dict, with a one-line RunError when the weights belong to another model."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RunError(f"the weights in {source} do not fit its config.json ({first}); "
                       "the checkpoint belongs to another model") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise RunError(f"{path} is missing or not a safetensors file ({e}); the run directory is damaged") from None


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _file_mode() -> int:
    """The mode open() gives a new file here (0666 less the umask): that of the run's other files."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    """Writes `path` whole or not at all, durably (the rename is synced too)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def load_model(path: str | Path, device: str = "auto", precision: str = "auto", fall_back: bool = False,
               prepared: bool = True):
    """The model of a run directory with its newest weights (with `fall_back`, the newest intact
    ones when newer ones are damaged; RUN@best: its best validation epoch's), ready for inference on `device` in `precision` (auto: bf16
    where the hardware runs it natively, as in training; see models/inference.py). With
    `prepared=False`, the model as training builds it (plain parameters, e.g. to export it).
    Returns (model, config, runtime)."""
    from .distributed import setup
    from .models import build_model
    from .models.inference import prepare_for_inference

    run = Run.open(path)
    config = run.config()
    runtime = setup(device, precision)
    model = build_model(config.model)
    load_weights_into(model, run.load_best_weights() if is_best(path) else run.load_weights(fall_back), run.path)
    if not prepared:
        return model.to(runtime.device, memory_format=torch.channels_last).eval(), config, runtime
    return prepare_for_inference(model, runtime), config, runtime
