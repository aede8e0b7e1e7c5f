"""The stored runs of `python -m experiments.compare`, read back for the report.

A run lives in `<results>/runs/<dataset>/<configuration>/seed<k>/` with its `results.json`,
`config.json`, `run_info.json` and `metrics.jsonl`.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

from train import prepare_data


def load_runs(results: str) -> list[dict[str, Any]]:
    """Every finished run under `<results>/runs`: its results.json plus name and metrics path."""
    rows = []
    pattern = os.path.join(results, "runs", "*", "*", "seed*", "results.json")
    for path in sorted(glob.glob(pattern)):
        workdir = os.path.dirname(path)
        with open(path) as f:
            row = json.load(f)
        row["name"] = os.path.basename(os.path.dirname(workdir))
        # The folder names the table a run belongs to: the same as results.json's dataset for
        # the CPU grid, and e.g. cifar10_plus for augmented CIFAR-10 runs (REPRODUCE.md).
        row["dataset"] = os.path.basename(os.path.dirname(os.path.dirname(workdir)))
        row["workdir"] = workdir
        config_path = os.path.join(workdir, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                row["config"] = json.load(f)
        info_path = os.path.join(workdir, "run_info.json")
        if os.path.exists(info_path):
            with open(info_path) as f:
                row["run_info"] = json.load(f)
        rows.append(row)
    return rows


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    train_records, eval_records = [], []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            (eval_records if record.get("kind") == "eval" else train_records).append(record)
    return train_records, eval_records


def stops_norm_gradient(row: dict[str, Any]) -> bool:
    """Whether a run stopped the gradient through the norms (`config.stop_norm_gradient`)."""
    # Runs made before the config key existed recorded it in run_info.json.
    recorded = row.get("config", {}).get("stop_norm_gradient")
    if recorded is None:
        recorded = row.get("run_info", {}).get("stop_norm_gradient", False)
    return bool(recorded)


def dataset_order(datasets: set[str]) -> list[str]:
    """prepare_data.DATASETS's order first, then other folders (e.g. cifar10_plus) by name."""
    known = [d for d in prepare_data.DATASETS if d in datasets]
    return known + sorted(datasets - set(known))


def is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


def last(records: list[dict], key: str) -> float:
    """The last value of `key` in `records`; NaN if none holds it."""
    values = [r[key] for r in records if key in r]
    return values[-1] if values else float("nan")


def train_subset(row: dict[str, Any]) -> int:
    """The training-subset size of a run (its `config.train_subset`; 0: the whole split)."""
    return int(row.get("config", {}).get("train_subset") or 0)


# A run counts as collapsed when its final test accuracy is at most this (chance is 0.1).
COLLAPSE_ACCURACY = 0.2


def collapsed(error: float) -> bool:
    """Whether a run's test error means chance accuracy."""
    return error >= 1 - COLLAPSE_ACCURACY
