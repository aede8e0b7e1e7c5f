"""The report of experiments.compare: statistics, tables, plots and the README splice, from
fake runs."""

import math
import os

import pytest

from experiments import plots, report, runs, statistics, sweeps
from tests.experiments import fake_runs


def test_welch_and_spread():
    assert statistics.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert math.isnan(statistics.mean_std([1.0])[1])
    assert statistics.welch_p([1.0, 1.1, 0.9], [5.0, 5.1, 4.9]) < 1e-3
    assert statistics.welch_p([1.0, 2.0, 3.0], [1.5, 2.5, 1.0]) > 0.5
    assert math.isnan(statistics.welch_p([1.0], [2.0, 3.0]))


def test_holm_adjusts_the_p_values_of_one_family_and_skips_undefined_ones():
    # Holm's step-down by hand: sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1, kept monotone.
    assert statistics.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    adjusted = statistics.holm([float("nan"), 0.02, 0.03, 0.9])
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.06, 0.06, 0.9])
    assert statistics.holm([]) == []


def test_one_rule_for_every_configuration_a_p_below_005_alone_is_not_a_difference():
    softmax = [0.030, 0.031, 0.032, 0.033, 0.034]
    errors = {
        "softmax": softmax,
        "a": [0.028, 0.029, 0.030, 0.031, 0.0305],  # Welch p about 0.03 on its own
        "b": [0.030, 0.032, 0.031, 0.034, 0.033],
        "c": [0.031, 0.030, 0.033, 0.032, 0.035],
    }
    comparisons = statistics.versus_softmax(errors)
    assert list(comparisons) == ["a", "b", "c"]
    assert comparisons["a"].p_value < 0.05 <= comparisons["a"].adjusted_p
    assert comparisons["a"].adjusted_p == pytest.approx(
        min(1.0, 3 * statistics.welch_p(errors["a"], softmax)))
    assert statistics.significance_summary(comparisons, "mnist") == [
        "- mnist: no configuration differs from softmax (every Holm p >= 0.05)."]
    clear = statistics.versus_softmax({**errors, "a": [0.020, 0.021, 0.022, 0.021, 0.020]})
    assert statistics.significance_summary(clear, "mnist")[0].startswith(
        "- mnist: a has lower test error than softmax by 1.12 pp (Welch p < 0.001, Holm p "
        "< 0.001)")


def test_report_writes_tables_plots_and_fills_the_readme(tmp_path):
    results = str(tmp_path)
    for seed in range(3):
        for name in ("softmax", "noisy_a0.1", "noisy_a2.0"):
            run = sweeps.Run("mnist", name, seed)
            config = sweeps.run_config(run)
            error = 0.9 if name == "noisy_a2.0" else None  # a collapsed run
            fake_runs.fake_run(config, run.workdir(results), test_error=error)
    with open(os.path.join(results, "README.md"), "w") as f:
        f.write(f"# Results\n\n{report.TABLES_START}\nold\n{report.TABLES_END}\n\nthe end\n")
    report.report(results)

    tables = fake_runs.read(os.path.join(results, "tables.md"))
    assert tables.count("Holm-Bonferroni") == 1  # the rule, stated once
    assert "| softmax | 3 | 3.10 ± 0.10 |" in tables
    assert "| noisy_a0.1 | 3 | 2.60 ± 0.10 | -0.50 |" in tables
    assert "disjoint" in tables
    assert "noisy_a0.1 has lower test error than softmax by 0.50 pp" in tables
    assert "| noisy_a2.0 | 2.0 | 0.05 | 0.0005 | yes | 0 | 90.00 |" in tables
    assert "| fails (chance accuracy; amplitude up to 10) |" in tables  # fake amplitude: 10
    readme = fake_runs.read(os.path.join(results, "README.md"))
    assert "old" not in readme and tables.strip() in readme and readme.endswith("the end\n")
    for png in ("saturation_mnist.png", "test_error.png"):
        assert os.path.getsize(os.path.join(results, png)) > 1000


@pytest.mark.parametrize(
    "row, stopped",
    [
        ({"config": {"stop_norm_gradient": True}}, True),
        (
            {"config": {"stop_norm_gradient": False}, "run_info": {"stop_norm_gradient": True}},
            False,
        ),
        # Runs made before the config key existed: run_info.json recorded it.
        ({"config": {}, "run_info": {"stop_norm_gradient": True}}, True),
        ({"config": {}, "run_info": {}}, False),
        ({}, False),
    ],
)
def test_stops_norm_gradient_reads_the_config_then_old_run_info(row, stopped):
    assert runs.stops_norm_gradient(row) is stopped


RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "results")


@pytest.mark.skipif(not os.path.isdir(os.path.join(RESULTS, "runs")), reason="no stored runs")
def test_committed_tables_are_what_the_stored_runs_give():
    # `python -m experiments.compare --report-only` must reproduce results/tables.md (and so the
    # README's numbers) from the stored runs alone.
    assert report.tables(runs.load_runs(RESULTS)) == fake_runs.read(
        os.path.join(RESULTS, "tables.md"))


def _row(dataset, name, test_error):
    return {"dataset": dataset, "name": name, "test_error": test_error}


def test_error_panels_put_collapsed_and_degraded_configurations_apart():
    rows = [
        *(_row("mnist", "softmax", e) for e in (0.030, 0.032)),
        *(_row("mnist", "noisy_a0.1", e) for e in (0.025, 0.027)),
        *(_row("mnist", "negative_a0.1", e) for e in (0.05, 0.08)),  # mean 6.5 % > 2 x 3.1 %
        *(_row("mnist", "noisy_a0.5", e) for e in (0.03, 0.9)),  # one collapsed run
        _row("mnist", "noisy_a0.2", 0.9),  # not in the main grid: not plotted
        _row("fashion_mnist", "free_a0.1", 0.15),  # no softmax to compare with
    ]
    panels = [(title, {name: len(errors) for name, errors in group.items()})
              for title, group in plots.error_panels(rows)]
    assert panels == [
        ("mnist", {"softmax": 2, "noisy_a0.1": 2}),
        ("mnist:\ncollapsed or > 2x softmax", {"noisy_a0.5": 2, "negative_a0.1": 2}),
        ("fashion_mnist", {"free_a0.1": 1}),
    ]
