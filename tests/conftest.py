import os
from pathlib import Path

import pytest

SAMPLE = Path(__file__).parent / "data" / "mnist-sample"   # real MNIST: 2,000 train / 500 test images


class Log(list):
    """A `log` callable that keeps its lines."""

    def __call__(self, line: str) -> None:
        assert "\n" not in line
        self.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's ~/.cache/vaekit, and none reaches a real mirror."""
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("VAEKIT_MIRRORS", "http://127.0.0.1:9/")


@pytest.fixture
def sample_dir() -> Path:
    return SAMPLE


def sample_config(**train):
    from vaekit import Config

    config = Config()
    config.data.data_dir = str(SAMPLE)
    config.train.device = "cpu"
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def cli_env() -> dict:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    return env
