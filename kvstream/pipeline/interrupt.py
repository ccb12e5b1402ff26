"""Ctrl-C (SIGINT) and SIGTERM during a job: stop cleanly, keep what is written, say how to resume.

While the driver streams results, both signals raise `Interrupted` (a BaseException, like KeyboardInterrupt, so
no `except Exception` on the way swallows it). The job then writes the rows it holds, appends its partial stats,
and `main` prints one line (interrupted, N rows saved to ..., rerun the same command to resume) and exits
128 + the signal number: 130 for SIGINT, 143 for SIGTERM. `ray.init` installs its own SIGTERM handler (exit
without cleanup), so these are installed after it and the previous handlers are restored afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The job was stopped by a signal; `exit_code` is 128 + its number."""

    def __init__(self, signum: int, rows_saved: int = 0, results: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.rows_saved, self.results = signum, rows_saved, results

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        return (f"kvstream: interrupted ({signal.Signals(self.signum).name}): {self.rows_saved} rows saved to "
                f"{self.results} by this run; rerun the same command to resume")


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def raising_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferring_sigint() -> Iterator[None]:
    """On a worker: SIGINT (a terminal's Ctrl-C reaches the local Ray's workers too) and Ray's non-forced task
    cancellation (a KeyboardInterrupt raised as if SIGINT came) are ignored inside the block, so a short write
    finishes whole instead of stopping halfway and printing a traceback; main thread only, elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
