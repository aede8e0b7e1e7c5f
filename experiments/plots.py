"""The figures of the report: saturation and test error of the whole-split runs, and what every
figure (the small-data ones too) shares: mean over seeds with a min-max band, panels over steps."""

from __future__ import annotations

import math

from experiments import runs, sweeps
from experiments.statistics import mean_std


def _curves(rows: list[dict], dataset: str, name: str):
    """Per-seed train and eval records of one configuration."""
    curves = []
    for row in sorted(rows, key=lambda r: r["seed"]):
        if row["dataset"] == dataset and row["name"] == name:
            curves.append(runs.read_metrics(row["workdir"]))
    return curves


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (the report runs without a display)."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    return plt


def steps_and_values(records: list[dict], key: str, transform=lambda v: v) -> tuple[list, list]:
    """(steps, values) of the records that hold `key`, the values passed through `transform`."""
    kept = [r for r in records if key in r]
    return [r["step"] for r in kept], [transform(r[key]) for r in kept]


def seed_band(ax, per_seed: list[tuple[list, list]], color, label: str) -> None:
    """Plots the mean over seeds of (steps, values) series and, for 2+ seeds, their min-max band.

    Only the steps every seed logged are drawn, so that a seed that logged more often (or a
    run that logged fewer steps) does not shift the mean.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top

    common = sorted(set.intersection(*(set(steps) for steps, _ in per_seed)))
    stacked = np.array(
        [[dict(zip(steps, values))[step] for step in common] for steps, values in per_seed],
        dtype=float,
    ).reshape(len(per_seed), len(common))
    ax.plot(common, stacked.mean(0), color=color, label=f"{label} (n={len(per_seed)})")
    if len(per_seed) > 1:
        ax.fill_between(common, stacked.min(0), stacked.max(0), color=color, alpha=0.2)


def step_panel(ax, title: str, yscale: str, legend_fontsize: int) -> None:
    """Title, axes and legend of a panel over training steps."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_yscale(yscale)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_fontsize)


def save(fig, path: str, title: str, fontsize: int = 11) -> None:
    """Titles, lays out, writes and closes a figure."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)


def plot_saturation(rows: list[dict], dataset: str, path: str) -> bool:
    """Saturation diagnostics and error vs step, softmax vs noisy: mean and range of seeds."""
    plt = pyplot()
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
                per_seed = [steps_and_values(train, "accuracy", lambda a: 1 - a)
                            for train, _ in curves]
            else:
                per_seed = [steps_and_values(train, key) for train, _ in curves]
            seed_band(ax, per_seed, colors[name], name)
        step_panel(ax, title, "log" if key in ("train_error", "test_error") else "linear", 8)
    save(
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
    for dataset in runs.dataset_order({r["dataset"] for r in rows if r["name"] in sweeps.MAIN}):
        errors = {}
        for name in sweeps.MAIN:
            found = [r["test_error"] for r in rows if r["dataset"] == dataset and r["name"] == name]
            if found:
                errors[name] = found
        baseline = mean_std(errors["softmax"])[0] if "softmax" in errors else math.inf
        apart = {
            name: values
            for name, values in errors.items()
            if any(map(runs.collapsed, values)) or mean_std(values)[0] > 2 * baseline
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
    plt = pyplot()
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
    save(
        fig,
        path,
        "test error: mean ± std over seeds (squares) and each seed (dots); collapsed: a run at "
        f"accuracy <= {runs.COLLAPSE_ACCURACY:.0%}; > 2x softmax: mean error over twice softmax's",
        fontsize=10,
    )
    return True
