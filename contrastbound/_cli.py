"""Pieces shared by the command-line jobs (reproduce, bench): SIGTERM as an interruption (the work in the block
stops as at Ctrl-C, the job writes what it has, and the signal then goes on: contrastbound.__main__.exit_from_cli),
and the check of --out before any work."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading

__all__ = ["Terminated", "sigterm_as_interrupt", "out_folder_problem"]


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


def out_folder_problem(path: str) -> str | None:
    """Makes the folder ``path`` (and its parents) and checks that a file can be written there; returns None, or why
    not (an OSError's text, or for a symbolic link to a missing path, that: os.makedirs said only "File exists")."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        if os.path.islink(path) and not os.path.exists(path):
            return f"it is a symbolic link to {os.readlink(path)!r}, which does not exist"
        return str(exc)
    return None
