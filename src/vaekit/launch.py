"""`vaekit train --nproc N`: the job started as N ranks on this machine through torchrun's own
launcher (its elastic agent, in this process), each rank running the same command (distributed.py
sets each one up).

Each rank runs `python -m vaekit.launch LAUNCHER_PID THREADS ARGS` (`_worker` below), which ties
its life to the launcher's (a launcher killed by kill -9 takes its ranks with it, and with them the
run's lock) and sets its thread count before running `vaekit ARGS`. A rank that loses a peer exits
quietly; the launcher prints one line naming the rank lost and how to go on.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import uuid
from pathlib import Path

from .cpu import usable_cores
from .errors import ConfigError, die_with

PEER_LOST = 75    # a rank's exit code when its communication with a lost rank failed


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def check_nproc(nproc: int, device: str) -> None:
    """A one-line ConfigError unless this machine can run `nproc` ranks on `device` (one of
    config.DEVICES): one GPU each on CUDA; on the CPU no more than the cores this process may use
    (more would only take turns on them, each holding a copy of the model and its data)."""
    from .distributed import resolve_device

    if resolve_device(device).type == "cuda":
        import torch

        limit, what = torch.cuda.device_count(), "GPUs torch sees (one process each)"
    else:
        limit, what = usable_cores(), "cores this process may use"
    if nproc > limit:
        raise ConfigError(f"--nproc {nproc} is more than the {limit} {what}: pass at most {limit}")


def _threads_per_process(nproc: int) -> tuple[int | None, str]:
    """(threads each rank sets, None where the user's OMP_NUM_THREADS reaches the ranks as it is;
    the words for the launch line). This machine's cores are shared out (torchrun would set 1 and
    print a banner about it). Nothing here writes this process's environment."""
    if "OMP_NUM_THREADS" in os.environ:
        return None, f"{os.environ['OMP_NUM_THREADS']} thread(s) each (OMP_NUM_THREADS as set)"
    cores = usable_cores()
    threads = max(1, cores // nproc)
    return threads, (f"{threads} thread{'s' * (threads > 1)} each: {cores} cores shared out (set OMP_NUM_THREADS "
                     "to choose)")


def launch(nproc: int, args: list[str], max_restarts: int = 0) -> int:
    """Runs `vaekit ARGS` as `nproc` ranks on this machine through torchrun's elastic agent (as
    `torchrun --standalone` does); returns the exit code to leave with (a worker's, when one fails)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads, said = _threads_per_process(nproc)
    print(f"vaekit: {nproc} processes, {said}", file=sys.stderr, flush=True)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts)
    worker = ["-u", "-m", "vaekit.launch", str(os.getpid()), str(threads or 0), *args]
    try:
        with _quiet_agent():
            elastic_launch(config, entrypoint=sys.executable)(*worker)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"vaekit: {_lost(rank, failure.exitcode)}; {_how_to_go_on(args, nproc)}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode   # -N: killed by signal N
    except SignalException as e:
        return 128 + e.sigval
    return 0


@contextlib.contextmanager
def _quiet_agent():
    """The agent's own log lines (a failure's table, "Sending process closing signal") stay
    unprinted: the launcher says what happened in one line. torch sets some of its loggers' levels
    itself, so each is quietened, not only their parent."""
    names = [name for name in logging.root.manager.loggerDict
             if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _lost(rank: int, exitcode: int) -> str:
    if exitcode < 0:
        return f"rank {rank} was killed by {signal.Signals(-exitcode).name}"
    if exitcode == PEER_LOST:
        return f"rank {rank} lost contact with the other ranks"
    return f"rank {rank} stopped with exit code {exitcode}"


def _how_to_go_on(args: list[str], nproc: int) -> str:
    """The command that goes on from the run's newest checkpoint, or (no run yet) says to start again."""
    for flag in ("--resume", "--out"):
        if flag in args and Path(args[args.index(flag) + 1], "config.json").is_file():
            run = args[args.index(flag) + 1]
            return f"go on with `vaekit train --nproc {nproc} --resume {run}`"
    return "no run directory was made: run the command again"


def _worker(argv: list[str]) -> int:
    """One rank: `LAUNCHER_PID THREADS ARGS` (THREADS 0: leave the thread count as the environment sets it)."""
    launcher, threads, *args = argv
    die_with(int(launcher))   # no rank trains on, re-parented to init, holding the run's lock
    import torch
    import torch.distributed as dist

    from .cli import main

    if int(threads):
        torch.set_num_threads(int(threads))
    try:
        return main(args)
    except dist.DistError:
        # a peer died mid-collective (gloo: "Connection reset by peer"): the launcher names the
        # rank lost; a traceback from every survivor would bury that line
        return PEER_LOST


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
