"""Typed configuration: one dataclass per part, defaults = the seed's recipe, saved as config.json.

The command line builds its flags from these fields (see cli.py), so a setting is declared once.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .models import ModelConfig
from .models.model_config import setting

IDX_DATASETS = ("mnist", "fashion-mnist", "kmnist")   # the IDX datasets; vaekit.data.sources holds each one's files
BINARIZATIONS = ("static", "dynamic", "none")
PRECISIONS = ("auto", "fp32", "bf16")   # what --precision takes; distributed.setup turns it into the arithmetic
LR_SCHEDULES = ("constant", "cosine")
KL_ESTIMATORS = ("sample", "analytic")
DEVICES = ("auto", "cpu", "cuda")       # what --device takes; distributed.setup turns it into the device
COMPILE_MODES = ("auto", "on", "off")    # what --compile takes; vaekit/compiling.py decides what auto means
# The largest seed: every stream vaekit derives from a seed (evaluation's (seed + 1) * 2**32 + image,
# training's seed * 1_000_003 + epoch) then stays below 2**64, what torch.Generator.manual_seed takes.
SEED_LIMIT = 2**31 - 1


def check_seed(seed: int, flag: str = "--seed") -> int:
    """`seed` if it is an integer from 0 to SEED_LIMIT, else a one-line ConfigError naming `flag`."""
    if type(seed) is not int or not 0 <= seed <= SEED_LIMIT:
        raise ConfigError(f"{flag} must be an integer from 0 to {SEED_LIMIT}; got {seed}")
    return seed


@dataclass
class DataConfig:
    dataset: str = setting("mnist", f"{', '.join(IDX_DATASETS)} (IDX files, fetched "
                           "and verified), or folder: the PNG/JPEG images under --data-dir, labelled by subfolder")
    data_dir: str | None = setting(None, "IDX files to use instead of fetching; with "
                                   "--dataset folder, the folder of images (required)")
    binarization: str = setting("static", "static: the seed's threshold pixel/255 >= 0.5; "
                                "dynamic: a Bernoulli draw with p = pixel/255 per batch; none: pixel/255 in [0, 1] "
                                "as is (8-bit likelihoods recover the integer as x*255)")
    resize: int = setting(28, "folder: the shorter side is resized to this many pixels, "
                          "then the centre square kept")
    channels: int = setting(1, "folder: 1 = grey, 3 = RGB (each image is converted)")
    test_fraction: float = setting(0.1, "folder: the share of images held out as the "
                                   "test split, chosen by a hash of each file's path")
    split_seed: int = setting(0, "folder: another seed puts other files in the test split")
    validation: int = setting(0, "hold out the last N training images as a validation split, scored every epoch "
                              "(val_elbo) for --early-stop and RUN@best; the literature's MNIST split is 10000 "
                              "(50,000 train / 10,000 validation); 0: none, the seed's")

    def __post_init__(self) -> None:
        _choice("dataset", self.dataset, (*IDX_DATASETS, FOLDER))
        _choice("binarization", self.binarization, BINARIZATIONS)
        if self.dataset == FOLDER:
            if not self.data_dir:
                raise ConfigError("dataset folder reads its images from --data-dir DIR; pass it")
        else:
            changed = [f.name for f in dataclasses.fields(self)
                       if f.name in FOLDER_SETTINGS and getattr(self, f.name) != f.default]
            if changed:
                flags = ", ".join("--" + name.replace("_", "-") for name in changed)
                verb = "applies" if len(changed) == 1 else "apply"
                raise ConfigError(f"{flags} {verb} to --dataset folder only ({self.dataset} has fixed images and "
                                  "splits); leave them out")
        if self.resize < 1:
            raise ConfigError(f"resize must be >= 1, got {self.resize}: fix --resize")
        _choice("channels", self.channels, (1, 3))
        if self.validation < 0:
            raise ConfigError(f"validation must be >= 0 images, got {self.validation}: fix --validation")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be between 0 and 1, got {self.test_fraction}: fix --test-fraction")


FOLDER = "folder"   # the dataset of the images under data_dir (vaekit.data.folders)
FOLDER_SETTINGS = ("resize", "channels", "test_fraction", "split_seed")   # DataConfig fields of folder datasets


@dataclass
class TrainConfig:
    epochs: int = setting(100, "passes over the training images (the seed's 100)")
    batch_size: int = setting(100, "images per step, over all processes (the seed's 100)")
    lr: float = setting(1e-4, "Adam's learning rate (the seed's 1e-4); the start of --lr-schedule cosine")
    adam_eps: float = setting(1e-7, "Adam's epsilon; 1e-7 is Keras's, which the seed trained with (torch's is 1e-8)")
    lr_schedule: str = setting("constant", "constant (the seed's) or cosine: from --lr down to --lr-final along half "
                               "a cosine over all the steps of --epochs")
    lr_final: float = setting(0.0, "cosine: the learning rate at the last step")
    warmup_epochs: float = setting(0.0, "KL warm-up: the weight of the rate grows linearly from 0 to --beta over this "
                                   "many epochs (Sønderby et al. 2016); 0: off")
    kl: str = setting("sample", "the rate in the elbo objective: sample, the seed's log q(z|x) - log p(z) of the one "
                      "draw; analytic, each layer's closed-form KL where there is one (lower variance)")
    free_bits: float = setting(0.0, "analytic kl: each stochastic layer's rate of each image counts as at least this "
                               "many nats (Kingma et al. 2016), so no layer collapses early; 0: off")
    clip_grad: float = setting(0.0, "clip the gradient's global norm to this; 0: off")
    skip_grad: float = setting(0.0, "skip the update of a step whose gradient norm exceeds this (as VDVAE), counted in "
                               "metrics.jsonl's skipped_updates; 0: off")
    early_stop: int = setting(0, "with --validation: stop after this many epochs without a better validation "
                                 "ELBO; 0: off")
    seed: int = setting(0, "seeds the initial weights, the batch order and all noise")
    precision: str = setting("auto", "auto: bf16 where the hardware runs it fast (AVX512-BF16, AMX, Ampere+), "
                                     "else fp32")
    device: str = setting("auto", "auto: cuda if available, else cpu")
    compile: str = setting("auto", "torch.compile the model for training, and a prepared model for eval and sample: "
                                   "on, off, or auto: on for CUDA; off on CPU (measured no faster there, see "
                                   "docs/benchmarks.md) but for the spatial family's eval, 1.3-1.4x faster compiled")
    eval_batch_size: int = setting(500, "images per pass of the per-epoch held-out ELBO (no gradients)")
    keep_checkpoints: int = setting(2, "epoch checkpoints kept on disk (the newest ones)")
    keep_every: int = setting(0, "also keep every Nth epoch's checkpoint (0: none), for a long run's curve: "
                                 "`vaekit eval RUN@epoch_N` reads one (about 3 times the weights' size each)")
    checkpoint_every: int = setting(0, "also checkpoint every N steps within epochs (0: at epoch ends only)")
    tensorboard: bool = setting(False, "also log each epoch's metrics and grid image for TensorBoard in "
                                       "RUN/tensorboard/ "
                                "(needs pip install 'vaekit[tensorboard]')")

    def __post_init__(self) -> None:
        check_seed(self.seed)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        _choice("compile", self.compile, COMPILE_MODES)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("kl", self.kl, KL_ESTIMATORS)
        for name in ("epochs", "batch_size", "eval_batch_size", "keep_checkpoints", "keep_every", "checkpoint_every",
                     "early_stop"):
            minimum = 0 if name in ("keep_every", "checkpoint_every", "early_stop") else 1
            if getattr(self, name) < minimum:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} must be >= {minimum}, got {getattr(self, name)}: fix {flag}")
        for name in ("lr", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}: fix --{name.replace('_', '-')}")
        for name in ("lr_final", "warmup_epochs", "free_bits", "clip_grad", "skip_grad"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}: fix --{name.replace('_', '-')}")
        if self.free_bits and self.kl != "analytic":
            raise ConfigError("--free-bits works on each layer's closed-form rate: pass --kl analytic with it")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.early_stop and not self.data.validation:
            raise ConfigError("--early-stop watches the validation ELBO: pass --validation N (10000 for MNIST)")
        if self.model.family == "vq":
            tc = self.train
            ignored = [flag for flag, used in (("--warmup-epochs", tc.warmup_epochs),
                                               ("--kl analytic", tc.kl != "sample"), ("--free-bits", tc.free_bits))
                       if used]
            if ignored:
                flags, verb = ", ".join(ignored), "shapes" if len(ignored) == 1 else "shape"
                raise ConfigError(f"{flags} {verb} the Gaussian families' ELBO, which the vq family does not train: "
                                  f"drop {flags}")
        if (self.data.binarization == "none" and self.model.likelihood == "bernoulli"
                and not self.model.allow_continuous_bernoulli):
            raise ConfigError("the bernoulli likelihood is for binary data, and binarization none keeps grey "
                              "levels: pass --likelihood logistic (or gaussian), a binarization, or "
                              "--allow-continuous-bernoulli")

    def check_processes(self, processes: int) -> None:
        """A one-line ConfigError unless this run can train on `processes` processes: the global
        batch is shared out over them."""
        if self.train.batch_size < processes:
            raise ConfigError(f"batch_size {self.train.batch_size} (the global batch) is smaller than the "
                              f"{processes} processes; raise --batch-size")

    def checked_copy(self) -> "Config":
        """A deep copy whose parts run their checks again: a field set by hand (config.train.seed = ...)
        skips the checks a dataclass runs when it is made."""
        parts = copy.deepcopy(self)
        return Config(*(dataclasses.replace(part) for part in (parts.data, parts.model, parts.train)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        _no_unknown(d, cls, source)
        parts = {}
        for f in dataclasses.fields(cls):
            sub = d.get(f.name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{source}: '{f.name}' must be an object, got {type(sub).__name__}")
            part_cls = _field_types(cls)[f.name]
            _no_unknown(sub, part_cls, f"{source}: {f.name}")
            sub = _typed(sub, part_cls, f"{source}: {f.name}")
            try:
                parts[f.name] = part_cls(**sub)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{source}: {f.name}: {e}") from None
        return cls(**parts)

    def to_json(self) -> str:
        """config.json's text (a run writes it atomically: see Run.save_config)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> "Config":
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}; is this a vaekit run directory?") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} does not hold a JSON object; is this a vaekit run directory?")
        return cls.from_dict(d, source=str(path))


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _field_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _typed(d: dict, cls, source: str) -> dict:
    """`d` with each value checked against its field's type (a JSON file can hold 50.7, "fifty" or
    true where an integer belongs); an integer where a float belongs becomes that float."""
    hints = _field_types(cls)
    checked = {}
    for name, value in d.items():
        kinds = typing.get_args(hints[name]) or (hints[name],)    # `str | None` -> (str, NoneType)
        if float in kinds and type(value) is int:
            value = float(value)
        if type(value) not in kinds or (type(value) is float and not math.isfinite(value)):
            wanted = " or ".join(_KINDS[k] for k in kinds)
            raise ConfigError(f"{source}: {name} must be {wanted}, got {json.dumps(value)}")
        checked[name] = value
    return checked


def _no_unknown(d: dict, cls, source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
