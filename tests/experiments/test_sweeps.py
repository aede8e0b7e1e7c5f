"""The comparison grids: every configuration is a valid config that differs in config alone."""

import json

import pytest

from experiments import sweeps
from train import config_checks
from train.configs import default


def test_plan_is_seed_major_and_filters():
    runs = sweeps.plan(["main"], ["mnist", "fashion_mnist"], [0, 1])
    assert len(runs) == 2 * 2 * len(sweeps.MAIN)
    assert {r.seed for r in runs[: 2 * len(sweeps.MAIN)]} == {0}
    assert {r.seed for r in runs[2 * len(sweeps.MAIN) :]} == {1}
    only = sweeps.plan(["main", "alpha_range"], ["mnist"], [3], ["softmax", "noisy_a2.0"])
    assert only == [sweeps.Run("mnist", "softmax", 3), sweeps.Run("mnist", "noisy_a2.0", 3)]


@pytest.mark.parametrize("name", list(sweeps.CONFIGURATIONS))
def test_every_configuration_is_a_valid_config(name):
    config = sweeps.run_config(sweeps.Run("fashion_mnist", name, 2), data_dir="/tmp/data")
    config_checks.validate_config(config, num_devices=1, num_processes=1)
    assert (config.dataset, config.seed, config.data_dir) == ("fashion_mnist", 2, "/tmp/data")
    assert set(config.keys()) == set(default.get_config().keys())
    for key, value in sweeps.CONFIGURATIONS[name].items():
        assert config[key] == value


def _trajectory(name, seed=0):
    """What a run's config.json records, less the keys that only change what is reported."""
    config = sweeps.run_config(sweeps.Run("mnist", name, seed))
    reporting = {key for _, _, overrides in sweeps.REPORTING_OVERRIDES for key in overrides}
    return {k: v for k, v in json.loads(config.to_json()).items() if k not in reporting}


def test_configurations_differ_in_what_their_config_json_records():
    # A variant run by other means than config (a replaced function) would show as a duplicate.
    trajectories = {name: json.dumps(_trajectory(name), sort_keys=True)
                    for name in sweeps.CONFIGURATIONS}
    assert len(set(trajectories.values())) == len(trajectories)
    assert _trajectory("noisy_a1.0_nonormgrad")["stop_norm_gradient"] is True
    assert _trajectory("noisy_a1.0")["stop_norm_gradient"] is False


def test_only_the_saturation_pair_evaluates_during_training_and_only_seed_0():
    evals = {
        (name, seed): sweeps.run_config(sweeps.Run("mnist", name, seed)).eval_every_steps
        for name in ("softmax", "noisy_a0.1", "noisy_a0.5") for seed in (0, 1)
    }
    assert evals[("softmax", 0)] == evals[("noisy_a0.1", 0)] == 50
    assert evals[("softmax", 1)] == evals[("noisy_a0.1", 1)] == evals[("noisy_a0.5", 0)] == -1
    # Nothing else differs between the seeds.
    assert _trajectory("softmax", 0) == {**_trajectory("softmax", 1), "seed": 0}
