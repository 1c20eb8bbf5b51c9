import os
from pathlib import Path

import pytest


def share_the_cores_between_workers() -> None:
    """Under pytest-xdist (pyproject's addopts) each worker, and each process a test starts, takes its share
    of the cores: two workers of two threads each on two cores spin against each other. Set here, before
    torch is imported; an OMP_NUM_THREADS of the user's own is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))


share_the_cores_between_workers()
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


@pytest.fixture(autouse=True)
def no_child_outlives_its_test():
    """Kills what a test started through real_runs.start and left running."""
    from real_runs import CHILDREN
    yield
    while CHILDREN:
        child = CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.communicate()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted run (real_runs.TRAIN): what every interrupted and resumed run must equal, bit for
    bit. Tests copy it (real_runs.run_copy) rather than change it."""
    from real_runs import STEPS, TRAIN, latest_step, vaekit

    run = tmp_path_factory.mktemp("reference") / "run"
    result = vaekit("train", *TRAIN, "--out", run)
    assert result.returncode == 0, result.stderr
    assert latest_step(run) == STEPS
    return run
