"""Input pipeline: TFDS ArrayRecord data read through `tfds.data_source`, no TensorFlow.

A split is opened as `Records`, random access to its examples. `SourceRecords` reads each batch
from the split's source when it is needed (an ArrayRecord read, TFDS parsing, Pillow decoding),
so a split never has to fit in host memory; the training loop reads such batches a few steps
ahead in a background thread (`read_ahead` -> `prefetch`, through Grain). A split small enough
(`in_memory`, `config.in_memory_max_mib`) is decoded into host memory once instead
(`ArrayRecords`), which is faster where no core is free for the prefetch thread; so is every
split inside `cached_splits()` (`python -m train.compare` trains many short runs on one
dataset). A batch is the same whichever way it is read.

The order of the training data is a function of (seed, epoch) alone, so the batch of any step
can be recomputed: a run resumed from a checkpoint at step s sees exactly the batches an
uninterrupted run sees from step s on.

Multi-host: every process computes the same global batch of indices and reads only its own
contiguous slice; `jax.make_array_from_process_local_data` assembles the global array.
Normalization and the CIFAR-10+ augmentation run on the device (see `augment`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

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
        prepare_data.tfds_name(dataset),
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
            raise prepare_data.not_prepared(dataset, data_dir, type(error).__name__) from None
    prepare_data.prepare(dataset, data_dir)
    return _open_source(dataset, split, data_dir)


class Records(Protocol):
    """Random access to the (image, label) examples of a split."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [n, H, W, C] and int32 labels [n] of the examples at `indices`."""
        ...


class ArrayRecords:
    """Examples held in host memory as arrays (a decoded split, or test data)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]

    def all_labels(self) -> np.ndarray:
        return self.labels


def _damaged(dataset: str, split: str, data_dir: str, error: Exception
             ) -> prepare_data.DataUnavailableError:
    # A partly prepared or damaged dataset: array_record's error is a deep stack trace.
    folder = os.path.join(os.path.expanduser(data_dir), prepare_data.tfds_name(dataset))
    detail = str(error).strip().splitlines()[-1][:300] if str(error).strip() else ""
    return prepare_data.DataUnavailableError(
        f"the prepared {dataset} {split} split in {folder} is incomplete or damaged "
        f"({type(error).__name__}: {detail}).\n"
        f"Delete {folder} and rerun with --config.prepare_data=True to prepare it again.")


class SourceRecords:
    """The examples of a prepared split, read from its `tfds.data_source` when asked for.

    Nothing of the split is held in memory: each `read` fetches its records (one batched
    ArrayRecord read) and decodes their PNG bytes with Pillow. Opening the split reads its first
    and last record, so that a missing or truncated file fails here, before any training.

    Args:
      dataset: a key of `DATASETS`.
      split: the TFDS split name.
      data_dir: the TFDS data folder.
      prepare: prepare the data offline if it is missing (where possible).

    Raises:
      prepare_data.DataUnavailableError: the split is missing, incomplete or damaged.
    """

    image_shape: tuple[int, ...] | None = None  # default: the dataset's

    def __init__(self, dataset: str, split: str, data_dir: str, *, prepare: bool = True):
        self.dataset, self.split, self.data_dir = dataset, split, data_dir
        self.image_shape = self.image_shape or prepare_data.dataset_info(dataset).image_shape
        self.source = open_source(dataset, split, data_dir, prepare=prepare)
        self.batched = True
        self._labels: np.ndarray | None = None
        try:
            self.source.__getitems__([0])
        except TypeError:
            # tfds.testing.mock_data: item access only, and it makes the (random) arrays itself.
            self.source = _open_source(
                dataset, split, os.path.expanduser(data_dir), skip_decoding=False)
            self.batched = False
        except (RuntimeError, OSError, ValueError) as error:
            raise _damaged(dataset, split, data_dir, error) from None
        if len(self):
            self.read(np.array([0, len(self) - 1]))

    def __len__(self) -> int:
        return len(self.source)

    def _records(self, indices: list[int]) -> list:
        # One batched read is much faster than one read per record.
        if self.batched:
            return list(self.source.__getitems__(indices))
        return [self.source[index] for index in indices]

    def _example(self, record) -> tuple[np.ndarray, int]:
        """The (image, label) of a record."""
        return _decode_image(record["image"]), record["label"]

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            examples = [self._example(r) for r in self._records([int(i) for i in indices])]
        except (RuntimeError, OSError, ValueError) as error:
            raise _damaged(self.dataset, self.split, self.data_dir, error) from None
        images = [image for image, _ in examples]
        labels = [label for _, label in examples]
        images = np.stack(images).astype(np.uint8) if images else np.zeros((0,), np.uint8)
        return images.reshape((-1, *self.image_shape)), np.asarray(labels, dtype=np.int32)

    def all_labels(self, chunk: int = 4096) -> np.ndarray:
        """The int32 labels [N] of the whole split (read once, without decoding the images).

        From the split's `labels-<split>.npy` where the preparation wrote one (cjk_glyphs,
        face_folder: reading the labels of cjk_glyphs' 759k training records takes ~35 s).
        """
        if self._labels is not None:
            return self._labels
        stored = _stored_labels(self.source, self.split)
        if stored is not None and len(stored) == len(self):
            self._labels = stored
            return stored
        labels = []
        for start in range(0, len(self), chunk):
            keys = list(range(start, min(start + chunk, len(self))))
            try:
                labels.extend(record["label"] for record in self._records(keys))
            except (RuntimeError, OSError, ValueError) as error:
                raise _damaged(self.dataset, self.split, self.data_dir, error) from None
        self._labels = np.asarray(labels, dtype=np.int32)
        return self._labels


def labels_file(split: str) -> str:
    """The name of the labels file a preparation may write beside a split's records."""
    return f"labels-{split}.npy"


def _stored_labels(source, split: str) -> np.ndarray | None:
    folder = getattr(getattr(source, "dataset_info", None), "data_dir", None)
    if not isinstance(folder, str | os.PathLike):
        return None  # tfds.testing.mock_data has no folder
    path = os.path.join(folder, labels_file(split))
    return np.load(path).astype(np.int32) if os.path.exists(path) else None


class SubsetRecords:
    """The examples of `records` at `indices`, renumbered 0..len(indices)-1."""

    def __init__(self, records: Records, indices: np.ndarray):
        self.records, self.indices = records, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.records.read(self.indices[indices])

    def all_labels(self) -> np.ndarray:
        return all_labels(self.records)[self.indices]


def all_labels(records: Records) -> np.ndarray:
    """The int32 labels [N] of every example of `records`."""
    labels = getattr(records, "all_labels", None)
    if labels is not None:
        return labels()
    return records.read(np.arange(len(records)))[1]


def open_split(dataset: str, split: str, data_dir: str, *, prepare: bool = True) -> Records:
    """The examples of a split: read on demand, or from memory inside `cached_splits()`.

    Raises:
      prepare_data.DataUnavailableError: the split is missing, incomplete or damaged.
    """
    if _split_cache is not None:
        return ArrayRecords(*load_split(dataset, split, data_dir, prepare=prepare))
    return SourceRecords(dataset, split, data_dir, prepare=prepare)


@contextlib.contextmanager
def cached_splits() -> Iterator[None]:
    """Within this context, `load_split` decodes each split once and then returns the same arrays.

    For a process that trains many short runs on the same data (`python -m train.compare`):
    decoding a split costs seconds, a 200-step run about a minute. The cached arrays are made
    read-only, so no run can change the data another run sees. Nested uses share one cache; it
    is dropped when the outermost context exits. Inside it, `open_split` serves the cached
    arrays too.

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
    records = SourceRecords(dataset, split, data_dir, prepare=prepare)
    if not len(records):
        return records.read(np.zeros((0,), np.int64))
    decoded = in_memory(records, max_mib=np.inf, chunk=chunk)
    return decoded.images, decoded.labels


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


def _as_records(images, labels) -> Records:
    """`images` if it is already a `Records`, else `ArrayRecords(images, labels)`."""
    return images if labels is None else ArrayRecords(images, labels)


def in_memory(records: Records, max_mib: float, *, chunk: int = 4096) -> Records:
    """`records` decoded into host memory if their images take at most `max_mib` MiB, else as is.

    A small split is cheaper decoded once: reading a batch from the source costs about 100 us of
    CPU per MNIST image (ArrayRecord read, TFDS parsing, PNG decoding), which the prefetch thread
    hides only where a core is free. A large one (the point of streaming) stays on disk. The
    batches are the same either way.

    Args:
      records: the examples.
      max_mib: the bound on the decoded images' size; 0: never decode ahead.
      chunk: examples read at a time while decoding.

    Example:
      >>> records = ArrayRecords(np.zeros((4, 2, 2, 1), np.uint8), np.arange(4))
      >>> in_memory(records, 1.0) is records
      True
    """
    if isinstance(records, ArrayRecords) or not len(records) or max_mib <= 0:
        return records
    first, _ = records.read(np.zeros(1, np.int64))
    if first.nbytes * len(records) > max_mib * 2**20:
        return records
    parts = [records.read(np.arange(start, min(start + chunk, len(records))))
             for start in range(0, len(records), chunk)]
    return ArrayRecords(np.concatenate([p[0] for p in parts]),
                        np.concatenate([p[1] for p in parts]))


def num_classes(config) -> int:
    """The classes a run trains on: `config.num_classes`, else all of the dataset's.

    For datasets whose class count depends on how they were prepared (`DatasetInfo.num_classes`
    is None: `cjk_glyphs`, `face_folder`), that of the prepared data.
    """
    if config.num_classes:
        return config.num_classes
    known = DATASETS[config.dataset].num_classes
    if known is not None:
        return known
    return prepare_data.prepared_num_classes(config.dataset, config.data_dir)


def first_classes(records: Records, count: int) -> Records:
    """The examples of `records` whose label is below `count`.

    Raises:
      errors.ConfigError: no example has such a label, or `count` exceeds the labels present.
    """
    labels = all_labels(records)
    present = int(labels.max()) + 1 if len(labels) else 0
    if count > present:
        raise errors.ConfigError(
            f"config.num_classes={count} exceeds the {present} classes of the prepared data")
    return SubsetRecords(records, np.flatnonzero(labels < count))


def training_data(config, records: Records) -> Records:
    """The training split's examples a run trains on.

    Those of the first `config.num_classes` classes (0: all), and of those the fixed
    `config.train_subset` examples (0: all; `balanced_subset`).

    Raises:
      errors.ConfigError: the split has too few examples of a class for the subset, or fewer
        classes than `config.num_classes`.
    """
    if config.num_classes:
        records = first_classes(records, config.num_classes)
    if not config.train_subset:
        return records
    try:
        indices = balanced_subset(all_labels(records), config.train_subset, num_classes(config))
    except ValueError as error:
        raise errors.ConfigError(f"config.train_subset={config.train_subset}: {error}") from None
    return SubsetRecords(records, indices)


def evaluation_data(config, records: Records) -> Records:
    """The test split's examples of the classes a run trains on (`config.num_classes`)."""
    return first_classes(records, config.num_classes) if config.num_classes else records


class TrainBatches:
    """The process-local part of the training batch of any step.

    Epoch e visits the examples in the order `permutation(seed, e)`; the last incomplete batch
    of each epoch is dropped, so `steps_per_epoch = N // global_batch_size`. Each call reads
    only this process's rows of the global batch.

    Args:
      images: the examples, a `Records` (then `labels` is None), or uint8 images [N, H, W, C].
      labels: int labels [N] of `images`, or None.
      global_batch_size: examples per step over all processes.
      seed: the seed of the epochs' orders.
      process_index, process_count: this process and how many feed the batch.
    """

    def __init__(
        self,
        images: Records | np.ndarray,
        labels: np.ndarray | None = None,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        records = _as_records(images, labels)
        if global_batch_size % process_count:
            raise ValueError(
                f"batch_size {global_batch_size} is not divisible by the process count "
                f"{process_count}"
            )
        if len(records) < global_batch_size:
            raise ValueError(
                f"batch_size {global_batch_size} exceeds the {len(records)} training examples"
            )
        self.records = records
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.seed = seed
        self.steps_per_epoch = len(records) // global_batch_size
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(len(self.records))
            self._epoch = epoch
        return self._order

    def indices(self, step: int) -> np.ndarray:
        """The indices (into the examples) of this process's rows of the batch of `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch_size
        # Sort the whole global batch, then slice: row i of the global batch is the same example
        # in every layout. (Sorting each process's slice instead permuted the global batch with
        # the process count, and with it the per-position augmentation and loss noise.)
        rows = np.sort(self.order(epoch)[start : start + self.global_batch_size])
        local = self.process_index * self.local_batch_size
        return rows[local : local + self.local_batch_size]

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self.records.read(self.indices(step))


class EvalBatches:
    """The process-local (images, labels, mask) of evaluation batch i: every example once.

    Batch i holds examples [i * B, (i + 1) * B); the last batch is padded to the full size
    (with example 0) and `mask` is False on the padding.
    """

    def __init__(self, records: Records, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1):
        self.records = records
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index

    def __len__(self) -> int:
        return math.ceil(len(self.records) / self.global_batch_size)

    def __call__(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start = batch * self.global_batch_size + self.process_index * self.local_batch_size
        indices = np.arange(start, start + self.local_batch_size)
        mask = indices < len(self.records)
        images, labels = self.records.read(np.where(mask, indices, 0))
        return images, labels, mask


def eval_batches(
    images: Records | np.ndarray,
    labels: np.ndarray | None = None,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields process-local (images, labels, mask) covering every example exactly once.

    The last batch is padded to the full size; `mask` is False on the padding. Batches read
    from disk are read ahead in the background (`read_ahead`).

    Args:
      images: the examples, a `Records` (then `labels` is None), or uint8 images [N, H, W, C].
      labels: int labels [N] of `images`, or None.
      global_batch_size: examples per batch over all processes.
      process_index, process_count: this process and how many read the batch.
    """
    batches = EvalBatches(_as_records(images, labels), global_batch_size=global_batch_size,
                          process_index=process_index, process_count=process_count)
    return read_ahead(batches, 0, len(batches))


def read_ahead(batches: TrainBatches | EvalBatches, start: int, stop: int) -> Iterator:
    """The batches `start .. stop - 1`: prefetched if they are read from disk, else cut in turn.

    Examples in host memory are cut into a batch in microseconds, and a thread would only add
    its hand-off (0.5% of a step of the MNIST CNN, measured); a batch read from disk costs
    ~100 us of CPU per image, which `prefetch` overlaps with the training step.
    """
    if isinstance(batches.records, ArrayRecords):
        return (batches(index) for index in range(start, stop))
    return prefetch(batches, start, stop)


_Item = TypeVar("_Item")

# Batches read ahead of the one in use. A few are enough to hide a read behind a training step
# (a step of the MNIST CNN on 2 CPU cores takes ~100x longer than reading its batch).
PREFETCH_BUFFER = 4


def prefetch(read: Callable[[int], _Item], start: int, stop: int, *,
             buffer_size: int = PREFETCH_BUFFER, num_threads: int = 1) -> Iterator[_Item]:
    """Yields `read(start), ..., read(stop - 1)` in order, reading ahead in background threads.

    Grain's `MapDataset` over the step range: up to `buffer_size` items are read ahead by
    `num_threads` threads. An item is a pure function of its index, so the sequence is the same
    whatever the threads' timing; an exception raised by `read` surfaces, unchanged, where its
    item would have been yielded.

    Args:
      read: the item of an index (e.g. a `TrainBatches`: the batch of a step).
      start, stop: the range of indices.
      buffer_size: items read ahead.
      num_threads: threads reading.

    Example:
      >>> list(prefetch(lambda step: step * step, 2, 5))
      [4, 9, 16]
    """
    if stop <= start:
        return iter(())
    import grain  # pylint: disable=g-import-not-at-top

    dataset = grain.MapDataset.range(start, stop).map(read)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer_size)
    return iter(dataset.to_iter_dataset(options))


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
