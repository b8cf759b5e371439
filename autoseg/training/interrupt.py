"""Ctrl-C and SIGTERM during training: the first asks the loop to stop after the current step and write a
checkpoint; a second one ends the process at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["StopRequest", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the ``latest`` checkpoint was written. ``code`` is the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StopRequest:
    """The signal that asked training to stop, if any.

    Args:
        grace_seconds: with several ranks, a rank blocked in a collective because another rank died never
            reaches its next step; after this long without :meth:`done` the process ends itself (None: wait).
    """

    def __init__(self, grace_seconds: float | None = None):
        self.signum: int | None = None
        self.settled = False  # the checkpoint of the stop is written
        self.grace_seconds = grace_seconds
        self._timer: threading.Timer | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int) -> None:
        """What a signal does (also how another rank's stop is taken over)."""
        if self.signum is None:
            self.signum = signum
            if self.grace_seconds is not None:
                self._timer = threading.Timer(self.grace_seconds, self._give_up)
                self._timer.daemon = True
                self._timer.start()

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def settle(self) -> None:
        """The stop's checkpoint is written: the watchdog is off, and a further signal ends the process saying
        so instead of warning that nothing was saved."""
        self.done()
        self.settled = True

    def handle(self, signum: int, _: FrameType | None) -> None:
        """First signal: stop after the current step. A second one ends the process at once (for a trainer
        stuck waiting on a data worker or another rank), keeping the last checkpoint written. It exits rather
        than raising: an exception raised in a signal handler can land in a garbage-collector callback, where
        Python prints it and carries on."""
        if self.signum is not None and self.settled:
            _exit_now(f"interrupted: {signal.Signals(self.signum).name}: checkpoint_latest.pt written; run the same "
                      "command again to continue", 128 + int(self.signum))
        if self.signum is not None:
            _exit_now(f"interrupted: {signal.Signals(signum).name} again: stopped at once without writing a new "
                      "checkpoint; run the same command again to continue from the last checkpoint_latest.pt "
                      "(from the start if there is none)", 128 + int(signum))
        self.request(signum)

    def _give_up(self) -> None:
        assert self.signum is not None
        _exit_now(f"interrupted: {signal.Signals(self.signum).name}: the other ranks did not answer within "
                  f"{self.grace_seconds:g} s (one of them has probably failed: see its line); stopped without "
                  "writing a new checkpoint", 128 + int(self.signum))

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGINT and SIGTERM with :meth:`handle` inside the block; the previous handlers after it."""
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            self.done()
            for s, h in previous.items():
                signal.signal(s, h)


def _exit_now(message: str, code: int) -> None:
    os.write(2, (message + "\n").encode())
    for worker in multiprocessing.active_children():  # they ignore SIGTERM, and one may be stuck in C
        worker.kill()
    os._exit(code)
