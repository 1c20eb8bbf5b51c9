"""Distributed training for real: 2 CPU processes (gloo) started by torchrun, as a user would."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE, cli_env
from vaekit import Run
from vaekit.distributed import SEPARATE_STORES, store_prefix
from vaekit.errors import ConfigError

# 2 epochs of 21 global batches of 99: ranks take 49 and 50 rows, and 10 each of the last 20
TRAIN = ["--data-dir", SAMPLE, "--device", "cpu", "--precision", "fp32", "--epochs", "2", "--batch-size", "99",
         "--checkpoint-every", "5"]

# Runs `vaekit ARGS` on one torchrun rank, then saves that rank's replica of the weights as
# OUT/rankR.safetensors (ranks other than 0 write nothing else, so the test keeps them this way),
# and in OUT/rankR.json how many DDP wrappers were still in memory once the process group closed.
WORKER = """
import gc, importlib, json, os, sys, warnings
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
loop = importlib.import_module("vaekit.train")
trained, real = [], loop.train_step
def train_step(state, *args, **kwargs):
    trained.append(state.model)    # the replica, not the DDP wrapper: that must not outlive the group
    return real(state, *args, **kwargs)
loop.train_step = train_step
distributed, closed = importlib.import_module("vaekit.distributed"), {}
real_close = distributed.Runtime.close
def close(self):
    real_close(self)
    with warnings.catch_warnings():    # the scan touches torch.distributed.reduce_op, which warns it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        closed["ddp_alive"] = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
distributed.Runtime.close = close
from vaekit.cli import main
code = main(sys.argv[2:])
replica = {k: v.contiguous() for k, v in trained[-1].state_dict().items()}
save_file(replica, os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".safetensors"))
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(closed, f)
sys.exit(code)
"""


def run_to_end(command: list) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True,
                            env={**cli_env(), "OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run) -> dict:
    return load_file(str(Run(run).checkpoints.latest() / "model.safetensors"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """An uninterrupted 2-rank run through `torchrun -m`-style launching of the real CLI."""
    out = tmp_path_factory.mktemp("ddp")
    result = run_to_end(worker_launch(out, "--out", out / "run"))
    (out / "stderr.txt").write_text(result.stderr)
    return out


def worker_launch(out: Path, *args) -> list:
    """torchrun's arguments for 2 ranks of WORKER, writing into `out`, training with TRAIN and `args`."""
    (out / "worker.py").write_text(WORKER)
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", out / "worker.py", out,
            "train", *TRAIN, *args]


def ddp_alive_after_close(out: Path) -> list[int]:
    return [json.loads((out / f"rank{r}.json").read_text())["ddp_alive"] for r in (0, 1)]


def test_replicas_stay_identical_and_the_checkpoint_holds_them_unwrapped(two_ranks):
    rank0, rank1 = (load_file(str(two_ranks / f"rank{r}.safetensors")) for r in (0, 1))
    saved = weights(two_ranks / "run")
    assert rank0.keys() == rank1.keys() == saved.keys()              # no DDP "module." prefix
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], saved[k]) for k in saved)
    metrics = Run(two_ranks / "run").metrics()
    assert [(m["epoch"], m["step"]) for m in metrics] == [(1, 21), (2, 42)]
    assert ddp_alive_after_close(two_ranks) == [0, 0]
    assert "Warning" not in (two_ranks / "stderr.txt").read_text()     # none of torch's (DDP's FutureWarning)


def test_a_rank_stopped_by_a_signal_frees_its_ddp_wrapper_before_exit(tmp_path):
    """Left for interpreter exit, DDP's reducer frees gloo work from a dying interpreter, and the
    rank aborts now and then (-6, "terminate called without an active exception")."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *map(str, worker_launch(tmp_path, "--out", run))], text=True,
                            env={**cli_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = finish(proc)
    assert "stopping after this step" in stderr, stderr[-3000:]
    assert ddp_alive_after_close(tmp_path) == [0, 0], stderr[-3000:]


def test_two_ranks_match_one_process_with_the_same_global_batch(two_ranks, tmp_path):
    run_to_end(["-m", "vaekit", "train", *TRAIN, "--out", tmp_path / "single"])
    single, ddp = weights(tmp_path / "single"), weights(two_ranks / "run")
    # Adam divides each gradient element by its own scale, so where a gradient is only rounding
    # (the unused latent units' decoder weights) a step moves the weight by up to lr either way:
    # the float tolerance of a weight is lr (1e-4). The losses agree to far less.
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=1e-4)
    for a, b in zip(Run(tmp_path / "single").metrics(), Run(two_ranks / "run").metrics(), strict=True):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-7)   # all-reduced sums / 2000
        assert a["test_elbo"] == pytest.approx(b["test_elbo"], rel=1e-7)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def rank_pid(launcher: int, rank: int) -> int | None:
    for pid in children(launcher):
        try:
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if env.get("RANK") == str(rank):
            return pid
    return None


def latest_step(run: Path) -> int:
    try:
        return json.loads((Run(run).checkpoints.latest() / "state.json").read_text())["step"]
    except (OSError, TypeError, ValueError, AttributeError):
        return 0


def start_nproc(run: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vaekit", "train", "--nproc", "2", *extra, *map(str, TRAIN),
                             "--out", str(run)], env={**cli_env(), "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while latest_step(run) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no checkpoint of step {step} after {timeout} s"
        time.sleep(0.01)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """The launcher's output once it exits; if it hangs, it is stopped (torchrun stops its ranks)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.communicate(timeout=60)
        raise


def test_a_killed_rank_is_restarted_from_the_checkpoint_and_finishes(two_ranks, tmp_path):
    run = tmp_path / "run"
    proc = start_nproc(run, "--max-restarts", "1")
    wait_for_step(proc, run, 10)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Resuming" in stdout
    assert [m["epoch"] for m in Run(run).metrics()] == [1, 2]
    restarted, uninterrupted = weights(run), weights(two_ranks / "run")
    assert all(torch.equal(restarted[k], uninterrupted[k]) for k in uninterrupted)


def test_sigterm_to_the_launcher_stops_every_rank_after_one_step_with_a_checkpoint(two_ranks, tmp_path):
    run = tmp_path / "run"
    proc = start_nproc(run)
    wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGTERM)    # torchrun's agent passes it on to each rank once
    stdout, stderr = finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert f"go on with `vaekit train --resume {run}`" in stdout, stderr[-3000:]
    assert 5 <= latest_step(run) < 42
    run_to_end(["-m", "vaekit", "train", "--nproc", "2", "--resume", run])
    resumed, uninterrupted = weights(run), weights(two_ranks / "run")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_the_launcher_takes_its_ranks_with_it_and_the_run_resumes(two_ranks, tmp_path):
    run = tmp_path / "run"
    proc = start_nproc(run)
    wait_for_step(proc, run, 5)
    ranks = [rank_pid(proc.pid, r) for r in (0, 1)]
    proc.kill()
    proc.communicate()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in ranks), "a rank trains on without its launcher"
    run_to_end(["-m", "vaekit", "train", "--nproc", "2", "--resume", run])   # the lock went with the ranks
    resumed, uninterrupted = weights(run), weights(two_ranks / "run")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_a_killed_rank_is_named_in_one_line_with_the_command_that_goes_on(tmp_path):
    run = tmp_path / "run"
    proc = start_nproc(run)
    wait_for_step(proc, run, 5)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    _, stderr = finish(proc)
    assert proc.returncode == 128 + signal.SIGKILL, stderr[-3000:]
    assert f"vaekit: rank 1 was killed by SIGKILL; go on with `vaekit train --nproc 2 --resume {run}`" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_machines(run: Path, *extra) -> list[subprocess.Popen]:
    """Two torchrun launchers as two machines would run them (--nnodes 2, one rank each, a c10d
    rendezvous), here both on 127.0.0.1, writing one run directory."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-machines", *extra,
               "-m", "vaekit", "train", *map(str, TRAIN), "--out", str(run)]
    env = {**cli_env(), "OMP_NUM_THREADS": "1", SEPARATE_STORES: "1"}     # as docs/distributed.md says to
    return [subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]


def test_two_machines_train_the_run_of_one_machine_with_two_ranks(two_ranks, tmp_path):
    run = tmp_path / "run"
    machines = start_machines(run)
    for machine in machines:
        _, stderr = finish(machine)
        assert machine.returncode == 0, stderr[-3000:]
    two_machines, one_machine = weights(run), weights(two_ranks / "run")
    assert all(torch.equal(two_machines[k], one_machine[k]) for k in one_machine)


def test_a_rank_killed_on_one_machine_restarts_the_job_from_the_newest_checkpoint(two_ranks, tmp_path):
    """The other machine's launcher restarts its rank for a membership change, counting no
    restart: both restarted ranks must still meet (a store per round) and resume (the run's job id)."""
    run = tmp_path / "run"
    machines = start_machines(run, "--max-restarts", "1")
    wait_for_step(machines[0], run, 10)
    victim = next(pid for m in machines if (pid := rank_pid(m.pid, 1)) is not None)
    os.kill(victim, signal.SIGKILL)
    stdouts = []
    try:        # the restart waits for both launchers' rendezvous: on a loaded machine, minutes
        for machine in machines:
            stdout, stderr = finish(machine, timeout=300)
            assert machine.returncode == 0, stderr[-3000:]
            stdouts.append(stdout)
    finally:    # a launcher that failed or hung takes the other one down with it, never left running
        for machine in machines:
            if machine.poll() is None:
                machine.terminate()
                machine.communicate(timeout=60)
    resumed_at = [int(m) for out in stdouts for m in re.findall(r"Resuming .* \(step (\d+):", out)]
    assert resumed_at and min(resumed_at) >= 10, stdouts     # from the newest checkpoint, not the start
    assert [m["epoch"] for m in Run(run).metrics()] == [1, 2]
    restarted, uninterrupted = weights(run), weights(two_ranks / "run")
    assert all(torch.equal(restarted[k], uninterrupted[k]) for k in uninterrupted)


def test_the_group_keys_of_a_restart_are_its_own_and_a_shared_store_on_several_machines_is_refused():
    """What each rank's environment makes of torchrun's store (distributed.store_prefix): one
    machine shares a store across restarts, each restart taking keys of its own; with a store per
    round nothing is needed; several machines that may restart cannot share one (their restart
    counts disagree after a restart), and are told the setting that fixes it."""
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert store_prefix({**shared, "GROUP_WORLD_SIZE": "1", "TORCHELASTIC_MAX_RESTARTS": "3"}) == "vaekit/attempt_2"
    assert store_prefix({**shared, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "0"}) == "vaekit/attempt_2"
    assert store_prefix({"TORCHELASTIC_USE_AGENT_STORE": "False", "GROUP_WORLD_SIZE": "2",
                         "TORCHELASTIC_MAX_RESTARTS": "3"}) is None
    with pytest.raises(ConfigError, match=f"--rdzv-backend c10d and {SEPARATE_STORES}=1 exported on each machine"):
        store_prefix({**shared, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "1"})


def test_a_restartable_job_names_the_runs_it_made_and_one_of_several_machines_must_be_named(monkeypatch):
    from vaekit.distributed import restartable_job

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "mnist-1")
    assert restartable_job() == "mnist-1"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")                 # torchrun's default: no name
    with pytest.raises(ConfigError, match="pass the same --rdzv-id NAME to torchrun on each"):
        restartable_job()
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")                        # one machine: its restart count tells
    assert restartable_job() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "mnist-1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")                # no restarts: nothing to resume
    assert restartable_job() is None


def test_the_thread_count_of_the_ranks_leaves_the_launchers_environment_as_it_was(monkeypatch):
    from vaekit.launch import _threads_per_process

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    threads, said = _threads_per_process(2)
    assert threads == max(1, len(os.sched_getaffinity(0)) // 2) and "cores shared out" in said
    assert dict(os.environ) == before
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _threads_per_process(2) == (None, "3 thread(s) each (OMP_NUM_THREADS as set)")


# the vq family, tiny: 1 epoch of 21 global batches of 99 (ranks take 49 and 50 rows); every code
# starts dead, so the first step restarts them at encoder outputs gathered from both ranks
VQ = ["--family", "vq", "--codebook-size", "32", "--code-dim", "8", "--hidden-channels", "16", "--res-blocks", "1",
      "--dead-after", "5", "--epochs", "1", "--lr", "1e-3"]


def test_vq_ranks_keep_one_codebook_that_of_one_process_with_the_same_global_batch(tmp_path):
    """The codebook's counts and sums are summed over ranks and restarts drawn among all ranks'
    encoder outputs: both ranks end bit-identical (DDP broadcasts no buffers), and equal to one
    process on the same global batches up to float rounding, which flips the nearest code of a
    few near ties (5 of the epoch's 98,000 choices, measured): the counted buffers agree to 1%
    (a rank's own counts would be half), the codebook and the weights to 1e-4 (measured: 4e-5)."""
    run_to_end(worker_launch(tmp_path, *VQ, "--out", tmp_path / "ddp"))
    run_to_end(["-m", "vaekit", "train", *TRAIN, *VQ, "--out", tmp_path / "single"])
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    ddp, single = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    assert "codebook.embedding" in ddp
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], ddp[k]) for k in ddp)
    counted = ("codebook.cluster_size", "codebook.embed_sum", "codebook.epoch_counts")
    for k in single:
        tolerance = {"rtol": 1e-2, "atol": 1e-2} if k in counted else {"rtol": 0, "atol": 1e-4}
        torch.testing.assert_close(ddp[k], single[k], **tolerance, msg=k)
    assert ddp["codebook.epoch_counts"].sum() == single["codebook.epoch_counts"].sum() == 2000 * 49
    (a,), (b,) = Run(tmp_path / "single").metrics(), Run(tmp_path / "ddp").metrics()
    assert a["restarts"] == b["restarts"] > 32 and a["dead_codes"] == b["dead_codes"]
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-3)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
