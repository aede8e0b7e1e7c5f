"""The small-data report: per dataset and training subset, a table and a figure."""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from experiments import report, runs, small_data, sweeps
from tests.experiments import fake_runs

# Fake runs of 200 steps with whole-subset saturation every 50, as the grid logs it.
STEPS = 200
FULL_STEPS = (50, 100, 150, 200)

# (dataset, subset) -> loss -> seeds. Seeds 2 and 4 of label smoothing are missing; fashion_mnist
# has no 5000 subset (no table, no figure) and a single softmax seed (no spread).
TREE = {
    ("mnist", 1000): {
        "softmax": [0, 1, 2, 3, 4],
        "noisy_a0.1": [0, 1, 2, 3, 4],
        "label_smoothing_0.1": [0, 1, 3],
        "amplitude_a0.1": [0, 1, 2],
    },
    ("mnist", 5000): {"softmax": [0, 1], "noisy_a0.1": [0, 1]},
    ("fashion_mnist", 1000): {"softmax": [0]},
}
# Losses whose runs never have 90 % of the subset saturated.
NEVER = {"amplitude_a0.1"}


def _write_tree(results):
    """Writes the fake runs of TREE; returns (dataset, subset) -> loss -> per-seed truth."""
    rng = np.random.default_rng(14)
    truth = {}
    for (dataset, subset), losses in TREE.items():
        for loss, seeds in losses.items():
            for seed in seeds:
                run = sweeps.Run(dataset, f"{loss}_n{subset}", seed)
                fractions = rng.uniform(0.3, 0.89 if loss in NEVER else 1.0, len(FULL_STEPS))
                full = {
                    "saturated_fraction": fractions,
                    "target_grad": rng.uniform(1e-4, 1e-1, len(FULL_STEPS)),
                    "error": rng.uniform(0.0, 0.05, len(FULL_STEPS)),
                    "amplitude": rng.uniform(5.0, 50.0, len(FULL_STEPS)),
                }
                test_error = float(rng.uniform(0.02, 0.2))
                fake_runs.fake_run(
                    sweeps.run_config(run), run.workdir(results), test_error=test_error,
                    steps=STEPS,
                    train_full={
                        step: {f"train_full_{key}": float(v[i]) for key, v in full.items()}
                        for i, step in enumerate(FULL_STEPS)
                    },
                )
                with open(os.path.join(run.workdir(results), "run_info.json"), "w") as f:
                    json.dump({"wall_time_s": 100.0 + seed}, f)
                truth.setdefault((dataset, subset), {}).setdefault(loss, []).append(
                    {"test_error": test_error, **full}
                )
    return truth


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A fake small-data results tree, reported once: (results dir, truth, tables.md)."""
    results = str(tmp_path_factory.mktemp("small_data"))
    truth = _write_tree(results)
    report.report(results)
    return results, truth, fake_runs.read(os.path.join(results, "tables.md"))


def _cells(tables, dataset, subset, loss):
    """The cells of `loss`'s row in the table of `dataset` and `subset`."""
    section = tables.split(f"### {dataset}, {subset} training examples", 1)[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {loss} |")]
    assert len(rows) == 1, (loss, section)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def _numbers(cell):
    """'1.23 ± 0.45' -> (1.23, 0.45); n/a -> NaN."""
    return tuple(float("nan") if part == "n/a" else float(part) for part in cell.split(" ± "))


def _assert_printed(cell, want, half_digit):
    """`cell` ('mean ± std') shows `want` (mean, std) to within half its last printed digit."""
    for got, expected in zip(_numbers(cell), want, strict=True):
        if math.isnan(expected):
            assert math.isnan(got), cell
        else:
            assert abs(got - expected) <= half_digit * (1 + 1e-9), (cell, want)


def _mean_std(values):
    values = np.asarray(values, np.float64)
    return values.mean(), values.std(ddof=1) if len(values) > 1 else float("nan")


def _p_cell(p_value):
    return "< 0.001" if p_value < 0.001 else f"{p_value:.3f}"


def _holm(p_values):
    """Holm's step-down adjustment written out: the k-th smallest of m p-values times m - k + 1,
    never below the adjusted p-value before it, at most 1."""
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(np.argsort(p_values)):
        running = max(running, (len(p_values) - rank) * p_values[index])
        adjusted[index] = min(1.0, running)
    return adjusted


def _saturation_step(fractions):
    reached = np.flatnonzero(np.asarray(fractions) >= 0.9)
    return FULL_STEPS[reached[0]] if reached.size else None


@pytest.mark.parametrize(
    "dataset, subset, loss",
    [(d, s, loss) for (d, s), losses in TREE.items() for loss in losses],
)
def test_table_numbers_equal_an_independent_computation(written, dataset, subset, loss):
    _, truth, tables = written
    runs = truth[(dataset, subset)][loss]
    (name, n, error, delta, p, holm_p, intervals, step, never, target_grad, train_error,
     amplitude) = _cells(tables, dataset, subset, loss)
    assert (name, int(n)) == (loss, len(runs))
    errors = [100 * r["test_error"] for r in runs]
    _assert_printed(error, _mean_std(errors), 0.005)

    baseline = [100 * r["test_error"] for r in truth[(dataset, subset)]["softmax"]]
    if loss == "softmax":
        assert (delta, p, holm_p, intervals) == ("", "", "", "")
    else:
        assert float(delta) == pytest.approx(np.mean(errors) - np.mean(baseline), abs=0.005)
        welch = stats.ttest_ind(errors, baseline, equal_var=False).pvalue
        assert p == _p_cell(welch)
        # The family: every loss of this table against softmax.
        others = [other for other in truth[(dataset, subset)] if other != "softmax"]
        family = [stats.ttest_ind([100 * r["test_error"] for r in truth[(dataset, subset)][o]],
                                  baseline, equal_var=False).pvalue for o in others]
        assert holm_p == _p_cell(_holm(family)[others.index(loss)])
        (m, s), (bm, bs) = _mean_std(errors), _mean_std(baseline)
        assert intervals == ("disjoint" if m + 2 * s < bm - 2 * bs or m - 2 * s > bm + 2 * bs
                             else "overlap")

    steps = [_saturation_step(r["saturated_fraction"]) for r in runs]
    reached = [s for s in steps if s is not None]
    assert never == f"{len(runs) - len(reached)}/{len(runs)}"
    if reached:
        _assert_printed(step, _mean_std(reached), 0.5)
    else:
        assert step == "never"
    got_grad, want_grad = _numbers(target_grad), _mean_std([r["target_grad"][-1] for r in runs])
    np.testing.assert_allclose(got_grad, want_grad, rtol=5e-3)
    _assert_printed(train_error, _mean_std([100 * r["error"][-1] for r in runs]), 0.005)
    _assert_printed(amplitude, _mean_std([r["amplitude"][-1] for r in runs]), 0.05)


def test_tree_covers_saturating_and_never_saturating_seeds(written):
    # The table test above must see both kinds of seed within one loss, else "never" and the
    # mean over the seeds that saturate are not both checked.
    _, truth, _ = written
    steps = [_saturation_step(r["saturated_fraction"])
             for r in truth[("mnist", 1000)]["noisy_a0.1"] + truth[("mnist", 1000)]["softmax"]]
    assert None in steps and any(s is not None for s in steps)


def test_tables_have_one_section_per_dataset_and_subset_with_runs(written):
    _, _, tables = written
    headings = [line for line in tables.splitlines() if line.startswith("### ")]
    assert [h.split(":")[0] for h in headings] == [
        "### mnist, 1000 training examples",
        "### mnist, 5000 training examples",
        "### fashion_mnist, 1000 training examples",
    ]
    config = sweeps.run_config(sweeps.Run("mnist", "softmax_n1000", 0))
    epochs = config.num_steps * config.batch_size / 1000
    assert f"{config.num_steps} steps of batch {config.batch_size} ({epochs:.0f} epochs" in tables
    # 16 runs on mnist 1000, wall time 100 s + seed each.
    walls = sum(100 + s for seeds in TREE[("mnist", 1000)].values() for s in seeds)
    assert f"Wall time of these 16 runs in all: {walls / 3600:.2f} h." in tables
    walls = sum(100 + s for losses in TREE.values() for seeds in losses.values() for s in seeds)
    assert f"Wall time of the 21 small-data runs in all: {walls / 3600:.2f} h (summed" in tables
    assert "fashion_mnist (1000 examples): fewer than 2 seeds" in tables
    assert "Label smoothing s cannot saturate" in tables


def test_figures_per_dataset_and_subset_with_runs(written):
    results, _, _ = written
    pngs = sorted(f for f in os.listdir(results) if f.endswith(".png"))
    assert pngs == ["fashion_mnist_n1000.png", "mnist_n1000.png", "mnist_n5000.png"]
    for png in pngs:
        assert os.path.getsize(os.path.join(results, png)) > 10_000


def test_small_data_runs_leave_the_whole_split_tables_as_they_were(tmp_path):
    results = str(tmp_path)
    for seed in range(2):
        for name in ("softmax", "noisy_a0.1", "softmax_n1000", "noisy_a0.1_n1000"):
            run = sweeps.Run("mnist", name, seed)
            fake_runs.fake_run(sweeps.run_config(run), run.workdir(results),
                               train_full={30: {"train_full_saturated_fraction": 0.95}})
    rows = runs.load_runs(results)
    whole_split = [r for r in rows if "_n1000" not in r["name"]]
    assert len(whole_split) == 4
    text = report.tables(rows)
    main = report.tables(whole_split)
    assert text.startswith(main) and "### mnist, 1000 training examples" in text[len(main):]
    assert "_n1000" not in text  # no small-data run in the alpha-range table


def _full(step, fraction):
    return {"step": step, "kind": "train_full", "train_full_saturated_fraction": fraction}


@pytest.mark.parametrize(
    "records, step",
    [
        ([_full(50, 0.5), _full(100, 0.89), _full(150, 0.9), _full(200, 0.95)], 150),  # >= 90 %
        ([_full(50, 0.95), _full(100, 0.85), _full(150, 0.99)], 50),  # the first, not the last
        ([_full(50, 0.1), _full(100, 0.899)], None),  # never
        ([], None),
        # The batch's saturated_fraction (train records) and eval records are not the subset's.
        ([{"step": 10, "kind": "train", "saturated_fraction": 1.0},
          {"step": 20, "kind": "eval", "test_accuracy": 1.0}, _full(50, 0.92)], 50),
    ],
)
def test_saturation_step(records, step):
    assert small_data.saturation_step(records) == step


def test_saturation_step_at_another_fraction():
    assert small_data.saturation_step([_full(50, 0.5), _full(100, 0.7)], fraction=0.6) == 100


@pytest.mark.parametrize(
    "row, subset",
    [({"config": {"train_subset": 5000}}, 5000), ({"config": {"train_subset": 0}}, 0),
     ({"config": {}}, 0), ({}, 0)],
)
def test_train_subset(row, subset):
    assert runs.train_subset(row) == subset
