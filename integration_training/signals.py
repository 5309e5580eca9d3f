"""Graceful stop: SIGTERM/SIGINT set a flag; training loops check it at step boundaries, checkpoint and return.

One `StopRequest` lives for a whole run (cli installs its handlers around every stage), so a signal at any point
— loading, evaluation, a step — is honoured at the next safe point instead of killing the process mid-write.
A loop that returns early because of it calls `mark_stopped`, which is how the CLI tells "interrupted" (exit 3)
from "finished" (exit 0).

Under deploy.py's own torchrun the parent process receives the user's Ctrl-C / SIGTERM and creates the *stop
file* whose path is in $INTEGRATION_TRAINING_STOP_FILE; every rank polls it at the same step boundaries (the
ranks run in their own session, so the terminal's signal never reaches them or torchrun directly).

Ranks must stop at the *same* step: each polls its own flag, and the stop file can appear between two ranks' polls
(or a signal reach one rank only). So loops never act on `requested` directly but on `agree(dist)`, one all-reduce
at the step boundary: when any rank has a request, every rank records it, with the same reason (the first
requesting rank's), and they checkpoint, stop and report the same line together.

A second SIGINT while a stop is pending restores Python's default behaviour (KeyboardInterrupt), so a user who
really wants out is never stuck waiting for a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

STOP_FILE_ENV = "INTEGRATION_TRAINING_STOP_FILE"


class StopRequest:
    """A flag that a signal handler (or a test, or another thread, or the stop file) sets; loops poll `requested`."""

    def __init__(self, stop_file: str | Path | None = None) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self._stop_file = Path(stop_file) if stop_file else None
        self.stopped_at: str | None = None  # "SFT step 3": set by the loop that returned early because of the stop

    @classmethod
    def from_environment(cls) -> StopRequest:
        return cls(os.environ.get(STOP_FILE_ENV) or None)

    @property
    def requested(self) -> bool:
        if not self._event.is_set() and self._stop_file is not None and self._stop_file.exists():
            reason = self._stop_file.read_text().strip() or "stop file"
            self.request(reason)
        return self._event.is_set()

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def agree(self, dist) -> bool:
        """Whether any rank has a stop request; every rank gets the same answer and, when True, the same reason.

        Call on every rank at the same point (a step boundary): it is a collective. A rank that had not seen the
        request yet records it here, so its loop may `mark_stopped` like the rank that saw it.
        """
        from integration_training.distributed import all_gather_objects, any_rank

        mine = self.requested
        if dist.world_size == 1 or not any_rank(mine, dist):
            return mine
        reasons = all_gather_objects([self.reason] if mine else [], dist)
        assert reasons, "any_rank said a rank has a request"
        self.reason = reasons[0]
        self._event.set()
        return True

    def mark_stopped(self, where: str) -> None:
        """Called by a training loop that checkpointed and returned before its last step."""
        assert self._event.is_set(), "a loop only stops early when a stop was requested"
        self.stopped_at = where

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._event.is_set() and signum == signal.SIGINT:
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
