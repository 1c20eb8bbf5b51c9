"""The run directory: the unit a user keeps. Data only, never code, never pickle.

RUN/
  config.json                  the Config that made it
  metrics.jsonl                one JSON object per epoch
  fixed_z.safetensors          the 16 codes decoded into every progress grid
  images/image_at_epoch_NNNN.png
  training.gif
  checkpoints/epoch_NNNN/      model.safetensors, optimizer.safetensors, rng.safetensors, state.json
  checkpoints/latest           the name of the newest complete checkpoint
  .lock                        held (flock) by the one training process writing here
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError


class RunError(Exception):
    """A run directory or checkpoint that cannot be used; the message says which and what to do."""


@dataclass
class Checkpoint:
    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict            # a torch optimizer state_dict
    rng: dict[str, torch.Tensor]


class Run:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.images = self.path / "images"
        self.checkpoints = self.path / "checkpoints"
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.fixed_z_path = self.path / "fixed_z.safetensors"
        self.gif_path = self.path / "training.gif"
        self._lock_file = None

    # -- creating and opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: Config) -> "Run":
        run = cls(path)
        if run.path.exists() and any(run.path.iterdir()):
            raise RunError(f"{run.path} already exists and is not empty: resume it with "
                           f"`vaekit train --resume {run.path}` or choose another --out")
        try:
            run.images.mkdir(parents=True, exist_ok=True)
            run.checkpoints.mkdir(exist_ok=True)
            config.save(run.config_path)
        except OSError as e:
            raise RunError(f"cannot write the run directory {run.path}: {e.strerror}; choose a writable --out") from None
        return run

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        run = cls(path)
        if not run.config_path.is_file():
            raise RunError(f"{run.path} is not a vaekit run directory (no config.json); "
                           "pass the folder `vaekit train` made")
        return run

    def config(self) -> Config:
        try:
            return Config.load(self.config_path)
        except ConfigError as e:
            raise RunError(str(e)) from None

    def lock(self) -> None:
        """Refuses a second training process on this run (the lock dies with its process)."""
        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RunError(f"{self.path} is being trained by pid {owner}; wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- metrics and images ---------------------------------------------------------------
    def image_path(self, epoch: int) -> Path:
        return self.images / f"image_at_epoch_{epoch:04d}.png"

    def metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

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

    def fixed_z(self) -> torch.Tensor:
        return _load_tensors(self.fixed_z_path)["z"]

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, ckpt: Checkpoint, keep: int) -> Path:
        """Writes a complete checkpoint directory, then moves `latest` to it; both steps atomic,
        so a crash at any point leaves the previous checkpoint as `latest`."""
        name = f"epoch_{ckpt.epoch:04d}"
        final = self.checkpoints / name
        tmp = self.checkpoints / f".tmp-{name}-{os.getpid()}"
        opt_tensors, opt_meta = _flatten_optimizer(ckpt.optimizer)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in ckpt.model.items()}, str(tmp / "model.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            save_file({k: v.cpu().contiguous() for k, v in ckpt.rng.items()}, str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"epoch": ckpt.epoch, "step": ckpt.step,
                                                        "optimizer": opt_meta}, indent=1))
            for f in tmp.iterdir():
                _fsync(f)
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.checkpoints)
            _atomic_write_text(self.checkpoints / "latest", name + "\n")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunError(f"cannot write a checkpoint in {self.checkpoints}: {e.strerror}; "
                           "free disk space or fix permissions, then resume (the previous checkpoint is intact)") from None
        self._prune(keep)
        return final

    def _prune(self, keep: int) -> None:
        complete = sorted(p for p in self.checkpoints.glob("epoch_*") if p.is_dir())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.exists():
            return None
        path = self.checkpoints / pointer.read_text().strip()
        if not path.is_dir():
            raise RunError(f"{pointer} names {path.name}, which is missing; the run directory was altered by hand")
        return path

    def load_checkpoint(self, path: Path | None = None) -> Checkpoint:
        path = path or self.latest_checkpoint()
        if path is None:
            raise RunError(f"{self.path} has no checkpoint yet; train it first (`vaekit train --out {self.path}`)")
        try:
            state = json.loads((path / "state.json").read_text())
            model = _load_tensors(path / "model.safetensors")
            optimizer = _unflatten_optimizer(_load_tensors(path / "optimizer.safetensors"), state["optimizer"])
            rng = _load_tensors(path / "rng.safetensors")
            return Checkpoint(int(state["epoch"]), int(state["step"]), model, optimizer, rng)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RunError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); "
                           "delete it and its `latest` entry to fall back to an older one") from None

    def load_weights(self) -> dict[str, torch.Tensor]:
        """The newest checkpoint's model weights (all that generation and evaluation need)."""
        path = self.latest_checkpoint()
        if path is None:
            raise RunError(f"{self.path} has no checkpoint yet; train it first (`vaekit train --out {self.path}`)")
        return _load_tensors(path / "model.safetensors")


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_model(path: str | Path, device: str = "auto"):
    """The model of a run directory with its newest weights, ready for inference on `device`.
    Returns (model, config, runtime)."""
    from .distributed import setup
    from .models import build_model

    run = Run.open(path)
    config = run.config()
    runtime = setup(device, "fp32")
    model = build_model(config.model)
    try:
        model.load_state_dict(run.load_weights())
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RunError(f"the weights in {run.path} do not fit its config.json ({first}); "
                       "the checkpoint belongs to another model") from None
    return model.to(runtime.device, memory_format=torch.channels_last).eval(), config, runtime
