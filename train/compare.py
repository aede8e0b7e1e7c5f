"""Multi-seed comparisons of softmax, label smoothing and noisy softmax, with tables and plots.

Trains a grid of (dataset, configuration, seed) runs one after another, each in its own workdir
`<results>/runs/<dataset>/<configuration>/seed<k>/`, then collects every `results.json` into
Markdown tables and the `metrics.jsonl` files into saturation plots:

  python -m train.compare --grid main --seeds 0,1,2          # train what is missing, then report
  python -m train.compare --grid alpha_range --seeds 0
  python -m train.compare --report-only                      # tables and plots from stored runs

Resumable: a run whose `results.json` exists is skipped, so a crash or a stop loses only the
run in progress (and that one resumes from its last checkpoint). Checkpoints of finished runs are
deleted; `results.json`, `metrics.jsonl`, `config.json` and `run_info.json` stay, which is all
the report needs.

Every run starts from `train/configs/compare_short.py` (a short CPU budget) and changes only the
fields of its configuration, so configurations differ in the loss alone unless named otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

DATASETS = ("mnist", "fashion_mnist")

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

# Where does training collapse? alpha beyond the main grid, and with a smaller learning rate or
# without weight decay (the main grid's noisy_a0.5 and noisy_a1.0 are the default-lr points).
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
    "noisy_a0.1_nonormgrad": {"loss": "noisy", "alpha": 0.1},
    "noisy_a0.5_nonormgrad": {"loss": "noisy", "alpha": 0.5},
    "noisy_a1.0_nonormgrad": {"loss": "noisy", "alpha": 1.0},
}

# "No gradient through the norms": the amplitude ||W_y|| ||x|| enters the loss as a constant
# (its gradient is stopped; f_y still gets its gradient). The training config has no key for
# this, so the runner wraps `train.compute_losses` for these runs only; run_info.json says so.
STOP_NORM_GRADIENT = frozenset(n for n in ALPHA_RANGE if n.endswith("_nonormgrad"))

GRIDS = {"main": MAIN, "alpha_range": ALPHA_RANGE}
CONFIGURATIONS = {**MAIN, **ALPHA_RANGE}

# The saturation plots compare these two; their seed-0 runs also evaluate every 50 steps (the
# evaluation does not change training: same batches, same noise, same parameters).
SATURATION_PAIR = ("softmax", "noisy_a0.1")
SATURATION_EVAL_EVERY = 50

# A run counts as collapsed when its final test accuracy is at most this (chance is 0.1).
COLLAPSE_ACCURACY = 0.2

DEFAULT_RESULTS = "results"


@dataclasses.dataclass(frozen=True)
class Run:
    dataset: str
    name: str
    seed: int

    def workdir(self, results: str) -> str:
        return os.path.join(results, "runs", self.dataset, self.name, f"seed{self.seed}")


def plan(
    grids: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int],
    names: Sequence[str] | None = None,
) -> list[Run]:
    """The runs of the grids, seed-major: every configuration gets seed 0 before any gets seed 1."""
    runs = []
    for seed in seeds:
        for grid in grids:
            for dataset in datasets:
                for name in GRIDS[grid]:
                    if names is None or name in names:
                        runs.append(Run(dataset, name, seed))
    return runs


def run_config(run: Run, data_dir: str | None = None):
    """The config of one run: compare_short plus the configuration's overrides."""
    from train.configs import compare_short  # pylint: disable=g-import-not-at-top

    config = compare_short.get_config()
    config.dataset = run.dataset
    config.seed = run.seed
    for key, value in CONFIGURATIONS[run.name].items():
        config[key] = value
    if run.name in SATURATION_PAIR and run.seed == 0:
        config.eval_every_steps = SATURATION_EVAL_EVERY
    if data_dir is not None:
        config.data_dir = data_dir
    return config


def _cache_loaded_splits() -> None:
    """Decodes each split once per process instead of once per run (the runs share the data)."""
    from train import input_pipeline  # pylint: disable=g-import-not-at-top

    if getattr(input_pipeline.load_split, "_compare_cached", False):
        return
    load_split, cache = input_pipeline.load_split, {}

    def cached(dataset, split, data_dir, **kwargs):
        key = (dataset, split, os.path.expanduser(data_dir), tuple(sorted(kwargs.items())))
        if key not in cache:
            images, labels = load_split(dataset, split, data_dir, **kwargs)
            images.setflags(write=False)
            labels.setflags(write=False)
            cache[key] = (images, labels)
        return cache[key]

    cached._compare_cached = True  # pylint: disable=protected-access
    input_pipeline.load_split = cached


def _code_version() -> str:
    """The git commit of the code that ran (from a `git archive` snapshot: its CODE_VERSION)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stamp = os.path.join(root, "CODE_VERSION")
    if os.path.exists(stamp):
        with open(stamp) as f:
            return f.read().strip()
    try:
        import subprocess  # pylint: disable=g-import-not-at-top

        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "train", "noisy_softmax_jax"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def _norm_gradient_stopped(active: bool):
    """While active, `train.compute_losses` sees the head's norms as constants."""
    from train import train  # pylint: disable=g-import-not-at-top

    if not active:
        yield
        return
    import jax  # pylint: disable=g-import-not-at-top

    compute_losses = train.compute_losses

    def without_norm_gradient(config, output, labels, rng, alpha):
        output = output._replace(
            feature_norm=jax.lax.stop_gradient(output.feature_norm),
            class_norm=jax.lax.stop_gradient(output.class_norm),
        )
        return compute_losses(config, output, labels, rng, alpha)

    train.compute_losses = without_norm_gradient
    try:
        yield
    finally:
        train.compute_losses = compute_losses


def machine_info() -> dict[str, Any]:
    import jax  # pylint: disable=g-import-not-at-top

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "code": _code_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }


def train_runs(runs: Sequence[Run], results: str, data_dir: str | None = None) -> None:
    """Trains every run that has no results.json yet; a failed run is logged and skipped."""
    from train import train  # pylint: disable=g-import-not-at-top

    _cache_loaded_splits()
    todo = [r for r in runs if not os.path.exists(os.path.join(r.workdir(results), "results.json"))]
    print(
        f"{len(runs)} runs planned, {len(runs) - len(todo)} already done, {len(todo)} to train",
        flush=True,
    )
    for index, run in enumerate(todo, 1):
        workdir = run.workdir(results)
        start = time.time()
        print(
            f"[{index}/{len(todo)}] {run.dataset} {run.name} seed {run.seed} -> {workdir}",
            flush=True,
        )
        try:
            with _norm_gradient_stopped(run.name in STOP_NORM_GRADIENT):
                outcome = train.train_and_evaluate(run_config(run, data_dir), workdir)
        except Exception:  # pylint: disable=broad-except
            # One broken run must not stop the grid; its workdir keeps the traceback.
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "error.txt"), "w") as f:
                f.write(traceback.format_exc())
            print(f"  failed; see {os.path.join(workdir, 'error.txt')}", flush=True)
            continue
        wall = time.time() - start
        info = {
            "wall_time_s": wall,
            "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds"
            ),
            "stop_norm_gradient": run.name in STOP_NORM_GRADIENT,
            **machine_info(),
        }
        with open(os.path.join(workdir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
        shutil.rmtree(os.path.join(workdir, "tensorboard"), ignore_errors=True)
        print(f"  test error {100 * outcome['test_error']:.2f}%  ({wall:.0f} s)", flush=True)


# --------------------------------------------------------------------------- collecting


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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value; NaN where it is undefined (n < 2 or zero variance)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    try:
        from scipy import stats  # pylint: disable=g-import-not-at-top
    except ImportError:
        return float("nan")
    if mean_std(a)[1] == 0 and mean_std(b)[1] == 0:
        return float("nan")
    with warnings.catch_warnings():
        # Collapsed runs all end at the same error: scipy warns about the zero variance.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _is_nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _p_text(p_value: float, equals: bool = False) -> str:
    if p_value < 0.001:
        return "< 0.001"
    return f"{'= ' if equals else ''}{p_value:.3f}"


def _pct(x: float, digits: int = 2) -> str:
    return "n/a" if _is_nan(x) else f"{100 * x:.{digits}f}"


def comparison_table(rows: list[dict], dataset: str, names: Sequence[str]) -> tuple[str, list]:
    """Markdown table of test error over seeds for `names` on `dataset`, against softmax."""
    by_name: dict[str, list[float]] = {}
    for row in rows:
        if row["dataset"] == dataset and row["name"] in names:
            by_name.setdefault(row["name"], []).append(row["test_error"])
    baseline = by_name.get("softmax", [])
    b_mean, b_std = mean_std(baseline) if baseline else (float("nan"), float("nan"))
    lines = [
        "| configuration | n seeds | test error % (mean ± std) | vs softmax (pp) "
        "| Welch p | 2-std intervals | collapsed runs |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name in names:
        errors = by_name.get(name)
        if not errors:
            continue
        mean, std = mean_std(errors)
        collapsed = sum(e >= 1 - COLLAPSE_ACCURACY for e in errors)
        if name == "softmax" or not baseline:
            delta, p, separate = "", "", ""
        else:
            delta = f"{100 * (mean - b_mean):+.2f}"
            p_value = welch_p(errors, baseline)
            p = "n/a" if _is_nan(p_value) else _p_text(p_value)
            if len(errors) > 1 and len(baseline) > 1:
                disjoint = (mean + 2 * std < b_mean - 2 * b_std) or (
                    mean - 2 * std > b_mean + 2 * b_std
                )
                separate = "disjoint" if disjoint else "overlap"
            else:
                separate = "n/a"
            verdicts.append((name, mean - b_mean, p_value, separate))
        lines.append(
            f"| {name} | {len(errors)} | {_pct(mean)} ± {_pct(std)} | {delta} | {p} | {separate} "
            f"| {collapsed}/{len(errors)} |"
        )
    return "\n".join(lines), verdicts


def _last(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else float("nan")


def alpha_range_table(rows: list[dict], dataset: str) -> str:
    """Per run of the noisy configurations (and their softmax baselines): does it train?"""
    names = [n for n in CONFIGURATIONS if n.startswith(("noisy", "softmax"))]
    lines = [
        "| configuration | alpha | learning rate | weight decay | gradient through norms "
        "| seed | test error % | final train loss | final amplitude | final logit std | trains? |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def sort_key(row):
        config = row.get("config", {})
        alpha = -1.0 if row.get("alpha") is None else row["alpha"]
        stopped = bool(row.get("run_info", {}).get("stop_norm_gradient"))
        return (
            stopped,
            -config.get("learning_rate", 0),
            -config.get("weight_decay", 0),
            alpha,
            row["seed"],
        )

    selected = sorted(
        (r for r in rows if r["dataset"] == dataset and r["name"] in names), key=sort_key
    )
    softmax_errors = [r["test_error"] for r in selected if r["name"] == "softmax"]
    baseline = mean_std(softmax_errors)[0] if softmax_errors else None
    for row in selected:
        config = row.get("config", {})
        train_records, _ = read_metrics(row["workdir"])
        loss = _last(train_records, "loss")
        accuracy = row["test_accuracy"]
        dead = [r["step"] for r in train_records if r.get("amplitude", 1.0) < 1e-3]
        nan = [r["step"] for r in train_records if _is_nan(r.get("loss", 0.0))]
        if nan or (isinstance(accuracy, float) and math.isnan(accuracy)):
            verdict = "diverged (NaN loss" + (f" from step {nan[0]})" if nan else ")")
        elif accuracy <= COLLAPSE_ACCURACY and dead:
            verdict = f"collapsed (amplitude < 1e-3 from step {dead[0]})"
        elif accuracy <= COLLAPSE_ACCURACY:
            peak = max((r.get("amplitude", 0.0) for r in train_records), default=float("nan"))
            verdict = f"fails (chance accuracy; amplitude up to {peak:.3g})"
        elif baseline and row["test_error"] > 2 * baseline:
            verdict = "degraded (over 2x the softmax error)"
        else:
            verdict = "yes"
        alpha = row.get("alpha")
        lines.append(
            f"| {row['name']} | {'-' if alpha is None else alpha} "
            f"| {config.get('learning_rate', '?')} | {config.get('weight_decay', '?')} "
            f"| {'stopped' if row.get('run_info', {}).get('stop_norm_gradient') else 'yes'} "
            f"| {row['seed']} | {_pct(row['test_error'])} | {loss:.4g} "
            f"| {_last(train_records, 'amplitude'):.3g} | {_last(train_records, 'logit_std'):.3g} "
            f"| {verdict} |"
        )
    return "\n".join(lines)


def significance_summary(verdicts: list, dataset: str) -> list[str]:
    lines = []
    testable = [v for v in verdicts if v[3] != "n/a"]
    if not testable:
        return [
            f"- {dataset}: fewer than 2 seeds per configuration so far: no test of the differences."
        ]
    for name, delta, p_value, separate in testable:
        significant_t = not _is_nan(p_value) and p_value < 0.05
        if significant_t or separate == "disjoint":
            direction = "lower" if delta < 0 else "higher"
            tests = []
            if significant_t:
                tests.append(f"Welch p {_p_text(p_value, equals=True)}")
            if separate == "disjoint":
                tests.append("mean ± 2 std intervals disjoint")
            lines.append(
                f"- {dataset}: {name} has {direction} test error than softmax by "
                f"{abs(100 * delta):.2f} pp ({', '.join(tests)})."
            )
    if not lines:
        lines.append(
            f"- {dataset}: no configuration differs from softmax by more than the "
            "seed-to-seed spread (no Welch p < 0.05, no disjoint 2-std intervals)."
        )
    return lines


# --------------------------------------------------------------------------- plots


def _curves(rows: list[dict], dataset: str, name: str):
    """Per-seed train and eval records of one configuration."""
    curves = []
    for row in sorted(rows, key=lambda r: r["seed"]):
        if row["dataset"] == dataset and row["name"] == name:
            curves.append(read_metrics(row["workdir"]))
    return curves


def plot_saturation(rows: list[dict], dataset: str, path: str) -> bool:
    """Saturation diagnostics and error vs step, softmax vs noisy softmax; seeds' mean and range."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    panels = [
        ("target_prob", "mean clean target probability $p_y$"),
        ("saturated_fraction", "fraction saturated ($p_y > 0.99$)"),
        ("target_grad", r"mean $|\partial \ell / \partial f_y|$"),
        ("train_error", "train error (batch, clean logits)"),
        ("test_error", "test error"),
        ("amplitude", r"mean amplitude $\|W_y\|\,\|x\|$"),
    ]
    found = {name: _curves(rows, dataset, name) for name in SATURATION_PAIR}
    if not all(found.values()):
        return False
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    colors = {"softmax": "tab:blue", "noisy_a0.1": "tab:red"}
    for ax, (key, title) in zip(axes.ravel(), panels):
        for name, curves in found.items():
            if key == "test_error":
                for seed_index, (_, evals) in enumerate(curves):
                    if len(evals) < 2:
                        continue
                    steps = [r["step"] for r in evals]
                    errors = [1 - r["test_accuracy"] for r in evals]
                    ax.plot(
                        steps, errors, "o-", color=colors[name], label=f"{name} (seed {seed_index})"
                    )
                    break
                continue
            series = []
            for train_records, _ in curves:
                steps = np.array([r["step"] for r in train_records])
                if key == "train_error":
                    values = 1 - np.array([r["accuracy"] for r in train_records])
                else:
                    values = np.array([r.get(key, np.nan) for r in train_records])
                series.append(values)
            length = min(len(s) for s in series)
            stacked = np.stack([s[:length] for s in series])
            steps = steps[:length]
            mean = stacked.mean(0)
            ax.plot(steps, mean, color=colors[name], label=f"{name} (n={len(series)})")
            if len(series) > 1:
                ax.fill_between(
                    steps, stacked.min(0), stacked.max(0), color=colors[name], alpha=0.2
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if key in ("train_error", "test_error"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{dataset}: softmax vs noisy softmax (alpha = 0.1); lines: mean over seeds, "
        "bands: min-max over seeds; test error: seed 0",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_test_error(rows: list[dict], path: str) -> bool:
    """Test error of every main configuration, per dataset: mean ± std and the single seeds."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    present = {r["dataset"] for r in rows if r["name"] in MAIN}
    datasets = [d for d in DATASETS if d in present] + sorted(present - set(DATASETS))
    if not datasets:
        return False
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        names = [n for n in MAIN if any(r["dataset"] == dataset and r["name"] == n for r in rows)]
        for x, name in enumerate(names):
            errors = [
                100 * r["test_error"] for r in rows if r["dataset"] == dataset and r["name"] == name
            ]
            mean, std = mean_std(errors)
            ax.errorbar(
                [x], [mean], yerr=[0 if math.isnan(std) else std], fmt="s", color="black", capsize=4
            )
            ax.plot([x] * len(errors), errors, ".", color="tab:gray")
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("test error %")
        ax.set_yscale("log")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- report

TABLES_START = "<!-- tables:start (written by python -m train.compare --report-only) -->"
TABLES_END = "<!-- tables:end -->"


def report(results: str) -> str:
    """Writes `<results>/tables.md` and the plots; fills the tables into `<results>/README.md`."""
    rows = load_runs(results)
    # The CPU grid has MNIST and Fashion-MNIST; runs of other datasets laid out the same way
    # (results/REPRODUCE.md: CIFAR on a GPU or TPU) are reported too.
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    datasets += sorted({r["dataset"] for r in rows} - set(datasets))
    parts = []
    for dataset in datasets:
        if not any(r["dataset"] == dataset for r in rows):
            continue
        table, verdicts = comparison_table(rows, dataset, list(MAIN))
        parts += [
            f"### {dataset}: test error over seeds (short budget)",
            "",
            table,
            "",
            *significance_summary(verdicts, dataset),
            "",
        ]
    for dataset in datasets:
        if any(r["dataset"] == dataset and r["name"].startswith("noisy") for r in rows):
            parts += [
                f"### {dataset}: where alpha stops training (every run)",
                "",
                alpha_range_table(rows, dataset),
                "",
            ]
    plots = []
    for dataset in datasets:
        path = os.path.join(results, f"saturation_{dataset}.png")
        if plot_saturation(rows, dataset, path):
            plots.append(path)
    path = os.path.join(results, "test_error.png")
    if plot_test_error(rows, path):
        plots.append(path)
    times = [r["train_time_s"] for r in rows if r.get("train_time_s")]
    if times:
        parts.append(
            f"{len(rows)} runs; training time per run {min(times):.0f}-{max(times):.0f} s "
            f"(median {sorted(times)[len(times) // 2]:.0f} s), excluding data loading "
            "and evaluation."
        )
    text = "\n".join(parts).rstrip() + "\n"
    with open(os.path.join(results, "tables.md"), "w") as f:
        f.write(text)
    readme = os.path.join(results, "README.md")
    if os.path.exists(readme):
        with open(readme) as f:
            content = f.read()
        if TABLES_START in content and TABLES_END in content:
            head, rest = content.split(TABLES_START, 1)
            _, tail = rest.split(TABLES_END, 1)
            with open(readme, "w") as f:
                f.write(head + TABLES_START + "\n\n" + text + "\n" + TABLES_END + tail)
    print(text)
    for path in plots:
        print(f"wrote {path}")
    return text


def _csv(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.compare",
        description="Train a grid of (dataset, configuration, seed) runs, skipping finished "
        "ones, then write Markdown tables and plots.",
    )
    parser.add_argument(
        "--grid",
        default="main",
        type=_csv,
        help=f"comma-separated grids among {', '.join(GRIDS)} (default: main)",
    )
    parser.add_argument("--datasets", default=",".join(DATASETS), type=_csv)
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in _csv(s)])
    parser.add_argument(
        "--configurations",
        default=None,
        type=_csv,
        help="only these configuration names (default: the whole grid)",
    )
    parser.add_argument(
        "--results",
        default=DEFAULT_RESULTS,
        help="results root; runs go to <results>/runs (default: results)",
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="TFDS data dir (default: the config's, ~/tensorflow_datasets)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing; regenerate tables and plots from the stored runs",
    )
    parser.add_argument("--list", action="store_true", help="list the planned runs and exit")
    args = parser.parse_args(argv)

    for grid in args.grid:
        if grid not in GRIDS:
            parser.error(f"unknown grid {grid!r}; choose among {', '.join(GRIDS)}")
    for dataset in args.datasets:
        if dataset not in DATASETS:
            parser.error(f"unknown dataset {dataset!r}; choose among {', '.join(DATASETS)}")
    for name in args.configurations or ():
        if name not in CONFIGURATIONS:
            parser.error(
                f"unknown configuration {name!r}; choose among {', '.join(CONFIGURATIONS)}"
            )

    if not args.report_only:
        runs = plan(args.grid, args.datasets, args.seeds, args.configurations)
        if args.list:
            for run in runs:
                done = os.path.exists(os.path.join(run.workdir(args.results), "results.json"))
                print(f"{'done' if done else 'todo'}  {run.workdir(args.results)}")
            return
        train_runs(runs, args.results, args.data_dir)
    report(args.results)


if __name__ == "__main__":
    main(sys.argv[1:])
