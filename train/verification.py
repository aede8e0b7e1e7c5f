"""Open-set verification metrics on image pairs, by LFW's protocol; NumPy only.

A *pair* is two images; it is *same* when both show one class (a person, a character) and
*different* otherwise. A verifier scores each pair (here: the cosine similarity of the two
embeddings) and accepts it as same when the score exceeds a threshold. Names as in face
recognition:

* TAR, the true accept rate: the fraction of same pairs accepted (the ROC's true positive rate).
* FAR, the false accept rate: the fraction of different pairs accepted (false positive rate).
* Accuracy: the fraction of all pairs decided correctly at one threshold.

LFW's protocol (Huang et al., "Labeled Faces in the Wild", UMass TR 07-49, 2007, View 2): the
pairs come in 10 disjoint folds; for each fold the threshold is the one most accurate on the
other 9 folds, and the accuracy is measured on the held-out fold. The summary is the mean of the
10 fold accuracies ``mu = sum(p_i) / 10`` and, as LFW's results page reports it, the standard
error of that mean ``SE = sigma / sqrt(10)`` with the sample standard deviation
``sigma = sqrt(sum((p_i - mu)^2) / 9)``. Both ``sigma`` (:attr:`VerificationResult.accuracy_std`)
and ``SE`` (:attr:`VerificationResult.accuracy_standard_error`) are kept: many face papers print
``mu +- sigma`` (some with the population std); read the label before comparing numbers.

The threshold-free numbers use all pairs at once: the ROC curve (TAR against FAR over every
threshold), its area (AUC) and the TAR at a fixed FAR. A FAR target can only be measured when at
least one false accept is allowed: ``far * num_different >= 1``. With LFW's 3,000 different pairs
FAR = 1e-3 allows 3 false accepts (a coarse estimate) and FAR = 1e-4 none; :func:`tar_at_far`
returns NaN there and :func:`evaluate_pairs` says so in its notes.

  cosine_scores      cosine similarity of two batches of embeddings (each L2-normalised first).
  best_threshold     the most accurate threshold on a set of scored pairs (exact, ties handled).
  fold_accuracies    the 10-fold protocol: thresholds from 9 folds, accuracy on the 10th.
  roc_curve          FAR and TAR at every distinct threshold (``score >= threshold`` accepts).
  roc_auc            the area under that curve (Mann-Whitney, ties count one half).
  tar_at_far         the highest TAR whose FAR does not exceed a target; NaN if unmeasurable.
  evaluate_pairs     all of them: a :class:`VerificationResult`.
  evaluate_embeddings  the same from an embedding table and the pairs' row indices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# The FAR targets reported by default; 1e-4 only where the different pairs resolve it.
DEFAULT_FARS = (1e-3, 1e-4)


def l2_normalize(embeddings: np.ndarray, *, epsilon: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit Euclidean norm, ``x / max(||x||, epsilon)``, in float64.

    Example:
      >>> l2_normalize(np.array([[3.0, 4.0]])).tolist()
      [[0.6, 0.8]]
    """
    embeddings = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return embeddings / np.maximum(norms, epsilon)


def cosine_scores(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair of rows: ``<l, r> / (||l|| ||r||)``, float64 ``[pairs]``.

    Args:
      left: the first image's embedding of each pair, ``[pairs, dims]``.
      right: the second image's embedding of each pair, ``[pairs, dims]``.

    Returns:
      Scores in [-1, 1]; a zero embedding scores 0 against anything.

    Example:
      >>> cosine_scores(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[2.0, 0.0], [-1.0, 1.0]]))
      array([1., 0.])
    """
    left, right = np.asarray(left), np.asarray(right)
    if left.ndim != 2 or left.shape != right.shape:
        raise ValueError(
            f"left and right must both be [pairs, dims]; got {left.shape} and {right.shape}")
    return np.einsum("pd,pd->p", l2_normalize(left), l2_normalize(right))


def _checked(scores, is_same) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    is_same = np.asarray(is_same)
    if scores.ndim != 1 or is_same.shape != scores.shape:
        raise ValueError(f"scores and is_same must be 1-D of one length; got {scores.shape} "
                         f"and {is_same.shape}")
    if is_same.dtype != bool:
        if not np.isin(is_same, (0, 1)).all():
            raise ValueError("is_same must be boolean (or 0/1)")
        is_same = is_same.astype(bool)
    if not np.isfinite(scores).all():
        raise ValueError(f"scores must be finite; {np.sum(~np.isfinite(scores))} are not")
    return scores, is_same


def _checked_both_kinds(scores, is_same) -> tuple[np.ndarray, np.ndarray]:
    scores, is_same = _checked(scores, is_same)
    if is_same.all() or not is_same.any():
        raise ValueError("the ROC needs both same and different pairs; got only "
                         + ("same" if is_same.any() else "different") + " pairs")
    return scores, is_same


def best_threshold(scores: np.ndarray, is_same: np.ndarray) -> tuple[float, float]:
    r"""The threshold ``t`` most accurate at accepting ``score > t``, and its accuracy.

    .. math::
      t^* = \arg\max_t \; \frac{1}{n} \sum_i [\, (s_i > t) = y_i \,]

    Exact, not a grid search: the accuracy changes only between distinct scores, so the
    candidates are ``-inf`` (accept all), the midpoint between each two neighbouring distinct
    scores, and ``+inf`` (reject all). Equal scores are always decided alike. Of equally
    accurate candidates the lowest is returned.

    Args:
      scores: similarity of each pair, ``[pairs]``; higher means more alike.
      is_same: whether each pair is same, ``[pairs]``.

    Returns:
      ``(threshold, accuracy)``.

    Example:
      >>> best_threshold(np.array([0.0, 0.5, 0.25, 1.0]), np.array([False, False, True, True]))
      (0.125, 0.75)
    """
    scores, is_same = _checked(scores, is_same)
    if scores.size == 0:
        raise ValueError("best_threshold needs at least one pair")
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_same = scores[order], is_same[order]
    num_same = int(sorted_same.sum())
    # Rejecting the first i + 1 sorted pairs decides rejected different and accepted same pairs
    # correctly; only cuts between distinct scores are possible.
    correct_if_cut = np.cumsum(~sorted_same) + (num_same - np.cumsum(sorted_same))
    cut = np.flatnonzero(np.diff(sorted_scores) > 0)
    correct = np.concatenate([[num_same], correct_if_cut[cut], [scores.size - num_same]])
    low, high = sorted_scores[cut], sorted_scores[cut + 1]
    middle = low + (high - low) / 2
    # Neighbouring floats can round the midpoint up to the higher score; then the lower one
    # separates them (score > low accepts exactly the higher pairs).
    middle = np.where(middle < high, middle, low)
    thresholds = np.concatenate([[-np.inf], middle, [np.inf]])
    best = int(np.argmax(correct))  # the first maximum: the lowest threshold
    return float(thresholds[best]), float(correct[best] / scores.size)


def fold_accuracies(
    scores: np.ndarray, is_same: np.ndarray, folds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """LFW's protocol: each fold's accuracy at the threshold that is best on all other folds.

    Args:
      scores: similarity of each pair, ``[pairs]``.
      is_same: whether each pair is same, ``[pairs]``.
      folds: the fold of each pair, ``[pairs]`` integers (LFW: 10 folds of 600 pairs).

    Returns:
      ``(accuracies, thresholds)``, one per fold in increasing fold order: the held-out
      accuracy of ``score > threshold`` and the threshold chosen on the other folds.

    Example:
      >>> scores = np.array([0.875, 0.125, 0.75, 0.25, 0.375, 0.625])
      >>> accuracies, thresholds = fold_accuracies(
      ...     scores, np.array([1, 0, 1, 0, 1, 0]), np.array([0, 0, 1, 1, 2, 2]))
      >>> accuracies.tolist(), thresholds.tolist()
      ([1.0, 1.0, 0.0], [0.3125, 0.25, 0.5])
    """
    scores, is_same = _checked(scores, is_same)
    folds = np.asarray(folds)
    if folds.shape != scores.shape or not np.issubdtype(folds.dtype, np.integer):
        raise ValueError(f"folds must be integers of shape {scores.shape}; got {folds.dtype} "
                         f"{folds.shape}")
    fold_ids = np.unique(folds)
    if fold_ids.size < 2:
        raise ValueError(f"the protocol needs at least 2 folds; got {fold_ids.size}")
    accuracies, thresholds = [], []
    for fold in fold_ids:
        held_out = folds == fold
        threshold, _ = best_threshold(scores[~held_out], is_same[~held_out])
        accuracies.append(np.mean((scores[held_out] > threshold) == is_same[held_out]))
        thresholds.append(threshold)
    return np.asarray(accuracies), np.asarray(thresholds)


def roc_curve(scores: np.ndarray, is_same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAR and TAR of accepting ``score >= threshold``, at every distinct score as threshold.

    The points of ``sklearn.metrics.roc_curve(is_same, scores, drop_intermediate=False)``:
    the first is ``threshold = +inf`` (nothing accepted, FAR = TAR = 0), then the distinct
    scores in decreasing order, ending at FAR = TAR = 1.

    Args:
      scores: similarity of each pair, ``[pairs]``.
      is_same: whether each pair is same, ``[pairs]``; both kinds must occur.

    Returns:
      ``(far, tar, thresholds)``, each ``[distinct scores + 1]``; FAR and TAR non-decreasing.

    Example:
      >>> far, tar, thresholds = roc_curve(np.array([0.9, 0.5, 0.5, 0.1]),
      ...                                  np.array([True, True, False, False]))
      >>> far.tolist(), tar.tolist(), thresholds.tolist()
      ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0], [inf, 0.9, 0.5, 0.1])
    """
    scores, is_same = _checked_both_kinds(scores, is_same)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], is_same[order]
    # The last pair of each run of equal scores: a threshold accepts a run whole or not at all.
    run_ends = np.flatnonzero(np.r_[np.diff(sorted_scores) != 0, True])
    true_accepts = np.cumsum(sorted_same)[run_ends]
    false_accepts = (run_ends + 1) - true_accepts
    far = np.r_[0, false_accepts] / false_accepts[-1]
    tar = np.r_[0, true_accepts] / true_accepts[-1]
    return far, tar, np.r_[np.inf, sorted_scores[run_ends]]


def roc_auc(scores: np.ndarray, is_same: np.ndarray) -> float:
    r"""Area under the ROC curve: the probability that a same pair outscores a different one.

    .. math::
      \mathrm{AUC} = \frac{1}{n_+ n_-} \sum_{i: y_i} \sum_{j: \neg y_j}
        \big([s_i > s_j] + \tfrac12 [s_i = s_j]\big)

    the Mann-Whitney statistic, computed from average ranks; it equals the trapezoidal area
    under :func:`roc_curve` (ties are the curve's diagonal segments).

    Example:
      >>> roc_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False]))
      0.875
    """
    scores, is_same = _checked_both_kinds(scores, is_same)
    _, position, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2  # 1-based ranks; a run of ties shares their mean
    num_same = int(is_same.sum())
    num_different = scores.size - num_same
    rank_sum = average_rank[position][is_same].sum()
    return float((rank_sum - num_same * (num_same + 1) / 2) / (num_same * num_different))


def far_is_measurable(far: float, num_different: int) -> bool:
    """Whether ``num_different`` different pairs can measure FAR = ``far``: one false accept fits.

    Example:
      >>> far_is_measurable(1e-3, 3000), far_is_measurable(1e-4, 3000)
      (True, False)
    """
    return num_different > 0 and 1 / num_different <= far


def tar_at_far(scores: np.ndarray, is_same: np.ndarray, far: float) -> tuple[float, float]:
    """The highest TAR among thresholds whose FAR is at most ``far``, and that threshold.

    The operating point of :func:`roc_curve` with the most true accepts among those with
    ``false accepts / num_different <= far`` (of several, the one with the fewest false
    accepts); its threshold accepts ``score >= threshold``.
    Where the different pairs are too few for ``far`` (fewer than ``1 / far``: the target
    lies below one false accept, so only FAR = 0 would qualify) the TAR is not measured and
    ``(nan, nan)`` is returned; see :func:`far_is_measurable`.

    Args:
      scores: similarity of each pair, ``[pairs]``.
      is_same: whether each pair is same, ``[pairs]``; both kinds must occur.
      far: the FAR target, in (0, 1].

    Returns:
      ``(tar, threshold)``.

    Example:
      >>> scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
      >>> tar_at_far(scores, np.array([1, 0, 1, 1, 0, 0]), 0.34)
      (1.0, 0.6)
      >>> tar_at_far(scores, np.array([1, 0, 1, 1, 0, 0]), 0.1)
      (nan, nan)
    """
    if not 0 < far <= 1:
        raise ValueError(f"far must be in (0, 1]; got {far}")
    far_points, tar_points, thresholds = roc_curve(scores, is_same)
    num_different = int(np.sum(~np.asarray(is_same, bool)))
    if not far_is_measurable(far, num_different):
        return float("nan"), float("nan")
    # FAR and TAR are non-decreasing along the curve: the last point within the target has the
    # highest TAR, and the first point with that TAR the lowest FAR (the highest threshold).
    last = int(np.searchsorted(far_points, far, side="right")) - 1
    best = int(np.searchsorted(tar_points, tar_points[last], side="left"))
    return float(tar_points[best]), float(thresholds[best])


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    """Verification metrics of one model on one pairs list.

    Attributes:
      accuracy: mean of the fold accuracies (LFW's ``mu``).
      accuracy_std: their sample standard deviation, ``ddof=1`` (LFW's ``sigma``).
      accuracy_standard_error: ``accuracy_std / sqrt(folds)``, LFW's ``SE``: what its
        results page prints after the ``+-``.
      fold_accuracies: the held-out accuracy of each fold.
      fold_thresholds: the threshold each fold was decided with (chosen on the others).
      auc: area under the ROC curve of all pairs.
      tar_at_far: ``{far: tar}`` for each FAR target; NaN where it cannot be measured.
      num_same: same pairs.
      num_different: different pairs.
      far: the ROC curve's FAR points (all pairs), for figures.
      tar: the ROC curve's TAR points.
      notes: what was not measured and why.
    """

    accuracy: float
    accuracy_std: float
    accuracy_standard_error: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    auc: float
    tar_at_far: dict[float, float]
    num_same: int
    num_different: int
    far: np.ndarray = dataclasses.field(repr=False)
    tar: np.ndarray = dataclasses.field(repr=False)
    notes: tuple[str, ...] = ()

    def summary(self) -> dict:
        """The scalar metrics as a JSON-ready dict (no curve; NaN stays NaN)."""
        return {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "accuracy_standard_error": self.accuracy_standard_error,
            "fold_accuracies": [float(a) for a in self.fold_accuracies],
            "fold_thresholds": [float(t) for t in self.fold_thresholds],
            "auc": self.auc,
            **{f"tar_at_far_{far:.0e}": tar for far, tar in self.tar_at_far.items()},
            "num_same": self.num_same,
            "num_different": self.num_different,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        rates = ", ".join(f"TAR@FAR={far:.0e} " + ("n/a" if np.isnan(tar) else f"{tar:.4f}")
                          for far, tar in self.tar_at_far.items())
        return (f"accuracy {self.accuracy:.4f} +- {self.accuracy_standard_error:.4f} (standard "
                f"error over {len(self.fold_accuracies)} folds), AUC {self.auc:.4f}, {rates}")


def evaluate_pairs(
    scores: np.ndarray,
    is_same: np.ndarray,
    folds: np.ndarray,
    *,
    fars: Sequence[float] = DEFAULT_FARS,
) -> VerificationResult:
    """All verification metrics of scored pairs: the k-fold accuracy, AUC, TAR at each FAR.

    Args:
      scores: similarity of each pair, ``[pairs]``; higher means more alike.
      is_same: whether each pair is same, ``[pairs]``.
      folds: the fold of each pair, ``[pairs]`` integers.
      fars: the FAR targets of ``tar_at_far``.

    Returns:
      A :class:`VerificationResult`.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> is_same = np.arange(6000) % 2 == 0
      >>> scores = rng.normal(size=6000) + 2.0 * is_same
      >>> result = evaluate_pairs(scores, is_same, np.arange(6000) // 600)  # 10 folds
      >>> round(result.accuracy, 2), round(result.auc, 2), result.tar_at_far[1e-4]
      (0.84, 0.92, nan)
      >>> print(result.notes[0])
      TAR@FAR=1e-04 not measured: 3000 different pairs resolve FAR down to 3.3e-04
      (one false accept); FAR=1e-04 needs at least 10000
    """
    scores, is_same = _checked_both_kinds(scores, is_same)
    accuracies, thresholds = fold_accuracies(scores, is_same, folds)
    far, tar, _ = roc_curve(scores, is_same)
    num_same = int(is_same.sum())
    num_different = scores.size - num_same
    notes = tuple(
        f"TAR@FAR={target:.0e} not measured: {num_different} different pairs resolve FAR "
        f"down to {1 / num_different:.1e} (one false accept); FAR={target:.0e} needs at least "
        f"{int(np.ceil(1 / target))}"
        for target in fars if not far_is_measurable(target, num_different))
    std = float(np.std(accuracies, ddof=1))
    return VerificationResult(
        accuracy=float(np.mean(accuracies)),
        accuracy_std=std,
        accuracy_standard_error=float(std / np.sqrt(accuracies.size)),
        fold_accuracies=accuracies,
        fold_thresholds=thresholds,
        auc=roc_auc(scores, is_same),
        tar_at_far={float(target): tar_at_far(scores, is_same, target)[0] for target in fars},
        num_same=num_same,
        num_different=num_different,
        far=far,
        tar=tar,
        notes=notes,
    )


def evaluate_embeddings(
    embeddings: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    is_same: np.ndarray,
    folds: np.ndarray,
    *,
    fars: Sequence[float] = DEFAULT_FARS,
) -> VerificationResult:
    """:func:`evaluate_pairs` of the cosine similarity of rows ``left[i]`` and ``right[i]``.

    Args:
      embeddings: one row per image, ``[images, dims]`` (any scale: rows are normalised).
      left: the row of each pair's first image, ``[pairs]``.
      right: the row of each pair's second image, ``[pairs]``.
      is_same: whether each pair is same, ``[pairs]``.
      folds: the fold of each pair, ``[pairs]``.
      fars: the FAR targets.

    Returns:
      A :class:`VerificationResult`.
    """
    embeddings = np.asarray(embeddings)
    return evaluate_pairs(cosine_scores(embeddings[np.asarray(left)],
                                        embeddings[np.asarray(right)]),
                          is_same, folds, fars=fars)
