"""LFW-style verification pairs: which two examples of a split, same class or not, in which fold.

LFW's protocol (Huang et al. 2007, "View 2") scores 6,000 pairs of face images in 10 folds of 600,
half of each fold same-person pairs: a threshold on the similarity is chosen on 9 folds and
applied to the 10th. The pairs of a prepared dataset are stored beside its files, as `pairs.json`
in its folder, and read with `load_pairs`:

  cjk_glyphs  pairs of the held-out classes (split "heldout"), drawn by `sample_pairs`: the
              folds share no class, and both images of every pair come from two different
              typeface families, so that neither "same" nor "different" can be read off the style.
  lfw         the official pairs.txt, resolved to the records of the split "train".

Example:
  >>> pairs = load_pairs("cjk_glyphs", "~/tensorflow_datasets")  # doctest: +SKIP
  >>> records = input_pipeline.SourceRecords("cjk_glyphs", pairs.split, data_dir)  # doctest: +SKIP
  >>> left, _ = records.read(pairs.left)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

PAIRS_FILE = "pairs.json"


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Pairs of examples of one split, each with its same-class flag and its fold.

    Attributes:
      split: the split whose record indices `left` and `right` are.
      left, right: int64 [P] record indices of the two examples of each pair.
      same: bool [P], whether the two share a class.
      fold: int32 [P] in [0, num_folds).
    """

    split: str
    left: np.ndarray
    right: np.ndarray
    same: np.ndarray
    fold: np.ndarray

    def __len__(self) -> int:
        return len(self.left)

    @property
    def num_folds(self) -> int:
        return int(self.fold.max()) + 1 if len(self.fold) else 0

    def examples(self) -> np.ndarray:
        """The sorted distinct record indices of all pairs (embed each once, then look up)."""
        return np.unique(np.concatenate([self.left, self.right]))

    def to_json(self) -> dict:
        return {"split": self.split, "left": self.left.tolist(), "right": self.right.tolist(),
                "same": self.same.astype(int).tolist(), "fold": self.fold.tolist()}

    @classmethod
    def from_json(cls, values: dict) -> Pairs:
        return cls(split=values["split"], left=np.asarray(values["left"], np.int64),
                   right=np.asarray(values["right"], np.int64),
                   same=np.asarray(values["same"], bool), fold=np.asarray(values["fold"], np.int32))


def save_pairs(pairs: Pairs, folder: os.PathLike | str) -> pathlib.Path:
    """Writes `pairs` as `pairs.json` into `folder`; returns the path."""
    path = pathlib.Path(folder) / PAIRS_FILE
    path.write_text(json.dumps(pairs.to_json()))
    return path


def load_pairs(dataset: str, data_dir: str) -> Pairs:
    """The verification pairs stored with a prepared dataset.

    Args:
      dataset: a key of `prepare_data.DATASETS` with pairs (`cjk_glyphs`, `cjk_glyphs_lean`), or
        `lfw`.
      data_dir: the TFDS data folder.

    Returns:
      The pairs; their indices address the records of `tfds.data_source(dataset,
      split=pairs.split)`, e.g. through `input_pipeline.SourceRecords`.

    Raises:
      prepare_data.DataUnavailableError: the dataset is not prepared, or has no pairs.
    """
    from train import prepare_data  # pylint: disable=g-import-not-at-top

    path = prepare_data.prepared_folder(dataset, data_dir) / PAIRS_FILE
    if not path.exists():
        raise prepare_data.DataUnavailableError(
            f"{path} is missing: {dataset} has no verification pairs, or its preparation was "
            f"incomplete.\n" + prepare_data.how_to_obtain(dataset, data_dir))
    return Pairs.from_json(json.loads(path.read_text()))


def _fold_classes(classes: np.ndarray, num_folds: int, rng: np.random.Generator
                  ) -> list[np.ndarray]:
    shuffled = rng.permutation(classes)
    return [np.sort(shuffled[k::num_folds]) for k in range(num_folds)]


def sample_pairs(labels: np.ndarray, families: np.ndarray, *, num_folds: int = 10,
                 pairs_per_fold: int = 600, seed: int = 0, split: str = "heldout") -> Pairs:
    """Draws LFW-style pairs: in each fold, half same-class pairs, half different-class pairs.

    The classes are dealt into `num_folds` disjoint groups (a fold's pairs use its group's
    classes only). Same-class pairs go round the fold's classes in turn, each time drawing two
    examples of the class from two different families; different-class pairs likewise pair an
    example of each class in turn with one of another class of the fold, from another family.
    No pair is drawn twice. Deterministic in `seed`.

    Args:
      labels: int class [N] of each example.
      families: int family [N] of each example (the typeface family, for glyphs).
      num_folds: folds.
      pairs_per_fold: pairs in each fold, an even number (half of them same-class).
      seed: the seed of every draw.
      split: the split that `labels` describes (recorded in the result).

    Returns:
      Pairs ordered by fold, same-class pairs first within each fold.

    Raises:
      ValueError: a fold has fewer than 2 classes with examples of 2 families, or too few
        distinct pairs.

    Example:
      >>> labels = np.repeat(np.arange(8), 4)
      >>> families = np.tile(np.arange(4), 8)
      >>> pairs = sample_pairs(labels, families, num_folds=2, pairs_per_fold=8)
      >>> len(pairs), int(pairs.same.sum())
      (16, 8)
      >>> bool(np.all(families[pairs.left] != families[pairs.right]))
      True
    """
    if pairs_per_fold <= 0 or pairs_per_fold % 2:
        raise ValueError(f"pairs_per_fold must be a positive even number, got {pairs_per_fold}")
    labels, families = np.asarray(labels), np.asarray(families)
    rng = np.random.default_rng(seed)
    members = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    eligible = np.array(sorted(c for c, m in members.items() if len(np.unique(families[m])) > 1))
    half = pairs_per_fold // 2
    left, right, same, fold = [], [], [], []
    for k, classes in enumerate(_fold_classes(eligible, num_folds, rng)):
        if len(classes) < 2:
            raise ValueError(f"fold {k} has {len(classes)} classes with 2 families; need >= 2 "
                             f"(only {len(eligible)} such classes for {num_folds} folds)")
        for is_same in (True, False):
            drawn: set[tuple[int, int]] = set()
            attempts = 0
            while len(drawn) < half:
                attempts += 1
                if attempts > 100 * half:
                    kind = "same" if is_same else "different"
                    raise ValueError(f"fold {k}: too few distinct {kind}-class pairs for {half}")
                first_class = int(classes[attempts % len(classes)])
                a = int(rng.choice(members[first_class]))
                if is_same:
                    pool = members[first_class]
                else:
                    other = rng.choice(classes[classes != first_class])
                    pool = members[int(other)]
                pool = pool[(families[pool] != families[a]) & (pool != a)]
                if len(pool) == 0:
                    continue
                b = int(rng.choice(pool))
                key = (min(a, b), max(a, b))
                if key in drawn:
                    continue
                drawn.add(key)
                left.append(a)
                right.append(b)
                same.append(is_same)
                fold.append(k)
    return Pairs(split=split, left=np.asarray(left, np.int64), right=np.asarray(right, np.int64),
                 same=np.asarray(same, bool), fold=np.asarray(fold, np.int32))


# The verification set of each training set: its own held-out split, or another dataset.
VERIFICATION_SETS = {"cjk_glyphs": "cjk_glyphs", "cjk_glyphs_lean": "cjk_glyphs_lean",
                     "face_folder": "lfw"}


def verification_data(dataset: str, data_dir: str, *, prepare: bool = True):
    """The verification pairs of a training set, and the records their indices address.

    Args:
      dataset: a training set with a verification set (`VERIFICATION_SETS`): cjk_glyphs
        (its held-out classes) or face_folder (LFW, its images cropped and resized like the
        training images).
      data_dir: the TFDS data folder.
      prepare: prepare the verification set if it is missing (where its files are at hand).

    Returns:
      (pairs, records): `records.read(pairs.left)` are the pairs' first images, as the model
      takes them (uint8 [P, H, W, C]).

    Raises:
      KeyError: `dataset` has no verification set.
      prepare_data.DataUnavailableError: the verification set is not prepared (the message says
        what to obtain and where to put it).

    Example:
      >>> pairs, records = verification_data("cjk_glyphs", data_dir)  # doctest: +SKIP
      >>> for indices, images in example_batches(records, pairs):  # doctest: +SKIP
      ...     embeddings[indices] = embed(images)
    """
    from train import face_data, input_pipeline  # pylint: disable=g-import-not-at-top

    target = VERIFICATION_SETS[dataset]
    if target == "lfw":
        records = face_data.lfw_records(data_dir, prepare=prepare)
        return load_pairs("lfw", data_dir), records
    records = input_pipeline.SourceRecords(target, "heldout", data_dir, prepare=prepare)
    return load_pairs(target, data_dir), records


def example_batches(records, pairs: Pairs, batch_size: int = 256):
    """Yields (record indices, images) of the distinct examples of `pairs`, batch by batch."""
    examples = pairs.examples()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield chunk, records.read(chunk)[0]
