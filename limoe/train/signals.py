"""SIGINT/SIGTERM during training: the loop finishes its step, saves and exits; an evaluation stops at once.

Schedulers (Slurm and most others) send SIGTERM to the whole process group before they kill it; loader workers
ignore these signals (limoe.data.workers), so the trainer alone decides when to stop.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any


class Interrupted(BaseException):
    """A signal arrived inside an interruptible phase (an evaluation, whose work needs no saving).

    A BaseException, like KeyboardInterrupt: the handler raises it wherever the main thread is, and code that
    turns a bad sample's `Exception` into a counted skip (an image decoder) must not turn a signal into one.
    """


class Signals:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and returns.

    Inside `interruptible()` a signal stops the work at once instead: evaluations can take minutes, and the
    state they would delay saving is already saved or will be saved next.
    """

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.stop_at_once = False

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.received = signum
        if self.stop_at_once:
            self.stop_at_once = False
            raise Interrupted

    @contextlib.contextmanager
    def interruptible(self):
        if self.received is not None:
            raise Interrupted
        self.stop_at_once = True
        try:
            yield
        finally:
            self.stop_at_once = False

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
