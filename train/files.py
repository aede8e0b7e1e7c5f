"""Writes into the workdir that land whole or not at all, and a full disk reported in one line.

  atomic_write_text   a file replaced through a temporary and `os.replace`: a kill or a full
                      disk leaves the old file or the new one, never a truncated one.
  append_whole        an append to an open file (metrics.jsonl, TensorBoard events) that is
                      cut back on failure, so no half-written line or record is left.
  DiskFullError       a write failed for lack of space (ENOSPC, EDQUOT, or EFBIG from a
                      file-size limit): the run stops with one line naming the file, what was
                      half-written is removed (`remove_partial_writes`), and rerunning resumes.
  remove_stale_temporaries
                      at start, removes the temporary files of atomic writes whose writer was
                      killed before it could rename them.
  check_workdir       a workdir that cannot be written fails before any work is done.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging as std_logging
import os
import re
import shutil
import sys
from collections.abc import Callable

from absl import logging

from train import errors

# ENOSPC: the file system is full; EDQUOT: the user's quota is; EFBIG: a file-size limit
# (`ulimit -f`, RLIMIT_FSIZE) was reached.
DISK_FULL_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EFBIG: "EFBIG"}
# Orbax/TensorStore report a failed write as a ValueError naming the errno in its message.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")
_TEMPORARY_SUFFIX = ".partial"  # atomic_write_text's temporary files: `<path><suffix><pid>`
ORBAX_TEMPORARY = ".orbax-checkpoint-tmp"  # in the name of an unfinished Orbax save


class DiskFullError(errors.RunError, OSError):
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


@contextlib.contextmanager
def partial_writes_removed_on_disk_full(workdir: str, *, enabled: bool = True):
    """On a DiskFullError inside the block, removes what was half-written (an unfinished
    checkpoint, a temporary file) before re-raising; the finished checkpoints stay, so rerunning
    once there is space resumes. `enabled=False` (processes other than the writer) only re-raises.
    """
    try:
        yield
    except DiskFullError:
        if enabled:
            removed = remove_partial_writes(workdir)
            if removed:
                logging.warning("Disk full: removed the half-written %s", ", ".join(removed))
        raise


def check_workdir(workdir: str) -> None:
    """Creates `workdir` and proves it writable, so a bad path fails before any work is done.

    Raises:
      errors.WorkdirError: it cannot be created or written.
      DiskFullError: it can, but not for lack of space.
    """
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        if os.path.exists(probe):  # created, then the write failed (a full disk)
            os.remove(probe)
        cause = disk_full_cause(error)
        if cause:
            raise DiskFullError(workdir, cause) from None
        raise errors.WorkdirError(
            f"workdir {workdir!r} is not writable: {error.strerror or error}"
        ) from None


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


def append_whole(file, data: bytes, path: str) -> None:
    """Appends `data` to `file` (opened unbuffered, "ab"); on failure cuts the file back to
    where it was, so no half-written line or record is left, and raises DiskFullError for lack
    of space."""
    descriptor = file.fileno()
    position = os.lseek(descriptor, 0, os.SEEK_END)
    try:
        with disk_full_check(path):
            view = memoryview(data)
            while view:  # a write can be partial: up to the limit, the next one fails
                view = view[os.write(descriptor, view):]
    except BaseException:
        try:  # cutting a file back needs no space
            os.ftruncate(descriptor, position)
        except OSError:
            pass
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
    unfinished = glob.glob(os.path.join(workdir, "checkpoints", f"*{ORBAX_TEMPORARY}*"))
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
