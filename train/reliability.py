"""Keeping a training run alive and honest: preemption, damaged checkpoints, divergence, collapse.

The guards that `train.train_and_evaluate` wires into its loop:

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
  DiskFullError       A write into the workdir failed for lack of space (ENOSPC, EDQUOT, or
                      EFBIG from a file-size limit): the run stops with one line naming the
                      file, half-written files are removed, and rerunning resumes.
  trim_metrics        On resume, drops the metrics.jsonl lines of steps after the restored
                      checkpoint (steps the resumed run executes and logs again).
  remove_stale_temporaries
                      At start, removes the temporary files of atomic writes whose writer
                      was killed before it could rename them.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging as std_logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

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


def read_step_records(path: str) -> dict[str, Any]:
    """The per-checkpoint records in the JSON file `path`, by step (as a string)."""
    try:
        with open(path) as f:
            records = json.load(f)
        return records if isinstance(records, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or itself damaged


def record_step(path: str, step: int, value: Any, keep_steps: Iterable[int] = ()) -> None:
    """Records `value` for the checkpoint of `step` in the JSON file `path`, atomically,
    dropping the records of steps no longer in `keep_steps` (the checkpoints kept)."""
    keep = {str(s) for s in keep_steps} | {str(step)}
    records = {k: v for k, v in read_step_records(path).items() if k in keep}
    records[str(step)] = value
    atomic_write_text(path, json.dumps(records, indent=1, sort_keys=True))


def _read_digests(workdir: str) -> dict[str, str]:
    # Missing or damaged: the checkpoints then count as unverified.
    return read_step_records(os.path.join(workdir, DIGESTS_FILE))


def record_digest(workdir: str, step: int, state, keep_steps: Iterable[int] = ()) -> None:
    """Records the digest of `state` as saved at `step` (atomically, before the save starts).

    Written first, so whenever a checkpoint exists its digest does too; an entry for a step
    whose save never finished is harmless and dropped once the step is no longer kept.
    """
    record_step(os.path.join(workdir, DIGESTS_FILE), step, state_digest(state), keep_steps)


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
            message = (f"Resuming from step {step}: the newer checkpoint(s) {', '.join(damaged)} "
                       "were damaged.")
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


# ---------------------------------------------------------------------------------- full disk

# ENOSPC: the file system is full; EDQUOT: the user's quota is; EFBIG: a file-size limit
# (`ulimit -f`, RLIMIT_FSIZE) was reached.
DISK_FULL_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EFBIG: "EFBIG"}
# Orbax/TensorStore report a failed write as a ValueError naming the errno in its message.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")
_TEMPORARY_SUFFIX = ".partial"  # atomic_write_text's temporary files: `<path><suffix><pid>`
_ORBAX_TEMPORARY = ".orbax-checkpoint-tmp"


class DiskFullError(OSError):
    """A write into the workdir failed for lack of space; rerunning once there is space resumes."""

    def __init__(self, path: str, cause: str):
        super().__init__(
            f"no space left on device writing {path} ({cause}). The run stopped; the "
            "half-written files were removed and the checkpoints written before are kept: "
            "free space (or raise the file-size limit) and rerun the same command to resume."
        )
        self.path = path
        self.cause = cause


def disk_full_cause(error: BaseException | None) -> str | None:
    """`'ENOSPC: No space left on device'` (or EDQUOT, EFBIG) if `error` or one of its causes
    is a failed write for lack of space, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return error.cause
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return f"{DISK_FULL_ERRNOS[error.errno]}: {os.strerror(error.errno)}"
        match = _TENSORSTORE_ERRNO.search(str(error))
        if match and int(match.group(1)) in DISK_FULL_ERRNOS:
            code = int(match.group(1))
            return f"{DISK_FULL_ERRNOS[code]}: {os.strerror(code)}"
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def disk_full_check(path: str | Callable[[BaseException], str]):
    """Turns a failed write for lack of space inside the block into DiskFullError.

    Args:
      path: the file written, or a function of the error that names it.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:  # pylint: disable=broad-except  # Orbax raises ValueError
        cause = disk_full_cause(error)
        if cause is None:
            raise
        raise DiskFullError(path(error) if callable(path) else path, cause) from None


def checkpoint_path_of(checkpoint_dir: str) -> Callable[[BaseException], str]:
    """For disk_full_check: the step directory a failed Orbax save was writing, which its error
    names (the error of an async save surfaces at the next save or wait), else the folder."""

    def path_of(error: BaseException) -> str:
        pattern = re.escape(os.fspath(checkpoint_dir)) + r"/(\d+)" + re.escape(_ORBAX_TEMPORARY)
        match = re.search(pattern, str(error))
        return os.path.join(checkpoint_dir, match.group(1)) if match else os.fspath(checkpoint_dir)

    return path_of


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and `os.replace`.

    A kill or a full disk leaves either the old file or the new one, never a truncated one, and
    a failed write removes its temporary file. Raises DiskFullError for lack of space.
    """
    temporary = f"{path}{_TEMPORARY_SUFFIX}{os.getpid()}"
    try:
        with disk_full_check(path):
            with open(temporary, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _temporary_files(workdir: str) -> dict[str, int | None]:
    """The temporary files of `atomic_write_text` in `workdir`, with their writer's pid."""
    files = {}
    for path in glob.glob(os.path.join(workdir, f"*{_TEMPORARY_SUFFIX}[0-9]*")):
        pid = path.rsplit(_TEMPORARY_SUFFIX, 1)[1]
        files[path] = int(pid) if pid.isdigit() else None
    return files


def remove_partial_writes(workdir: str) -> list[str]:
    """Removes what failed writes leave in `workdir`: unfinished Orbax checkpoint directories
    and the temporary files of `atomic_write_text`. Returns the paths removed."""
    removed = []
    unfinished = glob.glob(os.path.join(workdir, "checkpoints", f"*{_ORBAX_TEMPORARY}*"))
    for path in sorted(set(unfinished) | set(_temporary_files(workdir))):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(workdir: str) -> list[str]:
    """Removes the temporary files of `atomic_write_text` whose writer is gone.

    A process killed between opening its temporary file and the `os.replace` (SIGKILL, a power
    cut) leaves `<path>.partial<pid>` beside the intact old file. Nothing reads these files, but
    they are litter that looks like data; a starting run removes those of processes that no
    longer exist (a live writer's file is left alone). Returns the paths removed.
    """
    removed = []
    for path, pid in sorted(_temporary_files(workdir).items()):
        if pid is None or pid == os.getpid() or _process_alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(path)
    return removed


class _StripDiskFullTracebacks(std_logging.Filter):
    """Orbax logs the failure of a background save with its traceback, once per thread it
    passes through; for lack of space the one-line DiskFullError says all that matters."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.exc_info and disk_full_cause(record.exc_info[1]) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


class _DropUnretrievedDiskFull(std_logging.Filter):
    """When one write of an Orbax save fails for lack of space, asyncio logs each future of
    that save whose exception nobody retrieved, with a traceback, whenever it is garbage
    collected (at exit, that can be after the one-line error). The failure is reported once,
    by the save itself; these echoes are dropped, any other asyncio error is kept."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (record.exc_info and disk_full_cause(record.exc_info[1]) is not None)


def _closed_loop_unraisable(previous_hook):
    def hook(unraisable):
        # When one write of an Orbax save fails, Orbax stops waiting and closes its event loop;
        # TensorStore then reports each of the other writes of that save, finishing later, as
        # an unraisable "Event loop is closed" with a traceback. The failure is reported once,
        # by the save itself.
        if (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            return
        previous_hook(unraisable)

    hook.closed_loop_filter = True
    return hook


def quiet_disk_full_tracebacks() -> None:
    """Keeps Orbax's log lines about a failed write for lack of space, without tracebacks, and
    drops the echoes of a failed save (see `_DropUnretrievedDiskFull` and
    `_closed_loop_unraisable`). For the command line."""
    for logger, kind in ((logging.get_absl_logger(), _StripDiskFullTracebacks),
                         (std_logging.getLogger("asyncio"), _DropUnretrievedDiskFull)):
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    if not getattr(sys.unraisablehook, "closed_loop_filter", False):
        sys.unraisablehook = _closed_loop_unraisable(sys.unraisablehook)


# ---------------------------------------------------------------------------- resume hygiene


def trim_metrics(path: str, last_step: int) -> int:
    """Keeps the lines of metrics.jsonl with `step <= last_step` (the restored checkpoint).

    Steps after the checkpoint were logged by an attempt that was then killed; the resumed run
    executes and logs them again. Lines that do not parse (cut short by a kill) go too. The
    file is replaced atomically. Returns the number of lines dropped.
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            keep = line.endswith("\n") and int(record["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)
