"""The run directory: the unit a user keeps. Data only, never code, never pickle.

RUN/
  config.json                  the Config that made it
  metrics.jsonl                one JSON object per epoch
  metrics.jsonl.before-restart the lines of a training resumed without a checkpoint (from epoch 1)
  fixed_z.safetensors          the 16 codes decoded into every progress grid
  data.json                    the data it was trained on: split sizes, SHA-256 (data.fingerprint)
  images/image_at_epoch_NNNN.png
  training.gif
  checkpoints/                 epoch and step checkpoints, `latest`, set-aside/, best/ (checkpoints.py)
  samples/                     the pictures the generation commands write (Run.samples_path)
  best/, epoch_NNNN/           what commands make of RUN@best and RUN@epoch_N (their samples/, eval.json)
  eval.json                    what `vaekit eval` measured, one entry per protocol (Run.save_eval)
  eval-partial/KEY.safetensors the IWAE bounds of an evaluation under way, and its lock (PartialEval)
  eval-bounds/KEY.safetensors  those of a finished one, image by image (read_bounds)
  .lock, .lock.pid             an OS file lock held by the one training process writing here; its pid
  .eval.lock                   an OS file lock held while eval.json is read, merged and replaced
  .torchrun-job                made under torchrun: the job's id, so its restarted ranks resume the run
  tensorboard/                 event files for TensorBoard (train --tensorboard)
  prior/                       the vq family's code prior (`vaekit train-prior`): config-less, with its own
                               checkpoints/, metrics.jsonl, images/ and stage.json (the first stage's weights)

No command's --out (a picture, the GIF beside it, an export) may be one of the files above that the
run keeps (KEPT: all but samples/, and of best/ and epoch_NNNN/ their eval files) or lie inside one of
its folders (check_not_kept); a file of one's own elsewhere in the run (RUN/samples/x.png) may.

This module is also the one home of the RUN syntax every command takes (parse_run_name):
  RUN              the run directory: its newest intact checkpoint's weights
  RUN@best         its best validation epoch's weights (checkpoints/best/); commands write what they
                   make of it under RUN/best
  RUN@epoch_N      the weights of its epoch N checkpoint, while the run keeps it (the newest
                   --keep-checkpoints ones, and every --keep-every'th); commands write under RUN/epoch_NNNN
  pretrained:NAME  a model shipped in vaekit/pretrained: a run reduced to config.json, metrics.jsonl
                   and model.safetensors (no checkpoints/), read-only, so commands write under
                   ./pretrained-NAME
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import pretrained
from .checkpoints import CheckpointStore
from .config import Config
from .errors import ConfigError, DataError, Interrupted, RunError, handling
from .files import atomic_write_text, load_tensors, move_aside, replacing

BEST_SUFFIX = "@best"              # RUN@best: the run's best validation epoch
BEST_OUT = "best"                  # where commands write what they make of RUN@best: RUN/best
EPOCH_SUFFIX = re.compile(r"@epoch_(\d+)$")   # RUN@epoch_N: the weights of a kept epoch checkpoint (RUN/epoch_NNNN)
PRETRAINED_PREFIX = "pretrained:"  # pretrained:NAME: a model shipped with vaekit
EVAL_FILE = "eval.json"
EVAL_LOCK = ".eval.lock"           # beside eval.json, held while it is read, merged and replaced
EVAL_LOCK_SECONDS = 600            # how long a `vaekit eval` waits for another one saving its entry
PARTIAL_EVALS = "eval-partial"     # the bounds of evaluations under way (PartialEval)
EVAL_BOUNDS = "eval-bounds"        # the per-image bounds of finished ones (PartialEval.done)
PARTIAL_SAVE_SECONDS = 60.0        # how often an evaluation under way saves them: a kill loses at most this


PRIOR_FOLDER = "prior"             # the vq family's code prior, trained second (vaekit train-prior)
STAGE_FILE = "stage.json"        # in RUN/prior/: which first-stage weights the prior was fitted to
JOB_FILE = ".torchrun-job"         # the id of the torchrun job that made the run (Run.made_by)

# What a run keeps (the layout above), by name in the run directory: no command's --out may take the
# place of one of them or go inside one (check_not_kept). samples/, onnx/, curves.png are the commands' own.
EVAL_FILES = (EVAL_FILE, EVAL_FILE + ".unreadable", EVAL_LOCK, PARTIAL_EVALS, EVAL_BOUNDS)  # also in best/, epoch_NNNN/
METRICS_ASIDE = "metrics.jsonl.before-restart"   # a resume without a checkpoint keeps the old lines here
KEPT = frozenset({"config.json", "metrics.jsonl", METRICS_ASIDE, "fixed_z.safetensors", "data.json", "images",
                  "training.gif", "checkpoints", ".lock", ".lock.pid", JOB_FILE, "tensorboard", PRIOR_FOLDER,
                  *EVAL_FILES})
SET_ASIDE_COPY = re.compile(r"\.\d+$")   # files.move_aside's later copies: eval.json.unreadable.2, ...
OUT_FOLDER = re.compile(rf"{BEST_OUT}|epoch_\d{{4,}}")   # RunName.out's folders for RUN@best, RUN@epoch_N


@dataclass(frozen=True)
class RunName:
    """A RUN argument, parsed once (parse_run_name): `text` as the command was given it, `path` the
    directory to read, `best` whether it names the best validation epoch's weights (RUN@best),
    `epoch` the epoch whose checkpoint's weights it names (RUN@epoch_N, else None), `shipped` the
    NAME of pretrained:NAME (else None)."""
    text: str
    path: Path
    best: bool = False
    shipped: str | None = None
    epoch: int | None = None
    at_checkpoint: str | None = None    # the suffix naming weights other than the newest: "@best", "@epoch_N"

    @property
    def out(self) -> Path:
        """Where commands write what they make of the run (samples/, eval.json, onnx/): the run
        directory; RUN/best for RUN@best; ./pretrained-NAME for a shipped model (read-only)."""
        if self.shipped is not None:
            return Path("pretrained-" + self.shipped)
        if self.epoch is not None:
            return self.path / f"epoch_{self.epoch:04d}"
        return self.path / BEST_OUT if self.best else self.path


def parse_run_name(text: str | Path) -> RunName:
    """RUN, RUN@best, RUN@epoch_N or pretrained:NAME as a RunName; RunError naming the shipped
    models when NAME is not one of them."""
    text = str(text)
    if (Path(text) / "config.json").is_file():            # a run whose own folder name ends like a suffix
        return RunName(text, Path(text))
    if text.endswith(BEST_SUFFIX):
        return RunName(text, Path(text[:-len(BEST_SUFFIX)]), best=True, at_checkpoint=BEST_SUFFIX)
    if epoch := EPOCH_SUFFIX.search(text):
        return RunName(text, Path(text[:epoch.start()]), epoch=int(epoch.group(1)), at_checkpoint=epoch.group(0))
    if text.startswith(PRETRAINED_PREFIX):
        name = text[len(PRETRAINED_PREFIX):]
        if name not in pretrained.names():
            shipped = ", ".join(PRETRAINED_PREFIX + n for n in pretrained.names()) or "none"
            raise RunError(f"{text} is not a model shipped with vaekit (shipped: {shipped}); pass one of them "
                           "or a run directory")
        return RunName(text, pretrained.FOLDER / name, shipped=name)
    return RunName(text, Path(text))


def holds_a_run(folder: Path) -> bool:
    """Whether `folder` is a run directory `vaekit train` made: its checkpoints/ and a config.json of
    vaekit's sections, not another tool's project folder that has a config.json and checkpoints/ too."""
    if not (folder / "checkpoints").is_dir():
        return False
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"data", "model", "train"} <= saved.keys()


def kept_file(path: str | Path) -> tuple[Path, Path] | None:
    """(the run directory, the kept file or folder) when `path` is one of the files a run keeps
    (KEPT: its config.json, images/, training.gif, checkpoints/, eval.json, ...) or lies inside one
    of its kept folders; None for any other path, a new file of one's own inside a run
    (RUN/samples/x.png) among them."""
    path = Path(os.path.abspath(path))
    for run in path.parents:
        if not holds_a_run(run):
            continue
        parts = path.relative_to(run).parts
        if SET_ASIDE_COPY.sub("", parts[0]) in KEPT:
            return run, run / parts[0]
        if OUT_FOLDER.fullmatch(parts[0]) and len(parts) > 1 and SET_ASIDE_COPY.sub("", parts[1]) in EVAL_FILES:
            return run, run / parts[0] / parts[1]
    return None


def check_not_kept(out: str | Path, *beside: Path, instead=None) -> None:
    """RunError unless the --out `out`, and each file a command writes `beside` it (a GIF), is none
    of the files a run keeps (kept_file): a command's output never writes over a run's own.
    `instead(run)`: the place to suggest in that run (default: its samples/ folder)."""
    for path in (Path(out), *beside):
        if found := kept_file(path):
            run, kept = found
            inside = "" if Path(os.path.abspath(path)) == kept else f", inside {kept},"
            what = f"{inside} is" if path == Path(out) else f" would write {path} beside it{inside or ','}"
            suggested = instead(run) if instead else Run(run).samples_path(Path(out).name)
            raise RunError(f"--out {out}{what} part of the run {run}, which no command writes over; choose another "
                           f"--out, such as {suggested}")


class Run:
    """The run in directory `path` (a new one, or one opened by name: Run.open). `name` is how a
    command named it (a RunName; default: the path itself): `out` is where commands write what they
    make of it, `best` says to read the best validation epoch's weights."""

    def __init__(self, path: str | Path, name: RunName | None = None) -> None:
        self.path = Path(path)
        self.name = name or RunName(str(path), self.path)
        self.out = self.name.out
        self.best = self.name.best
        self.epoch = self.name.epoch
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

    @property
    def prior_stage(self) -> "Run":
        """The vq family's second stage, RUN/prior/: its own checkpoints/, metrics.jsonl, images/
        and stage.json (`vaekit train-prior`, vaekit/train_prior.py)."""
        return Run(self.path / PRIOR_FOLDER)

    def stage_record(self) -> dict | None:
        """RUN/prior/stage.json: the SHA-256 of the first stage's weights the prior was fitted to,
        and the prior's epochs; None when the run has no prior yet."""
        path = self.prior_stage.path / STAGE_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise RunError(f"{path} is damaged ({e}); the run directory was altered") from None

    def save_stage_record(self, first_stage_sha256: str, epochs: int) -> None:
        atomic_write_text(self.prior_stage.path / STAGE_FILE,
                          json.dumps({"first_stage_sha256": first_stage_sha256, "epochs": epochs}, indent=1) + "\n")

    # -- creating and opening -------------------------------------------------------------
    def check_new(self) -> None:
        """Raises RunError unless `path` is free for a new run (missing, or an empty folder), is not
        inside another run (whose commands would then trip over it), and can be made: checked by
        making a file in the nearest folder that exists, as permission bits say nothing for root or a
        read-only mount."""
        if self.path.is_file():
            raise RunError(f"{self.path} is a file, not a folder; choose a new folder for --out")
        if self.path.is_dir() and (self.path / "config.json").is_file():
            raise RunError(f"{self.path} already holds a run: resume it with `vaekit train --resume {self.path}` "
                           "or choose another --out")
        for parent in self.path.absolute().parents:
            if holds_a_run(parent):
                raise RunError(f"{self.path} is inside the run {parent}; choose an --out outside it")
        if self.path.exists() and any(self.path.iterdir()):
            raise RunError(f"{self.path} already exists and is not empty; choose a new or empty folder for --out")
        nearest = self.path.absolute()
        while not nearest.exists():
            nearest = nearest.parent
        try:
            if not nearest.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            tempfile.TemporaryFile(dir=nearest).close()
        except OSError as e:
            raise RunError(f"cannot write the run directory {self.path}: {e.strerror}; choose a writable --out") from None

    def make(self, config: Config, data: dict | None = None, job: str | None = None) -> None:
        """Makes the run directory with its config.json (and `data`, the fingerprint of its data,
        as data.json; `job`, the torchrun job making it, as .torchrun-job before config.json, see
        made_by). Training calls this only once the data and the model are known good, so a start
        that fails on them leaves nothing behind."""
        self.check_new()
        made_folder = not self.path.exists()
        try:
            self.images.mkdir(parents=True, exist_ok=True)
            self.created = "folder" if made_folder else "contents"
            self.checkpoints.path.mkdir(exist_ok=True)
            if job is not None:
                atomic_write_text(self.path / JOB_FILE, job)
            self.save_config(config)
            if data is not None:
                atomic_write_text(self.data_path, json.dumps(data, indent=1) + "\n")
        except OSError as e:
            raise RunError(f"cannot write the run directory {self.path}: {e.strerror}; choose a writable --out") from None

    def made_by(self, job: str | None) -> bool:
        """Whether torchrun job `job` (distributed.restartable_job) made this run: its restarted
        ranks then go on with it rather than being refused it."""
        try:
            return job is not None and (self.path / JOB_FILE).read_text() == job and self.config_path.is_file()
        except OSError:
            return False

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

    def check_data(self, found: dict, where: str) -> None:
        """DataError unless `found` (data.fingerprint of the data in `where`) is the data the run was
        trained on, as data.json recorded it: a resume, an evaluation or a generation command on
        other data would mix or mislabel results."""
        trained = self.data_fingerprint()
        if trained is not None and found != trained:
            raise DataError(f"{where} does not hold the data {self.path} was trained on ({found['train']}/"
                            f"{found['test']} train/test images of SHA-256 {found['sha256'][:12]}, not "
                            f"{trained['train']}/{trained['test']} of {trained['sha256'][:12]}); pass --data-dir "
                            "the folder it was trained on")

    @classmethod
    def open(cls, run: str | Path | RunName) -> "Run":
        """The run RUN, RUN@best, RUN@epoch_N or pretrained:NAME (see parse_run_name)."""
        name = run if isinstance(run, RunName) else parse_run_name(run)
        run = cls(name.path, name)
        if not run.config_path.is_file():
            before, at, after = name.text.rpartition("@")
            if at and (Path(before) / "config.json").is_file():     # RUN@ a name that is no checkpoint's
                raise RunError(f"'@{after}' is not a checkpoint name of the run {before}: pass {before} (its newest "
                               f"weights), {before}{BEST_SUFFIX} or {before}@epoch_N")
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

    def set_metrics_aside(self) -> Path | None:
        """metrics.jsonl, when it has lines, moved to METRICS_ASIDE (.2, .3, ... when taken); where it went."""
        if not self.metrics():
            return None
        return move_aside(self.metrics_path, self.path / METRICS_ASIDE)

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drops lines written after the checkpoint being resumed (a crash can leave them)."""
        kept = [m for m in self.metrics() if m["epoch"] <= last_epoch]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def save_fixed_z(self, z: torch.Tensor) -> None:
        with replacing(self.fixed_z_path) as tmp:
            save_file({"z": z.detach().cpu().contiguous()}, str(tmp))

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
        """Keeps `record` (what `vaekit eval` measured, with the fingerprint of the data it scored as
        "data") in eval.json under its protocol's key (eval_key), beside the other protocols' entries,
        replacing that protocol's older one. The file is read,
        merged and replaced whole (atomic) under a lock of its own (.eval.lock), so evaluations
        saving at once keep every entry. A damaged file is kept beside it as eval.json.unreadable,
        never overwritten; entries an older vaekit keyed otherwise take their key."""
        path = self.eval_path
        try:
            with FileLock(path.with_name(EVAL_LOCK), timeout=EVAL_LOCK_SECONDS):
                entries = self._eval_entries()
                entries[eval_key(record)] = record
                atomic_write_text(path, json.dumps(entries, indent=1) + "\n")
        except Timeout:
            raise RunError(f"cannot write {path}: another process held its lock for {EVAL_LOCK_SECONDS} s; "
                           "the result is not saved") from None
        except OSError as e:
            raise RunError(f"cannot write {path}: {e.strerror}; the result is not saved") from None
        return path

    def _eval_entries(self) -> dict:
        """eval.json's entries by eval_key; a damaged file is moved aside (eval.json.unreadable)."""
        path = self.eval_path
        try:
            saved = json.loads(path.read_text()) if path.exists() else {}
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            move_aside(path, path.with_name(path.name + ".unreadable"))   # an earlier one kept too
            return {}
        return {_stored_key(key, entry): entry for key, entry in saved.items()}


def eval_key(record: dict) -> str:
    """The key of an evaluation's entry in eval.json: its protocol and precision,
    BINARIZATION_kK_nN_seedS_PRECISION (e.g. dynamic_k5000_n10000_seed0_bf16), so that evaluations
    with another K, on fewer images, with another seed (another draw of z, and of the binarization
    when dynamic) or in another precision (bf16's offset against fp32 on the same draws) sit beside
    it. An entry an older vaekit saved without its precision keeps the key without it."""
    key = f"{record['binarization']}_k{record['k']}_n{record['n']}_seed{record['seed']}"
    return f"{key}_{record['precision']}" if "precision" in record else key


def _stored_key(key: str, entry) -> str:
    """The key of an entry read from eval.json: eval_key, for those an older vaekit stored under
    BINARIZATION, BINARIZATION_nN or BINARIZATION_kK_nN (an entry without its seed was seed 0's,
    the default); `key` as it is for an entry that does not say its protocol."""
    try:
        return eval_key({"seed": 0, **entry})
    except (KeyError, TypeError):
        return key


class PartialEval:
    """The IWAE bounds an evaluation under way has scored, so that one of hours, stopped (killed, a
    sitting's end, a full disk), goes on where it stopped: RUN/eval-partial/KEY.safetensors (KEY:
    eval_key), the bounds of the first M test images in order with the seconds spent on them,
    replaced whole every PARTIAL_SAVE_SECONDS and when an exception (Ctrl-C) stops the evaluation
    (a kill -9 loses at most PARTIAL_SAVE_SECONDS of work). SIGTERM, what `kill`, a scheduler or a
    sitting's end sends (a job a script starts with `&` ignores SIGINT), is made such an exception:
    errors.Interrupted, raised once the bounds are kept.
    Image i's importance draws depend on the seed and i alone (evaluate._image_noise), so the
    bounds a resumed evaluation adds are those one sitting would have computed. Saved bounds are
    used only by an evaluation of the same protocol (KEY), weights and data (`identity`); others
    start over. Used as a context manager it holds an OS lock beside the file, so one evaluation
    of a protocol runs on a run at a time; `done`, once eval.json holds the result, moves the bounds
    to RUN/eval-bounds/KEY.safetensors, where two protocols that scored the same images and draws
    (bf16 and fp32, say) can be compared image by image (read_bounds)."""

    def __init__(self, run: Run, key: str, identity: dict, log=lambda line: None) -> None:
        self.path = run.out / PARTIAL_EVALS / f"{key}.safetensors"
        self.log = log
        self.identity = json.dumps(identity, sort_keys=True)
        self.scored: list[torch.Tensor] = []
        self.unsaved = False                     # bounds added since the last save
        self.seconds_before = 0.0
        self.sittings = 1
        self.started = self.saved = time.perf_counter()
        self._lock = FileLock(self.path.with_suffix(".lock"))
        # SIGTERM stops the evaluation as Ctrl-C does, unless the process was told to ignore it
        self._sigterm = handling([s for s in [signal.SIGTERM] if signal.getsignal(s) != signal.SIG_IGN], self._stop)

    def __enter__(self) -> "PartialEval":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except Timeout:
            raise RunError(f"another `vaekit eval` of this protocol is running on {self.path.parent.parent} (it "
                           f"holds {self._lock.lock_file}): wait for it to end, or evaluate with another --seed") from None
        except OSError as e:
            raise RunError(f"cannot write {self.path.parent}: {e.strerror}; fix its permissions") from None
        self._sigterm.__enter__()
        return self

    def _stop(self, signum: int, frame) -> None:
        """SIGTERM: stop where the evaluation is, as Ctrl-C does (__exit__ keeps the bounds); a second
        one ends the process at once."""
        signal.signal(signum, signal.SIG_DFL)
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}")

    def __exit__(self, error_type, error, _) -> None:
        """Releases the lock and SIGTERM; an evaluation stopped by an exception (Ctrl-C, SIGTERM) first
        saves what it scored, and says where it is kept."""
        try:
            self._sigterm.__exit__(None, None, None)
            if error_type is not None and self.scored:
                if self.unsaved:
                    self.save()
                self.log(f"stopped: the bounds of {len(self.bounds):,} images are kept in {self.path}; the same "
                         "command goes on from there")
            elif isinstance(error, Interrupted):
                self.log(f"{error} before the first bounds were scored")
        except (OSError, SafetensorError) as e:   # the stop's own cause is what the user must see
            self.log(f"stopped: could not save the newest bounds in {self.path} ({_reason(e)}); the same command "
                     "goes on from the last save")
        finally:
            self._lock.release()

    def resume(self) -> str | None:
        """Takes up the bounds saved by an earlier sitting of this evaluation, if any: says what it
        took up (or why it starts over) in a line, None when there was nothing."""
        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta, bounds = f.metadata() or {}, f.get_tensor("bounds")
        except (OSError, SafetensorError) as e:
            return f"starting over: the saved bounds {self.path} are unreadable ({e})"
        if meta.get("identity") != self.identity:
            return f"starting over: {self.path} scored other weights or data than these"
        self.scored, self.seconds_before = [bounds], float(meta["seconds"])
        self.sittings = int(meta["sittings"]) + 1
        self.started = self.saved = time.perf_counter()
        return (f"resuming: {len(bounds):,} images scored in {self.seconds_before / 60:.1f} min before "
                f"(sitting {self.sittings}), kept in {self.path}")

    @property
    def bounds(self) -> torch.Tensor:
        """The bounds scored so far, first test image first: [M] float64."""
        return torch.cat(self.scored) if self.scored else torch.zeros(0, dtype=torch.float64)

    @property
    def seconds(self) -> float:
        """The seconds this evaluation has taken, in every sitting."""
        return self.seconds_before + time.perf_counter() - self.started

    def add(self, bounds: torch.Tensor) -> None:
        """The bounds of the next images scored; saved when PARTIAL_SAVE_SECONDS passed since the last save."""
        self.scored.append(bounds.detach().double().cpu())
        self.unsaved = True
        if time.perf_counter() - self.saved >= PARTIAL_SAVE_SECONDS:
            try:
                self.save()
            except (OSError, SafetensorError) as e:   # the evaluation goes on; only a stop would lose more
                self.saved = time.perf_counter()
                self.log(f"warning: could not keep the bounds scored so far in {self.path} ({_reason(e)}); "
                         "the evaluation goes on, but a stop now would lose them")

    def save(self) -> None:
        meta = {"identity": self.identity, "seconds": repr(self.seconds), "sittings": str(self.sittings)}
        with replacing(self.path) as tmp:
            save_file({"bounds": self.bounds.contiguous()}, str(tmp), metadata=meta)
        self.saved, self.unsaved = time.perf_counter(), False

    def done(self) -> None:
        """The result is in eval.json: the bounds, all of them, move to RUN/eval-bounds/KEY.safetensors."""
        kept = self.path.parent.parent / EVAL_BOUNDS / self.path.name
        try:
            self.save()
            kept.parent.mkdir(exist_ok=True)
            os.replace(self.path, kept)
        except (OSError, SafetensorError) as e:   # the result is saved; only the image-by-image record is lost
            self.log(f"warning: could not keep the bounds image by image in {kept} ({_reason(e)})")
            self.path.unlink(missing_ok=True)


SAME_DRAWS = ("binarization", "k", "seed", "device", "weights_sha256", "data")   # what fixes the images and draws


def bounds_on_the_same_draws(run: Run, identity: dict) -> dict[str, torch.Tensor]:
    """The kept bounds (RUN/eval-bounds/) of the finished evaluations of `run` that scored the
    images and draws an evaluation of `identity` (PartialEval's) scores, in another precision:
    {eval key: bounds [M]}, image i's bound beside image i's, so their difference is precision's alone."""
    found = {}
    for path in sorted((run.out / EVAL_BOUNDS).glob("*.safetensors")):
        try:
            bounds, other = read_bounds(path)
        except RunError:
            continue
        if other.get("precision") != identity["precision"] and all(other.get(f) == identity[f] for f in SAME_DRAWS):
            found[path.stem] = bounds
    return found


def read_bounds(path: str | Path) -> tuple[torch.Tensor, dict]:
    """A finished evaluation's bounds (RUN/eval-bounds/KEY.safetensors), first test image first,
    [N] float64, and what scored them (protocol, weights and data: PartialEval's identity)."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("bounds"), json.loads((f.metadata() or {})["identity"])
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise RunError(f"cannot read the bounds {path} ({_reason(e)}): give a file a finished `vaekit eval` kept "
                       f"in RUN/{EVAL_BOUNDS}/") from None


def _reason(error: Exception) -> str:
    """An OSError's or a safetensors write error's reason, in a few words."""
    return getattr(error, "strerror", None) or str(error)
