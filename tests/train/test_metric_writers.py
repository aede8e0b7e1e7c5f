"""metrics.jsonl and TensorBoard events of train/metric_writers.py: whole lines only, and the
steps after a resumed checkpoint dropped."""

import json
import os

import pytest

from tests.train import test_main
from tests.train.test_files import file_size_limit
from train import files, metric_writers


def test_a_failed_metrics_write_leaves_only_whole_lines(tmp_path):
    writer = metric_writers.MetricWriter(str(tmp_path), enabled=True)
    writer.write(1, "train", {"loss": 1.0})
    size = (tmp_path / "metrics.jsonl").stat().st_size
    with (file_size_limit(size + 40),
          pytest.raises(files.DiskFullError, match="metrics.jsonl")):
        writer.write(2, "train", {"loss": 0.5, "accuracy": 0.25, "learning_rate": 0.1})
    writer.write(3, "train", {"loss": 0.25})  # space again
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 3]


def test_trim_metrics_drops_the_steps_after_the_checkpoint_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 7)]
    records.insert(4, {"step": 4, "kind": "eval", "test_loss": 0.5})
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + '{"step": 7, "kind": "tr')  # cut short by a kill
    assert metric_writers.trim_metrics(str(path), 4) == 3
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in kept] == [
        (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval")]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    inode = path.stat().st_ino
    assert metric_writers.trim_metrics(str(path), 4) == 0
    assert path.stat().st_ino == inode  # untouched
    assert metric_writers.trim_metrics(str(path), 0) == 5 and path.read_text() == ""
    assert metric_writers.trim_metrics(str(tmp_path / "missing.jsonl"), 3) == 0


def _log(writer, steps):
    for step in steps:
        writer.write(step, "train", {"loss": 1.0 / step, "accuracy": 0.5})
        if step % 3 == 0:
            writer.write(step, "eval", {"test_accuracy": 0.9})


def _shown(workdir):
    return sorted(test_main.tensorboard_entries(workdir))


def _killed(workdir, steps):
    """What a run SIGKILLed after logging `steps` leaves: metrics.jsonl whole, the events that
    SummaryWriter's thread had not written lost (here: all of them), and complete_through.json
    as the run wrote it at its start."""
    marker = workdir / "tensorboard" / metric_writers.COMPLETE_FILE
    written = set((workdir / "tensorboard").glob("events.*"))
    writer = metric_writers.MetricWriter(str(workdir), enabled=True,
                                         resumed_from=_last_logged(workdir))
    at_start = marker.read_text()
    _log(writer, steps)
    writer.close()
    for path in set((workdir / "tensorboard").glob("events.*")) - written:
        path.write_bytes(path.read_bytes()[:200])  # the file's first events only
    marker.write_text(at_start)


def _last_logged(workdir):
    path = workdir / "metrics.jsonl"
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()), default=0) \
        if path.exists() else 0


def _uninterrupted(tmp_path, steps):
    workdir = tmp_path / "uninterrupted"
    workdir.mkdir()
    with metric_writers.MetricWriter(str(workdir), enabled=True) as writer:
        _log(writer, steps)
    return _shown(workdir)


@pytest.mark.parametrize("killed", [False, True])
def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path, killed):
    workdir = tmp_path / "run"
    workdir.mkdir()
    if killed:  # SummaryWriter's unwritten events are lost; metrics.jsonl has every step
        _killed(workdir, range(1, 8))
    else:  # stopped cleanly (SIGTERM, a full disk) after step 7
        with metric_writers.MetricWriter(str(workdir), enabled=True) as writer:
            _log(writer, range(1, 8))
    with metric_writers.MetricWriter(str(workdir), enabled=True, resumed_from=5) as writer:
        _log(writer, range(6, 13))  # steps 6 and 7 again, from the checkpoint at step 5
    shown = _shown(workdir)
    assert len(shown) == len(set(shown))
    assert shown == _uninterrupted(tmp_path, range(1, 13))
    marker = json.loads((workdir / "tensorboard" / metric_writers.COMPLETE_FILE).read_text())
    assert marker == {"step": 12}


def test_events_are_written_again_from_the_last_clean_close_over_several_kills(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with metric_writers.MetricWriter(str(workdir), enabled=True) as writer:
        _log(writer, range(1, 4))  # closed cleanly at step 3
    _killed(workdir, range(4, 7))
    metric_writers.trim_metrics(str(workdir / "metrics.jsonl"), 5)  # as a resume from step 5
    _killed(workdir, range(6, 9))
    with metric_writers.MetricWriter(str(workdir), enabled=True, resumed_from=8) as writer:
        _log(writer, range(9, 11))
    assert _shown(workdir) == _uninterrupted(tmp_path, range(1, 11))


def test_a_workdir_of_the_synchronous_writer_is_trusted_up_to_its_checkpoint(tmp_path):
    # Written before complete_through.json existed: every event was on disk as it was logged.
    workdir = tmp_path / "run"
    workdir.mkdir()
    with metric_writers.MetricWriter(str(workdir), enabled=True) as writer:
        _log(writer, range(1, 8))
    (workdir / "tensorboard" / metric_writers.COMPLETE_FILE).unlink()
    earlier = set((workdir / "tensorboard").glob("events.*"))
    with metric_writers.MetricWriter(str(workdir), enabled=True, resumed_from=5) as writer:
        _log(writer, range(6, 9))
    assert _shown(workdir) == _uninterrupted(tmp_path, range(1, 9))
    [new_file] = set((workdir / "tensorboard").glob("events.*")) - earlier
    steps = {event.step for event in test_main.read_events(new_file) if event.summary.value}
    assert steps == {6, 7, 8}  # purged from step 6, nothing before it written again
