"""Writes into the workdir of train/files.py: atomic writes, a full disk reported in one line,
the litter of killed and failed writes removed."""

import contextlib
import errno
import os
import resource
import subprocess

import pytest

from tests.train.test_checkpointing import restore, save_run
from train import errors, files


@contextlib.contextmanager
def file_size_limit(limit_bytes):
    """Real EFBIG for writes past `limit_bytes` in this process (the soft RLIMIT_FSIZE; Python
    ignores SIGXFSZ), restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


ORBAX_NO_SPACE = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.Dense_0.kernel/0.0" in OCDBT database: Failed to '
    "write 1316143 bytes to file 5: No space left on device [os_error_code='28']")


def chained(error):
    try:
        raise RuntimeError("save failed") from error
    except RuntimeError as wrapped:
        return wrapped


@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, "x"), "ENOSPC: "),
    (OSError(errno.EFBIG, "x"), "EFBIG: "),
    (OSError(errno.EDQUOT, "x"), "EDQUOT: "),
    (ORBAX_NO_SPACE, "ENOSPC: "),
    (chained(ORBAX_NO_SPACE), "ENOSPC: "),
    (OSError(errno.EACCES, "Permission denied"), None),
    (ValueError("NOT_FOUND [os_error_code='2']"), None),
])
def test_disk_full_cause_reads_os_errors_and_orbax_messages(error, cause):
    found = files.disk_full_cause(error)
    assert found is None if cause is None else found.startswith(cause)


def test_disk_full_error_is_a_run_error():
    assert isinstance(files.DiskFullError("/x", "ENOSPC: No space left"), errors.RunError)


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with file_size_limit(100), pytest.raises(files.DiskFullError) as raised:
        files.atomic_write_text(str(path), "x" * 1000)
    assert str(raised.value).startswith(f"no space left on device writing {path} (EFBIG: ")
    assert "rerun the same command to resume" in str(raised.value)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    files.atomic_write_text(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]


def test_remove_partial_writes_removes_unfinished_checkpoints_and_temporaries(tmp_path):
    save_run(str(tmp_path), steps=(1,))
    unfinished = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp" / "default"
    unfinished.mkdir(parents=True)
    (tmp_path / f"results.json.partial{os.getpid()}").write_text("{")
    (tmp_path / "metrics.jsonl").write_text("")
    removed = files.remove_partial_writes(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        "2.orbax-checkpoint-tmp", f"results.json.partial{os.getpid()}"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert restore(str(tmp_path)).step == 1


def test_remove_stale_temporaries_keeps_those_of_live_writers(tmp_path):
    exited = subprocess.Popen(["true"])
    exited.wait()
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            names = [f"results.json.partial{exited.pid}", f"config.json.partial{alive.pid}",
                     f"digests.json.partial{os.getpid()}", "notes.partial", "results.json"]
            for name in names:
                (tmp_path / name).write_text("{")
            removed = files.remove_stale_temporaries(str(tmp_path))
        finally:
            alive.kill()
    assert [os.path.basename(p) for p in removed] == [f"results.json.partial{exited.pid}"]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])
