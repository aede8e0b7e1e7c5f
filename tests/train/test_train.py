"""The training loop under `tfds.testing.mock_data`: one step, a short run, resume, sharding."""

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from train import input_pipeline, models, train
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


@pytest.mark.parametrize(
    "loss",
    # The baselines compile a train step each: slow on a shared CPU, so only noisy runs fast.
    [
        pytest.param(name, marks=() if name == "noisy" else pytest.mark.slow)
        for name in train.LOSSES
    ],
)
def test_one_train_step(tmp_path, mock_mnist, loss):
    config = tiny_config(tmp_path, loss=loss)
    images, labels = input_pipeline.load_split("mnist", "train", config.data_dir, prepare=False)
    model = models.create_model(config.model, num_classes=10)
    learning_rate = train.learning_rate_schedule(config, 4)
    state = train.create_train_state(
        config, model, train.create_optimizer(config, learning_rate), (28, 28, 1)
    )
    step = jax.jit(
        lambda s, x, y: train.train_step(
            s,
            x,
            y,
            config=config,
            learning_rate=learning_rate,
            alpha_fn=train.alpha_schedule(config, 4),
        )
    )
    new_state, metrics = step(state, images[:16], labels[:16])
    assert int(new_state.step) == 1
    assert new_state.key_data.dtype == np.uint32  # raw key data, no typed key in the state
    for name in ("loss", "accuracy", "learning_rate", "alpha", "target_prob", "saturated_fraction"):
        assert np.isfinite(metrics[name]), name
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params, new_state.params)
    assert all(jax.tree.leaves(changed))


def test_noise_key_is_folded_with_the_step(tmp_path):
    config = tiny_config(tmp_path)
    state = train.create_train_state(
        config, models.create_model("small_cnn", 10), optax.sgd(0.1), (28, 28, 1)
    )
    key0, key1 = state.step_key(), state.replace(step=state.step + 1).step_key()
    assert not np.array_equal(jax.random.key_data(key0), jax.random.key_data(key1))
    expected = jax.random.fold_in(jax.random.wrap_key_data(state.key_data), 1)
    np.testing.assert_array_equal(jax.random.key_data(key1), jax.random.key_data(expected))


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
    # The training time beside each checkpoint: at step 3 that of the interval logged at 2.
    times = train.read_train_times(str(workdir))
    assert sorted(times) == ["3", "6"]
    assert times["3"]["timed_steps"] == 2 and times["6"]["timed_steps"] == 6
    assert 0 < times["3"]["train_time_s"] < times["6"]["train_time_s"] == results["train_time_s"]
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
    before = train.read_train_times(str(interrupted))["3"]
    resumed = train.train_and_evaluate(config, str(interrupted))
    # Steps 4-6 ran in two log intervals (4, then 5-6): 3 timed steps added to the 2 before.
    assert resumed["train_time_s"] > before["train_time_s"]
    assert train.read_train_times(str(interrupted))["6"]["timed_steps"] == 2 + 3
    assert resumed["images_per_sec"] == pytest.approx(5 * 16 / resumed["train_time_s"])
    assert resumed["train_time_complete"]
    # A rerun of the finished run trains nothing and reports the time the run took.
    again = train.train_and_evaluate(config, str(interrupted))
    assert again["resumed_from_step"] == 6
    assert again["train_time_s"] == resumed["train_time_s"]
    assert again["images_per_sec"] == resumed["images_per_sec"]
    # A checkpoint without a recorded time (a run from before the record): said so.
    os.remove(interrupted / train.TRAIN_TIME_FILE)
    unknown = train.train_and_evaluate(config, str(interrupted))
    assert not unknown["train_time_complete"]
    assert unknown["params_sha256"] == uninterrupted["params_sha256"]


def test_resume_refuses_a_different_config(tmp_path):
    train.check_or_write_config(tiny_config(tmp_path), str(tmp_path), write=True)
    with pytest.raises(train.WorkdirError, match="alpha: 0.1 there, 0.2 now"):
        train.train_and_evaluate(tiny_config(tmp_path, alpha=0.2), str(tmp_path))


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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config_name", "image_shape"), [("mnist_paper", (28, 28, 1)), ("cifar10_plus", (32, 32, 3))]
)
def test_paper_configs_take_a_train_step(config_name, image_shape):
    """The VGG nets (batch norm) and the on-device CIFAR-10+ augmentation inside the step."""
    import importlib

    config = importlib.import_module(f"train.configs.{config_name}").get_config("runlocal")
    info = input_pipeline.DATASETS[config.dataset]
    model = models.create_model(config.model, info.num_classes)
    learning_rate = train.learning_rate_schedule(config, config.num_steps)
    state = train.create_train_state(
        config, model, train.create_optimizer(config, learning_rate), image_shape
    )
    assert state.batch_stats  # the VGG nets use batch norm
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, *image_shape), dtype=np.uint8)
    labels = rng.integers(0, info.num_classes, 8).astype(np.int32)
    step = jax.jit(
        lambda s, x, y: train.train_step(
            s,
            x,
            y,
            config=config,
            learning_rate=learning_rate,
            alpha_fn=train.alpha_schedule(config, config.num_steps),
        )
    )
    new_state, metrics = step(state, images, labels)
    assert np.isfinite(metrics["loss"])
    moved = jax.tree.map(
        lambda a, b: not np.allclose(a, b), state.batch_stats, new_state.batch_stats
    )
    assert all(jax.tree.leaves(moved))
