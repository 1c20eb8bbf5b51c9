"""A run's checkpoints (RUN/checkpoints/, see runs.py for the whole directory): written whole or
not at all with the SHA-256 of each file, pruned, found again (the newest intact one), verified,
set aside when damaged, and loaded; and the best validation epoch's weights. Weights, optimizer
and generator states are safetensors; never pickle.

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
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import RunError
from .files import atomic_write_text, file_mode, fsync, load_tensors, move_aside, sha256

CHECKPOINT_NAME = re.compile(r"(epoch_\d{4,}|step_\d{8,})")
CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
CHECKSUMS = "SHA256SUMS"   # written last into each checkpoint; `sha256sum -c SHA256SUMS` checks it too
SET_ASIDE = "set-aside"    # damaged checkpoints a --fall-back resume moved away
BEST_FOLDER = "best"       # the best validation epoch's weights


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


class CheckpointStore:
    """The checkpoints of the run in directory `run` (RUN/checkpoints/), or the weights alone of a
    model shipped with vaekit (RUN/model.safetensors, no checkpoints/; see vaekit.pretrained)."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.path = run / "checkpoints"
        self.shipped_weights = run / "model.safetensors"

    # -- writing ---------------------------------------------------------------------------
    def save(self, ckpt: Checkpoint, keep: int, keep_every: int = 0) -> Path:
        """Writes a complete checkpoint directory, then moves `latest` to it; both steps atomic,
        so a crash at any point leaves the previous checkpoint as `latest`. Then keeps the newest
        `keep` epoch checkpoints, and every `keep_every`'th epoch's (0: none). The caller holds the run's lock, so any `.tmp-*` directory is a
        crashed write's leftover."""
        name = ckpt.progress.checkpoint_name
        final = self.path / name
        tmp = self.path / f".tmp-{name}"
        opt_tensors, opt_meta = _flatten_optimizer(ckpt.optimizer)
        state = {**vars(ckpt.progress), "step_losses": ckpt.step_losses, "optimizer": opt_meta}
        try:
            for leftover in self.path.glob(".tmp-*"):
                shutil.rmtree(leftover)
            tmp.mkdir(parents=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in ckpt.model.items()}, str(tmp / "model.safetensors"))
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            save_file({k: v.cpu().contiguous() for k, v in ckpt.rng.items()}, str(tmp / "rng.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            # hashed from the disk, so the sums vouch for what was written
            (tmp / CHECKSUMS).write_text("".join(f"{sha256(tmp / f)}  {f}\n" for f in CHECKPOINT_FILES))
            for f in tmp.iterdir():
                os.chmod(f, file_mode())   # safetensors writes 0600; a run's files share one mode
                fsync(f)
            fsync(tmp)
            if final.exists():   # not written by this process (a resume starts after the newest intact one)
                self.set_aside(final)
            os.rename(tmp, final)
            fsync(self.path)
            atomic_write_text(self.path / "latest", name + "\n")
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            previous = self.latest()
            kept = f"the last checkpoint, {previous.name}, is intact" if previous else "no checkpoint was written yet"
            raise RunError(f"cannot write a checkpoint in {self.path}: {reason}; free disk space or fix "
                           f"permissions, then `vaekit train --resume {self.run}` ({kept})") from None
        self._prune(keep, keep_every, latest=name)
        return final

    def _prune(self, keep: int, keep_every: int, latest: str) -> None:
        """Keeps the newest `keep` epoch checkpoints and every `keep_every`'th, and of the
        within-epoch ones only `latest`."""
        epochs = self._epoch_dirs()
        steps = [p for p in self.path.glob("step_*") if p.is_dir() and p.name != latest]
        kept = {p for p in epochs if keep_every and _epoch_of(p) % keep_every == 0}
        for old in [p for p in epochs[:-keep] if p not in kept] + steps:
            shutil.rmtree(old, ignore_errors=True)

    def set_aside(self, path: Path) -> Path:
        """Moves checkpoint `path` into checkpoints/set-aside/ (renamed, never deleted)."""
        aside = self.path / SET_ASIDE
        aside.mkdir(exist_ok=True)
        return move_aside(path, aside / path.name)

    def save_best(self, weights: dict[str, torch.Tensor], epoch: int, val_elbo: float) -> None:
        """Keeps `weights` as the best epoch's: the file first, then best.json naming it (atomic), then
        the older file goes; a crash at any point leaves a best.json whose file is there and intact."""
        folder = self.path / BEST_FOLDER
        folder.mkdir(exist_ok=True)
        name = f"model-epoch_{epoch:04d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / name))
        os.chmod(folder / name, file_mode())
        fsync(folder / name)
        record = {"file": name, "epoch": epoch, "val_elbo": val_elbo, "sha256": sha256(folder / name)}
        atomic_write_text(folder / "best.json", json.dumps(record, indent=1) + "\n")
        for old in folder.glob("model-*.safetensors"):
            if old.name != name:
                old.unlink()

    # -- finding and checking --------------------------------------------------------------
    def dirs(self) -> list[Path]:
        """Every checkpoint directory, complete or not, newest first: by the step its state.json
        records (an epoch's end after a step checkpoint of the same step); a checkpoint whose
        state cannot be read counts as the newest of its kind, so it is never passed over unseen."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()]

        def newness(path: Path) -> tuple:
            try:
                step = int(json.loads((path / "state.json").read_text())["step"])
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
                step = int(path.name[5:]) if path.name.startswith("step_") else float("inf")
            return step, path.name.startswith("epoch_"), path.name

        return sorted(found, key=newness, reverse=True)

    def verify(self, path: Path) -> None:
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
            if sha256(path / f) != recorded[f]:
                raise RunError(f"checkpoint file {path / f} is damaged (its SHA-256 differs from the one "
                               "recorded when it was written)")

    def find(self, fall_back: bool = False) -> tuple[Path | None, list[Path]]:
        """(the checkpoint to go on from, the damaged ones newer than it). That is the newest one
        whose files verify, whatever `latest` says, when it is also the newest there is; when a
        newer one is damaged, RunError naming its file, unless `fall_back` asks for the newest
        intact one. (None, []) when the run has no checkpoint."""
        damaged = []
        for path in self.dirs():
            try:
                self.verify(path)
            except RunError as e:
                if not damaged:
                    first_error = str(e)
                damaged.append(path)
                continue
            if damaged and not fall_back:
                raise RunError(f"{first_error}; `vaekit train --resume {self.run} --fall-back` goes on from the "
                               f"newest intact checkpoint, {path.name}, and moves the damaged one to "
                               f"{self.path / SET_ASIDE}") from None
            return path, damaged
        if damaged:
            raise RunError(f"{first_error}, and no checkpoint of {self.run} is intact; start a new run") from None
        return None, []

    def latest(self) -> Path | None:
        """The checkpoint `latest` names (what the last writer committed last)."""
        pointer = self.path / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text(errors="replace").strip()
        if not CHECKPOINT_NAME.fullmatch(name):
            raise RunError(f"{pointer} holds {name[:40]!r}, not a checkpoint name; the run directory was altered")
        path = self.path / name
        if not path.is_dir():
            raise RunError(f"{pointer} names {path.name}, which is missing; the run directory was altered by hand")
        return path

    def _newest(self, fall_back: bool = False) -> Path:
        path, _ = self.find(fall_back)
        if path is None:
            raise RunError(f"{self.run} has no checkpoint yet; train it first (`vaekit train --resume {self.run}`)")
        return path

    # -- loading ---------------------------------------------------------------------------
    def load(self, path: Path | None = None) -> Checkpoint:
        """Checkpoint `path` (default: the newest intact one), its checksums verified."""
        path = path or self._newest()
        self.verify(path)
        try:
            state = json.loads((path / "state.json").read_text())
            progress = Progress(*(int(state[k]) for k in ("epoch", "batch", "step")))
            step_losses = [float(v) for v in state["step_losses"]]
            if min(vars(progress).values()) < 0 or len(step_losses) != progress.batch:
                raise ValueError(f"inconsistent progress {vars(progress)} with {len(step_losses)} step losses")
            model = load_tensors(path / "model.safetensors")
            optimizer = _unflatten_optimizer(load_tensors(path / "optimizer.safetensors"), state["optimizer"])
            rng = load_tensors(path / "rng.safetensors")
            return Checkpoint(progress, model, optimizer, rng, step_losses)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as e:
            raise RunError(f"checkpoint {path} is damaged ({type(e).__name__}: {e}), though its checksums hold: it "
                           f"was altered after it was written; restore it, or move it out of {self.path} "
                           "to go on from an older one") from None

    def weights_file(self, best: bool = False, fall_back: bool = False, epoch: int | None = None) -> Path:
        """The model weights file that generation and evaluation read, verified: the newest
        checkpoint's (with `fall_back`, the newest intact one's), the best validation epoch's
        (`best`), epoch `epoch`'s checkpoint's, or a shipped model's."""
        if best:
            return self._best_weights_file()
        if epoch is not None:
            return self._epoch_weights_file(epoch)
        if self.shipped_weights.is_file() and not self.path.is_dir():
            return self.shipped_weights
        return self._newest(fall_back) / "model.safetensors"

    def best(self) -> dict | None:
        """best.json of checkpoints/best/ (the file, epoch, validation ELBO, SHA-256), or None."""
        path = self.path / BEST_FOLDER / "best.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{path} is damaged ({e}); the run directory was altered") from None

    def _epoch_dirs(self) -> list[Path]:
        """The epoch checkpoints' directories (epoch_NNNN), oldest first."""
        return sorted(p for p in self.path.glob("epoch_*") if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir())

    def _epoch_weights_file(self, epoch: int) -> Path:
        path = self.path / f"epoch_{epoch:04d}"
        if not path.is_dir():
            kept = ", ".join(str(_epoch_of(p)) for p in self._epoch_dirs()) or "none"
            raise RunError(f"{self.run} keeps no checkpoint of epoch {epoch} (it keeps epochs: {kept}); "
                           "`vaekit train --keep-every N` keeps every Nth epoch's")
        self.verify(path)
        return path / "model.safetensors"

    def _best_weights_file(self) -> Path:
        best = self.best()
        if best is None:
            raise RunError(f"{self.run} has no best checkpoint: it is kept by runs trained with a validation "
                           "split (--validation 10000); use the run's newest weights (drop @best)")
        path = self.path / BEST_FOLDER / best["file"]
        if not path.is_file() or sha256(path) != best["sha256"]:
            raise RunError(f"best checkpoint file {path} is missing or damaged (its SHA-256 differs from the one "
                           "recorded when it was written)")
        return path


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """model.load_state_dict, with a one-line RunError when the weights belong to another model."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RunError(f"the weights in {source} do not fit its config.json ({first}); "
                       "the checkpoint belongs to another model") from None


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


def _epoch_of(path: Path) -> int:
    """The epoch of an epoch checkpoint's directory, epoch_NNNN."""
    return int(path.name[len("epoch_"):])
