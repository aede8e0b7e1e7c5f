"""The raw-pixel baseline of a verification benchmark: cosine similarity of the images themselves.

A learned embedding is worth something on `cjk_glyphs`' held-out pairs only by what it adds to
comparing the pixels: this is that floor, scored with LFW's protocol.

  python -m train.pixel_baseline --dataset cjk_glyphs --data_dir ~/tensorflow_datasets

`cosine_scores` gives one score per pair, the input of any verification metric;
`ten_fold_accuracy` is LFW's: for each fold, the threshold that maximises the accuracy on the other
nine is applied to it.
"""

from __future__ import annotations

import numpy as np

from train import verification_pairs


def cosine_scores(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    r"""Cosine similarity of each pair of images, as flattened float64 pixel vectors.

    .. math:: s_i = \frac{\langle a_i, b_i \rangle}{\|a_i\| \|b_i\|}

    Args:
      left, right: images [P, ...] (any dtype); pair i is (left[i], right[i]).

    Returns:
      float64 [P] in [-1, 1] (in [0, 1] for non-negative pixels); 0 where an image is all zero.

    Example:
      >>> a = np.array([[[1, 0]], [[1, 1]]])
      >>> cosine_scores(a, np.array([[[2, 0]], [[0, 1]]])).round(4).tolist()
      [1.0, 0.7071]
    """
    a = np.asarray(left, np.float64).reshape(len(left), -1)
    b = np.asarray(right, np.float64).reshape(len(right), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.divide(np.sum(a * b, axis=1), norms, out=np.zeros(len(a)), where=norms > 0)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold t maximising the accuracy of "same iff score > t".

    Of the cuts between consecutive distinct scores that reach the best accuracy, the lowest;
    t is the midpoint of the two scores around it (one below the lowest score when every pair
    is called "same", one above the highest when none is).

    Example:
      >>> best_threshold(np.array([0.1, 0.4, 0.6, 0.9]), np.array([False, False, True, True]))
      0.5
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores, sorted_same = scores[order], same[order]
    # Cut i: pairs [0, i) say "different", [i, P) say "same".
    correct_below = np.concatenate([[0], np.cumsum(~sorted_same)])
    correct_above = np.concatenate([np.cumsum(sorted_same[::-1])[::-1], [0]])
    correct = correct_below + correct_above
    # Only cut between different scores: ties must fall on one side together.
    cut_allowed = np.concatenate([[True], sorted_scores[1:] > sorted_scores[:-1], [True]])
    best = int(np.argmax(np.where(cut_allowed, correct, -1)))
    if best == 0:
        return float(sorted_scores[0] - 1.0)
    if best == len(scores):
        return float(sorted_scores[-1] + 1.0)
    return float((sorted_scores[best - 1] + sorted_scores[best]) / 2)


def ten_fold_accuracy(scores: np.ndarray, same: np.ndarray, fold: np.ndarray
                      ) -> tuple[float, float, np.ndarray]:
    """LFW's verification accuracy: threshold chosen on the other folds, applied to each fold.

    Args:
      scores: float [P], higher = more alike.
      same: bool [P].
      fold: int [P], the fold of each pair.

    Returns:
      (mean, standard deviation (ddof=0), per-fold accuracies [num_folds]).

    Example:
      >>> scores = np.array([0.9, 0.2, 0.8, 0.1, 0.7, 0.3])
      >>> same = np.array([True, False, True, False, True, False])
      >>> ten_fold_accuracy(scores, same, np.array([0, 0, 1, 1, 2, 2]))[0]
      1.0
    """
    scores, same, fold = np.asarray(scores, np.float64), np.asarray(same, bool), np.asarray(fold)
    accuracies = []
    for k in np.unique(fold):
        test = fold == k
        threshold = best_threshold(scores[~test], same[~test])
        accuracies.append(np.mean((scores[test] > threshold) == same[test]))
    accuracies = np.asarray(accuracies)
    return float(accuracies.mean()), float(accuracies.std()), accuracies


def pair_scores(dataset: str, data_dir: str) -> tuple[verification_pairs.Pairs, np.ndarray]:
    """The verification pairs of a prepared dataset and their raw-pixel cosine scores.

    Args:
      dataset: a training set with verification pairs (`verification_pairs.VERIFICATION_SETS`).
      data_dir: the TFDS data folder.
    """
    pairs, records = verification_pairs.verification_data(dataset, data_dir, prepare=False)
    examples = pairs.examples()
    images, _ = records.read(examples)
    row = np.searchsorted(examples, np.concatenate([pairs.left, pairs.right]))
    return pairs, cosine_scores(images[row[: len(pairs)]], images[row[len(pairs):]])


def main(argv):
    del argv
    from absl import flags  # pylint: disable=g-import-not-at-top

    values = flags.FLAGS
    pairs, scores = pair_scores(values.dataset, values.data_dir)
    mean, std, _ = ten_fold_accuracy(scores, pairs.same, pairs.fold)
    print(f"{values.dataset}: raw-pixel cosine, {len(pairs)} pairs in {pairs.num_folds} folds: "
          f"verification accuracy {mean:.4f} +- {std:.4f}")


if __name__ == "__main__":
    from absl import app, flags  # pylint: disable=g-import-not-at-top

    flags.DEFINE_string("dataset", "cjk_glyphs", "A prepared dataset with verification pairs.")
    flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "The TFDS data folder.")
    app.run(main)
