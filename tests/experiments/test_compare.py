"""The comparison runner: its resumability, its flags and the variants it trains, without data."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import compare, sweeps
from noisy_softmax_jax import HeadOutput
from tests.experiments import fake_runs
from train import steps
from train import train as train_lib


def test_stop_norm_gradient_leaves_only_the_gradient_through_the_logits():
    config = sweeps.run_config(sweeps.Run("mnist", "noisy_a1.0_nonormgrad", 0))
    labels = jnp.array([0, 1])
    logits = jnp.array([[1.0, 0.5, -1.0], [0.2, 0.1, 0.3]])
    norms = (jnp.array([2.0, 3.0]), jnp.array([1.0, 1.5, 2.0]))

    def gradients(stop_norm_gradient):
        config.stop_norm_gradient = stop_norm_gradient

        def loss(feature_norm, class_norm, logits):
            output = HeadOutput(logits, feature_norm, class_norm)
            return steps.compute_losses(config, output, labels, jax.random.key(0), 1.0).sum()

        return jax.grad(loss, argnums=(0, 1, 2))(*norms, logits)

    through, stopped = gradients(False), gradients(True)
    assert float(jnp.abs(through[0]).sum()) > 0 and float(jnp.abs(through[1]).sum()) > 0
    np.testing.assert_array_equal(stopped[0], 0.0)
    np.testing.assert_array_equal(stopped[1], 0.0)
    # The gradient through the logits is the same: the noise and the amplitude's value are.
    np.testing.assert_allclose(stopped[2], through[2], rtol=1e-6)


def test_train_runs_skips_finished_runs_and_survives_a_failure(tmp_path, monkeypatch):
    calls = []

    def fake(config, workdir):
        calls.append((config.dataset, config.loss, config.seed))
        return fake_runs.fake_run(config, workdir)

    monkeypatch.setattr(train_lib, "train_and_evaluate", fake)
    runs = sweeps.plan(["main"], ["mnist"], [0, 99, 1], ["softmax", "noisy_a0.1"])
    compare.train_runs(runs, str(tmp_path))
    assert len(calls) == 6
    for run in runs:
        workdir = run.workdir(str(tmp_path))
        if run.seed == 99:
            assert "boom" in fake_runs.read(os.path.join(workdir, "error.txt"))
            assert not os.path.exists(os.path.join(workdir, "results.json"))
        else:
            assert os.path.exists(os.path.join(workdir, "run_info.json"))
            assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    calls.clear()
    compare.train_runs(runs, str(tmp_path))  # again: only the failed runs are retried
    assert sorted(calls) == [("mnist", "noisy", 99), ("mnist", "softmax", 99)]


def test_train_runs_records_the_variant_in_config_json(tmp_path, monkeypatch):
    monkeypatch.setattr(train_lib, "train_and_evaluate", fake_runs.fake_run)
    runs = sweeps.plan(
        ["main", "alpha_range"], ["mnist"], [0], ["noisy_a0.5", "noisy_a0.5_nonormgrad"]
    )
    compare.train_runs(runs, str(tmp_path))
    recorded = {}
    for run in runs:
        with open(os.path.join(run.workdir(str(tmp_path)), "config.json")) as f:
            recorded[run.name] = json.load(f)["stop_norm_gradient"]
    assert recorded == {"noisy_a0.5": False, "noisy_a0.5_nonormgrad": True}


def test_train_runs_decodes_each_split_once_for_the_whole_grid(tmp_path, monkeypatch):
    from train import input_pipeline

    seen = []

    def fake(config, workdir):
        seen.append(input_pipeline.load_split(config.dataset, "test", config.data_dir))
        return fake_runs.fake_run(config, workdir)

    decoded = []

    def decode(dataset, split, data_dir, **kwargs):
        decoded.append((dataset, split))
        return np.zeros((2, 28, 28, 1), np.uint8), np.zeros((2,), np.int32)

    monkeypatch.setattr(train_lib, "train_and_evaluate", fake)
    monkeypatch.setattr(input_pipeline, "_decode_split", decode)
    compare.train_runs(sweeps.plan(["main"], ["mnist"], [0, 1], ["softmax"]), str(tmp_path))
    assert len(seen) == 2 and seen[0][0] is seen[1][0] and len(decoded) == 1
    input_pipeline.load_split("mnist", "test", "~/tensorflow_datasets")
    assert len(decoded) == 2  # the cache ends with the grid


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["prog", "--report-only"], ["prog", "--report_only"]),
        (["prog", "--data-dir=/a-b", "--seeds", "0"], ["prog", "--data_dir=/a-b", "--seeds", "0"]),
        (["prog", "--list", "--", "--not-a-flag"], ["prog", "--list", "--", "--not-a-flag"]),
    ],
)
def test_dashed_flag_names_are_accepted(argv, expected):
    assert compare.underscored_flag_names(argv) == expected


def _cli(*args, cwd, module="experiments.compare"):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# `python -m train.compare`, the command's old name, runs the same command.
@pytest.mark.parametrize("module", ["experiments.compare", "train.compare"])
def test_list_shows_done_and_todo_runs(tmp_path, module):
    run = sweeps.Run("mnist", "softmax", 0)
    fake_runs.fake_run(sweeps.run_config(run), run.workdir(str(tmp_path)))
    listed = _cli("--list", "--results", str(tmp_path), "--grid=main", "--seeds", "0,1",
                  "--datasets=mnist", "--configurations", "softmax,noisy_a0.1", cwd=tmp_path,
                  module=module)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\n")[:4] == [
        f"done  {run.workdir(str(tmp_path))}",
        f"todo  {sweeps.Run('mnist', 'noisy_a0.1', 0).workdir(str(tmp_path))}",
        f"todo  {sweeps.Run('mnist', 'softmax', 1).workdir(str(tmp_path))}",
        f"todo  {sweeps.Run('mnist', 'noisy_a0.1', 1).workdir(str(tmp_path))}",
    ]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--grid=main,nope", "unknown grid 'nope'"),
        ("--datasets=imagenet", "unknown dataset 'imagenet'"),
        ("--configurations=softmax,noisy_a9", "unknown configuration 'noisy_a9'"),
        ("--seeds=0,one", "--seeds must be comma-separated integers"),
    ],
)
def test_bad_flags_fail_naming_the_value(tmp_path, flag, message):
    result = _cli("--list", flag, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr


def test_report_only_without_runs_fails_in_one_line(tmp_path):
    result = _cli("--report-only", "--results", str(tmp_path / "nothing"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"no runs to report: {tmp_path / 'nothing' / 'runs'} does not exist" in result.stderr
