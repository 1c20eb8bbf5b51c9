"""Typed configuration: one dataclass per part, defaults = the seed's recipe, saved as config.json.

The command line builds its flags from these fields (see cli.py), so a setting is declared once.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .models import ModelConfig

BINARIZATIONS = ("static", "dynamic", "none")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message says which and what to do."""


@dataclass
class DataConfig:
    dataset: str = "mnist"
    data_dir: str | None = None       # a folder of IDX files to use instead of fetching
    binarization: str = "static"      # "static": the seed's threshold at 0.5; "dynamic": Bernoulli per batch;
                                      # "none": grey levels pixel/255, for the 8-bit likelihoods

    def __post_init__(self) -> None:
        _choice("binarization", self.binarization, BINARIZATIONS)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 100
    lr: float = 1e-4
    seed: int = 0
    precision: str = "auto"           # "auto": bf16 where the hardware runs it fast, else fp32
    device: str = "auto"              # "auto": cuda if available, else cpu
    eval_batch_size: int = 500        # no gradients; 500 keeps activations under the mmap threshold (allocator.py)
    keep_checkpoints: int = 2         # epoch checkpoints kept on disk (the newest ones)
    checkpoint_every: int = 0         # also checkpoint every N steps within epochs (0: at epoch ends only)

    def __post_init__(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        for name in ("epochs", "batch_size", "eval_batch_size", "keep_checkpoints", "checkpoint_every"):
            minimum = 0 if name in ("epochs", "checkpoint_every") else 1
            if getattr(self, name) < minimum:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} must be >= {minimum}, got {getattr(self, name)}: fix {flag}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}: fix --lr")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if (self.data.binarization == "none" and self.model.likelihood == "bernoulli"
                and not self.model.allow_continuous_bernoulli):
            raise ConfigError("the bernoulli likelihood is for binary data, and binarization none keeps grey "
                              "levels: pass --likelihood logistic (or gaussian), a binarization, or "
                              "--allow-continuous-bernoulli")

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


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _field_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _no_unknown(d: dict, cls, source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
