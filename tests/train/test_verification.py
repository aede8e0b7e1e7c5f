"""train/verification.py: LFW's protocol, ROC, AUC and TAR@FAR, against scikit-learn and by hand."""

import doctest
import math
import statistics

import numpy as np
import pytest
from sklearn import metrics

from train import verification


def scored_pairs(seed, num_pairs=600, *, separation=1.0, decimals=None):
    """Same pairs score `separation` higher on average; `decimals` rounds them into ties."""
    rng = np.random.default_rng(seed)
    is_same = rng.permutation(np.arange(num_pairs) % 2 == 0)
    scores = rng.normal(size=num_pairs) + separation * is_same
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, is_same


def test_the_docstring_examples_hold():
    failures, tried = doctest.testmod(verification, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 9 and failures == 0


# --------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("decimals", [None, 1, 0], ids=["distinct", "ties", "many_ties"])
@pytest.mark.parametrize("seed", [0, 1])
def test_roc_curve_equals_sklearn(seed, decimals):
    scores, is_same = scored_pairs(seed, decimals=decimals)
    far, tar, thresholds = verification.roc_curve(scores, is_same)
    expected_far, expected_tar, expected_thresholds = metrics.roc_curve(
        is_same, scores, drop_intermediate=False)
    np.testing.assert_array_equal(far, expected_far)
    np.testing.assert_array_equal(tar, expected_tar)
    np.testing.assert_array_equal(thresholds, expected_thresholds)


@pytest.mark.parametrize("decimals", [None, 1, 0], ids=["distinct", "ties", "many_ties"])
@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_equals_sklearn_and_the_area_under_the_curve(seed, decimals):
    scores, is_same = scored_pairs(seed, decimals=decimals)
    auc = verification.roc_auc(scores, is_same)
    assert auc == pytest.approx(metrics.roc_auc_score(is_same, scores), abs=1e-12)
    far, tar, _ = verification.roc_curve(scores, is_same)
    assert auc == pytest.approx(np.trapezoid(tar, far), abs=1e-12)


def sklearn_tar_at_far(scores, is_same, far):
    fpr, tpr, thresholds = metrics.roc_curve(is_same, scores, drop_intermediate=False)
    within = fpr <= far
    best = np.flatnonzero(within)[np.argmax(tpr[within])]
    return tpr[best], thresholds[best]


@pytest.mark.parametrize("decimals", [None, 1], ids=["distinct", "ties"])
@pytest.mark.parametrize("far", [1e-3, 2e-3, 0.01, 0.05, 0.5, 1.0])
def test_tar_at_far_equals_the_best_sklearn_point_within_the_target(far, decimals):
    scores, is_same = scored_pairs(3, num_pairs=4000, separation=2.0, decimals=decimals)
    assert verification.tar_at_far(scores, is_same, far) == sklearn_tar_at_far(
        scores, is_same, far)


def test_tar_at_far_counts_a_target_of_exactly_k_false_accepts():
    """FAR = 3/3000 allows 3 false accepts, not 2 (the float compare must not round it off)."""
    is_same = np.r_[np.ones(10, bool), np.zeros(3000, bool)]
    # Same pairs score 10..19; different ones below 3, except four among the same ones.
    scores = np.r_[np.arange(10.0, 20.0), np.arange(3000.0) / 1000]
    scores[10:14] = [15.5, 16.5, 17.5, 18.5]
    tar, threshold = verification.tar_at_far(scores, is_same, 3 / 3000)
    # Accepting >= 16 takes 4 same pairs (16..19) and 3 different ones (16.5, 17.5, 18.5);
    # >= 15.5 would take a 4th false accept, >= 17 (2 allowed) only 3 same pairs.
    assert (tar, threshold) == (0.4, 16.0)
    assert sklearn_tar_at_far(scores, is_same, 3 / 3000) == (0.4, 16.0)


def test_cosine_scores_equal_sklearn_cosine_similarity():
    rng = np.random.default_rng(0)
    left, right = rng.normal(size=(2, 50, 16))
    expected = np.diag(metrics.pairwise.cosine_similarity(left, right))
    np.testing.assert_allclose(verification.cosine_scores(left, right), expected, atol=1e-12)
    # Scale-free: normalised first.
    np.testing.assert_allclose(verification.cosine_scores(3 * left, 0.5 * right), expected,
                               atol=1e-12)


# --------------------------------------------------------------- known answers


def test_perfectly_separable_scores():
    scores, is_same = scored_pairs(0, num_pairs=6000)
    scores = np.where(is_same, 1 + np.abs(scores), -1 - np.abs(scores))
    result = verification.evaluate_pairs(scores, is_same, np.arange(6000) // 600)
    np.testing.assert_array_equal(result.fold_accuracies, np.ones(10))
    assert (result.accuracy, result.accuracy_std, result.accuracy_standard_error) == (1, 0, 0)
    assert result.auc == 1.0 and result.tar_at_far[1e-3] == 1.0
    # Every fold's threshold lies in the gap between the classes.
    assert np.all((result.fold_thresholds > scores[~is_same].max())
                  & (result.fold_thresholds < scores[is_same].min()))


def test_reversed_scores_have_auc_zero():
    scores, is_same = scored_pairs(0)
    scores = np.where(is_same, -1 - np.abs(scores), 1 + np.abs(scores))
    assert verification.roc_auc(scores, is_same) == 0.0
    assert verification.tar_at_far(scores, is_same, 1e-2)[0] == 0.0


@pytest.mark.parametrize("kind", ["all_equal", "same_multiset"])
def test_identical_score_distributions_have_auc_one_half(kind):
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=300), 1)  # with ties
    if kind == "all_equal":
        scores, is_same = np.full(600, 0.3), np.arange(600) % 2 == 0
    else:  # the same scores for same and for different pairs, in another order
        scores, is_same = np.r_[values, rng.permutation(values)], np.r_[np.ones(300, bool),
                                                                       np.zeros(300, bool)]
    assert verification.roc_auc(scores, is_same) == 0.5
    assert metrics.roc_auc_score(is_same, scores) == pytest.approx(0.5, abs=1e-15)


def test_all_equal_scores_decide_every_pair_alike():
    """One score for all pairs: accept all or reject all, whichever is more common."""
    is_same = np.r_[np.ones(4, bool), np.zeros(6, bool)]
    assert verification.best_threshold(np.full(10, 0.7), is_same) == (math.inf, 0.6)
    assert verification.best_threshold(np.full(10, 0.7), ~is_same) == (-math.inf, 0.6)


def test_fold_thresholds_by_hand():
    """Three folds of four pairs, worked out on paper.

    fold 0: (0.9 same) (0.6 diff) (0.5 same) (0.1 diff)
    fold 1: (0.8 same) (0.7 diff) (0.3 same) (0.2 diff)
    fold 2: (0.65 same) (0.4 diff) (0.35 diff) (0.15 same)

    Held out 0: folds 1+2 sorted 0.15s 0.2d 0.3s 0.35d 0.4d 0.65s 0.7d 0.8s; the cuts and their
    correct decisions (rejected diff + accepted same): accept all 4, after 0.15: 3, after 0.2:
    4, after 0.3: 3, after 0.35: 4, after 0.4: 5, after 0.65: 4, after 0.7: 5, reject all 4.
    Best 5/8, first at (0.4 + 0.65) / 2 = 0.525: fold 0 decides 0.9 s, 0.6 d wrongly
    accepted, 0.5 s wrongly rejected, 0.1 d: accuracy 1/2.
    Held out 1: folds 0+2 sorted 0.1d 0.15s 0.35d 0.4d 0.5s 0.6d 0.65s 0.9s: accept all 4,
    after 0.1: 5, after 0.15: 4, after 0.35: 5, after 0.4: 6, after 0.5: 5, after 0.6: 6,
    after 0.65: 5, reject all 4. Best 6/8 first at (0.4 + 0.5) / 2 = 0.45: fold 1 gets 0.8 s,
    0.7 d wrong, 0.3 s wrong, 0.2 d: 1/2.
    Held out 2: folds 0+1 sorted 0.1d 0.2d 0.3s 0.5s 0.6d 0.7d 0.8s 0.9s: accept all 4, after
    0.1: 5, after 0.2: 6, after 0.3: 5, after 0.5: 4, after 0.6: 5, after 0.7: 6, after 0.8: 5,
    reject all 4. Best 6/8 first at (0.2 + 0.3) / 2 = 0.25: fold 2 gets 0.65 s, 0.4 d wrong,
    0.35 d wrong, 0.15 s wrong: 1/4.
    """
    scores = np.array([0.9, 0.6, 0.5, 0.1, 0.8, 0.7, 0.3, 0.2, 0.65, 0.4, 0.35, 0.15])
    is_same = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1], bool)
    folds = np.repeat([0, 1, 2], 4)
    accuracies, thresholds = verification.fold_accuracies(scores, is_same, folds)
    np.testing.assert_allclose(thresholds, [0.525, 0.45, 0.25], rtol=1e-12)
    np.testing.assert_array_equal(accuracies, [0.5, 0.5, 0.25])
    result = verification.evaluate_pairs(scores, is_same, folds, fars=(0.5,))
    assert result.accuracy == pytest.approx(5 / 12)
    assert result.accuracy_std == pytest.approx(statistics.stdev([0.5, 0.5, 0.25]))
    assert result.accuracy_standard_error == pytest.approx(
        statistics.stdev([0.5, 0.5, 0.25]) / math.sqrt(3))


def test_fold_thresholds_with_ties_across_the_classes():
    """A same and a different pair with one score are decided alike, in training and held out.

    Training folds 1+2 sorted: 0.1d 0.2d 0.5s 0.5d 0.5s 0.9s; no cut separates the three at
    0.5, so the best is after 0.2 (0.35): 5 of 6 correct (after 0.5 only 4). Held out fold 0:
    0.5 s accepted, 0.5 d accepted (wrong), 0.3 d rejected: 2/3.
    """
    scores = np.array([0.5, 0.5, 0.3, 0.2, 0.5, 0.5, 0.9, 0.1, 0.5])
    is_same = np.array([1, 0, 0, 0, 1, 0, 1, 0, 1], bool)
    folds = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    accuracies, thresholds = verification.fold_accuracies(scores, is_same, folds)
    assert thresholds[0] == pytest.approx(0.35)
    assert accuracies[0] == pytest.approx(2 / 3)


def brute_force_best_threshold(scores, is_same):
    values = np.unique(scores)
    candidates = [-np.inf, *((values[:-1] + values[1:]) / 2), np.inf]
    accuracies = [np.mean((scores > t) == is_same) for t in candidates]
    best = int(np.argmax(accuracies))
    return candidates[best], accuracies[best]


@pytest.mark.parametrize("decimals", [None, 1], ids=["distinct", "ties"])
@pytest.mark.parametrize("seed", range(4))
def test_best_threshold_equals_a_brute_force_search(seed, decimals):
    scores, is_same = scored_pairs(seed, num_pairs=301, decimals=decimals)
    threshold, accuracy = verification.best_threshold(scores, is_same)
    expected_threshold, expected_accuracy = brute_force_best_threshold(scores, is_same)
    assert accuracy == expected_accuracy
    assert threshold == pytest.approx(expected_threshold, rel=1e-12)


def test_best_threshold_separates_neighbouring_floats():
    low = 0.3
    high = np.nextafter(low, 1.0)
    threshold, accuracy = verification.best_threshold(np.array([low, high]),
                                                      np.array([False, True]))
    assert accuracy == 1.0 and low <= threshold < high


def test_tar_at_far_is_not_measured_below_one_false_accept():
    scores, is_same = scored_pairs(0, num_pairs=6000, separation=3.0)
    result = verification.evaluate_pairs(scores, is_same, np.arange(6000) // 600)
    assert result.num_different == int(np.sum(~is_same))
    assert result.num_different < 10_000
    assert math.isnan(result.tar_at_far[1e-4]) and not math.isnan(result.tar_at_far[1e-3])
    assert len(result.notes) == 1 and "FAR=1e-04 needs at least 10000" in result.notes[0]
    # With 10,000 different pairs FAR = 1e-4 allows one false accept: measured, no note.
    scores, is_same = scored_pairs(1, num_pairs=20_000, separation=3.0)
    is_same[:] = np.arange(20_000) % 2 == 0
    result = verification.evaluate_pairs(scores, is_same, np.arange(20_000) // 2000)
    assert result.num_different == 10_000
    assert result.tar_at_far[1e-4] == sklearn_tar_at_far(scores, is_same, 1e-4)[0]
    assert result.notes == ()


def test_evaluate_embeddings_scores_rows_by_cosine():
    embeddings = np.array([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    left, right = np.array([0, 2, 0, 1]), np.array([1, 3, 2, 3])
    is_same, folds = np.array([True, True, False, False]), np.array([0, 1, 0, 1])
    result = verification.evaluate_embeddings(embeddings, left, right, is_same, folds, fars=())
    assert result.accuracy == 1.0 and result.auc == 1.0
    expected = verification.evaluate_pairs(
        verification.cosine_scores(embeddings[left], embeddings[right]), is_same, folds, fars=())
    assert result.summary() == expected.summary()


def test_summary_is_json_ready():
    import json

    scores, is_same = scored_pairs(0, num_pairs=6000)
    summary = verification.evaluate_pairs(scores, is_same, np.arange(6000) // 600).summary()
    assert set(summary) >= {"accuracy", "accuracy_std", "accuracy_standard_error", "auc",
                            "tar_at_far_1e-03", "tar_at_far_1e-04", "notes"}
    assert json.loads(json.dumps(summary))["num_same"] == int(is_same.sum())


@pytest.mark.parametrize(
    ("scores", "is_same", "folds", "match"),
    [
        ([0.1, 0.2], [True, True], [0, 1], "both same and different"),
        ([0.1, np.nan], [True, False], [0, 1], "finite"),
        ([0.1, 0.2], [True, False], [0, 0], "at least 2 folds"),
        ([0.1, 0.2], [2, 0], [0, 1], "boolean"),
        ([0.1, 0.2], [True, False], [0.0, 1.0], "folds must be integers"),
        ([0.1, 0.2, 0.3], [True, False], [0, 1], "one length"),
    ],
)
def test_bad_input_is_named(scores, is_same, folds, match):
    with pytest.raises(ValueError, match=match):
        verification.evaluate_pairs(np.asarray(scores), np.asarray(is_same), np.asarray(folds))
