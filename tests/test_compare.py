"""The comparison runner: its grid, its resumability and its report, without training a network."""

import json
import math
import os

import pytest

from train import compare
from train import train as train_lib


def test_plan_is_seed_major_and_filters():
    runs = compare.plan(["main"], ["mnist", "fashion_mnist"], [0, 1])
    assert len(runs) == 2 * 2 * len(compare.MAIN)
    assert {r.seed for r in runs[: 2 * len(compare.MAIN)]} == {0}
    only = compare.plan(["main", "alpha_range"], ["mnist"], [3], ["softmax", "noisy_a2.0"])
    assert [(r.name, r.seed) for r in only] == [("softmax", 3), ("noisy_a2.0", 3)]


@pytest.mark.parametrize("name", list(compare.CONFIGURATIONS))
def test_every_configuration_is_a_valid_config(name):
    config = compare.run_config(compare.Run("fashion_mnist", name, 2), data_dir="/tmp/data")
    train_lib.validate_config(config, num_devices=1, num_processes=1)
    assert (config.dataset, config.seed, config.data_dir) == ("fashion_mnist", 2, "/tmp/data")
    for key, value in compare.CONFIGURATIONS[name].items():
        assert config[key] == value


def test_stop_norm_gradient_leaves_only_the_gradient_through_the_logits():
    import jax
    import jax.numpy as jnp

    from noisy_softmax_jax import HeadOutput

    config = compare.run_config(compare.Run("mnist", "noisy_a1.0_nonormgrad", 0))
    labels = jnp.array([0, 1])
    logits = jnp.array([[1.0, 0.5, -1.0], [0.2, 0.1, 0.3]])

    def loss(feature_norm, class_norm, logits):
        output = HeadOutput(logits, feature_norm, class_norm)
        return train_lib.compute_losses(config, output, labels, jax.random.key(0), 1.0).sum()

    args = (jnp.array([2.0, 3.0]), jnp.array([1.0, 1.5, 2.0]), logits)
    grad_norms = jax.grad(loss, argnums=(0, 1, 2))(*args)
    assert float(jnp.abs(grad_norms[0]).sum()) > 0
    with compare._norm_gradient_stopped(True):  # pylint: disable=protected-access
        stopped = jax.grad(loss, argnums=(0, 1, 2))(*args)
    assert float(jnp.abs(stopped[0]).sum()) == float(jnp.abs(stopped[1]).sum()) == 0.0
    assert float(jnp.abs(stopped[2]).sum()) > 0
    assert train_lib.compute_losses.__name__ == "compute_losses"  # restored
    assert compare.STOP_NORM_GRADIENT == {
        "noisy_a0.1_nonormgrad", "noisy_a0.5_nonormgrad", "noisy_a1.0_nonormgrad"}


def test_only_the_saturation_pair_evaluates_during_training_and_only_seed_0():
    evals = {
        (name, seed): compare.run_config(compare.Run("mnist", name, seed)).eval_every_steps
        for name in ("softmax", "noisy_a0.1", "noisy_a0.5") for seed in (0, 1)
    }
    assert evals[("softmax", 0)] == evals[("noisy_a0.1", 0)] == compare.SATURATION_EVAL_EVERY
    assert evals[("softmax", 1)] == evals[("noisy_a0.5", 0)] == -1
    # Evaluating more often must not change what is trained.
    assert "eval_every_steps" in train_lib._NON_TRAJECTORY_KEYS  # pylint: disable=protected-access


def _read(path):
    with open(path) as f:
        return f.read()


def _fake_run(config, workdir, *, test_error=None, steps=30):
    """Writes what train_and_evaluate writes, with made-up numbers (or fails for seed 99)."""
    if config.seed == 99:
        raise RuntimeError("boom")
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
    noisy = config.loss == "noisy"
    if test_error is None:
        test_error = 0.03 - (0.005 if noisy and config.alpha == 0.1 else 0.0) + 0.001 * config.seed
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(10, steps + 1, 10):
            f.write(json.dumps({
                "step": step, "kind": "train", "loss": 1.0 / step, "accuracy": 1 - 1.0 / step,
                "target_prob": 1 - 1.0 / step, "saturated_fraction": step / steps,
                "target_grad": 1.0 / step, "amplitude": 10.0, "logit_std": 3.0}) + "\n")
            if step % 20 == 0 or step == steps:
                f.write(json.dumps({"step": step, "kind": "eval", "test_loss": 0.1,
                                    "test_accuracy": 1 - test_error}) + "\n")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    results = {"dataset": config.dataset, "loss": config.loss,
               "noise": config.noise if noisy else None, "alpha": config.alpha if noisy else None,
               "seed": config.seed, "steps": steps, "test_accuracy": 1 - test_error,
               "test_error": test_error, "train_time_s": 12.0}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
    return results


def test_train_runs_skips_finished_runs_and_survives_a_failure(tmp_path, monkeypatch):
    calls = []

    def fake(config, workdir):
        calls.append((config.dataset, config.loss, config.seed))
        return _fake_run(config, workdir)

    monkeypatch.setattr(train_lib, "train_and_evaluate", fake)
    monkeypatch.setattr(compare, "_cache_loaded_splits", lambda: None)
    runs = compare.plan(["main"], ["mnist"], [0, 99, 1], ["softmax", "noisy_a0.1"])
    compare.train_runs(runs, str(tmp_path))
    assert len(calls) == 6
    for run in runs:
        workdir = run.workdir(str(tmp_path))
        if run.seed == 99:
            assert "boom" in _read(os.path.join(workdir, "error.txt"))
            assert not os.path.exists(os.path.join(workdir, "results.json"))
        else:
            assert os.path.exists(os.path.join(workdir, "run_info.json"))
            assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    calls.clear()
    compare.train_runs(runs, str(tmp_path))  # again: only the failed runs are retried
    assert sorted(calls) == [("mnist", "noisy", 99), ("mnist", "softmax", 99)]


def test_welch_and_spread():
    assert compare.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert math.isnan(compare.mean_std([1.0])[1])
    assert compare.welch_p([1.0, 1.1, 0.9], [5.0, 5.1, 4.9]) < 1e-3
    assert compare.welch_p([1.0, 2.0, 3.0], [1.5, 2.5, 1.0]) > 0.5
    assert math.isnan(compare.welch_p([1.0], [2.0, 3.0]))


def test_report_writes_tables_plots_and_fills_the_readme(tmp_path):
    results = str(tmp_path)
    for seed in range(3):
        for name in ("softmax", "noisy_a0.1", "noisy_a2.0"):
            run = compare.Run("mnist", name, seed)
            config = compare.run_config(run)
            error = 0.9 if name == "noisy_a2.0" else None  # a collapsed run
            _fake_run(config, run.workdir(results), test_error=error)
    with open(os.path.join(results, "README.md"), "w") as f:
        f.write(f"# Results\n\n{compare.TABLES_START}\nold\n{compare.TABLES_END}\n\nthe end\n")
    compare.report(results)

    tables = _read(os.path.join(results, "tables.md"))
    assert "| softmax | 3 | 3.10 ± 0.10 |" in tables
    assert "| noisy_a0.1 | 3 | 2.60 ± 0.10 | -0.50 |" in tables
    assert "disjoint" in tables
    assert "noisy_a0.1 has lower test error than softmax by 0.50 pp" in tables
    assert "| noisy_a2.0 | 2.0 | 0.05 | 0.0005 | yes | 0 | 90.00 |" in tables
    assert "| fails (chance accuracy; amplitude up to 10) |" in tables  # fake amplitude: 10
    readme = _read(os.path.join(results, "README.md"))
    assert "old" not in readme and tables.strip() in readme and readme.endswith("the end\n")
    for png in ("saturation_mnist.png", "test_error.png"):
        assert os.path.getsize(os.path.join(results, png)) > 1000
