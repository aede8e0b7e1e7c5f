"""metrics.jsonl and TensorBoard events, consistent over kills, resumes and full disks.

metrics.jsonl is the record: each line is written whole (or not at all) before `write` returns.
The TensorBoard events go through tensorboardX's `SummaryWriter`, which writes them from a
background thread and has them all on disk only once it is closed. So, for each step to show
once however often a run is killed:

  - a resumed run executes and logs again the steps after its checkpoint: it first drops their
    lines from metrics.jsonl (`trim_metrics`);
  - `tensorboard/complete_through.json` holds the last step whose events a writer closed
    cleanly (a SIGKILL gives no such close). A resumed run tells TensorBoard to purge
    (`purge_step`) from the step after the earlier of that and its checkpoint, and writes the
    events of those steps again from metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging

from train import files

COMPLETE_FILE = "complete_through.json"


def _complete_through(path: str, default: int) -> int:
    """The step recorded in `path`; `default` if there is no such file (a workdir of the
    synchronous writer this one replaced, whose events were on disk as they were logged)."""
    try:
        with open(path) as f:
            return int(json.load(f)["step"])
    except FileNotFoundError:
        return default
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # damaged: trust no earlier event


class TensorBoardEvents:
    """Scalars through tensorboardX's SummaryWriter, flushed after every write.

    Args:
      logdir: the run's TensorBoard directory.
      resumed_from: the restored checkpoint's step (0: a fresh start).
      records: the kept records of metrics.jsonl, written again where the earlier events
        cannot be trusted (see the module docstring).
    """

    def __init__(self, logdir: str, resumed_from: int, records: list[dict]):
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._marker = os.path.join(logdir, COMPLETE_FILE)
        self.path = logdir
        with files.disk_full_check(logdir):
            os.makedirs(logdir, exist_ok=True)
            earlier = any(name.startswith("events.") for name in os.listdir(logdir))
        trusted = min(resumed_from, _complete_through(self._marker, resumed_from)) if earlier else 0
        # Before the new event file: a kill from here on makes the next run start from there too.
        files.atomic_write_text(self._marker, json.dumps({"step": trusted}))
        self.last_step = trusted
        # SummaryWriter's thread writes the events into the file's buffer; the flush after each
        # write empties it from this thread, so that a failed write (a full disk) is raised
        # here and the buffer never fills enough for the thread to write, and fail, by itself
        # (its own flush, once a day, does not come in a run). Its file names hold the time in
        # seconds: the suffix keeps two writers of one second apart, in the order TensorBoard
        # must read them.
        self._writer = SummaryWriter(logdir, purge_step=trusted + 1 if earlier else None,
                                     max_queue=1000, flush_secs=86_400,
                                     filename_suffix=f".{time.time_ns()}.{os.getpid()}")
        for record in records:
            if record["step"] > trusted:
                values = {k: v for k, v in record.items() if k not in ("step", "kind")}
                self.write(record["step"], record["kind"], values)

    def write(self, step: int, kind: str, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(f"{kind}/{name}", value, step)
        with files.disk_full_check(self.path):
            self._writer.flush()
        self.last_step = max(self.last_step, step)

    def close(self) -> None:
        """Closes the writer, then records that every event through `last_step` is on disk."""
        with files.disk_full_check(self.path):
            self._writer.close()
        files.atomic_write_text(self._marker, json.dumps({"step": self.last_step}))


class MetricWriter:
    """Writes metrics.jsonl and TensorBoard events; a no-op on every process but process 0.

    Every write is flushed at once; a metrics.jsonl line lands whole or not at all; for lack of
    space a write raises files.DiskFullError. `resumed_from` (the restored step, 0 for a fresh
    start) first drops the lines of later steps, which the run logs again. Use it as a context
    manager, so that a run that stops on an error (SIGTERM included) closes its events too.
    """

    def __init__(self, workdir: str, enabled: bool, resumed_from: int = 0):
        self.enabled = enabled
        if enabled:
            self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
            trim_metrics(self._jsonl_path, resumed_from)
            with files.disk_full_check(self._jsonl_path):
                self._jsonl = open(self._jsonl_path, "ab+", buffering=0)
                self._jsonl.seek(0)
                records = [json.loads(line) for line in self._jsonl.read().splitlines()]
            self._tensorboard = TensorBoardEvents(
                os.path.join(workdir, "tensorboard"), resumed_from, records)

    def write(self, step: int, kind: str, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, "kind": kind, **scalars}) + "\n"
        files.append_whole(self._jsonl, line.encode(), self._jsonl_path)
        self._tensorboard.write(step, kind, scalars)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the error in flight is what the run reports; the next run replays the events
            self.close()
        except Exception as error:  # pylint: disable=broad-except
            logging.warning("Could not close the metric writers: %s", error)


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
        files.atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)
