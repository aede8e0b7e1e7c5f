"""The report of the runs on a training subset (`config.train_subset`, the small_data grid): per
dataset and subset size, a table of test error and whole-subset saturation per loss, and a figure
`<dataset>_n<subset>.png` of both over steps."""

from __future__ import annotations

import math

from experiments import plots, runs, statistics, sweeps
from experiments.runs import train_subset
from experiments.tables import spread, training_time

# The saturation step of a run is the first logged step at which at least this fraction of its
# training subset has clean p_y > 0.99 (the threshold of `train_full_saturated_fraction`,
# train/saturation.py).
SATURATION_STEP_FRACTION = 0.9


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
        for dataset in runs.dataset_order({d for d, _ in pairs})
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


def small_data_table(rows: list[dict], dataset: str, subset: int
                     ) -> tuple[str, dict[str, statistics.Comparison]]:
    """Markdown table of one dataset and training subset: test error and saturation per loss.

    Per loss over its seeds: the final test error (mean ± std, the difference and the tests
    against softmax of `statistics`), the saturation step (mean ± std over the seeds that reach
    it, and how many never do), and at the last logged step the whole subset's mean 1 - p_y
    (softmax's gradient on the target logit), training error and amplitude ||W_y|| ||x||.

    Returns:
      (the table, the comparisons of the losses other than softmax with softmax).
    """
    losses = _losses(rows, dataset, subset)
    comparisons = statistics.versus_softmax(
        {loss: [r["test_error"] for r in found] for loss, found in losses.items()})
    lines = [
        "| loss | n seeds | test error % (mean ± std) | vs softmax (pp) | Welch p | Holm p "
        "| 2-std intervals | saturation step (mean ± std) | never saturated "
        "| final mean 1 - p_y | final train error % | final amplitude |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loss, found in losses.items():
        errors = [r["test_error"] for r in found]
        records = [runs.read_metrics(r["workdir"])[0] for r in found]
        steps = [saturation_step(r) for r in records]
        reached = [float(s) for s in steps if s is not None]
        delta, p, adjusted, separate = statistics.comparison_cells(loss, comparisons)
        final = {
            key: [runs.last(r, f"train_full_{key}") for r in records]
            for key in ("target_grad", "error", "amplitude")
        }
        lines.append(
            f"| {loss} | {len(found)} | {spread([100 * e for e in errors], '.2f')} | {delta} "
            f"| {p} | {adjusted} | {separate} "
            f"| {spread(reached, '.0f') if reached else 'never'} "
            f"| {len(found) - len(reached)}/{len(found)} | {spread(final['target_grad'], '.2e')} "
            f"| {spread([100 * e for e in final['error']], '.2f')} "
            f"| {spread(final['amplitude'], '.1f')} |"
        )
    return "\n".join(lines), comparisons


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
        table, comparisons = small_data_table(rows, dataset, subset)
        group = [r for r in rows if r["dataset"] == dataset and train_subset(r) == subset]
        parts += [
            f"### {dataset}, {subset} training examples: test error and saturation over seeds",
            "",
            _recipe(group),
            "",
            table,
            "",
            *statistics.significance_summary(comparisons, f"{dataset} ({subset} examples)"),
            "",
            *training_time(group),
            *_wall_time(group),
            "",
        ]
    # The grid's cost. Runs trained side by side (one process per dataset) overlap in time, so
    # the sum exceeds the elapsed time.
    return parts + [
        line.removesuffix(".") + " (summed: runs trained side by side overlap in time)."
        for line in _wall_time(rows, "the {} small-data runs")
    ]


def _recipe(group: list[dict]) -> str:
    """What the runs of one table trained: steps, batch, epochs, how often they were measured."""
    def values(key: str) -> str:
        found = sorted({r.get("config", {}).get(key) for r in group}, key=str)
        return "/".join("?" if v is None else str(v) for v in found)

    subset = train_subset(group[0])
    found = {(r["config"].get("num_steps"), r["config"].get("batch_size")) for r in group}
    epochs = "/".join(
        f"{steps * batch / subset:.0f}" for steps, batch in sorted(found) if steps and batch
    )
    return (
        f"{values('num_steps')} steps of batch {values('batch_size')} ({epochs or '?'} epochs of "
        f"the subset); whole-subset saturation every {values('train_saturation_every_steps')} "
        f"steps, test error every {values('eval_every_steps')} steps."
    )


def _wall_time(group: list[dict], which: str = "these {} runs") -> list[str]:
    """The line on the runs' summed wall time (run_info.json), where they recorded one."""
    walls = [r["run_info"]["wall_time_s"] for r in group
             if "wall_time_s" in r.get("run_info", {})]
    if not walls:
        return []
    return [f"Wall time of {which.format(len(walls))} in all: {sum(walls) / 3600:.2f} h."]


def plot_small_data(rows: list[dict], dataset: str, subset: int, path: str) -> bool:
    """Test error and whole-subset saturation over steps, one line per loss, for one subset.

    Lines are the mean over seeds, bands the min-max over seeds (`plots.seed_band`).
    """
    losses = _losses(rows, dataset, subset)
    if not losses:
        return False
    plt = plots.pyplot()
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
        for index, (loss, found) in enumerate(losses.items()):
            curves = [runs.read_metrics(r["workdir"]) for r in found]
            per_seed = [
                plots.steps_and_values(evals if key == "test_accuracy" else train, key,
                                       transform or float)
                for train, evals in curves
            ]
            if all(steps for steps, _ in per_seed):
                plots.seed_band(ax, per_seed, colors(index % 10), loss)
        if key == "train_full_saturated_fraction":
            ax.axhline(SATURATION_STEP_FRACTION, color="black", linestyle=":", linewidth=1,
                       label=f"{SATURATION_STEP_FRACTION:.0%} (saturation step)")
        plots.step_panel(ax, title, scale, 7)
    plots.save(
        fig,
        path,
        f"{dataset}, {subset} training examples: lines are the mean over seeds, bands the "
        "min-max over seeds (n seeds in the legend)",
    )
    return True
