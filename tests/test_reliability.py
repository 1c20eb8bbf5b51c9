"""Faults made to real processes: kill -9, a crash inside the checkpoint write, stop signals, a
full disk, a second trainer, a diverging loss, commands writing one file at once, pictures cut
short, and data mirrors that hang. Training runs in child processes with one thread, so that
results are bitwise reproducible and comparable with an uninterrupted run. The run directory's
and the checkpoint store's own cases are in test_runs.py and test_checkpoints.py; the helpers all
three share are in real_runs.py."""
import http.server
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from conftest import SAMPLE, cli_env
from real_runs import (CHILDREN, STEPS, TRAIN, assert_one_line_error, assert_same_run, child_env, latest_step,
                       run_copy, start, vaekit, wait_for_step, weights)
from test_data import Log, _offline, one_line, recognise_sample_as, serve  # noqa: F401 (serve is a fixture)
from vaekit import Run
from vaekit.errors import DataError
from vaekit.data import fetch, sources

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
    proc.send_signal(signal.SIGTERM)   # the checkpoint write takes >= 0.9 s: this one cuts it short
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM          # killed by the signal, not a finished stop (128 + 15)
    assert Run(run).checkpoints.load().progress.step == 20   # the stop's checkpoint was never completed


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



# --- results lost: commands writing one file at once, pictures cut short ----------------------

EVAL = ["--k", "1", "--decode-batch", "8", "--device", "cpu"]

# The faults below are made in the libraries vaekit writes with (os, Pillow), aimed at the file's name
SLOW_EVAL_WRITE = """
import os, sys, time
real = os.replace
def replace(src, dst, *args, **kwargs):   # a slow disk: each write of eval.json takes 0.3 s more to land
    if os.path.basename(dst) == "eval.json":
        time.sleep(0.3)
    real(src, dst, *args, **kwargs)
os.replace = replace
"""


def test_evals_saving_at_once_keep_every_entry(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    evals = [start("eval", run, *EVAL, "--n", n, script=SLOW_EVAL_WRITE) for n in range(1, 9)]
    for proc in evals:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "saved in" in stdout, stderr
    entries = json.loads((run / "eval.json").read_text())
    assert sorted(entry["n"] for entry in entries.values()) == list(range(1, 9))


KILLED_WRITING_EVAL = """
import os, signal, sys
real = os.replace
def replace(src, dst, *args, **kwargs):   # kill -9 once eval.json's new content is written, before it lands
    if os.path.basename(dst) == "eval.json":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *args, **kwargs)
os.replace = replace
"""


def test_what_a_kill_9_leaves_of_a_write_is_cleared_by_the_next_one(reference, tmp_path):
    run, _ = run_copy(reference, tmp_path)
    assert vaekit("eval", run, *EVAL, "--n", "1").returncode == 0
    before = (run / "eval.json").read_text()
    assert vaekit("eval", run, *EVAL, "--n", "2", script=KILLED_WRITING_EVAL).returncode == -signal.SIGKILL
    assert (run / "eval.json").read_text() == before
    left = [p.name for p in run.iterdir() if p.name.startswith(".eval.json") and p.name.endswith(".tmp")]
    assert left, "the kill left no partial write: the fault missed"
    assert vaekit("eval", run, *EVAL, "--n", "3").returncode == 0
    assert not any((run / name).exists() for name in left)
    assert sorted(e["n"] for e in json.loads((run / "eval.json").read_text()).values()) == [1, 3]


def picture_writer(fault: str) -> str:
    """Python run before vaekit: when Pillow has written a PNG's header and is about to write its
    pixels, `fault` runs (BARRIER: a folder where the writers meet)."""
    return f"""
import os, signal, sys, time
import PIL.ImageFile
real = PIL.ImageFile._save
def _save(im, fp, *args, **kwargs):
    getattr(fp, "fp", fp).flush()           # a PNG's pixels go through a chunk writer around the file
{fault}
    real(im, fp, *args, **kwargs)
PIL.ImageFile._save = _save
"""


TWO_WRITERS = """
import os, sys, time
import PIL.Image, PIL.ImageFile
barrier = os.environ["BARRIER"]           # a folder where two writers of one picture meet
def wait_for(writers):
    deadline = time.time() + 120
    while len(os.listdir(barrier)) < writers and time.time() < deadline:
        time.sleep(0.01)
real_save = PIL.Image.Image.save
def save(image, *args, **kwargs):         # the larger picture's file is opened once the smaller has its header
    if image.size[0] > 500:
        wait_for(1)
    real_save(image, *args, **kwargs)
PIL.Image.Image.save = save
real = PIL.ImageFile._save
def _save(im, fp, *args, **kwargs):       # both write their pixels once both have written their header
    getattr(fp, "fp", fp).flush()
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    wait_for(2)
    if im.size[0] < 500:                  # the smaller picture's pixels land last
        time.sleep(1)
    real(im, fp, *args, **kwargs)
PIL.ImageFile._save = _save
"""


def test_two_commands_writing_one_picture_at_once_leave_one_whole(reference, tmp_path, monkeypatch):
    png = tmp_path / "same.png"
    monkeypatch.setenv("BARRIER", str(tmp_path / "barrier"))
    (tmp_path / "barrier").mkdir()
    writers = [start("sample", reference, "--n", n, "--out", png, "--device", "cpu", script=TWO_WRITERS)
               for n in (4, 64)]
    for proc in writers:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    assert len(list((tmp_path / "barrier").iterdir())) == 2        # they did write at once
    with Image.open(png) as image:
        image.load()                                                # whole: every pixel decodes
        assert image.size in {(248, 248), (968, 968)}              # 2 x 2 or 8 x 8 images of 28 + 2 pixels, x 4
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["same.png"]


def test_a_picture_cut_short_by_kill_9_or_a_full_disk_leaves_the_old_one(reference, tmp_path):
    png = tmp_path / "picture.png"
    assert vaekit("sample", reference, "--n", "1", "--out", png, "--device", "cpu").returncode == 0
    old = png.read_bytes()
    killed = vaekit("sample", reference, "--n", "64", "--seed", "1", "--out", png, "--device", "cpu",
                    script=picture_writer("    os.kill(os.getpid(), signal.SIGKILL)"))
    assert killed.returncode == -signal.SIGKILL
    assert png.read_bytes() == old
    limit = 4096   # bytes per file: the old picture fits, 64 images do not, as on a full disk
    full = f"import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))"
    error = assert_one_line_error(vaekit("sample", reference, "--n", "64", "--out", png, "--device", "cpu",
                                         script=full))
    assert "File too large" in error
    assert png.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]   # nor any part of the cut-short writes


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
