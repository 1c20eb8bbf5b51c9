"""`vaekit train --nproc N`: the job started as N ranks on this machine through torchrun's own
launcher, each rank running the same command (distributed.py sets each one up)."""
from __future__ import annotations

import os
import sys


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def _threads_per_process(nproc: int) -> str:
    """Sets OMP_NUM_THREADS for the ranks to this machine's cores shared out (torchrun would set
    1 and print a banner about it), unless the user set it; says which, for the launch line."""
    if "OMP_NUM_THREADS" in os.environ:
        return f"{os.environ['OMP_NUM_THREADS']} thread(s) each (OMP_NUM_THREADS as set)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // nproc)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return (f"{threads} thread{'s' * (threads > 1)} each: {cores} cores shared out (set OMP_NUM_THREADS "
            "to choose)")


def launch(nproc: int, args: list[str], max_restarts: int = 0) -> int:
    """Runs `vaekit ARGS` as `nproc` ranks on this machine through torchrun's own launcher
    (`torchrun --standalone`); returns the exit code to leave with (a worker's, when one fails)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    print(f"vaekit: {nproc} processes, {_threads_per_process(nproc)}", file=sys.stderr, flush=True)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
                        "--module", "vaekit", *args]))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode   # -N: killed by signal N
    except SignalException as e:
        return 128 + e.sigval
    return 0
