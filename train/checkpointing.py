"""Orbax checkpoints that carry their own digest and training time, and a restore that skips
damaged ones.

`Checkpoints.save` is the one save path (periodic, SIGTERM and Ctrl-C saves alike): it records
with each checkpoint, in Orbax's per-step custom metadata (written atomically with the step and
deleted with it), the sha256 digest of the saved state and the training time spent to reach it.
In a single-process run the loop waits only for a host copy of the state: the digest of that
copy and Orbax's save of it run in a background thread (see `Checkpoints.save`).
`Checkpoints.restore_latest_good` restores the newest checkpoint that reads back intact (what it
reads must match the digest); a damaged one is moved aside with a warning and the previous one is
tried. Never a silent start from scratch.

Workdirs written before the metadata kept these records in two side files,
`checkpoint_digests.json` and `train_time.json`; they are still read for the checkpoints whose
metadata lacks them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from train import errors, files

DAMAGED_DIR = "checkpoints_damaged"
# Side files of the workdirs written before the records moved into the checkpoint metadata.
LEGACY_DIGESTS_FILE = "checkpoint_digests.json"
LEGACY_TRAIN_TIME_FILE = "train_time.json"


class CheckpointError(errors.RunError, RuntimeError):
    """No checkpoint in the workdir can be restored."""


def tree_sha256(tree) -> str:
    """sha256 over the paths, dtypes, shapes and bytes of every leaf of a (replicated) pytree.

    The digest each checkpoint records of its state, and the `params_sha256` fingerprint of
    results.json. Typed PRNG keys count by their key data.
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            leaf = leaf.addressable_data(0)
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        # The bytes where they lie (a uint8 view, any dtype): no copy of them for the hash.
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _host_copy(leaf) -> np.ndarray:
    """A host copy of `leaf` that the next (donating) training step cannot overwrite."""
    return np.array(leaf, copy=True)


@dataclasses.dataclass(frozen=True)
class TrainTime:
    """Wall time of the training steps a run logged, over every invocation that trained it."""

    seconds: float = 0.0
    timed_steps: int = 0  # the steps `seconds` covers: those of completed log intervals

    def __add__(self, other: TrainTime) -> TrainTime:
        return TrainTime(self.seconds + other.seconds, self.timed_steps + other.timed_steps)

    @classmethod
    def from_record(cls, record: Any) -> TrainTime | None:
        """From a checkpoint's record; None if it has no valid time (a run from before it)."""
        if isinstance(record, dict) and all(
                isinstance(record.get(key), (int, float)) and record[key] >= 0
                for key in ("train_time_s", "timed_steps")):
            return cls(record["train_time_s"], record["timed_steps"])
        return None


class Restored(NamedTuple):
    state: Any
    step: int
    train_time: TrainTime | None  # None: the checkpoint recorded no time


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            records = json.load(f)
        return records if isinstance(records, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or itself damaged: the checkpoints then count as unverified


class Checkpoints:
    """The Orbax checkpoints of a run in `<workdir>/checkpoints`.

    Every write goes through `files.disk_full_check`: a save that fails for lack of space (whose
    error an async save reports at the next save or wait) raises `files.DiskFullError` naming
    the step directory it was writing.

    Restore before the first save: `restore_latest_good` and `record` read the checkpoints as
    they are on disk.

    Args:
      workdir: the run's workdir.
      max_to_keep: the newest checkpoints kept; older ones are deleted with their records.
    """

    def __init__(self, workdir: str, max_to_keep: int):
        self.workdir = workdir
        self.directory = os.path.join(workdir, "checkpoints")
        with self._writes():
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep,
                    create=True,
                    cleanup_tmp_directories=True,  # a killed run's unfinished saves: free the space
                ),
                # Named, so that reading a step's metadata needs no guess (and logs no warning).
                item_handlers=ocp.StandardCheckpointHandler(),
            )
        self._latest = self._manager.latest_step()
        self._saving: threading.Thread | None = None  # the background part of a save
        self._saving_error: BaseException | None = None

    def _writes(self):
        return files.disk_full_check(self._path_of_failed_save)

    def _path_of_failed_save(self, error: BaseException) -> str:
        """The step directory a failed Orbax save was writing, which its error names, else the
        folder."""
        pattern = re.escape(self.directory) + r"/(\d+)" + re.escape(files.ORBAX_TEMPORARY)
        match = re.search(pattern, str(error))
        return os.path.join(self.directory, match.group(1)) if match else self.directory

    def latest_step(self) -> int | None:
        """The newest step saved or being saved (it does not wait for a save in progress)."""
        return self._latest

    def all_steps(self) -> list[int]:
        self.wait_until_finished()
        return list(self._manager.all_steps())

    def save(self, step: int, state, train_time: TrainTime) -> None:
        """Saves `state` as the checkpoint of `step` (asynchronously), with its digest and the
        training time spent to reach it; a step already saved is left as it is.

        One process: the call returns once it has a host copy of `state`; a background thread
        then computes the digest of the copy and hands the copy to Orbax's asynchronous save,
        with the digest in its metadata. Several processes: the digest is computed here and
        Orbax saves `state` itself, because Orbax's save begins with a barrier across the
        processes that must stay in step with the training loop's collectives, so it cannot
        run in another thread.
        """
        if step == self._latest:
            return
        # One save at a time: the previous one finishes, or raises its error, here (as within
        # Orbax's own save).
        self.wait_until_finished()
        record = {"train_time_s": train_time.seconds, "timed_steps": train_time.timed_steps}
        if jax.process_count() > 1:
            with self._writes():
                self._manager.save(step, args=ocp.args.StandardSave(state),
                                   custom_metadata={"state_sha256": tree_sha256(state), **record})
        else:
            host_state = jax.tree.map(_host_copy, state)
            self._saving = threading.Thread(
                target=self._save_in_background, args=(step, host_state, record),
                name=f"checkpoint-{step}")
            self._saving.start()
        self._latest = step

    def _save_in_background(self, step: int, host_state, record: dict[str, Any]) -> None:
        try:
            self._manager.save(step, args=ocp.args.StandardSave(host_state),
                               custom_metadata={"state_sha256": tree_sha256(host_state), **record})
        except BaseException as error:  # pylint: disable=broad-except  # raised by the next call
            self._saving_error = error

    def _finish_saving(self) -> None:
        """Waits for the background part of a save; raises what failed there."""
        if self._saving is not None:
            self._saving.join()
            self._saving = None
        error, self._saving_error = self._saving_error, None
        if error is not None:
            with self._writes():
                raise error

    def wait_until_finished(self) -> None:
        self._finish_saving()
        with self._writes():
            self._manager.wait_until_finished()

    def close(self) -> None:
        self._finish_saving()
        with self._writes():
            self._manager.close()

    def record(self, step: int) -> dict[str, Any]:
        """What was recorded with the checkpoint of `step` (`state_sha256`, `train_time_s`,
        `timed_steps`): its metadata, else (a checkpoint of an older workdir) the legacy side
        files' entries.

        Raises:
          CheckpointError: the checkpoint's metadata file is missing or unreadable.
        """
        metadata = self._manager.metadata(step)
        if metadata.commit_timestamp_nsecs is None:  # Orbax commits every step with one
            raise CheckpointError("its metadata file is missing or unreadable")
        record = dict(metadata.custom_metadata or {})
        if "state_sha256" not in record:
            digest = _read_json(os.path.join(self.workdir, LEGACY_DIGESTS_FILE)).get(str(step))
            if digest is not None:
                record["state_sha256"] = digest
        if TrainTime.from_record(record) is None:
            legacy = _read_json(os.path.join(self.workdir, LEGACY_TRAIN_TIME_FILE)).get(str(step))
            if TrainTime.from_record(legacy) is not None:
                record.update(legacy)
        return record

    def restore_latest_good(self, abstract_state) -> Restored | None:
        """Restores the newest intact checkpoint; None if there is none.

        A checkpoint is damaged when Orbax cannot read it, or when what it reads differs from
        the digest recorded at save time (garbled bytes that still decode). A damaged checkpoint
        is moved to `<workdir>/checkpoints_damaged/` (so a later save of the same step cannot
        collide with it) and a warning names it and the step resumed from instead. A checkpoint
        without a recorded digest is restored unverified.

        Args:
          abstract_state: the state's structure with shapes and dtypes (or a concrete state of
            that structure), as Orbax restores into.

        Raises:
          CheckpointError: checkpoints exist but every one is damaged. Starting from scratch
            silently would throw away the run, so the user decides.
        """
        abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        damaged: list[str] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                record = self.record(step)
                state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                recorded = record.get("state_sha256")
                if recorded is not None and tree_sha256(state) != recorded:
                    raise CheckpointError(
                        "its contents differ from the digest recorded at save time")
                restored_step = int(np.asarray(jax.device_get(state.step)))
                if restored_step != step:
                    raise CheckpointError(f"it holds step {restored_step}, not {step}")
            except Exception as error:  # pylint: disable=broad-except  # any failure = damaged
                moved_to = self._quarantine(step)
                damaged.append(f"step {step} ({_one_line(error)})")
                logging.warning(
                    "Checkpoint at step %d is damaged (%s); moved it to %s and falling back to "
                    "the previous checkpoint.", step, _one_line(error), moved_to)
                print(
                    f"warning: checkpoint at step {step} is damaged ({_one_line(error)}); moved "
                    f"it to {moved_to}; falling back to the previous checkpoint.", flush=True)
                continue
            if damaged:
                message = (f"Resuming from step {step}: the newer checkpoint(s) "
                           f"{', '.join(damaged)} were damaged.")
                logging.warning(message)
                print(f"warning: {message}", flush=True)
            return Restored(state, step, TrainTime.from_record(record))
        if damaged:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged: {'; '.join(damaged)}. They "
                f"were moved to {os.path.join(self.workdir, DAMAGED_DIR)}. Rerun to start this "
                "workdir from scratch, or restore a good copy of a checkpoint."
            )
        return None

    def _quarantine(self, step: int) -> str:
        source = os.path.join(self.directory, str(step))
        target_dir = os.path.join(self.workdir, DAMAGED_DIR)
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        if os.path.exists(source):
            shutil.move(source, target)
        self._manager.reload()  # forget the moved step
        self._latest = self._manager.latest_step()
        return target
