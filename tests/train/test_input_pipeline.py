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
