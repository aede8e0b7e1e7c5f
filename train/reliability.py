"""Keeping a training run alive and honest: preemption, damaged checkpoints, divergence, collapse.

Four guards that `train.train_and_evaluate` wires into its loop:

  PreemptionGuard     SIGTERM (what a TPU preemption or `kill` sends) asks the loop to save a
                      checkpoint after the current step and stop; the process exits with
                      EXIT_PREEMPTED, and rerunning the same command resumes.
  restore_latest_good Restores the newest checkpoint that reads back intact (its state digest,
                      recorded at save time, must match); a damaged one is moved aside with a
                      warning and the previous one is tried. Never a silent start from scratch.
  check_finite        A NaN or inf loss stops training, naming the step and its diagnostics,
                      before a checkpoint of the broken state can be written.
  CollapseDetector    Training accuracy at chance for a sustained window while the amplitude
                      has fallen toward zero or every prediction is one class: the known
                      failure of too large an alpha. Stops with the cause and the remedy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what shells report for a job ended by SIGTERM
DIGESTS_FILE = "checkpoint_digests.json"
DAMAGED_DIR = "checkpoints_damaged"


# ----------------------------------------------------------------------------------- SIGTERM


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint; rerun the command to resume."""

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


# ------------------------------------------------------------------------- checkpoint integrity


class CheckpointError(RuntimeError):
    """No checkpoint in the workdir can be restored."""


def state_digest(state) -> str:
    """sha256 over the paths, dtypes, shapes and bytes of every leaf of a (replicated) pytree."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            leaf = leaf.addressable_data(0)
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _read_digests(workdir: str) -> dict[str, str]:
    try:
        with open(os.path.join(workdir, DIGESTS_FILE)) as f:
            digests = json.load(f)
        return digests if isinstance(digests, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or itself damaged: checkpoints then count as unverified


def record_digest(workdir: str, step: int, state, keep_steps: Iterable[int] = ()) -> None:
    """Records the digest of `state` as saved at `step` (atomically, before the save starts).

    Written first, so whenever a checkpoint exists its digest does too; an entry for a step
    whose save never finished is harmless and dropped once the step is no longer kept.
    """
    digests = _read_digests(workdir)
    keep = {str(s) for s in keep_steps} | {str(step)}
    digests = {k: v for k, v in digests.items() if k in keep}
    digests[str(step)] = state_digest(state)
    path = os.path.join(workdir, DIGESTS_FILE)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(digests, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def restore_latest_good(manager, abstract_state, workdir: str, restore_args_fn):
    """Restores the newest intact checkpoint; returns `(state, step)`, or `(None, None)` if none.

    A checkpoint is damaged when Orbax cannot read it, or when what it reads differs from the
    digest recorded at save time (garbled bytes that still decode). A damaged checkpoint is
    moved to `<workdir>/checkpoints_damaged/` (so a later save of the same step cannot collide
    with it) and a warning names it and the step resumed from instead.

    Args:
      manager: an `orbax.checkpoint.CheckpointManager`.
      abstract_state: the state's structure with shapes and dtypes, as Orbax restores into.
      workdir: the run's workdir (holds the digests and the damaged checkpoints).
      restore_args_fn: `abstract_state -> args` for `manager.restore`, e.g.
        `orbax.checkpoint.args.StandardRestore`.

    Raises:
      CheckpointError: checkpoints exist but every one is damaged. Starting from scratch
        silently would throw away the run, so the user decides.
    """
    digests = _read_digests(workdir)
    damaged: list[str] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = manager.restore(step, args=restore_args_fn(abstract_state))
            recorded = digests.get(str(step))
            if recorded is not None and state_digest(state) != recorded:
                raise CheckpointError("its contents differ from the digest recorded at save time")
            restored_step = int(np.asarray(jax.device_get(state.step)))
            if restored_step != step:
                raise CheckpointError(f"it holds step {restored_step}, not {step}")
        except Exception as error:  # pylint: disable=broad-except  # any failure = damaged
            moved_to = _quarantine(manager, step, workdir)
            damaged.append(f"step {step} ({_one_line(error)})")
            logging.warning(
                "Checkpoint at step %d is damaged (%s); moved it to %s and falling back to the "
                "previous checkpoint.", step, _one_line(error), moved_to)
            print(
                f"warning: checkpoint at step {step} is damaged ({_one_line(error)}); moved it "
                f"to {moved_to}; falling back to the previous checkpoint.", flush=True)
            continue
        if damaged:
            message = f"Resuming from step {step}: the newer checkpoint(s) {', '.join(damaged)} were damaged."
            logging.warning(message)
            print(f"warning: {message}", flush=True)
        return state, step
    if damaged:
        raise CheckpointError(
            f"every checkpoint in {os.path.join(workdir, 'checkpoints')} is damaged: "
            f"{'; '.join(damaged)}. They were moved to {os.path.join(workdir, DAMAGED_DIR)}. "
            "Rerun to start this workdir from scratch, or restore a good copy of a checkpoint."
        )
    return None, None


def _quarantine(manager, step: int, workdir: str) -> str:
    source = os.path.join(os.fspath(manager.directory), str(step))
    target_dir = os.path.join(workdir, DAMAGED_DIR)
    os.makedirs(target_dir, exist_ok=True)
    target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    if os.path.exists(source):
        shutil.move(source, target)
    manager.reload()  # forget the moved step
    return target


# --------------------------------------------------------------------------------- divergence


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


_DIAGNOSTIC_KEYS = ("loss", "accuracy", "learning_rate", "alpha", "amplitude", "logit_std",
                    "target_prob", "saturated_fraction", "target_grad", "noise", "cos_target")


def check_finite(metrics: Sequence[Mapping[str, Any]], first_step: int,
                 last_good_checkpoint: int | None) -> None:
    """Raises NonFiniteLossError at the first step of `metrics` whose loss is not finite.

    Args:
      metrics: per-step metrics (host values) of steps `first_step + 1, first_step + 2, ...`
        (the step count after each step, as logs and checkpoints number them).
      first_step: the step count before the first of them.
      last_good_checkpoint: the newest saved step, named in the message.
    """
    for offset, step_metrics in enumerate(metrics):
        loss = float(np.asarray(step_metrics["loss"]))
        if math.isfinite(loss):
            continue
        step = first_step + offset + 1
        shown = ", ".join(
            f"{k}={float(np.asarray(step_metrics[k])):.6g}"
            for k in _DIAGNOSTIC_KEYS if k in step_metrics)
        kept = (f"the checkpoints (the latest at step {last_good_checkpoint}) are kept; none "
                "is written from a non-finite loss"
                if last_good_checkpoint is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"training loss is {loss} at step {step}; diagnostics at that step: {shown}. "
            f"Training stopped and {kept}. Usual causes: too high a learning rate or alpha; "
            "rerun with smaller values in a new workdir."
        )


# ---------------------------------------------------------------------------------- collapse


def top_class_fraction(logits: jax.Array) -> jax.Array:
    """Fraction of the batch predicted as its most frequent predicted class (1.0 = one class)."""
    predictions = jnp.argmax(logits, axis=-1).reshape(-1)
    counts = jnp.zeros((logits.shape[-1],), jnp.int32).at[predictions].add(1)
    return jnp.max(counts) / jnp.maximum(predictions.size, 1)


class TrainingCollapsedError(RuntimeError):
    """The run collapsed: chance accuracy with the features shrunk away or one predicted class."""


class CollapseDetector:
    """Detects the collapse too large an alpha causes, from the logged training metrics.

    The network can escape the noise by shrinking its features (and so the amplitude
    ||W_y|| ||x||) to zero: every logit equal, every prediction the same class, chance accuracy.
    A run is declared collapsed when, over at least `window_steps` consecutive steps after
    `min_steps`, the training accuracy stayed at chance (below `chance_factor / num_classes`)
    and in every log the amplitude was below `amplitude_fraction` of its peak or
    `top_class_fraction` was at least `one_class_fraction`. Feed it the means of each log
    interval; it raises TrainingCollapsedError.
    """

    def __init__(self, num_classes: int, alpha: float | None, *, window_steps: int = 300,
                 min_steps: int = 300, chance_factor: float = 1.5,
                 amplitude_fraction: float = 0.01, one_class_fraction: float = 0.95):
        self.num_classes = num_classes
        self.alpha = alpha
        self.window_steps = window_steps
        self.min_steps = min_steps
        self.chance_factor = chance_factor
        self.amplitude_fraction = amplitude_fraction
        self.one_class_fraction = one_class_fraction
        self.peak_amplitude = 0.0
        self.collapsed_since: int | None = None  # the step count before the first bad interval

    def symptoms(self, means: Mapping[str, float]) -> list[str]:
        """The collapse symptoms present in one interval's means (empty: healthy)."""
        amplitude = means.get("amplitude")
        if amplitude is not None and math.isfinite(amplitude):
            self.peak_amplitude = max(self.peak_amplitude, amplitude)
        accuracy = means.get("accuracy")
        if accuracy is None or self.num_classes < 2:
            return []
        chance = 1.0 / self.num_classes
        if not accuracy < self.chance_factor * chance:
            return []
        found = [f"train accuracy {accuracy:.3f} at chance (1/{self.num_classes} = {chance:.3f})"]
        if amplitude is not None and amplitude < self.amplitude_fraction * self.peak_amplitude:
            found.append(f"amplitude ||W_y|| ||x|| {amplitude:.3g}, down from a peak of "
                         f"{self.peak_amplitude:.3g}")
        fraction = means.get("top_class_fraction")
        if fraction is not None and fraction >= self.one_class_fraction:
            found.append(f"{100 * fraction:.0f}% of predictions are one class")
        return found if len(found) > 1 else []

    def update(self, step: int, interval_steps: int, means: Mapping[str, float]) -> None:
        """Takes the means of the `interval_steps` steps that end at step count `step`."""
        found = self.symptoms(means)
        if not found or step < self.min_steps:
            self.collapsed_since = None
            return
        if self.collapsed_since is None:
            self.collapsed_since = step - interval_steps
        if step - self.collapsed_since >= self.window_steps:
            alpha = f"alpha = {self.alpha:g}" if self.alpha is not None else "the noise"
            raise TrainingCollapsedError(
                f"training collapsed: from step {self.collapsed_since} to step {step}: "
                + "; ".join(found) + ". "
                f"Likely cause: {alpha} is too large, and the network escaped the noise by "
                "shrinking its features toward zero (every logit equal, chance accuracy). "
                "Remedy: use a smaller alpha (the paper reports about 0.1 working well), or "
                "anneal it with --config.alpha_schedule; rerun in a new workdir."
            )
