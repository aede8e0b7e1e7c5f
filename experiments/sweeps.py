"""The grids of `python -m experiments.compare`, as data: config overrides of `compare_short`.

A run is (dataset, configuration, seed). Its config is `train/configs/compare_short.py` with the
dataset, the seed and the configuration's overrides set, and nothing else: every variant a run
trains is a config key, so the run's `config.json` records what ran. Adding a configuration is
adding a line to a grid below.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from train.configs import compare_short

# The datasets the grids run on by default (the CPU budget); any of prepare_data.DATASETS works.
GRID_DATASETS = ("mnist", "fashion_mnist")

# name -> config overrides. The order is the order of the tables.
MAIN = {
    "softmax": {"loss": "softmax"},
    "label_smoothing_0.1": {"loss": "label_smoothing", "label_smoothing": 0.1},
    "noisy_a0.05": {"loss": "noisy", "alpha": 0.05},
    "noisy_a0.1": {"loss": "noisy", "alpha": 0.1},
    "noisy_a0.5": {"loss": "noisy", "alpha": 0.5},
    "noisy_a1.0": {"loss": "noisy", "alpha": 1.0},
    "free_a0.1": {"loss": "noisy", "noise": "free", "alpha": 0.1},
    "amplitude_a0.1": {"loss": "noisy", "noise": "amplitude", "alpha": 0.1},
    "negative_a0.1": {"loss": "noisy", "negative": True, "alpha": 0.1},
    "shared_a0.1": {"loss": "noisy", "shared_noise": True, "alpha": 0.1},
}

# Where does training collapse? alpha beyond the main grid, with a smaller learning rate, without
# weight decay (the main grid's noisy_a0.5 and noisy_a1.0 are the default-lr points), and with the
# amplitude ||W_y|| ||x|| entering the loss as a constant (no gradient through the norms).
ALPHA_RANGE = {
    "noisy_a0.2": {"loss": "noisy", "alpha": 0.2},
    "noisy_a0.3": {"loss": "noisy", "alpha": 0.3},
    "noisy_a2.0": {"loss": "noisy", "alpha": 2.0},
    "softmax_lr0.01": {"loss": "softmax", "learning_rate": 0.01},
    "noisy_a0.1_lr0.01": {"loss": "noisy", "alpha": 0.1, "learning_rate": 0.01},
    "noisy_a0.5_lr0.01": {"loss": "noisy", "alpha": 0.5, "learning_rate": 0.01},
    "noisy_a1.0_lr0.01": {"loss": "noisy", "alpha": 1.0, "learning_rate": 0.01},
    "noisy_a2.0_lr0.01": {"loss": "noisy", "alpha": 2.0, "learning_rate": 0.01},
    "noisy_a0.5_wd0": {"loss": "noisy", "alpha": 0.5, "weight_decay": 0.0},
    "noisy_a1.0_wd0": {"loss": "noisy", "alpha": 1.0, "weight_decay": 0.0},
    "noisy_a0.1_nonormgrad": {"loss": "noisy", "alpha": 0.1, "stop_norm_gradient": True},
    "noisy_a0.5_nonormgrad": {"loss": "noisy", "alpha": 0.5, "stop_norm_gradient": True},
    "noisy_a1.0_nonormgrad": {"loss": "noisy", "alpha": 1.0, "stop_norm_gradient": True},
}

# Small training subsets trained to zero training error, where softmax saturates.
# The same recipe for every loss; the whole subset's clean saturation every 50 steps.
SMALL_DATA_SUBSETS = (1000, 5000)
# Steps per subset size, batch 64, from the pilots in results/small_data_pilot/README.md: on
# 1000 examples (64 epochs) softmax and noisy alpha 0.1 reach 0 training error by step 200 of
# 1000. On 5000, 1000 steps leave Fashion-MNIST softmax at 1 % training error; at 3000 steps
# (38 epochs) it reaches 0 at step 1550 and stays there (MNIST at step 850).
SMALL_DATA_STEPS = {1000: 1000, 5000: 3000}
# The losses of the main and alpha-range grids, by the same names and overrides.
SMALL_DATA_LOSSES = {
    name: dict({**MAIN, **ALPHA_RANGE}[name])
    for name in ("softmax", "label_smoothing_0.1", "noisy_a0.05", "noisy_a0.1", "noisy_a0.2",
                 "free_a0.1", "amplitude_a0.1")
}
SMALL_DATA = {
    f"{name}_n{subset}": {
        **overrides,
        "train_subset": subset,
        "num_steps": SMALL_DATA_STEPS[subset],
        "eval_every_steps": 250,
        "train_saturation_every_steps": 50,
        "log_every_steps": 50,
        "checkpoint_every_steps": 500,
    }
    for subset in SMALL_DATA_SUBSETS
    for name, overrides in SMALL_DATA_LOSSES.items()
}

GRIDS = {"main": MAIN, "alpha_range": ALPHA_RANGE, "small_data": SMALL_DATA}
CONFIGURATIONS = {**MAIN, **ALPHA_RANGE, **SMALL_DATA}

# The saturation plots compare these two. Their seed-0 runs also evaluate every 50 steps, which
# changes what is reported, not what is trained (same batches, same noise, same parameters).
SATURATION_PAIR = ("softmax", "noisy_a0.1")
# (configurations, seeds, overrides) of reporting keys that only some runs set.
REPORTING_OVERRIDES = ((SATURATION_PAIR, (0,), {"eval_every_steps": 50}),)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a grid; its workdir is `<results>/runs/<dataset>/<name>/seed<seed>`."""

    dataset: str
    name: str
    seed: int

    def workdir(self, results: str) -> str:
        return os.path.join(results, "runs", self.dataset, self.name, f"seed{self.seed}")

    def overrides(self) -> dict[str, Any]:
        """Every key this run sets on top of compare_short."""
        overrides = {"dataset": self.dataset, "seed": self.seed, **CONFIGURATIONS[self.name]}
        for names, seeds, reporting in REPORTING_OVERRIDES:
            if self.name in names and self.seed in seeds:
                overrides.update(reporting)
        return overrides


def plan(
    grids: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int],
    names: Sequence[str] | None = None,
) -> list[Run]:
    """The runs of the grids, seed-major: every configuration gets seed 0 before any gets seed 1."""
    return [
        Run(dataset, name, seed)
        for seed in seeds
        for grid in grids
        for dataset in datasets
        for name in GRIDS[grid]
        if names is None or name in names
    ]


def run_config(run: Run, data_dir: str | None = None):
    """The config of one run: compare_short plus the run's overrides (and `data_dir` if given)."""
    config = compare_short.get_config()
    config.update(run.overrides())
    if data_dir is not None:
        config.data_dir = data_dir
    return config
