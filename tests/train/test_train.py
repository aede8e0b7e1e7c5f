"""The training loop of train/train.py under `tfds.testing.mock_data`: a short run, resume
(also of a workdir written before the checkpoint metadata), sharding."""

import json
import os
import shutil
import subprocess

import jax
import pytest
import tensorflow_datasets as tfds

from train import checkpointing, config_checks, errors, train
from train.configs import default


def finished_pid() -> int:
    """The id of a process that has exited and been reaped: no process has it (for now)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def tiny_config(tmp_path, **overrides):
    config = default.get_config()
    config.data_dir = str(tmp_path / "no_data_here")  # mock_data serves every read
    config.prepare_data = False
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_steps = 4
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.max_checkpoints_to_keep = 5
    config.progress_bar = False
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture
def mock_mnist():
    with tfds.testing.mock_data(num_examples=64):
        yield


def train_time_at(workdir, step):
    """The training time recorded with the checkpoint of `step`."""
    checkpoints = checkpointing.Checkpoints(str(workdir), max_to_keep=5)
    try:
        return checkpointing.TrainTime.from_record(checkpoints.record(step))
    finally:
        checkpoints.close()


def strip_records(workdir, step):
    """Empties the custom metadata of a checkpoint, as the code before it wrote them; returns
    what it held."""
    path = workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA"
    metadata = json.loads(path.read_text())
    record, metadata["custom_metadata"] = metadata["custom_metadata"], {}
    path.write_text(json.dumps(metadata))
    return record


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step run on all (8 emulated) devices with checkpoints at steps 3 and 6."""
    tmp_path = tmp_path_factory.mktemp("finished_run")
    config = tiny_config(tmp_path, num_steps=6, checkpoint_every_steps=3, alpha_schedule="linear")
    with tfds.testing.mock_data(num_examples=64):
        results = train.train_and_evaluate(config, str(tmp_path / "run"))
    return config, tmp_path / "run", results


def test_short_train_and_evaluate_writes_its_outputs(finished_run):
    _, workdir, results = finished_run
    with open(workdir / "results.json") as f:
        assert json.load(f) == results
    for key in (
        "dataset",
        "loss",
        "noise",
        "alpha",
        "seed",
        "steps",
        "test_accuracy",
        "test_error",
        "train_time_s",
        "images_per_sec",
        "params_sha256",
    ):
        assert key in results
    assert results["steps"] == 6 and len(results["params_sha256"]) == 64
    assert results["test_error"] == pytest.approx(1 - results["test_accuracy"])
    records = _read_jsonl(workdir / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    for key in (
        "loss",
        "learning_rate",
        "alpha",
        "target_prob",
        "saturated_fraction",
        "images_per_sec",
    ):
        assert key in train_records[0]
    assert train_records[0]["alpha"] > train_records[-1]["alpha"]  # the linear alpha schedule
    assert any(r["kind"] == "eval" and "test_accuracy" in r for r in records)
    assert os.listdir(workdir / "tensorboard")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    # The training time saved with each checkpoint: at step 3 that of the interval logged at 2.
    times = {step: train_time_at(workdir, step) for step in (3, 6)}
    assert times[3].timed_steps == 2 and times[6].timed_steps == 6
    assert 0 < times[3].seconds < times[6].seconds == results["train_time_s"]
    assert sorted(os.listdir(workdir)) == [
        "checkpoints", "config.json", "metrics.jsonl", "results.json", "tensorboard"]
    assert results["images_per_sec"] == pytest.approx(6 * 16 / results["train_time_s"])
    assert results["train_time_complete"]


def test_resume_gives_the_uninterrupted_result(finished_run, tmp_path, mock_mnist):
    config, workdir, uninterrupted = finished_run
    # A copy of the run as if it had been stopped before its step-6 checkpoint was written.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(workdir, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "6")
    # ... by a SIGKILL in the middle of an atomic write, whose temporary file stayed behind.
    stale = interrupted / f"results.json.partial{finished_pid()}"
    stale.write_text('{"test_acc')
    resumed = train.train_and_evaluate(config, str(interrupted))
    assert not stale.exists()
    assert resumed["resumed_from_step"] == 3
    assert resumed["params_sha256"] == uninterrupted["params_sha256"]
    assert resumed["test_loss"] == uninterrupted["test_loss"]


def test_a_resumed_run_reports_the_training_time_of_all_its_invocations(
        finished_run, tmp_path, mock_mnist):
    config, workdir, uninterrupted = finished_run
    interrupted = tmp_path / "interrupted"
    shutil.copytree(workdir, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "6")
    before = train_time_at(interrupted, 3)
    resumed = train.train_and_evaluate(config, str(interrupted))
    # Steps 4-6 ran in two log intervals (4, then 5-6): 3 timed steps added to the 2 before.
    assert resumed["train_time_s"] > before.seconds
    assert train_time_at(interrupted, 6).timed_steps == 2 + 3
    assert resumed["images_per_sec"] == pytest.approx(5 * 16 / resumed["train_time_s"])
    assert resumed["train_time_complete"]
    # A rerun of the finished run trains nothing and reports the time the run took.
    again = train.train_and_evaluate(config, str(interrupted))
    assert again["resumed_from_step"] == 6
    assert again["train_time_s"] == resumed["train_time_s"]
    assert again["images_per_sec"] == resumed["images_per_sec"]
    # A checkpoint without a recorded time (a run from before the record): said so.
    strip_records(interrupted, 6)
    unknown = train.train_and_evaluate(config, str(interrupted))
    assert not unknown["train_time_complete"]
    assert unknown["params_sha256"] == uninterrupted["params_sha256"]


def test_resume_refuses_a_different_config(tmp_path):
    config_checks.check_or_write_config(tiny_config(tmp_path), str(tmp_path), write=True)
    with pytest.raises(errors.WorkdirError, match="alpha: 0.1 there, 0.2 now"):
        train.train_and_evaluate(tiny_config(tmp_path, alpha=0.2), str(tmp_path))
    with pytest.raises(errors.WorkdirError, match="stop_norm_gradient: False there, True now"):
        train.train_and_evaluate(tiny_config(tmp_path, stop_norm_gradient=True), str(tmp_path))


@pytest.mark.slow
def test_eight_devices_match_one_device(finished_run, tmp_path, mock_mnist):
    config, workdir, eight = finished_run
    assert eight["num_devices"] == 8, "tests/conftest.py should emulate 8 CPU devices"
    one = train.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])
    assert one["num_devices"] == 1
    assert eight["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    assert eight["test_accuracy"] == one["test_accuracy"]
    pairs = list(
        zip(_read_jsonl(tmp_path / "one" / "metrics.jsonl"), _read_jsonl(workdir / "metrics.jsonl"))
    )
    assert len(pairs) == 5  # train at steps 2, 4, 6; eval after the epoch (4) and at 6
    for a, b in pairs:
        assert a["step"] == b["step"]
        for key in ("loss", "accuracy", "target_prob", "amplitude", "test_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("side_files", [True, False])
def test_a_workdir_from_before_the_checkpoint_metadata_resumes(
        finished_run, tmp_path, mock_mnist, side_files):
    """Digests and training times in `checkpoint_digests.json` and `train_time.json`, a
    config.json without the keys added since: it resumes, and the records still count."""
    config, workdir, uninterrupted = finished_run
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    shutil.rmtree(old / "checkpoints" / "6")
    record = strip_records(old, 3)
    if side_files:
        (old / checkpointing.LEGACY_DIGESTS_FILE).write_text(
            json.dumps({"3": record["state_sha256"]}))
        (old / checkpointing.LEGACY_TRAIN_TIME_FILE).write_text(json.dumps(
            {"3": {"train_time_s": record["train_time_s"], "timed_steps": record["timed_steps"]}}))
    saved_config = json.loads((old / "config.json").read_text())
    del saved_config["stop_norm_gradient"]
    (old / "config.json").write_text(json.dumps(saved_config))
    resumed = train.train_and_evaluate(config, str(old))
    assert resumed["resumed_from_step"] == 3
    assert resumed["params_sha256"] == uninterrupted["params_sha256"]
    assert resumed["train_time_complete"] == side_files
    if side_files:
        assert resumed["train_time_s"] > record["train_time_s"]
        assert train_time_at(old, 6).timed_steps == record["timed_steps"] + 3
    assert json.loads((old / "config.json").read_text())["stop_norm_gradient"] is False


def test_the_host_runs_at_most_max_steps_ahead_of_the_devices(monkeypatch):
    # Each added step beyond the bound waits for the step MAX_STEPS_AHEAD + 1 back, so no more
    # than MAX_STEPS_AHEAD dispatched steps are ever unfinished (the multi-process deadlock).
    waited = []
    monkeypatch.setattr(train.jax, "block_until_ready", lambda x: waited.append(x) or x)
    log = train.TrainLog(None, None, train.Progress(False, total=20, initial=0), batch_size=1,
                         first_step=0, earlier=checkpointing.TrainTime())
    metrics = [{"loss": jax.numpy.asarray(float(i))} for i in range(20)]
    for step_metrics in metrics:
        log.add(step_metrics)
    assert train.MAX_STEPS_AHEAD < 32  # XLA:CPU's limit of computations in flight per device
    assert [m is w for m, w in zip(metrics, waited)] == [True] * (20 - train.MAX_STEPS_AHEAD)
    assert len(waited) == 20 - train.MAX_STEPS_AHEAD
