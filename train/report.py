"""The report of `python -m train.compare`: Markdown tables and plots from the stored runs.

Reads every finished run under `<results>/runs/<dataset>/<configuration>/seed<k>/` (its
`results.json`, `config.json`, `run_info.json` and `metrics.jsonl`), writes
`<results>/tables.md`, the saturation and test-error plots, and splices the tables into
`<results>/README.md` between the markers `TABLES_START` and `TABLES_END`. Trains nothing: a
report of stored runs is reproducible without a GPU or the data.

Runs on a training subset (`config.train_subset`, the small_data grid of issue 14) are reported
apart, per dataset and subset size: a table of test error and whole-subset saturation per loss
and a figure `<dataset>_n<subset>.png` of both over steps.
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


def versus_baseline(
    name: str, errors: Sequence[float], baseline: Sequence[float]
) -> tuple[str, float, float, str]:
    """(name, mean difference, Welch p, whether the mean ± 2 std intervals are "disjoint").

    The last is "overlap" where they are not, "n/a" where either side has a single seed.
    """
    mean, std = mean_std(errors)
    b_mean, b_std = mean_std(baseline)
    if len(errors) > 1 and len(baseline) > 1:
        disjoint = (mean + 2 * std < b_mean - 2 * b_std) or (mean - 2 * std > b_mean + 2 * b_std)
        separate = "disjoint" if disjoint else "overlap"
    else:
        separate = "n/a"
    return name, mean - b_mean, welch_p(errors, baseline), separate


def _versus_softmax_cells(
    name: str, errors: Sequence[float], baseline: Sequence[float], verdicts: list
) -> tuple[str, str, str]:
    """The cells of `name` against softmax: difference in pp, Welch p, 2-std intervals.

    Empty for softmax itself or without softmax runs; otherwise the `versus_baseline` verdict is
    appended to `verdicts`.
    """
    if name == "softmax" or not baseline:
        return "", "", ""
    verdict = versus_baseline(name, errors, baseline)
    verdicts.append(verdict)
    _, delta, p_value, separate = verdict
    return f"{100 * delta:+.2f}", "n/a" if _is_nan(p_value) else _p_text(p_value), separate


def comparison_table(rows: list[dict], dataset: str, names: Sequence[str]) -> tuple[str, list]:
    """Markdown table of test error over seeds for `names` on `dataset`, against softmax."""
    by_name: dict[str, list[float]] = {}
    for row in rows:
        if row["dataset"] == dataset and row["name"] in names:
            by_name.setdefault(row["name"], []).append(row["test_error"])
    baseline = by_name.get("softmax", [])
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
        delta, p, separate = _versus_softmax_cells(name, errors, baseline, verdicts)
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


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (the report runs without a display)."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    return plt


def _series(records: list[dict], key: str, transform=lambda v: v) -> tuple[list, list]:
    """(steps, values) of the records that hold `key`, the values passed through `transform`."""
    kept = [r for r in records if key in r]
    return [r["step"] for r in kept], [transform(r[key]) for r in kept]


def _seed_band(ax, series: list[tuple[list, list]], color, label: str) -> None:
    """Plots the mean over seeds of (steps, values) series and, for 2+ seeds, their min-max band.

    Only the steps every seed logged are drawn, so that a seed that logged more often (or a
    run that logged fewer steps) does not shift the mean.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top

    common = sorted(set.intersection(*(set(steps) for steps, _ in series)))
    stacked = np.array(
        [[dict(zip(steps, values))[step] for step in common] for steps, values in series],
        dtype=float,
    ).reshape(len(series), len(common))
    ax.plot(common, stacked.mean(0), color=color, label=f"{label} (n={len(series)})")
    if len(series) > 1:
        ax.fill_between(common, stacked.min(0), stacked.max(0), color=color, alpha=0.2)


def _step_panel(ax, title: str, yscale: str, legend_fontsize: int) -> None:
    """Title, axes and legend of a panel over training steps."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_yscale(yscale)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_fontsize)


def _save(fig, path: str, title: str, fontsize: int = 11) -> None:
    """Titles, lays out, writes and closes a figure."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)


def plot_saturation(rows: list[dict], dataset: str, path: str) -> bool:
    """Saturation diagnostics and error vs step, softmax vs noisy: mean and range of seeds."""
    plt = _pyplot()
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
            if key == "train_error":
                series = [_series(train, "accuracy", lambda a: 1 - a) for train, _ in curves]
            else:
                series = [_series(train, key) for train, _ in curves]
            _seed_band(ax, series, colors[name], name)
        _step_panel(ax, title, "log" if key in ("train_error", "test_error") else "linear", 8)
    _save(
        fig,
        path,
        f"{dataset}: softmax vs noisy softmax (alpha = 0.1); lines: mean over seeds, "
        "bands: min-max over seeds; test error: seed 0",
    )
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
    plt = _pyplot()
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
    _save(
        fig,
        path,
        "test error: mean ± std over seeds (squares) and each seed (dots); collapsed: a run at "
        f"accuracy <= {COLLAPSE_ACCURACY:.0%}; > 2x softmax: mean error over twice softmax's",
        fontsize=10,
    )
    return True


# Small training subsets (issue 14): the saturation step of a run is the first logged step at
# which at least this fraction of its training subset has clean p_y > 0.99 (the threshold of
# `train_full_saturated_fraction`, train/saturation.py).
SATURATION_STEP_FRACTION = 0.9


def train_subset(row: dict[str, Any]) -> int:
    """The training-subset size of a run (its `config.train_subset`; 0: the whole split)."""
    return int(row.get("config", {}).get("train_subset") or 0)


def saturation_step(records: list[dict], fraction: float = SATURATION_STEP_FRACTION) -> int | None:
    """The first step at which `train_full_saturated_fraction` >= `fraction`; None if never.

    Args:
      records: a run's metrics.jsonl records in step order; those without a whole-subset
        saturated fraction (train and eval records) are passed over.
      fraction: the fraction of the subset that must be saturated.

    Returns:
      The step, or None where no logged step reaches `fraction`.
    """
    for record in records:
        if record.get("train_full_saturated_fraction", -math.inf) >= fraction:
            return record["step"]
    return None


def small_data_groups(rows: list[dict]) -> list[tuple[str, int]]:
    """The (dataset, training-subset size) pairs with runs, datasets in report order."""
    pairs = {(r["dataset"], train_subset(r)) for r in rows if train_subset(r)}
    return [
        (dataset, subset)
        for dataset in dataset_order({d for d, _ in pairs})
        for subset in sorted(s for d, s in pairs if d == dataset)
    ]


def _losses(rows: list[dict], dataset: str, subset: int) -> dict[str, list[dict]]:
    """loss -> runs (by seed) of one dataset and subset; losses in the grid's order, then by name.

    The loss is the configuration's name without its subset: softmax_n1000 -> softmax.
    """
    found: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        if row["dataset"] == dataset and train_subset(row) == subset:
            found.setdefault(row["name"].removesuffix(f"_n{subset}"), []).append(row)
    order = list(sweeps.SMALL_DATA_LOSSES)
    return dict(
        sorted(found.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order),
                                              kv[0]))
    )


def _spread(values: Sequence[float], spec: str) -> str:
    """'mean ± std' of `values` in the format `spec`; n/a for what is undefined."""
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return " ± ".join("n/a" if _is_nan(x) else f"{x:{spec}}" for x in (mean, std))


def small_data_table(rows: list[dict], dataset: str, subset: int) -> tuple[str, list]:
    """Markdown table of one dataset and training subset: test error and saturation per loss.

    Per loss over its seeds: the final test error (mean ± std, the difference and Welch test
    against softmax), the saturation step (mean ± std over the seeds that reach it, and how many
    never do), and at the last logged step the whole subset's mean 1 - p_y (softmax's gradient
    on the target logit), training error and amplitude ||W_y|| ||x||.

    Returns:
      (the table, the `versus_baseline` verdicts of the losses other than softmax).
    """
    losses = _losses(rows, dataset, subset)
    baseline = [r["test_error"] for r in losses.get("softmax", [])]
    lines = [
        "| loss | n seeds | test error % (mean ± std) | vs softmax (pp) | Welch p "
        "| 2-std intervals | saturation step (mean ± std) | never saturated "
        "| final mean 1 - p_y | final train error % | final amplitude |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for loss, runs in losses.items():
        errors = [r["test_error"] for r in runs]
        records = [read_metrics(r["workdir"])[0] for r in runs]
        steps = [saturation_step(r) for r in records]
        reached = [float(s) for s in steps if s is not None]
        delta, p, separate = _versus_softmax_cells(loss, errors, baseline, verdicts)
        final = {
            key: [_last(r, f"train_full_{key}") for r in records]
            for key in ("target_grad", "error", "amplitude")
        }
        lines.append(
            f"| {loss} | {len(runs)} | {_spread([100 * e for e in errors], '.2f')} | {delta} "
            f"| {p} | {separate} | {_spread(reached, '.0f') if reached else 'never'} "
            f"| {len(runs) - len(reached)}/{len(runs)} | {_spread(final['target_grad'], '.2e')} "
            f"| {_spread([100 * e for e in final['error']], '.2f')} "
            f"| {_spread(final['amplitude'], '.1f')} |"
        )
    return "\n".join(lines), verdicts


def small_data_tables(rows: list[dict]) -> list[str]:
    """The small-data part of tables.md: a table per dataset and training-subset size."""
    parts = [
        f"Saturation step: the first logged step at which at least "
        f"{SATURATION_STEP_FRACTION:.0%} of the training subset has clean p_y > 0.99; mean ± std "
        "over the seeds that reach it, \"never saturated\": the seeds that do not by their last "
        "step. Final 1 - p_y, train error and amplitude: the whole subset at the last logged "
        "step, mean ± std over seeds. n seeds: the finished runs.",
        "",
    ]
    if any(r["config"].get("loss") == "label_smoothing" for r in rows):
        parts[0] += (
            " Label smoothing s cannot saturate by this measure with 10 classes: its loss is "
            "least at p_y = 1 - s (1 - 1/10), 0.91 for s = 0.1."
        )
    for dataset, subset in small_data_groups(rows):
        table, verdicts = small_data_table(rows, dataset, subset)
        runs = [r for r in rows if r["dataset"] == dataset and train_subset(r) == subset]
        parts += [
            f"### {dataset}, {subset} training examples: test error and saturation over seeds",
            "",
            _recipe(runs),
            "",
            table,
            "",
            *significance_summary(verdicts, f"{dataset} ({subset} examples)"),
            "",
            *_training_time(runs),
            *_wall_time(runs),
            "",
        ]
    # The grid's cost. Runs trained side by side (one process per dataset) overlap in time, so
    # the sum exceeds the elapsed time.
    return parts + [
        line.removesuffix(".") + " (summed: runs trained side by side overlap in time)."
        for line in _wall_time(rows, "the {} small-data runs")
    ]


def _recipe(runs: list[dict]) -> str:
    """What the runs of one table trained: steps, batch, epochs, how often they were measured."""
    def values(key: str) -> str:
        found = sorted({r.get("config", {}).get(key) for r in runs}, key=str)
        return "/".join("?" if v is None else str(v) for v in found)

    subset = train_subset(runs[0])
    found = {(r["config"].get("num_steps"), r["config"].get("batch_size")) for r in runs}
    epochs = "/".join(
        f"{steps * batch / subset:.0f}" for steps, batch in sorted(found) if steps and batch
    )
    return (
        f"{values('num_steps')} steps of batch {values('batch_size')} ({epochs or '?'} epochs of "
        f"the subset); whole-subset saturation every {values('train_saturation_every_steps')} "
        f"steps, test error every {values('eval_every_steps')} steps."
    )


def _wall_time(runs: list[dict], which: str = "these {} runs") -> list[str]:
    """The line on the runs' summed wall time (run_info.json), where they recorded one."""
    walls = [r["run_info"]["wall_time_s"] for r in runs if "wall_time_s" in r.get("run_info", {})]
    if not walls:
        return []
    return [f"Wall time of {which.format(len(walls))} in all: {sum(walls) / 3600:.2f} h."]


def plot_small_data(rows: list[dict], dataset: str, subset: int, path: str) -> bool:
    """Test error and whole-subset saturation over steps, one line per loss, for one subset.

    Lines are the mean over seeds, bands the min-max over seeds (`_seed_band`).
    """
    losses = _losses(rows, dataset, subset)
    if not losses:
        return False
    plt = _pyplot()
    panels = [
        ("test_accuracy", "test error %", lambda a: 100 * (1 - a), "linear"),
        ("train_full_saturated_fraction", "fraction of the subset with clean $p_y > 0.99$",
         None, "linear"),
        ("train_full_target_grad", "mean target gradient $1 - p_y$ on the subset", None, "log"),
        ("train_full_amplitude", r"mean amplitude $\|W_y\|\,\|x\|$ on the subset", None,
         "linear"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    colors = plt.get_cmap("tab10")
    for ax, (key, title, transform, scale) in zip(axes.ravel(), panels):
        for index, (loss, runs) in enumerate(losses.items()):
            curves = [read_metrics(r["workdir"]) for r in runs]
            series = [
                _series(evals if key == "test_accuracy" else train, key, transform or float)
                for train, evals in curves
            ]
            if all(steps for steps, _ in series):
                _seed_band(ax, series, colors(index % 10), loss)
        if key == "train_full_saturated_fraction":
            ax.axhline(SATURATION_STEP_FRACTION, color="black", linestyle=":", linewidth=1,
                       label=f"{SATURATION_STEP_FRACTION:.0%} (saturation step)")
        _step_panel(ax, title, scale, 7)
    _save(
        fig,
        path,
        f"{dataset}, {subset} training examples: lines are the mean over seeds, bands the "
        "min-max over seeds (n seeds in the legend)",
    )
    return True


def _training_time(rows: list[dict]) -> list[str]:
    """The line on the runs' training time (none if no run recorded one)."""
    times = [r["train_time_s"] for r in rows if r.get("train_time_s")]
    if not times:
        return []
    return [
        f"{len(rows)} runs; training time per run {min(times):.0f}-{max(times):.0f} s "
        f"(median {sorted(times)[len(times) // 2]:.0f} s), excluding data loading "
        "and evaluation."
    ]


def _full_split_tables(rows: list[dict]) -> list[str]:
    """Per dataset, the main comparison, then the alpha-range runs (runs on the whole split)."""
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
    return parts + _training_time(rows)


def tables(rows: list[dict]) -> str:
    """The Markdown of tables.md: the whole-split runs' tables, then the small-data tables."""
    full_split = [r for r in rows if not train_subset(r)]
    subsets = [r for r in rows if train_subset(r)]
    parts = _full_split_tables(full_split) if full_split else []
    if subsets:
        parts += ["", *small_data_tables(subsets)] if parts else small_data_tables(subsets)
    return "\n".join(parts).rstrip() + "\n"


def plots(rows: list[dict], results: str) -> list[str]:
    """Draws every plot of the report; returns their paths.

    For the whole-split runs, the saturation plot of each dataset and the test-error plot; for
    the small-data runs, `<dataset>_n<subset>.png` per dataset and training-subset size.
    """
    full_split = [r for r in rows if not train_subset(r)]
    written = []
    for dataset in dataset_order({r["dataset"] for r in full_split}):
        path = os.path.join(results, f"saturation_{dataset}.png")
        if plot_saturation(full_split, dataset, path):
            written.append(path)
    path = os.path.join(results, "test_error.png")
    if plot_test_error(full_split, path):
        written.append(path)
    for dataset, subset in small_data_groups(rows):
        path = os.path.join(results, f"{dataset}_n{subset}.png")
        if plot_small_data(rows, dataset, subset, path):
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
