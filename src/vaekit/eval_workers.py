"""`vaekit eval --workers N`: the IWAE pass of an evaluation on the CPU in N processes of T/N
threads each (T: this process's threads; at least one each), the test images dealt out in order.

Why processes: the threads of one process meet after every layer, and a layer of a few thousand
draws splits poorly over them; N processes each run whole passes alone (threads of one process would
share Python's lock for the glue between layers). What it gains depends on the
machine: on a 2-core AMD EPYC, `benchmarks/eval_throughput.py --workers 2` against `--workers 1`
measured 0.97x and 1.12x for the frontier model and 0.99x for the seed's (docs/evaluation.md), so
it is not the default.

Each worker builds the model from its config and weights (a prepared or compiled model does not
pickle) as the parent opened it (loading.model_for_inference), in the parent's precision, and
compiles its pass as the parent would (compiling.log_weights). Workers are started with "spawn", not "fork": a forked child of a process
whose OpenMP threads have run can hang in its first parallel region. Image i's draws depend on
the seed and i alone (evaluate._image_noise), so a worker scores the bounds the parent would
(up to the order its threads sum in), and they come back in order, so the parent keeps them as
one process does (runs.PartialEval). Workers ignore SIGINT and SIGTERM, which reach them too when
sent to the whole process group (Ctrl-C, `timeout`, a closed terminal): the parent stops, keeps
its bounds and then ends them. They die with the parent (errors.die_with), even by kill -9."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch

from .cpu import usable_cores
from .errors import ConfigError, RunError, die_with
from .evaluate import images_per_pass, iwae_bounds

_worker: dict = {}       # in a worker process: its pass, or the error that kept it from being built


def check_workers(workers: int, device: torch.device) -> None:
    """A one-line ConfigError unless `workers` (at least 1) processes can share the evaluation on `device`."""
    if workers > 1 and device.type != "cpu":
        raise ConfigError(f"--workers {workers} is for evaluations on the CPU; one process keeps a "
                          f"{device.type} device busy: leave --workers out")
    if workers > usable_cores():
        raise ConfigError(f"--workers {workers} is more than the {usable_cores()} cores this process may use: "
                          f"pass at most {usable_cores()}")


def threads_per_worker(workers: int) -> int:
    """Each of `workers` processes' share of this process's threads (at least one)."""
    return max(1, torch.get_num_threads() // workers)


@contextlib.contextmanager
def threads(count: int):
    """This process runs on `count` threads inside the block (what a worker has, to tune for it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _start(parent: int, model_config, weights: dict, device: str, precision: str, compile_setting: str,
           decodes: int, thread_count: int) -> None:
    """A worker's start: it dies with its parent (`parent`, the pid), leaves SIGINT and SIGTERM to it
    (the parent keeps the bounds, then ends the workers), and builds its model as the parent's. An
    error is kept and raised by the first task, so the user reads it: raised here, it would only
    break the pool ("a worker died")."""
    die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        torch.set_num_threads(thread_count)
        from .compiling import log_weights
        from .distributed import setup
        from .loading import model_for_inference
        runtime = setup(device, precision)
        model = model_for_inference(model_config, weights, "the evaluated model's weights", runtime, compile_setting)
        lines = _worker.setdefault("lines", [])
        _worker.update(model=model, device=runtime.device, log_weights=log_weights(
            model, compile_setting, runtime.device, lambda line: lines.append(f"worker {os.getpid()}: {line}"), decodes))
    except Exception as e:   # noqa: BLE001 - raised again, whole, by the first task
        _worker["error"] = e


def _score(images: np.ndarray, labels: np.ndarray | None, first: int, k: int, seed: int,
           decode_batch: int) -> tuple[np.ndarray, list[str]]:
    """A task: the bounds of `images` (test images first, first + 1, ...), and the lines the worker
    logged since its last task (its compile)."""
    if "error" in _worker:
        raise _worker["error"]
    device = _worker["device"]
    x = torch.from_numpy(images).to(device)
    y = None if labels is None else torch.from_numpy(labels).to(device)
    bounds = iwae_bounds(_worker["model"], x, k, seed, decode_batch, y, first=first,
                         log_weights=_worker["log_weights"])
    lines, _worker["lines"][:] = list(_worker["lines"]), []
    return bounds.cpu().numpy(), lines


class EvalWorkers:
    """`workers` processes that score IWAE bounds of one model (see the module docstring): a
    context manager whose `iwae_bounds` is evaluate.iwae_bounds's, less the model. `model_config`
    and `weights` (a state dict) are the model's as training builds it; `precision` and
    `compile_setting` what the parent runs it in; `decodes` the evaluation's size, which decides
    whether `--compile auto` compiles. `log(line)`: told the workers' own lines (a compile)."""

    def __init__(self, workers: int, model_config, weights: dict, device: torch.device, precision: str,
                 compile_setting: str, decodes: int, log=lambda line: None) -> None:
        self.log = log
        self.pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
            initargs=(os.getpid(), model_config, {name: t.cpu() for name, t in weights.items()}, device.type,
                      precision, compile_setting, decodes, threads_per_worker(workers)))

    def __enter__(self) -> "EvalWorkers":
        return self

    def __exit__(self, *_) -> None:
        """Ends the workers: the tasks not started are dropped, the ones under way end first."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _kill_survivors(self) -> None:
        """SIGKILL for the workers still alive once one died: the pool ends them with SIGTERM, which
        they ignore (see _start), and would wait for their passes before the error is told."""
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):   # the pool's own record
            process.kill()

    def iwae_bounds(self, x: torch.Tensor, k: int, seed: int = 0, decode_batch: int = 2000,
                    labels: torch.Tensor | None = None, progress=None, first: int = 0, on_pass=None) -> torch.Tensor:
        """evaluate.iwae_bounds of the workers' model: each pass's images a task, the bounds joined
        in order; `on_pass(bounds)` and `progress` are told each pass as it comes back in order."""
        per_pass = images_per_pass(decode_batch, k)
        starts = range(0, len(x), per_pass)
        images = x.float().cpu().numpy()
        tags = None if labels is None else labels.cpu().numpy()
        tasks = [self.pool.submit(_score, images[s:s + per_pass], None if tags is None else tags[s:s + per_pass],
                                  first + s, k, seed, decode_batch) for s in starts]
        bounds = []
        try:
            for task in tasks:
                scored, lines = task.result()
                for line in lines:
                    self.log(line)
                bounds.append(torch.from_numpy(scored).to(x.device))
                if progress is not None:
                    progress.update(len(scored) * k)
                if on_pass is not None:
                    on_pass(bounds[-1])
        except BrokenProcessPool:
            self._kill_survivors()
            raise RunError("an evaluation worker died (killed, or out of memory?); the bounds scored so far are kept: "
                           "run the same command again with fewer --workers or a smaller --max-memory") from None
        finally:
            for task in tasks:
                task.cancel()
        return torch.cat(bounds) if bounds else x.new_zeros(0, dtype=torch.float64)
