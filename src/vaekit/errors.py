"""vaekit's errors, in one place. Each carries a one-line message that names the problem and
the fix; the command line prints it as it is (no traceback). VaekitError is the one to catch.
Beside them, the stop of a long command on a signal (Interrupted), the handling of its signals,
and the signal that ends a helper process with its parent (die_with)."""
import contextlib
import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1   # linux/prctl.h


class VaekitError(Exception):
    """A request vaekit cannot carry out; the message says why and what to do."""


class ConfigError(VaekitError, ValueError):
    """A configuration value, flag or config file that cannot be used."""


class DataError(VaekitError):
    """A dataset that cannot be fetched, read or verified, or that does not fit the run."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, even when a cause had several


class RunError(VaekitError):
    """A run directory or checkpoint that cannot be used."""


class Interrupted(KeyboardInterrupt):
    """A long command stopped on a signal after keeping its work (training: a checkpoint; an
    evaluation: the bounds it scored), having said how to go on; `signum` says which signal. A
    KeyboardInterrupt, as Ctrl-C's: raised from a signal handler at any line, it passes every
    `except Exception` (torch.compile's wrapping of errors in a compile among them)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def handling(signums, handler):
    """Sets `handler` for each signal of `signums` while the block runs, and the previous handlers
    back after it (one set outside Python, which Python cannot set again: the default). Only in the
    main thread, the only one Python lets set handlers; elsewhere the block runs as it is."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, signal.SIG_DFL if before is None else before)


def die_with(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent (pid `parent`) dies, even by kill -9, so no
    helper process (a training rank, an evaluation worker) works on, re-parented to init, after the
    command that started it is gone. If the parent died before this was set, leave now."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return   # not allowed here (a sandbox): the process outlives a killed parent, as without this
    if os.getppid() != parent:
        os._exit(128 + signal.SIGKILL)
