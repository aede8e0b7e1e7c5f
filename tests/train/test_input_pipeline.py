"""Batches as a function of the step, per-process slices, eval coverage, on-device augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import input_pipeline


def _data(n=50):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 4, 4, 1), np.uint8)
    return images, np.arange(n, dtype=np.int32)


def test_batch_of_a_step_does_not_depend_on_history():
    images, labels = _data()
    first = input_pipeline.TrainBatches(images, labels, global_batch_size=8, seed=3)
    sequence = [first(step)[1] for step in range(20)]
    # A fresh loader (as after a resume) asked for step 13 directly gives the same batch.
    fresh = input_pipeline.TrainBatches(images, labels, global_batch_size=8, seed=3)
    np.testing.assert_array_equal(fresh(13)[1], sequence[13])
    other_seed = input_pipeline.TrainBatches(images, labels, global_batch_size=8, seed=4)
    assert not np.array_equal(other_seed(0)[1], sequence[0])


def test_each_epoch_visits_distinct_examples_in_a_new_order():
    images, labels = _data()
    batches = input_pipeline.TrainBatches(images, labels, global_batch_size=8, seed=0)
    assert batches.steps_per_epoch == 6  # the 2 leftover examples are dropped
    epoch0 = np.concatenate([batches(s)[1] for s in range(6)])
    epoch1 = np.concatenate([batches(s)[1] for s in range(6, 12)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert not np.array_equal(epoch0, epoch1)


def test_process_slices_make_up_the_global_batch():
    images, labels = _data()
    whole = input_pipeline.TrainBatches(images, labels, global_batch_size=8, seed=1)
    parts = [
        input_pipeline.TrainBatches(
            images, labels, global_batch_size=8, seed=1, process_index=p, process_count=4
        )
        for p in range(4)
    ]
    for step in (0, 7):
        local = [part(step)[1] for part in parts]
        assert all(len(x) == 2 for x in local)
        # In the same row order: each row's augmentation and loss noise depend on its position.
        np.testing.assert_array_equal(np.concatenate(local), whole(step)[1])
        np.testing.assert_array_equal(
            np.concatenate([part(step)[0] for part in parts]), whole(step)[0])


def test_eval_batches_cover_every_example_once():
    images, labels = _data(23)
    seen = []
    for batch_images, batch_labels, mask in input_pipeline.eval_batches(
        images, labels, global_batch_size=8
    ):
        assert batch_images.shape[0] == 8
        seen.extend(batch_labels[mask].tolist())
    assert sorted(seen) == list(range(23))


def test_augment_crops_a_window_of_the_padded_image_and_flips():
    images = jnp.asarray(np.random.default_rng(0).integers(1, 256, (16, 8, 8, 3)), jnp.uint8)
    out = jax.jit(input_pipeline.augment)(jax.random.key(0), images)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for original, augmented in zip(padded, np.asarray(out)):
        windows = [original[i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
        plain = any(np.array_equal(augmented, w) for w in windows)
        flipped = any(np.array_equal(augmented[:, ::-1], w) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 0 < flips < 16
    # No padding and no flip is the identity; the same key gives the same augmentation.
    np.testing.assert_array_equal(
        input_pipeline.augment(jax.random.key(1), images, pad=0, flip=False), images
    )
    np.testing.assert_array_equal(input_pipeline.augment(jax.random.key(0), images), out)


@pytest.mark.parametrize("dataset", sorted(input_pipeline.DATASETS))
def test_normalize_standardizes_per_channel(dataset):
    info = input_pipeline.DATASETS[dataset]
    mean = np.broadcast_to(np.round(info.mean).astype(np.uint8), (1, *info.image_shape))
    out = input_pipeline.normalize(jnp.asarray(mean), dataset)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, 0.0, atol=0.01)


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """A prepared 12/6-example MNIST (from CSV files) in a TFDS data dir."""
    from train import prepare_data

    root = tmp_path_factory.mktemp("tiny_mnist")
    rng = np.random.default_rng(0)
    header = "label," + ",".join(f"p{i}" for i in range(784))
    for split, n in (("train", 12), ("test", 6)):
        rows = np.concatenate(
            [rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 784))], axis=1
        )
        lines = [header] + [",".join(map(str, row)) for row in rows]
        (root / f"mnist_{split}.csv").write_text("\n".join(lines) + "\n")
    prepare_data.prepare("mnist", str(root / "tfds"), source_dir=root)
    return str(root / "tfds")


def _counting_open_source(monkeypatch):
    opened = []
    open_source = input_pipeline.open_source

    def counting(dataset, split, data_dir, **kwargs):
        opened.append((dataset, split))
        return open_source(dataset, split, data_dir, **kwargs)

    monkeypatch.setattr(input_pipeline, "open_source", counting)
    return opened


def test_cached_splits_decode_once_and_return_the_same_read_only_arrays(tiny_mnist, monkeypatch):
    opened = _counting_open_source(monkeypatch)
    uncached = input_pipeline.load_split("mnist", "train", tiny_mnist, prepare=False)
    with input_pipeline.cached_splits():
        first = input_pipeline.load_split("mnist", "train", tiny_mnist, prepare=False)
        with input_pipeline.cached_splits():  # a nested use shares the cache
            again = input_pipeline.load_split("mnist", "train", tiny_mnist + "/", prepare=False)
        test = input_pipeline.load_split("mnist", "test", tiny_mnist, prepare=False)
        assert input_pipeline.load_split("mnist", "test", tiny_mnist, prepare=False)[0] is test[0]
    assert opened == [("mnist", "train"), ("mnist", "train"), ("mnist", "test")]
    assert again[0] is first[0] and again[1] is first[1]
    for cached, fresh in zip(first, uncached):
        np.testing.assert_array_equal(cached, fresh)
        assert fresh.flags.writeable and not cached.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            cached[0] = 0
    # Outside the context every call decodes afresh, into arrays the caller owns.
    after = input_pipeline.load_split("mnist", "train", tiny_mnist, prepare=False)
    assert len(opened) == 4 and after[0] is not first[0] and after[0].flags.writeable


# --------------------------------------------------------------------------- streaming input


def test_batches_read_from_the_source_equal_those_cut_from_the_decoded_split(tiny_mnist):
    records = input_pipeline.SourceRecords("mnist", "train", tiny_mnist, prepare=False)
    images, labels = input_pipeline.load_split("mnist", "train", tiny_mnist, prepare=False)
    in_memory = input_pipeline.TrainBatches(images, labels, global_batch_size=4, seed=5)
    for count in (1, 2, 4):  # every process reads only its rows; together they are the batch
        parts = [input_pipeline.TrainBatches(records, global_batch_size=4, seed=5,
                                             process_index=p, process_count=count)
                 for p in range(count)]
        for step in (0, 2, 7):  # 3 steps per epoch: steps 2 and 7 lie in the first and third
            expected = in_memory(step)
            got = [part(step) for part in parts]
            assert all(len(g[1]) == 4 // count for g in got)
            np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), expected[0])
            np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), expected[1])


def test_eval_batches_from_the_source_cover_every_example_once_with_a_padded_last_batch(
        tiny_mnist):
    records = input_pipeline.SourceRecords("mnist", "test", tiny_mnist, prepare=False)
    images, labels = input_pipeline.load_split("mnist", "test", tiny_mnist, prepare=False)
    for count in (1, 2):
        seen_images, seen_labels = [], []
        per_process = [list(input_pipeline.eval_batches(
            records, global_batch_size=4, process_index=p, process_count=count))
            for p in range(count)]
        assert [len(batches) for batches in per_process] == [2] * count  # 6 examples, 2 batches
        for batch in range(2):
            for p in range(count):
                batch_images, batch_labels, mask = per_process[p][batch]
                assert batch_images.shape == (4 // count, 28, 28, 1) and mask.shape == (4 // count,)
                seen_images.append(batch_images[mask])
                seen_labels.append(batch_labels[mask])
        np.testing.assert_array_equal(np.concatenate(seen_images), images)
        np.testing.assert_array_equal(np.concatenate(seen_labels), labels)


def test_prefetch_yields_every_item_in_order_and_raises_the_readers_exception_unchanged():
    assert list(input_pipeline.prefetch(lambda i: (i, i * i), 3, 9, num_threads=2)) == [
        (i, i * i) for i in range(3, 9)]
    assert list(input_pipeline.prefetch(lambda i: i, 5, 5)) == []

    def read(step):
        if step == 4:
            raise FileNotFoundError("the batch of step 4 is missing")
        return step

    seen = []
    with pytest.raises(FileNotFoundError, match="the batch of step 4 is missing"):
        for item in input_pipeline.prefetch(read, 0, 10):
            seen.append(item)
    assert seen == [0, 1, 2, 3]


def test_source_records_read_no_image_until_asked(tiny_mnist, monkeypatch):
    decoded = []
    decode = input_pipeline._decode_image
    monkeypatch.setattr(input_pipeline, "_decode_image",
                        lambda image: decoded.append(1) or decode(image))
    records = input_pipeline.SourceRecords("mnist", "train", tiny_mnist, prepare=False)
    assert len(decoded) == 2  # the first and the last record, to check the files
    images, labels = records.read(np.array([3, 1]))
    assert images.shape == (2, 28, 28, 1) and len(decoded) == 4
    whole = input_pipeline.load_split("mnist", "train", tiny_mnist, prepare=False)
    np.testing.assert_array_equal(images, whole[0][[3, 1]])
    np.testing.assert_array_equal(records.all_labels(), whole[1])


def test_open_split_serves_the_cached_arrays_inside_cached_splits(tiny_mnist):
    assert isinstance(input_pipeline.open_split("mnist", "test", tiny_mnist, prepare=False),
                      input_pipeline.SourceRecords)
    with input_pipeline.cached_splits():
        records = input_pipeline.open_split("mnist", "test", tiny_mnist, prepare=False)
        cached = input_pipeline.load_split("mnist", "test", tiny_mnist, prepare=False)
        assert isinstance(records, input_pipeline.ArrayRecords) and records.images is cached[0]


def _config(**overrides):
    from train.configs import default

    config = default.get_config()
    config.update(overrides)
    return config


def test_training_data_keeps_the_first_classes_and_then_a_balanced_subset():
    labels = np.repeat(np.arange(5), 6).astype(np.int32)  # 5 classes of 6 examples
    images = np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1)
    records = input_pipeline.ArrayRecords(images, labels)
    three = input_pipeline.training_data(_config(num_classes=3), records)
    assert len(three) == 18
    np.testing.assert_array_equal(input_pipeline.all_labels(three), labels[:18])
    subset = input_pipeline.training_data(_config(num_classes=3, train_subset=6), records)
    chosen_images, chosen_labels = subset.read(np.arange(len(subset)))
    assert sorted(chosen_labels.tolist()) == [0, 0, 1, 1, 2, 2]
    # Each image (its pixel is its index) travels with its own label.
    np.testing.assert_array_equal(labels[chosen_images[:, 0, 0, 0]], chosen_labels)
    test = input_pipeline.evaluation_data(_config(num_classes=2), records)
    assert set(input_pipeline.all_labels(test).tolist()) == {0, 1}
    assert input_pipeline.evaluation_data(_config(), records) is records
    with pytest.raises(input_pipeline.errors.ConfigError, match="exceeds the 5 classes"):
        input_pipeline.training_data(_config(num_classes=6), records)


def test_in_memory_decodes_small_splits_once_and_leaves_large_ones_on_disk(tiny_mnist):
    records = input_pipeline.SourceRecords("mnist", "train", tiny_mnist, prepare=False)
    # 12 images of 784 bytes: 9408 bytes, 0.009 MiB.
    assert input_pipeline.in_memory(records, 0.008) is records
    assert input_pipeline.in_memory(records, 0) is records
    decoded = input_pipeline.in_memory(records, 0.009, chunk=5)
    assert isinstance(decoded, input_pipeline.ArrayRecords)
    whole = input_pipeline.load_split("mnist", "train", tiny_mnist, prepare=False)
    np.testing.assert_array_equal(decoded.images, whole[0])
    np.testing.assert_array_equal(decoded.labels, whole[1])
    subset = input_pipeline.SubsetRecords(records, np.array([7, 2]))
    np.testing.assert_array_equal(input_pipeline.in_memory(subset, 1).images, whole[0][[7, 2]])
