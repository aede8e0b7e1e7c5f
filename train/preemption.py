"""SIGTERM (what a TPU preemption or `kill` sends) as a request to checkpoint and stop.

    with preemption.PreemptionGuard() as guard:
        for step in ...:
            ...
            if guard.requested:
                save a checkpoint; raise preemption.Preempted(step, guard.signal_name)

The process then exits with EXIT_PREEMPTED, and rerunning the same command resumes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from typing import Any

from absl import logging

from train import errors

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what shells report for a job ended by SIGTERM


class Preempted(errors.RunError):
    """Training stopped on SIGTERM after saving a checkpoint; rerun the command to resume."""

    prefix = "stopped"
    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        super().__init__(
            f"{signal_name} received: saved a checkpoint at step {step} and stopped; rerun the "
            "same command to resume."
        )
        self.step = step


class PreemptionGuard:
    """Turns SIGTERM into a request the training loop polls between steps.

    A handler that raised inside a jitted step could leave the donated state unusable, so the
    first signal only sets `requested`; the loop saves a checkpoint and raises `Preempted`. A
    second signal (the scheduler losing patience) raises KeyboardInterrupt at once. Outside the
    main thread (where Python cannot install handlers) the guard does nothing.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self.received: int | None = None

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.received = signum
        logging.warning(
            "%s received: checkpointing after the current step, then stopping.",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
