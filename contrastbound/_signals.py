"""SIGTERM as an interruption, for the command-line jobs (reproduce, bench): the work in the block stops as at
Ctrl-C, the job writes what it has, and the signal then goes on (contrastbound.__main__.exit_from_cli)."""

from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["Terminated", "sigterm_as_interrupt"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the Ctrl-C path (a KeyboardInterrupt), so that a job's results are still written."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises Terminated (once: the handler first puts the previous one back, so a
    second SIGTERM acts at once). Only in the main thread, and not where SIGTERM is ignored (e.g. by the caller)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, None):
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
