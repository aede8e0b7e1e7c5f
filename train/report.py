"""The report of `python -m train.compare`: Markdown tables and plots from the stored runs.

Reads every finished run under `<results>/runs/<dataset>/<configuration>/seed<k>/` (its
`results.json`, `config.json`, `run_info.json` and `metrics.jsonl`), writes
`<results>/tables.md`, the saturation and test-error plots, and splices the tables into
`<results>/README.md` between the markers `TABLES_START` and `TABLES_END`. Trains nothing: a
report of stored runs is reproducible without a GPU or the data.
"""

from __future__ import annotations

import glob
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

from train import prepare_data, sweeps

# A run counts as collapsed when its final test accuracy is at most this (chance is 0.1).
COLLAPSE_ACCURACY = 0.2

# The tables go between these markers of <results>/README.md.
TABLES_START = "<!-- tables:start (written by python -m train.compare --report-only) -->"
TABLES_END = "<!-- tables:end -->"


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


def _collapsed(error: float) -> bool:
    """Whether a run's test error means chance accuracy."""
    return error >= 1 - COLLAPSE_ACCURACY


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
        collapsed = sum(map(_collapsed, errors))
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
    names = [n for n in sweeps.CONFIGURATIONS if n.startswith(("noisy", "softmax"))]
    lines = [
        "| configuration | alpha | learning rate | weight decay | gradient through norms "
        "| seed | test error % | final train loss | final amplitude | final logit std | trains? |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def sort_key(row):
        config = row.get("config", {})
        alpha = -1.0 if row.get("alpha") is None else row["alpha"]
        return (
            stops_norm_gradient(row),
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
            f"| {'stopped' if stops_norm_gradient(row) else 'yes'} "
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


def _curves(rows: list[dict], dataset: str, name: str):
    """Per-seed train and eval records of one configuration."""
    curves = []
    for row in sorted(rows, key=lambda r: r["seed"]):
        if row["dataset"] == dataset and row["name"] == name:
            curves.append(read_metrics(row["workdir"]))
    return curves


def plot_saturation(rows: list[dict], dataset: str, path: str) -> bool:
    """Saturation diagnostics and error vs step, softmax vs noisy: mean and range of seeds."""
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
    found = {name: _curves(rows, dataset, name) for name in sweeps.SATURATION_PAIR}
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


def _error_panel(ax, errors: dict[str, list[float]], title: str) -> None:
    """Mean ± std (squares) and every seed (dots) of each configuration's test error in %."""
    for x, values in enumerate(errors.values()):
        percent = [100 * e for e in values]
        mean, std = mean_std(percent)
        ax.errorbar(
            [x], [mean], yerr=[0 if math.isnan(std) else std], fmt="s", color="black", capsize=4
        )
        ax.plot([x] * len(percent), percent, ".", color="tab:gray")
    ax.set_xticks(range(len(errors)), list(errors), rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(errors) - 0.4)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def error_panels(rows: list[dict]) -> list[tuple[str, dict[str, list[float]]]]:
    """The panels of the test-error plot: (title, {main configuration: test errors}).

    Per dataset, the configurations that train, then (apart, so that the first panel's linear
    scale shows their differences) those with a collapsed run or over twice softmax's mean error.
    """
    panels = []
    for dataset in dataset_order({r["dataset"] for r in rows if r["name"] in sweeps.MAIN}):
        errors = {}
        for name in sweeps.MAIN:
            found = [r["test_error"] for r in rows if r["dataset"] == dataset and r["name"] == name]
            if found:
                errors[name] = found
        baseline = mean_std(errors["softmax"])[0] if "softmax" in errors else math.inf
        apart = {
            name: values
            for name, values in errors.items()
            if any(map(_collapsed, values)) or mean_std(values)[0] > 2 * baseline
        }
        trained = {n: e for n, e in errors.items() if n not in apart}
        if trained:
            panels.append((dataset, trained))
        if apart:
            panels.append((f"{dataset}:\ncollapsed or > 2x softmax", apart))
    return panels


def plot_test_error(rows: list[dict], path: str) -> bool:
    """Test error of every main configuration, per dataset: mean ± std and the single seeds.

    Configurations with a collapsed run (chance accuracy) or over twice the softmax error (as
    `alpha_range_table` judges them) get a panel of their own (`error_panels`), so that the
    others share a linear scale on which their differences show.
    """
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    panels = error_panels(rows)
    if not panels:
        return False
    widths = [max(len(errors), 3) + 1 for _, errors in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(0.55 * sum(widths) + 1, 4.8), squeeze=False,
        gridspec_kw={"width_ratios": widths},
    )
    for ax, (title, errors) in zip(axes[0], panels):
        _error_panel(ax, errors, title)
    axes[0][0].set_ylabel("test error %")
    fig.suptitle(
        "test error: mean ± std over seeds (squares) and each seed (dots); collapsed: a run at "
        f"accuracy <= {COLLAPSE_ACCURACY:.0%}; > 2x softmax: mean error over twice softmax's",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def tables(rows: list[dict]) -> str:
    """The Markdown of tables.md: per dataset, the main comparison, then the alpha-range runs."""
    # The CPU grid has MNIST and Fashion-MNIST; runs of other datasets laid out the same way
    # (results/REPRODUCE.md: CIFAR on a GPU or TPU) are reported too.
    datasets = dataset_order({r["dataset"] for r in rows})
    parts = []
    for dataset in datasets:
        table, verdicts = comparison_table(rows, dataset, list(sweeps.MAIN))
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
    times = [r["train_time_s"] for r in rows if r.get("train_time_s")]
    if times:
        parts.append(
            f"{len(rows)} runs; training time per run {min(times):.0f}-{max(times):.0f} s "
            f"(median {sorted(times)[len(times) // 2]:.0f} s), excluding data loading "
            "and evaluation."
        )
    return "\n".join(parts).rstrip() + "\n"


def plots(rows: list[dict], results: str) -> list[str]:
    """Draws the saturation plot of each dataset and the test-error plot; returns their paths."""
    written = []
    for dataset in dataset_order({r["dataset"] for r in rows}):
        path = os.path.join(results, f"saturation_{dataset}.png")
        if plot_saturation(rows, dataset, path):
            written.append(path)
    path = os.path.join(results, "test_error.png")
    if plot_test_error(rows, path):
        written.append(path)
    return written


def splice_into_readme(readme: str, text: str) -> bool:
    """Replaces what lies between `TABLES_START` and `TABLES_END` in `readme` by `text`."""
    if not os.path.exists(readme):
        return False
    with open(readme) as f:
        content = f.read()
    if TABLES_START not in content or TABLES_END not in content:
        return False
    head, rest = content.split(TABLES_START, 1)
    _, tail = rest.split(TABLES_END, 1)
    with open(readme, "w") as f:
        f.write(head + TABLES_START + "\n\n" + text + "\n" + TABLES_END + tail)
    return True


def report(results: str) -> str:
    """Writes `<results>/tables.md` and the plots; fills the tables into `<results>/README.md`."""
    rows = load_runs(results)
    text = tables(rows)
    with open(os.path.join(results, "tables.md"), "w") as f:
        f.write(text)
    splice_into_readme(os.path.join(results, "README.md"), text)
    print(text)
    for path in plots(rows, results):
        print(f"wrote {path}")
    return text
