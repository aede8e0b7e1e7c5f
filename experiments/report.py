"""The report of `python -m experiments.compare`: Markdown tables and plots from the stored runs.

Reads every finished run under `<results>/runs/<dataset>/<configuration>/seed<k>/` (`runs`) and
writes `<results>/tables.md`: the rule that decides whether a configuration differs from
softmax, stated once (`statistics.RULE`), the tables of the runs on a whole training split
(`tables`), then those of the runs on a training subset (`small_data`). Draws the figures
(`plots`, `small_data`) and splices the tables into `<results>/README.md` between the markers
`TABLES_START` and `TABLES_END`. Trains nothing: a report of stored runs is reproducible without
a GPU or the data.
"""

from __future__ import annotations

import os

from experiments import plots, small_data, statistics
from experiments import tables as whole_split
from experiments.runs import dataset_order, load_runs, train_subset

# The tables go between these markers of <results>/README.md.
TABLES_START = "<!-- tables:start (written by python -m experiments.compare --report-only) -->"
TABLES_END = "<!-- tables:end -->"


def tables(rows: list[dict]) -> str:
    """The Markdown of tables.md: the rule, the whole-split runs' tables, the small-data ones."""
    full_split = [r for r in rows if not train_subset(r)]
    subsets = [r for r in rows if train_subset(r)]
    parts = [statistics.RULE, ""]
    if full_split:
        parts += whole_split.full_split_tables(full_split)
    if subsets:
        parts += ["", *small_data.small_data_tables(subsets)] if full_split else (
            small_data.small_data_tables(subsets))
    return "\n".join(parts).rstrip() + "\n"


def draw_figures(rows: list[dict], results: str) -> list[str]:
    """Draws every figure of the report; returns their paths.

    For the whole-split runs, the saturation figure of each dataset and the test-error figure;
    for the small-data runs, `<dataset>_n<subset>.png` per dataset and training-subset size.
    """
    full_split = [r for r in rows if not train_subset(r)]
    written = []
    for dataset in dataset_order({r["dataset"] for r in full_split}):
        path = os.path.join(results, f"saturation_{dataset}.png")
        if plots.plot_saturation(full_split, dataset, path):
            written.append(path)
    path = os.path.join(results, "test_error.png")
    if plots.plot_test_error(full_split, path):
        written.append(path)
    for dataset, subset in small_data.small_data_groups(rows):
        path = os.path.join(results, f"{dataset}_n{subset}.png")
        if small_data.plot_small_data(rows, dataset, subset, path):
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
    """Writes `<results>/tables.md` and the figures; fills the tables into `<results>/README.md`."""
    rows = load_runs(results)
    text = tables(rows)
    with open(os.path.join(results, "tables.md"), "w") as f:
        f.write(text)
    splice_into_readme(os.path.join(results, "README.md"), text)
    print(text)
    for path in draw_figures(rows, results):
        print(f"wrote {path}")
    return text
