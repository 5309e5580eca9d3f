"""Graceful stop: SIGTERM/SIGINT set a flag; training loops check it at step boundaries, checkpoint and return.

A second SIGINT while a stop is pending restores Python's default behaviour (KeyboardInterrupt), so a user who
really wants out is never stuck waiting for a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)


class StopRequest:
    """A flag that a signal handler (or a test, or another thread) sets; loops poll `requested`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        logger.warning("%s received: will checkpoint at the next step boundary and stop", name)
        self.request(name)

    @contextlib.contextmanager
    def handle_signals(self) -> Iterator[StopRequest]:
        """Route SIGTERM/SIGINT to this request while the block runs; previous handlers come back afterwards.

        Signal handlers can only be installed from the main thread; elsewhere this is a no-op.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
