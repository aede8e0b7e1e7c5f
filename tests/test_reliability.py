"""The reliability guards of train/reliability.py on their own: SIGTERM, damaged checkpoints,
non-finite losses and collapse. The end-to-end kills of `python -m train` are in
tests/test_preemption.py."""

import asyncio
import contextlib
import errno
import gc
import glob
import json
import logging as std_logging
import os
import resource
import signal
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import reliability

# ------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_becomes_a_request_and_a_second_one_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with reliability.PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_preempted_names_the_step_and_how_to_resume():
    assert "step 12" in str(reliability.Preempted(12)) and "rerun" in str(reliability.Preempted(12))
    assert reliability.EXIT_PREEMPTED == 128 + signal.SIGTERM


# ------------------------------------------------------------------------ checkpoint integrity


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    key_data: jax.Array


def make_state(step):
    params = {"w": jnp.arange(64.0).reshape(8, 8) * (step + 1),
              "b": jnp.full((8,), step, jnp.float32)}
    return State(step=jnp.asarray(step, jnp.int32), params=params,
                 key_data=jax.random.key_data(jax.random.key(step)))


def save_run(workdir, steps=(1, 2, 3)):
    options = ocp.CheckpointManagerOptions(max_to_keep=5, create=True)
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)
    for step in steps:
        state = make_state(step)
        reliability.record_digest(workdir, step, state, keep_steps=manager.all_steps())
        manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()


def restore(workdir):
    options = ocp.CheckpointManagerOptions(max_to_keep=5, create=True)
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, make_state(0))
    try:
        return reliability.restore_latest_good(manager, abstract, workdir, ocp.args.StandardRestore)
    finally:
        manager.close()


def data_files(workdir, step):
    """The files that hold the array bytes of a checkpoint, largest first."""
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(step), "**", "*"),
                                  recursive=True) if os.path.isfile(f)]
    return sorted(files, key=os.path.getsize, reverse=True)


def test_state_digest_is_stable_and_sees_every_leaf():
    assert reliability.state_digest(make_state(1)) == reliability.state_digest(make_state(1))
    changed = make_state(1).replace(key_data=jax.random.key_data(jax.random.key(9)))
    assert reliability.state_digest(changed) != reliability.state_digest(make_state(1))


def test_intact_checkpoints_restore_the_latest(tmp_path, capsys):
    save_run(str(tmp_path))
    state, step = restore(str(tmp_path))
    assert step == 3 and int(state.step) == 3
    np.testing.assert_array_equal(state.params["w"], make_state(3).params["w"])
    assert "warning" not in capsys.readouterr().out


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert restore(str(tmp_path)) == (None, None)


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete_metadata", "empty_dir"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_with_a_warning(
        tmp_path, capsys, damage):
    workdir = str(tmp_path)
    save_run(workdir)
    latest = os.path.join(workdir, "checkpoints", "3")
    if damage == "truncate":
        for path in data_files(workdir, 3):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif damage == "garble":  # bytes that may still decode: only the digest can tell
        for path in data_files(workdir, 3)[:3]:
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                for i in range(0, len(data), 7):
                    data[i] ^= 0x5A
                f.seek(0)
                f.write(data)
    elif damage == "delete_metadata":
        for path in glob.glob(os.path.join(latest, "**", "*METADATA*"), recursive=True):
            os.remove(path)
    else:
        for path in data_files(workdir, 3):
            os.remove(path)
    state, step = restore(workdir)
    assert step == 2 and int(state.step) == 2
    np.testing.assert_array_equal(state.params["w"], make_state(2).params["w"])
    out = capsys.readouterr().out
    assert "checkpoint at step 3 is damaged" in out and "falling back" in out
    assert not os.path.exists(latest)  # moved aside, so saving step 3 again cannot collide
    assert len(os.listdir(os.path.join(workdir, reliability.DAMAGED_DIR))) == 1


def test_every_checkpoint_damaged_is_an_error_not_a_silent_fresh_start(tmp_path):
    workdir = str(tmp_path)
    save_run(workdir, steps=(1, 2))
    for step in (1, 2):
        for path in data_files(workdir, step):
            os.remove(path)
    with pytest.raises(reliability.CheckpointError, match=r"every checkpoint .* is damaged"):
        restore(workdir)


def test_a_checkpoint_without_a_recorded_digest_is_still_restored(tmp_path):
    workdir = str(tmp_path)
    save_run(workdir)
    os.remove(os.path.join(workdir, reliability.DIGESTS_FILE))
    assert restore(workdir)[1] == 3


# --------------------------------------------------------------------------------- divergence


def test_non_finite_loss_names_the_step_and_the_diagnostics():
    metrics = [{"loss": 2.3, "accuracy": 0.1}, {"loss": 1.9, "accuracy": 0.2},
               {"loss": float("nan"), "accuracy": 0.1, "amplitude": 3.0, "alpha": 0.5}]
    with pytest.raises(reliability.NonFiniteLossError,
                       match=r"loss is nan at step 13; diagnostics at that step: loss=nan, "
                             r"accuracy=0.1, alpha=0.5, amplitude=3.*latest at step 10\) are kept"):
        reliability.check_finite(metrics, first_step=10, last_good_checkpoint=10)
    reliability.check_finite(metrics[:2], first_step=10, last_good_checkpoint=10)  # no error
    with pytest.raises(reliability.NonFiniteLossError, match=r"inf at step 1;.*no checkpoint"):
        reliability.check_finite([{"loss": np.float32(np.inf)}], 0, None)


# ----------------------------------------------------------------------------------- collapse


def test_top_class_fraction():
    logits = jnp.array([[1.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    assert float(reliability.top_class_fraction(logits)) == 0.75
    assert float(reliability.top_class_fraction(jnp.zeros((8, 10)))) == 1.0


def feed(detector, intervals, every=50):
    """Feeds (accuracy, amplitude, top_class_fraction) means, one per `every` steps."""
    for i, (accuracy, amplitude, top) in enumerate(intervals):
        detector.update((i + 1) * every, every, {"accuracy": accuracy, "amplitude": amplitude,
                                                 "top_class_fraction": top})


def test_a_healthy_run_and_a_slow_start_are_not_collapse():
    detector = reliability.CollapseDetector(10, alpha=0.1, window_steps=300, min_steps=100)
    # Chance accuracy for a while at the start, but features of normal size, mixed predictions.
    feed(detector, [(0.1, 5.0, 0.3)] * 20 + [(0.5 + i / 100, 8.0, 0.12) for i in range(40)])


@pytest.mark.parametrize("symptom", ["amplitude", "one_class"])
def test_collapse_is_detected_after_the_window_with_cause_and_remedy(symptom):
    detector = reliability.CollapseDetector(10, alpha=2.0, window_steps=300, min_steps=100)
    healthy = [(0.6, 10.0, 0.12)] * 6
    collapsed = (0.1, 0.01, 0.3) if symptom == "amplitude" else (0.1, 5.0, 1.0)
    feed(detector, healthy + [collapsed] * 5)  # 250 steps of collapse: not yet
    with pytest.raises(reliability.TrainingCollapsedError) as raised:
        feed(detector, healthy + [collapsed] * 7)
    message = str(raised.value)
    assert "alpha = 2 is too large" in message and "use a smaller alpha" in message
    assert "at chance" in message
    assert ("down from a peak of 10" in message) if symptom == "amplitude" else (
        "100% of predictions are one class" in message)


def test_a_recovery_resets_the_window():
    detector = reliability.CollapseDetector(10, alpha=1.0, window_steps=300, min_steps=0)
    collapsed, healthy = (0.1, 0.01, 1.0), (0.5, 8.0, 0.1)
    feed(detector, [healthy] + [collapsed] * 5 + [healthy] + [collapsed] * 5)  # never 300 in a row


# ---------------------------------------------------------------------------------- full disk


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


def test_disk_full_cause_reads_os_errors_and_orbax_messages():
    assert reliability.disk_full_cause(OSError(errno.ENOSPC, "x")).startswith("ENOSPC: ")
    assert reliability.disk_full_cause(OSError(errno.EFBIG, "x")).startswith("EFBIG: ")
    assert reliability.disk_full_cause(OSError(errno.EDQUOT, "x")).startswith("EDQUOT: ")
    orbax = ValueError('RESOURCE_EXHAUSTED: Error writing "params.Dense_0.kernel/0.0" in OCDBT '
                       'database: Failed to write 1316143 bytes to file 5: No space left on '
                       "device [os_error_code='28']")
    assert reliability.disk_full_cause(orbax).startswith("ENOSPC: ")
    try:
        raise RuntimeError("save failed") from orbax
    except RuntimeError as wrapped:
        assert reliability.disk_full_cause(wrapped).startswith("ENOSPC: ")
    assert reliability.disk_full_cause(OSError(errno.EACCES, "Permission denied")) is None
    assert reliability.disk_full_cause(ValueError("NOT_FOUND [os_error_code='2']")) is None


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with file_size_limit(100), pytest.raises(reliability.DiskFullError) as raised:
        reliability.atomic_write_text(str(path), "x" * 1000)
    assert str(raised.value).startswith(f"no space left on device writing {path} (EFBIG: ")
    assert "rerun the same command to resume" in str(raised.value)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    reliability.atomic_write_text(str(path), "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]


def test_a_failed_metrics_write_leaves_only_whole_lines(tmp_path):
    from train import train

    writer = train.MetricWriter(str(tmp_path), enabled=True)
    writer.write(1, "train", {"loss": 1.0})
    size = (tmp_path / "metrics.jsonl").stat().st_size
    with (file_size_limit(size + 40),
          pytest.raises(reliability.DiskFullError, match="metrics.jsonl")):
        writer.write(2, "train", {"loss": 0.5, "accuracy": 0.25, "learning_rate": 0.1})
    writer.write(3, "train", {"loss": 0.25})  # space again
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 3]


def test_remove_partial_writes_removes_unfinished_checkpoints_and_temporaries(tmp_path):
    save_run(str(tmp_path), steps=(1,))
    unfinished = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp" / "default"
    unfinished.mkdir(parents=True)
    (tmp_path / f"results.json.partial{os.getpid()}").write_text("{")
    (tmp_path / "metrics.jsonl").write_text("")
    removed = reliability.remove_partial_writes(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        "2.orbax-checkpoint-tmp", f"results.json.partial{os.getpid()}"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert restore(str(tmp_path))[1] == 1


def test_remove_stale_temporaries_keeps_those_of_live_writers(tmp_path):
    exited = subprocess.Popen(["true"])
    exited.wait()
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            names = [f"results.json.partial{exited.pid}", f"config.json.partial{alive.pid}",
                     f"digests.json.partial{os.getpid()}", "notes.partial", "results.json"]
            for name in names:
                (tmp_path / name).write_text("{")
            removed = reliability.remove_stale_temporaries(str(tmp_path))
        finally:
            alive.kill()
    assert [os.path.basename(p) for p in removed] == [f"results.json.partial{exited.pid}"]
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


def test_unretrieved_disk_full_futures_are_not_logged_other_errors_are(monkeypatch, caplog):
    """asyncio logs a garbage-collected future whose exception nobody retrieved; for the
    writes of a save that failed for lack of space, that is an echo of the one-line error."""
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored afterwards
    asyncio_logger = std_logging.getLogger("asyncio")
    filters = list(asyncio_logger.filters)
    reliability.quiet_disk_full_tracebacks()

    def abandon(exception):
        loop = asyncio.new_event_loop()
        loop.create_future().set_exception(exception)  # dropped at once: never retrieved
        loop.close()
        gc.collect()

    try:
        with caplog.at_level(std_logging.ERROR, logger="asyncio"):
            abandon(ValueError("RESOURCE_EXHAUSTED: Error writing \"params\" in OCDBT database: "
                               "Failed to write 1303728 bytes to file 15: No space left on "
                               "device [os_error_code='28']"))
            assert not caplog.records
            abandon(ValueError("something else went wrong"))
            assert [r.exc_info[1].args[0] for r in caplog.records] == ["something else went wrong"]
    finally:
        asyncio_logger.filters[:] = filters


# ----------------------------------------------------------------------------- resume hygiene


def test_trim_metrics_drops_the_steps_after_the_checkpoint_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 7)]
    records.insert(4, {"step": 4, "kind": "eval", "test_loss": 0.5})
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + '{"step": 7, "kind": "tr')  # cut short by a kill
    assert reliability.trim_metrics(str(path), 4) == 3
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in kept] == [
        (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval")]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    inode = path.stat().st_ino
    assert reliability.trim_metrics(str(path), 4) == 0 and path.stat().st_ino == inode  # untouched
    assert reliability.trim_metrics(str(path), 0) == 5 and path.read_text() == ""
    assert reliability.trim_metrics(str(tmp_path / "missing.jsonl"), 3) == 0
