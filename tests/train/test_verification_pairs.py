"""LFW-style pairs and the raw-pixel baseline's 10-fold accuracy, against brute-force references."""

import numpy as np
import pytest

from train import pixel_baseline, verification_pairs


def _random_classes(seed, num_classes=60, per_class=(2, 9), families=6):
    rng = np.random.default_rng(seed)
    counts = rng.integers(*per_class, num_classes)
    labels = np.repeat(np.arange(num_classes), counts)
    return labels, rng.integers(0, families, len(labels))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_pairs_follow_the_protocol(seed):
    labels, families = _random_classes(seed)
    pairs = verification_pairs.sample_pairs(labels, families, num_folds=5, pairs_per_fold=40,
                                            seed=seed)
    assert len(pairs) == 200 and pairs.num_folds == 5
    for k in range(5):
        in_fold = pairs.fold == k
        assert in_fold.sum() == 40 and pairs.same[in_fold].sum() == 20
    np.testing.assert_array_equal(labels[pairs.left] == labels[pairs.right], pairs.same)
    assert np.all(families[pairs.left] != families[pairs.right])
    assert np.all(pairs.left != pairs.right)
    unordered = {(min(a, b), max(a, b)) for a, b in zip(pairs.left, pairs.right)}
    assert len(unordered) == len(pairs)
    fold_classes = [set(labels[pairs.left[pairs.fold == k]]) | set(
        labels[pairs.right[pairs.fold == k]]) for k in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not fold_classes[i] & fold_classes[j]
    again = verification_pairs.sample_pairs(labels, families, num_folds=5, pairs_per_fold=40,
                                            seed=seed)
    assert again.to_json() == pairs.to_json()
    assert verification_pairs.Pairs.from_json(pairs.to_json()).to_json() == pairs.to_json()


def test_sample_pairs_refuses_folds_without_two_eligible_classes():
    labels = np.repeat(np.arange(6), 3)
    families = np.tile([0, 1, 2], 6)
    families[labels >= 3] = 0  # classes 3-5 have one family: no same-class pair possible
    with pytest.raises(ValueError, match=r"fold 0 has 1 classes with 2 families; need >= 2"):
        verification_pairs.sample_pairs(labels, families, num_folds=3, pairs_per_fold=2)


def _brute_force_accuracy(scores, same, fold):
    """For each fold: every midpoint of the other folds' sorted distinct scores (and one below
    and one above them all) tried as the threshold; the lowest best one is applied."""
    accuracies = []
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        distinct = np.unique(scores[train])
        candidates = np.concatenate([[distinct[0] - 1], (distinct[1:] + distinct[:-1]) / 2,
                                     [distinct[-1] + 1]])
        train_accuracy = [np.mean((scores[train] > t) == same[train]) for t in candidates]
        threshold = candidates[int(np.argmax(train_accuracy))]
        accuracies.append(np.mean((scores[test] > threshold) == same[test]))
    return np.asarray(accuracies)


@pytest.mark.parametrize("seed", range(5))
def test_ten_fold_accuracy_equals_the_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    same = rng.random(300) < 0.5
    scores = np.round(rng.normal(same * 0.8, 1.0), 1)  # rounded: many ties
    fold = np.repeat(np.arange(10), 30)
    mean, std, per_fold = pixel_baseline.ten_fold_accuracy(scores, same, fold)
    expected = _brute_force_accuracy(scores, same, fold)
    np.testing.assert_allclose(per_fold, expected)
    assert mean == pytest.approx(expected.mean()) and std == pytest.approx(expected.std())


def test_ten_fold_accuracy_of_separable_and_of_uninformative_scores():
    same = np.tile([True, False], 50)
    fold = np.repeat(np.arange(10), 10)
    assert pixel_baseline.ten_fold_accuracy(same * 1.0 + 0.1, same, fold)[:2] == (1.0, 0.0)
    # One score for every pair: no threshold separates anything, every fold calls all "same".
    assert pixel_baseline.ten_fold_accuracy(np.zeros(100), same, fold)[0] == 0.5


def test_cosine_scores_are_the_normalised_dot_products():
    rng = np.random.default_rng(0)
    left, right = rng.integers(0, 256, (2, 7, 4, 4, 1))
    expected = [np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)
                for a, b in zip(left.astype(float), right.astype(float))]
    np.testing.assert_allclose(pixel_baseline.cosine_scores(left, right), expected, rtol=1e-12)
    assert pixel_baseline.cosine_scores(np.zeros((1, 3)), np.ones((1, 3))).tolist() == [0.0]
