"""The Markdown tables of the runs on a whole training split: per dataset, the main comparison
of test errors against softmax, then every run of the alpha range and whether it trains."""

from __future__ import annotations

import math
from collections.abc import Sequence

from experiments import runs, statistics, sweeps


def pct(x: float, digits: int = 2) -> str:
    return "n/a" if runs.is_nan(x) else f"{100 * x:.{digits}f}"


def spread(values: Sequence[float], spec: str) -> str:
    """'mean ± std' of `values` in the format `spec`; n/a for what is undefined."""
    if not values:
        return "n/a"
    mean, std = statistics.mean_std(values)
    return " ± ".join("n/a" if runs.is_nan(x) else f"{x:{spec}}" for x in (mean, std))


def errors_by_name(rows: list[dict], dataset: str, names: Sequence[str]) -> dict[str, list]:
    """Configuration -> the test errors of its runs on `dataset`, in the order of `names`."""
    found: dict[str, list[float]] = {}
    for row in rows:
        if row["dataset"] == dataset and row["name"] in names:
            found.setdefault(row["name"], []).append(row["test_error"])
    return {name: found[name] for name in names if name in found}


def comparison_table(rows: list[dict], dataset: str, names: Sequence[str]
                     ) -> tuple[str, dict[str, statistics.Comparison]]:
    """Markdown table of test error over seeds for `names` on `dataset`, against softmax."""
    errors = errors_by_name(rows, dataset, names)
    comparisons = statistics.versus_softmax(errors)
    lines = [
        "| configuration | n seeds | test error % (mean ± std) | vs softmax (pp) | Welch p "
        "| Holm p | 2-std intervals | collapsed runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, values in errors.items():
        mean, std = statistics.mean_std(values)
        delta, p, adjusted, separate = statistics.comparison_cells(name, comparisons)
        lines.append(
            f"| {name} | {len(values)} | {pct(mean)} ± {pct(std)} | {delta} | {p} | {adjusted} "
            f"| {separate} | {sum(map(runs.collapsed, values))}/{len(values)} |"
        )
    return "\n".join(lines), comparisons


def _trains(row: dict, train_records: list[dict], baseline: float | None) -> str:
    """The verdict of one alpha-range run: does it train, and if not, how it failed."""
    accuracy = row["test_accuracy"]
    dead = [r["step"] for r in train_records if r.get("amplitude", 1.0) < 1e-3]
    nan = [r["step"] for r in train_records if runs.is_nan(r.get("loss", 0.0))]
    if nan or (isinstance(accuracy, float) and math.isnan(accuracy)):
        return "diverged (NaN loss" + (f" from step {nan[0]})" if nan else ")")
    if accuracy <= runs.COLLAPSE_ACCURACY and dead:
        return f"collapsed (amplitude < 1e-3 from step {dead[0]})"
    if accuracy <= runs.COLLAPSE_ACCURACY:
        peak = max((r.get("amplitude", 0.0) for r in train_records), default=float("nan"))
        return f"fails (chance accuracy; amplitude up to {peak:.3g})"
    if baseline and row["test_error"] > 2 * baseline:
        return "degraded (over 2x the softmax error)"
    return "yes"


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
            runs.stops_norm_gradient(row),
            -config.get("learning_rate", 0),
            -config.get("weight_decay", 0),
            alpha,
            row["seed"],
        )

    selected = sorted(
        (r for r in rows if r["dataset"] == dataset and r["name"] in names), key=sort_key
    )
    softmax_errors = [r["test_error"] for r in selected if r["name"] == "softmax"]
    baseline = statistics.mean_std(softmax_errors)[0] if softmax_errors else None
    for row in selected:
        config = row.get("config", {})
        train_records, _ = runs.read_metrics(row["workdir"])
        alpha = row.get("alpha")
        lines.append(
            f"| {row['name']} | {'-' if alpha is None else alpha} "
            f"| {config.get('learning_rate', '?')} | {config.get('weight_decay', '?')} "
            f"| {'stopped' if runs.stops_norm_gradient(row) else 'yes'} "
            f"| {row['seed']} | {pct(row['test_error'])} | {runs.last(train_records, 'loss'):.4g} "
            f"| {runs.last(train_records, 'amplitude'):.3g} "
            f"| {runs.last(train_records, 'logit_std'):.3g} "
            f"| {_trains(row, train_records, baseline)} |"
        )
    return "\n".join(lines)


def training_time(rows: list[dict]) -> list[str]:
    """The line on the runs' training time (none if no run recorded one)."""
    times = [r["train_time_s"] for r in rows if r.get("train_time_s")]
    if not times:
        return []
    return [
        f"{len(rows)} runs; training time per run {min(times):.0f}-{max(times):.0f} s "
        f"(median {sorted(times)[len(times) // 2]:.0f} s), excluding data loading "
        "and evaluation."
    ]


def full_split_tables(rows: list[dict]) -> list[str]:
    """Per dataset, the main comparison, then the alpha-range runs (runs on the whole split)."""
    # The CPU grid has MNIST and Fashion-MNIST; runs of other datasets laid out the same way
    # (results/REPRODUCE.md: CIFAR on a GPU or TPU) are reported too.
    datasets = runs.dataset_order({r["dataset"] for r in rows})
    parts = []
    for dataset in datasets:
        table, comparisons = comparison_table(rows, dataset, list(sweeps.MAIN))
        parts += [
            f"### {dataset}: test error over seeds (short budget)",
            "",
            table,
            "",
            *statistics.significance_summary(comparisons, dataset),
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
    return parts + training_time(rows)
