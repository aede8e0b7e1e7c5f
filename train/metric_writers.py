"""metrics.jsonl and TensorBoard events, written whole or not at all, consistent over resumes.

A resumed run executes and logs again the steps after its checkpoint: `MetricWriter` first drops
their lines from metrics.jsonl (`trim_metrics`) and tells TensorBoard to hide their events
(`purge_step`), so each step is logged once however often the run was killed.
"""

from __future__ import annotations

import json
import os
import struct
import time

from train import files


class TensorBoardEvents:
    """A TensorBoard event file written synchronously, in the calling thread.

    (tensorboardX's SummaryWriter writes from a daemon thread: a write that fails there, e.g. on
    a full disk, kills the thread with a traceback and later calls block on its full queue.)
    `purge_step` (for a resumed run) tells TensorBoard to discard the events of earlier files
    at that step and after, which the resumed run logs again.
    """

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX import summary  # pylint: disable=g-import-not-at-top
        from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

        self._event_pb2, self._summary = event_pb2, summary
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(
            logdir, f"events.out.tfevents.{time.time():.6f}.{os.uname().nodename}.{os.getpid()}"
        )
        with files.disk_full_check(self.path):
            self._file = open(self.path, "ab", buffering=0)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(event_pb2.Event(
                wall_time=time.time(), step=purge_step,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _write(self, *events) -> None:
        from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top

        records = []
        for event in events:
            data = event.SerializeToString()
            header = struct.pack("Q", len(data))
            records += [header, struct.pack("I", masked_crc32c(header)), data,
                        struct.pack("I", masked_crc32c(data))]
        files.append_whole(self._file, b"".join(records), self.path)

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        now = time.time()
        self._write(*(
            self._event_pb2.Event(wall_time=now, step=step,
                                  summary=self._summary.scalar(name, value))
            for name, value in scalars.items()))

    def close(self) -> None:
        self._file.close()


class MetricWriter:
    """Writes metrics.jsonl and TensorBoard events; a no-op on every process but process 0.

    Every write is flushed at once and either lands whole or not at all; for lack of space it
    raises files.DiskFullError. `resumed_from` (the restored step, 0 for a fresh start) first
    drops the lines of later steps, which the run logs again.
    """

    def __init__(self, workdir: str, enabled: bool, resumed_from: int = 0):
        self.enabled = enabled
        if enabled:
            self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
            trim_metrics(self._jsonl_path, resumed_from)
            tensorboard_dir = os.path.join(workdir, "tensorboard")
            earlier = os.path.isdir(tensorboard_dir) and any(
                name.startswith("events.") for name in os.listdir(tensorboard_dir))
            with files.disk_full_check(self._jsonl_path):
                self._jsonl = open(self._jsonl_path, "ab", buffering=0)
            self._tensorboard = TensorBoardEvents(
                tensorboard_dir, purge_step=resumed_from + 1 if earlier else None)

    def write(self, step: int, kind: str, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, "kind": kind, **scalars}) + "\n"
        files.append_whole(self._jsonl, line.encode(), self._jsonl_path)
        self._tensorboard.scalars(step, {f"{kind}/{name}": v for name, v in scalars.items()})

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


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
