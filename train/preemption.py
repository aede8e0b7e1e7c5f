"""SIGTERM (what a TPU preemption or `kill` sends) as a request to checkpoint and stop.

    with preemption.PreemptionGuard() as guard:
        for step in ...:
            ...
            if guard.stop_at(step):
                save a checkpoint; raise preemption.Preempted(step, guard.signal_name)

The process then exits with EXIT_PREEMPTED, and rerunning the same command resumes.

One process: the guard's own SIGTERM handler sets a flag the loop polls. Several processes
(`jax.distributed`): the guard installs nothing, because `jax.distributed.initialize()` has
installed JAX's preemption notifier, which tells the coordination service; every process then
asks JAX's preemption sync service at every step (`reached_preemption_sync_point`), which
answers True at the same step everywhere (one past the furthest step any process had reached
when the notice came), whichever processes got the signal. Replacing JAX's handler, as the guard
once did, left each host stopping at the step its own signal arrived, and the collective save
of hosts at different steps hung.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

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

    In a multi-process run (`jax.process_count() > 1`) the guard leaves the signals to JAX's
    preemption notifier and `stop_at` asks JAX's preemption sync service (see the module
    docstring): it must then be called by every process at every step.

    Args:
      signals: the signals to handle (one process).
      multiprocess: whether to use JAX's preemption sync service; default: whether this is
        a multi-process run.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), *,
                 multiprocess: bool | None = None):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self.received: int | None = None
        self.multiprocess = jax.process_count() > 1 if multiprocess is None else multiprocess

    def stop_at(self, step: int) -> bool:
        """Whether to checkpoint at step count `step` and stop: the same answer in every process.

        Raises:
          RuntimeError: a multi-process run without JAX's preemption service
            (`jax_enable_preemption_service` off).
        """
        if not self.multiprocess:
            return self.requested
        if multihost_utils.reached_preemption_sync_point(step):
            self.received = signal.SIGTERM  # JAX's notifier watches SIGTERM
            return True
        return False

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
        if not self.multiprocess and threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
