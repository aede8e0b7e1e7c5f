"""metrics.jsonl and TensorBoard events of train/metric_writers.py: whole lines only, and the
steps after a resumed checkpoint dropped."""

import json
import os

import pytest

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
