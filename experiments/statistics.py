"""Whether a configuration's test error differs from softmax's: one rule for every table.

Each configuration of a table is compared with softmax by Welch's t-test on the test errors of
their seeds; the p-values of the table's comparisons are then adjusted together by Holm's
step-down method (Holm-Bonferroni, statsmodels' `multipletests`), which keeps the chance of any
false "differs" in the table at most `ALPHA`. A configuration differs when its adjusted p-value
is below `ALPHA`. The report states the rule once (`RULE`); the mean ± 2 std intervals it also
shows describe the spread and decide nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from experiments.runs import is_nan

ALPHA = 0.05

RULE = (
    "How the tables decide whether a configuration differs from softmax: Welch's t-test on the "
    "test errors of their seeds (\"Welch p\"), with the p-values of all the comparisons of one "
    "table adjusted together by the Holm-Bonferroni method (\"Holm p\"); a configuration "
    f"differs when its Holm p < {ALPHA}. The same rule applies to every loss and every table. "
    "\"2-std intervals\" says whether the mean ± 2 std intervals overlap: a description of the "
    "spread, not a test. With 3-5 seeds the test is weak: a difference it does not find is not "
    "evidence either way."
)


class Comparison(NamedTuple):
    """One configuration against softmax."""

    name: str
    delta: float  # mean test error minus softmax's
    p_value: float  # Welch's t-test; NaN where undefined
    adjusted_p: float  # Holm-Bonferroni over the table's comparisons; NaN where p_value is
    intervals: str  # "disjoint" or "overlap" (mean ± 2 std), "n/a" for a single seed

    @property
    def differs(self) -> bool:
        return not is_nan(self.adjusted_p) and self.adjusted_p < ALPHA


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value; NaN where it is undefined (n < 2 or zero variance)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    from scipy import stats  # pylint: disable=g-import-not-at-top

    if mean_std(a)[1] == 0 and mean_std(b)[1] == 0:
        return float("nan")
    with warnings.catch_warnings():
        # Collapsed runs all end at the same error: scipy warns about the zero variance.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count as a comparison)."""
    from statsmodels.stats.multitest import multipletests  # pylint: disable=g-import-not-at-top

    defined = [i for i, p in enumerate(p_values) if not is_nan(p)]
    adjusted = [float("nan")] * len(p_values)
    if defined:
        corrected = multipletests([p_values[i] for i in defined], alpha=ALPHA, method="holm")[1]
        for i, p in zip(defined, corrected):
            adjusted[i] = float(p)
    return adjusted


def _intervals(errors: Sequence[float], baseline: Sequence[float]) -> str:
    if len(errors) < 2 or len(baseline) < 2:
        return "n/a"
    (mean, std), (b_mean, b_std) = mean_std(errors), mean_std(baseline)
    disjoint = mean + 2 * std < b_mean - 2 * b_std or mean - 2 * std > b_mean + 2 * b_std
    return "disjoint" if disjoint else "overlap"


def versus_softmax(errors: Mapping[str, Sequence[float]]) -> dict[str, Comparison]:
    """Every configuration of `errors` but softmax against softmax, adjusted as one family.

    Args:
      errors: configuration name -> the test errors of its seeds, softmax among them.

    Returns:
      name -> Comparison, for every name but softmax; empty without softmax runs.
    """
    baseline = errors.get("softmax")
    if not baseline:
        return {}
    names = [name for name in errors if name != "softmax"]
    p_values = [welch_p(errors[name], baseline) for name in names]
    return {
        name: Comparison(name, mean_std(errors[name])[0] - mean_std(baseline)[0], p, adjusted,
                         _intervals(errors[name], baseline))
        for name, p, adjusted in zip(names, p_values, holm(p_values))
    }


def p_text(p_value: float, equals: bool = False) -> str:
    if is_nan(p_value):
        return "n/a"
    if p_value < 0.001:
        return "< 0.001"
    return f"{'= ' if equals else ''}{p_value:.3f}"


def comparison_cells(name: str, comparisons: Mapping[str, Comparison]) -> tuple[str, ...]:
    """The table cells of `name` against softmax: difference in pp, Welch p, Holm p, 2-std
    intervals; empty for softmax itself and without softmax runs."""
    if name not in comparisons:
        return "", "", "", ""
    found = comparisons[name]
    return (f"{100 * found.delta:+.2f}", p_text(found.p_value), p_text(found.adjusted_p),
            found.intervals)


def significance_summary(comparisons: Mapping[str, Comparison], label: str) -> list[str]:
    """The bullet lines under a table: each configuration that differs (`RULE`), or none."""
    if not any(c.intervals != "n/a" for c in comparisons.values()):
        return [f"- {label}: fewer than 2 seeds per configuration so far: no test of the "
                "differences."]
    lines = [
        f"- {label}: {c.name} has {'lower' if c.delta < 0 else 'higher'} test error than softmax "
        f"by {abs(100 * c.delta):.2f} pp (Welch p {p_text(c.p_value, equals=True)}, Holm p "
        f"{p_text(c.adjusted_p, equals=True)})."
        for c in comparisons.values() if c.differs
    ]
    return lines or [f"- {label}: no configuration differs from softmax (every Holm p >= "
                     f"{ALPHA})."]
