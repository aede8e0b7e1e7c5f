"""Input pipeline: TFDS ArrayRecord data read through `tfds.data_source`, no TensorFlow.

The datasets here are small (at most 60k images of 32x32x3), so each split is decoded once into
host memory and batches are cut from it with NumPy. The order of the training data is a function
of (seed, epoch) alone, so the batch of any step can be recomputed: a run resumed from a
checkpoint at step s sees exactly the batches an uninterrupted run sees from step s on.

Multi-host: every process computes the same global batch of indices and keeps its own
contiguous slice; `jax.make_array_from_process_local_data` assembles the global array.
Normalization and the CIFAR-10+ augmentation run on the device (see `augment`).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from train import errors, prepare_data

# The registry lives with the data preparation (which does not import JAX); re-exported here for
# the code that reads the data.
DatasetInfo = prepare_data.DatasetInfo
DATASETS = prepare_data.DATASETS

# While `cached_splits()` is active: (dataset, split, data_dir) -> read-only (images, labels).
_split_cache: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] | None = None


def _open_source(dataset: str, split: str, data_dir: str, *, skip_decoding: bool = True):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    # download=False: TFDS's own preparation of these datasets needs TensorFlow; ours does not.
    # The PNG bytes are decoded here with Pillow (faster than TFDS's per-record decoding).
    return tfds.data_source(
        dataset,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()} if skip_decoding else None,
    )


def _decode_image(image) -> np.ndarray:
    if isinstance(image, bytes):
        from PIL import Image  # pylint: disable=g-import-not-at-top

        return np.asarray(Image.open(io.BytesIO(image)))
    return np.asarray(image)  # tfds.testing.mock_data yields arrays


def open_source(dataset: str, split: str, data_dir: str, *, prepare: bool = True):
    """Returns the random-access `tfds.data_source` of a split, preparing the data on first use.

    Raises:
      prepare_data.DataUnavailableError: the data is not prepared and cannot be obtained; the
        message names the package to install or the folder to fill.
    """
    data_dir = os.path.expanduser(data_dir)
    try:
        return _open_source(dataset, split, data_dir)
    except Exception as error:  # pylint: disable=broad-except
        # Missing data surfaces as DatasetNotFoundError, or, with download=False, as a misleading
        # NotImplementedError about TFRECORD; either way the remedy is the same.
        if not prepare:
            raise prepare_data.DataUnavailableError(
                f"{dataset} is not prepared in {data_dir} ({type(error).__name__}).\n"
                + prepare_data.how_to_obtain(dataset, data_dir)
            ) from None
    prepare_data.prepare(dataset, data_dir)
    return _open_source(dataset, split, data_dir)


@contextlib.contextmanager
def cached_splits() -> Iterator[None]:
    """Within this context, `load_split` decodes each split once and then returns the same arrays.

    For a process that trains many short runs on the same data (`python -m train.compare`):
    decoding a split costs seconds, a 200-step run about a minute. The cached arrays are made
    read-only, so no run can change the data another run sees. Nested uses share one cache; it
    is dropped when the outermost context exits.

    Example:
      >>> with cached_splits():  # doctest: +SKIP
      ...     first = load_split("mnist", "test", "~/tensorflow_datasets")
      ...     assert load_split("mnist", "test", "~/tensorflow_datasets")[0] is first[0]
    """
    global _split_cache
    outermost = _split_cache is None
    if outermost:
        _split_cache = {}
    try:
        yield
    finally:
        if outermost:
            _split_cache = None


def load_split(
    dataset: str, split: str, data_dir: str, *, prepare: bool = True, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a whole split into uint8 images [N, H, W, C] and int32 labels [N].

    Inside `cached_splits()` a split is decoded once per data_dir and returned read-only.
    """
    if _split_cache is None:
        return _decode_split(dataset, split, data_dir, prepare=prepare, chunk=chunk)
    key = (dataset, split, os.path.abspath(os.path.expanduser(data_dir)))
    if key not in _split_cache:
        images, labels = _decode_split(dataset, split, data_dir, prepare=prepare, chunk=chunk)
        images.setflags(write=False)
        labels.setflags(write=False)
        _split_cache[key] = (images, labels)
    return _split_cache[key]


def _decode_split(
    dataset: str, split: str, data_dir: str, *, prepare: bool, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    source = open_source(dataset, split, data_dir, prepare=prepare)
    batched = True
    images, labels = [], []
    try:
        try:
            source.__getitems__([0])
        except TypeError:
            # tfds.testing.mock_data: item access only, and it makes the (random) arrays itself.
            source = _open_source(dataset, split, os.path.expanduser(data_dir), skip_decoding=False)
            batched = False
        for start in range(0, len(source), chunk):
            keys = list(range(start, min(start + chunk, len(source))))
            # One batched read is much faster than one read per record.
            records = source.__getitems__(keys) if batched else [source[key] for key in keys]
            images.extend(_decode_image(record["image"]) for record in records)
            labels.extend(record["label"] for record in records)
    except (RuntimeError, OSError, ValueError) as error:
        # A partly prepared or damaged dataset: array_record's error is a deep stack trace.
        folder = os.path.join(os.path.expanduser(data_dir), dataset)
        detail = str(error).strip().splitlines()[-1][:300] if str(error).strip() else ""
        raise prepare_data.DataUnavailableError(
            f"the prepared {dataset} {split} split in {folder} is incomplete or damaged "
            f"({type(error).__name__}: {detail}).\n"
            f"Delete {folder} and rerun with --config.prepare_data=True to prepare it again."
        ) from None
    shape = DATASETS[dataset].image_shape
    images = np.stack(images).astype(np.uint8).reshape((-1, *shape))
    return images, np.asarray(labels, dtype=np.int32)


# The subset of `balanced_subset` is drawn from this seed, never from config.seed: every run and
# every seed of a comparison trains on the same examples.
SUBSET_SEED = 20171130


def balanced_subset(labels: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """The sorted indices of a fixed, class-balanced subset: `size // num_classes` per class.

    A pure function of (labels, size): the examples of each class are drawn without replacement
    from `SUBSET_SEED`, so every call, run and seed gets the same indices.

    Args:
      labels: int labels [N] of the whole split, in [0, num_classes).
      size: examples in the subset, a positive multiple of `num_classes`.
      num_classes: the classes of the dataset.

    Returns:
      int64 indices [size] into the split, sorted, without repeats.

    Raises:
      ValueError: `size` is not a positive multiple of `num_classes`, or a class has fewer than
        `size // num_classes` examples.

    Example:
      >>> labels = np.array([0, 1, 0, 1, 0, 1])
      >>> sorted(labels[balanced_subset(labels, 4, 2)].tolist())
      [0, 0, 1, 1]
    """
    if size <= 0 or size % num_classes:
        raise ValueError(f"subset size {size} is not a positive multiple of {num_classes} classes")
    per_class = size // num_classes
    rng = np.random.default_rng(SUBSET_SEED)
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(
                f"a balanced subset of {size} needs {per_class} examples of class {label}; "
                f"the split has {len(members)}")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def training_data(config, images: np.ndarray, labels: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The training split, or its `config.train_subset` examples (0: the whole split).

    Raises:
      errors.ConfigError: the split has too few examples of a class for the subset.
    """
    if not config.train_subset:
        return images, labels
    try:
        indices = balanced_subset(labels, config.train_subset,
                                  DATASETS[config.dataset].num_classes)
    except ValueError as error:
        raise errors.ConfigError(f"config.train_subset={config.train_subset}: {error}") from None
    return images[indices], labels[indices]


class TrainBatches:
    """The process-local part of the training batch of any step.

    Epoch e visits the examples in the order `permutation(seed, e)`; the last incomplete batch
    of each epoch is dropped, so `steps_per_epoch = N // global_batch_size`.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"batch_size {global_batch_size} is not divisible by the process count "
                f"{process_count}"
            )
        if len(images) < global_batch_size:
            raise ValueError(
                f"batch_size {global_batch_size} exceeds the {len(images)} training examples"
            )
        self.images, self.labels = images, labels
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.seed = seed
        self.steps_per_epoch = len(images) // global_batch_size
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(len(self.images))
            self._epoch = epoch
        return self._order

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch_size
        # Sort the whole global batch, then slice: row i of the global batch is the same example
        # in every layout. (Sorting each process's slice instead permuted the global batch with
        # the process count, and with it the per-position augmentation and loss noise.)
        rows = np.sort(self.order(epoch)[start : start + self.global_batch_size])
        local = self.process_index * self.local_batch_size
        indices = rows[local : local + self.local_batch_size]
        return self.images[indices], self.labels[indices]


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields process-local (images, labels, mask) covering every example exactly once.

    The last batch is padded to the full size; `mask` is False on the padding.
    """
    local = global_batch_size // process_count
    for start in range(0, len(images), global_batch_size):
        indices = np.arange(start, start + global_batch_size)[
            process_index * local : (process_index + 1) * local
        ]
        mask = indices < len(images)
        indices = np.where(mask, indices, 0)
        yield images[indices], labels[indices], mask


def normalize(images: jax.Array, dataset: str) -> jax.Array:
    """uint8 [..., C] -> float32, standardized per channel with the training-set statistics."""
    info = DATASETS[dataset]
    return (images.astype(jnp.float32) - jnp.asarray(info.mean)) / jnp.asarray(info.std)


def augment(rng: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """CIFAR-10+ augmentation on the device: zero-pad by `pad`, random crop back, random h-flip.

    Args:
      rng: a key; each example draws its own crop offset and flip.
      images: [N, H, W, C] (uint8 or float; padding is with zeros, i.e. black pixels).
      pad: pixels of padding on each side.
      flip: whether to flip horizontally with probability 1/2.

    Returns:
      [N, H, W, C] augmented images, same dtype.
    """
    n, height, width, channels = images.shape
    crop_key, flip_key = jax.random.split(rng)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    images = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        images = jnp.where(do_flip, images[:, :, ::-1, :], images)
    return images
