"""The ROC figure of verification results: TAR against FAR on a logarithmic FAR axis.

One curve per model (or per run), from `train.verification.VerificationResult.far` and `.tar`
(all pairs). A log axis shows the low-FAR end, where verifiers differ; it cannot show FAR = 0,
so the axis starts at one false accept (``1 / num_different``), the lowest FAR the pairs can
measure, and the points at FAR = 0 are left out. Dotted lines mark the FAR targets reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from train import verification


def roc_figure(
    results: Mapping[str, verification.VerificationResult],
    path: str | Path | None = None,
    *,
    title: str | None = None,
    fars: Sequence[float] = verification.DEFAULT_FARS,
):
    """Draws the ROC curves of ``results`` (label -> result) and saves them to ``path``.

    Args:
      results: the curves to draw, by legend label; the legend adds each one's accuracy
        (mean +- standard error over the folds) and AUC.
      path: where to save the figure (format from the suffix: .png, .svg, .pdf); None: not saved.
      title: the axes' title.
      fars: FAR targets to mark with dotted vertical lines (those the pairs can measure).

    Returns:
      The ``matplotlib.figure.Figure`` (no pyplot state: nothing to close).
    """
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    if not results:
        raise ValueError("roc_figure needs at least one result")
    figure = Figure(figsize=(5.5, 4.2), layout="constrained")
    axes = figure.subplots()
    lowest = min(1 / result.num_different for result in results.values())
    for label, result in results.items():
        shown = result.far > 0
        # Straight segments between the points: exact for distinct scores, and for tied ones
        # the diagonal that the AUC's ties-count-half convention integrates.
        axes.plot(result.far[shown], result.tar[shown], linewidth=1.4,
                  label=(f"{label}: acc {result.accuracy:.3f} ± "
                         f"{result.accuracy_standard_error:.3f}, AUC {result.auc:.3f}"))
    for far in fars:
        if far >= lowest:
            axes.axvline(far, color="0.6", linestyle=":", linewidth=1)
    axes.set_xscale("log")
    axes.set_xlim(lowest, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false accept rate (FAR)")
    axes.set_ylabel("true accept rate (TAR)")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    if title:
        axes.set_title(title)
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
