"""Helpers for the tests that run `vaekit` in child processes and attack them (test_reliability.py,
test_runs.py, test_checkpoints.py): starting and waiting for a child, comparing a run with the
uninterrupted reference run (conftest's `reference` fixture), and the one-line error check."""
import json
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import SAMPLE, cli_env
from vaekit import Run, RunError

# 2 epochs of 20 steps; a checkpoint every 3 steps and at each epoch's end
TRAIN = ["--data-dir", SAMPLE, "--device", "cpu", "--epochs", "2", "--checkpoint-every", "3"]
STEPS = 40


def child_env() -> dict:
    return {**cli_env(), "OMP_NUM_THREADS": "1"}   # one thread: bitwise reproducible


CHILDREN: list[subprocess.Popen] = []


def start(*args, script: str | None = None) -> subprocess.Popen:
    """`vaekit ARGS` in a child process; with `script`, that Python code runs first (fault injection)."""
    command = ["-c", script + "\nfrom vaekit.cli import main\nsys.exit(main(sys.argv[1:]))"] if script else ["-m", "vaekit"]
    child = subprocess.Popen([sys.executable, *command, *map(str, args)], env=child_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    CHILDREN.append(child)
    return child


def vaekit(*args, script: str | None = None) -> subprocess.CompletedProcess:
    proc = start(*args, script=script)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def latest_step(run) -> int:
    """The step of the run's newest complete checkpoint (0 while there is none)."""
    for _ in range(100):   # `latest` may move to a checkpoint that is pruned while we read
        try:
            latest = Run(run).checkpoints.latest()
            return json.loads((latest / "state.json").read_text())["step"] if latest else 0
        except (OSError, RunError, ValueError):
            time.sleep(0.001)
    raise AssertionError(f"no readable checkpoint in {run}")


def wait_for_step(proc, run, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while latest_step(run) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no checkpoint of step {step} after {timeout} s"
        time.sleep(0.002)


def weights(run) -> dict:
    return load_file(str(Run(run).checkpoints.latest() / "model.safetensors"))


def numbers(run) -> list:
    return [(m["epoch"], m["step"], m["train_loss"], m["test_elbo"]) for m in Run(run).metrics()]


def assert_same_run(run, reference) -> None:
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert numbers(run) == numbers(reference)
    assert not list((run / "checkpoints").glob(".tmp-*"))


def assert_one_line_error(result, returncode=2) -> str:
    """The error line (after any warning lines, such as the shipped sample's not being canonical MNIST)."""
    assert result.returncode == returncode, result.stderr
    *warnings, error = result.stderr.splitlines()
    assert all(line.startswith("warning: ") for line in warnings), result.stderr
    assert error.startswith("vaekit: error: ") and result.stderr.endswith("\n"), result.stderr
    assert "Traceback" not in result.stderr
    return error


def run_copy(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run, run / "checkpoints" / "epoch_0002"
