"""Face data for users who have it: an identity-folder training set, and LFW with its pairs.

Nothing here downloads: face data is licensed for research and must be obtained by the user.

`face_folder` (TFDS name `face_folder`): a training set in the layout CASIA-WebFace and MS1MV2
come in once extracted, one folder of images per identity,

    <source_dir>/<identity>/<any name>.jpg (or .jpeg, .png, .bmp)

by default `<data_dir>/downloads/manual/face_folder/`. Each image is centre-cropped to a square
of `crop_fraction` of its shorter side and resized to 112x112 RGB (JPEG, quality 95), the input
size of the usual face-recognition networks. The identities, sorted by name, are the labels.
One image of each identity that has at least `MIN_IMAGES_FOR_TEST` goes to the split "test"
(a closed-set check of the classifier); the rest form "train". Unreadable images are skipped and
counted in `build.json`. The crop of aligned 112x112 sets (MS1MV2) is 1.0; for sets of whole
250x250 web photos (CASIA-WebFace's original release, like LFW's) a crop of about 0.5 keeps the
face.

`lfw` (TFDS name `lfw`, the official builder's name, version and features: 250x250 RGB images
labelled with the person's name), prepared offline from `lfw.tgz` (or its extracted `lfw/`
folder) and LFW's `pairs.txt` (View 2: 10 folds of 300 same-person and 300 different-person
pairs), by default in `<data_dir>/downloads/manual/lfw/`. Both come from
http://vis-www.cs.umass.edu/lfw/ (TFDS fetches lfw.tgz from
https://ndownloader.figshare.com/files/5976018). The records are stored sorted by
(person, file), and `pairs.json` beside them holds pairs.txt resolved to record indices. For
verification, `lfw_records` serves them cropped and resized like the training set's images.

Usage:

  python -m train.prepare_data --dataset face_folder --data_dir D [--source_dir S]
  python -m train.prepare_data --dataset lfw --data_dir D [--source_dir S]
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pathlib
import tarfile
from collections.abc import Sequence

import numpy as np

IMAGE_SIZE = 112
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MIN_IMAGES_FOR_TEST = 4
SEED = 20171118  # which image of an identity is the test image
LFW_URL = "http://vis-www.cs.umass.edu/lfw/"


def manual_dir(dataset: str, data_dir: str) -> pathlib.Path:
    """Where the raw files of `face_folder` or `lfw` are looked for by default."""
    return pathlib.Path(os.path.expanduser(data_dir)) / "downloads" / "manual" / dataset


def how_to_obtain(dataset: str, data_dir: str) -> str:
    """One line: what to obtain for `face_folder` or `lfw`, and where to put it."""
    prepare = f"python -m train.prepare_data --dataset {dataset} --data_dir {data_dir}"
    if dataset == "face_folder":
        return (f"put a face set with one folder of images per identity (e.g. CASIA-WebFace or "
                f"MS1MV2, extracted) in {manual_dir(dataset, data_dir)}/<identity>/ and run "
                f"`{prepare}` (or pass --source_dir)")
    return (f"download lfw.tgz and pairs.txt from {LFW_URL} into {manual_dir(dataset, data_dir)}/"
            f" and run `{prepare}` (or pass --source_dir)")


def check_source(dataset: str, source_dir, data_dir: str) -> pathlib.Path:
    """The folder of `face_folder`'s or `lfw`'s raw files, if they are there.

    Raises:
      prepare_data.DataUnavailableError: they are not (one line: what to obtain and where).
    """
    from train import prepare_data  # pylint: disable=g-import-not-at-top

    source = pathlib.Path(source_dir or manual_dir(dataset, data_dir))
    if dataset == "face_folder":
        present = source.is_dir() and any(
            path.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir())
            for path in source.iterdir())
        found = "no identity folders of images"
    else:
        present = ((source / "lfw").is_dir() or (source / "lfw.tgz").exists()) and (
            source / "pairs.txt").exists()
        found = "no lfw.tgz (or lfw/) and pairs.txt"
    if not present:
        raise prepare_data.DataUnavailableError(
            f"{dataset} is not prepared in {data_dir} and {source} holds {found}: "
            + how_to_obtain(dataset, data_dir))
    return source


def identity_images(root: os.PathLike | str) -> list[tuple[str, pathlib.Path]]:
    """The (identity, image path) of every image under `root/<identity>/`, sorted."""
    root = pathlib.Path(root)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                found.append((folder.name, path))
    return found


def preprocess(image, *, size: int = IMAGE_SIZE, crop_fraction: float = 1.0) -> np.ndarray:
    """A PIL image -> uint8 RGB [size, size, 3]: the centred square crop, resized.

    The crop's side is `crop_fraction` times the image's shorter side.

    Example:
      >>> from PIL import Image
      >>> preprocess(Image.new("L", (250, 200)), crop_fraction=0.5).shape
      (112, 112, 3)
    """
    from PIL import Image  # pylint: disable=g-import-not-at-top

    image = image.convert("RGB")
    width, height = image.size
    side = max(1, round(min(width, height) * crop_fraction))
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def _encode_file(task: tuple[str, int, float]) -> bytes | None:
    """(path, size, crop) -> the preprocessed image as JPEG bytes, or None if unreadable."""
    from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

    path, size, crop_fraction = task
    try:
        with Image.open(path) as image:
            array = preprocess(image, size=size, crop_fraction=crop_fraction)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def held_out_choice(identities: Sequence[str]) -> np.ndarray:
    """bool [N]: which images (sorted by identity) form the split "test" (see module doc)."""
    identities = np.asarray(identities)
    is_test = np.zeros(len(identities), bool)
    rng = np.random.default_rng(SEED)
    starts = np.flatnonzero(np.r_[True, identities[1:] != identities[:-1]])
    ends = np.r_[starts[1:], len(identities)]
    for start, end in zip(starts, ends):
        if end - start >= MIN_IMAGES_FOR_TEST:
            is_test[start + rng.integers(end - start)] = True
    return is_test


def face_folder_builder_class():
    """The TFDS builder of `face_folder` (defined on demand: importing TFDS costs seconds)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from train import prepare_data  # pylint: disable=g-import-not-at-top

    class FaceFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A face set in identity folders, cropped and resized to 112x112 (train/face_data.py)."""

        name = "face_folder"
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release."}
        source_dir: str | None = None
        crop_fraction: float = 1.0
        processes: int | None = None
        requested_data_dir: str = prepare_data.DEFAULT_DATA_DIR

        def _info(self):
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                                 encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(),  # names: the identity folders
                    "file": tfds.features.Text(),  # <identity>/<file name>
                }),
                supervised_keys=("image", "label"),
                disable_shuffling=True,  # records sorted by identity, then file
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            root = check_source("face_folder", self.source_dir, self.requested_data_dir)
            images = identity_images(root)
            identities = sorted({identity for identity, _ in images})
            self.info.features["label"].names = identities
            label = {identity: i for i, identity in enumerate(identities)}
            is_test = held_out_choice([identity for identity, _ in images])
            self._record = {"dataset": "face_folder", "num_classes": len(identities),
                            "source_dir": str(root), "crop_fraction": self.crop_fraction,
                            "image_size": IMAGE_SIZE, "examples": {}, "unreadable": 0}
            self._labels = {"train": [], "test": []}
            return {split: self._generate_examples(
                        [(label[identity], identity, path)
                         for (identity, path), test in zip(images, is_test)
                         if test == (split == "test")], split)
                    for split in ("train", "test")}

        def _generate_examples(self, images, split):
            tasks = [(str(path), IMAGE_SIZE, self.crop_fraction) for _, _, path in images]
            # spawn: the parent may run JAX's threads (data prepared on first use by a run).
            context = multiprocessing.get_context("spawn")
            key = 0
            with context.Pool(self.processes or os.cpu_count()) as pool:
                for (label, identity, path), jpeg in zip(
                        images, pool.imap(_encode_file, tasks, chunksize=64)):
                    if jpeg is None:
                        self._record["unreadable"] += 1
                        continue
                    yield key, {"image": jpeg, "label": label, "file": f"{identity}/{path.name}"}
                    self._labels[split].append(label)
                    key += 1
            self._record["examples"][split] = key

        def _download_and_prepare(self, dl_manager, download_config=None):
            super()._download_and_prepare(dl_manager, download_config=download_config)
            # Still the folder being written: the record lands with the records, atomically.
            folder = pathlib.Path(self.data_dir)
            (folder / prepare_data.BUILD_RECORD).write_text(json.dumps(self._record, indent=1))
            for split, labels in self._labels.items():  # read by input_pipeline.all_labels
                np.save(folder / f"labels-{split}.npy", np.asarray(labels, np.int32))

    return FaceFolder


# --------------------------------------------------------------------------- LFW


def parse_lfw_pairs(text: str) -> list[tuple[tuple[str, int], tuple[str, int], bool, int]]:
    """LFW's pairs.txt: ((name, number), (name, number), same, fold) per pair.

    The first line is "<folds> <pairs>"; then each fold has <pairs> same-person lines
    "name n1 n2" and <pairs> different-person lines "name1 n1 name2 n2" (tab-separated).

    Example:
      >>> parse_lfw_pairs("1\\t1\\nA\\t1\\t2\\nA\\t1\\tB\\t3\\n")
      [(('A', 1), ('A', 2), True, 0), (('A', 1), ('B', 3), False, 0)]
    """
    lines = [line.split() for line in text.strip().splitlines()]
    folds, per_kind = int(lines[0][0]), int(lines[0][1])
    if len(lines) - 1 != 2 * folds * per_kind:
        raise ValueError(f"pairs.txt announces {folds} folds of 2 x {per_kind} pairs but has "
                         f"{len(lines) - 1} pair lines")
    pairs = []
    for i, fields in enumerate(lines[1:]):
        fold = i // (2 * per_kind)
        if len(fields) == 3:
            pairs.append(((fields[0], int(fields[1])), (fields[0], int(fields[2])), True, fold))
        elif len(fields) == 4:
            pairs.append(((fields[0], int(fields[1])), (fields[2], int(fields[3])), False, fold))
        else:
            raise ValueError(f"pairs.txt line {i + 2}: {' '.join(fields)!r} is not a pair")
    return pairs


def lfw_file_name(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}.jpg"


def _lfw_images(source: pathlib.Path) -> dict[str, bytes]:
    """{"<name>/<file>": JPEG bytes} of the extracted `lfw/` folder, or of `lfw.tgz`."""
    if (source / "lfw").is_dir():
        return {f"{identity}/{path.name}": path.read_bytes()
                for identity, path in identity_images(source / "lfw")}
    images = {}
    with tarfile.open(source / "lfw.tgz") as archive:
        for member in archive:
            parts = pathlib.PurePosixPath(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[2].lower().endswith(".jpg"):
                images[f"{parts[1]}/{parts[2]}"] = archive.extractfile(member).read()
    return images


def lfw_builder_class():
    """TFDS's `lfw` builder, prepared from local files (the official one downloads, with TF)."""
    from tensorflow_datasets.datasets.lfw import (  # pylint: disable=g-import-not-at-top
        lfw_dataset_builder,
    )

    from train import (  # pylint: disable=g-import-not-at-top
        prepare_data,
        verification_pairs,
    )

    class OfflineLfw(lfw_dataset_builder.Builder, skip_registration=True):
        """TFDS `lfw` (same name, version and features) from lfw.tgz and pairs.txt."""

        name = "lfw"
        source_dir: str | None = None
        requested_data_dir: str = prepare_data.DEFAULT_DATA_DIR

        def _info(self):
            official = super()._info()
            # Sorted records, so that pairs.json can name them by index.
            return self.dataset_info_from_configs(
                features=official.features, supervised_keys=official.supervised_keys,
                homepage=official.homepage, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            del dl_manager
            source = check_source("lfw", self.source_dir, self.requested_data_dir)
            images = _lfw_images(source)
            files = sorted(images)
            index = {file: i for i, file in enumerate(files)}
            resolved = []
            for first, second, same, fold in parse_lfw_pairs((source / "pairs.txt").read_text()):
                names = (lfw_file_name(*first), lfw_file_name(*second))
                missing = [n for n in names if n not in index]
                if missing:
                    raise prepare_data.DataUnavailableError(
                        f"pairs.txt names {missing[0]}, which lfw.tgz lacks: "
                        + how_to_obtain("lfw", self.requested_data_dir))
                resolved.append((index[names[0]], index[names[1]], same, fold))
            left, right, same, fold = (np.asarray(column) for column in zip(*resolved))
            verification_pairs.save_pairs(verification_pairs.Pairs(
                split="train", left=left.astype(np.int64), right=right.astype(np.int64),
                same=same.astype(bool), fold=fold.astype(np.int32)), self.data_dir)
            return {"train": self._generate_examples(images, files)}

        def _generate_examples(self, images, files):  # pylint: disable=arguments-renamed
            for key, file in enumerate(files):
                yield key, {"label": file.split("/")[0], "image": images[file]}

    return OfflineLfw


def lfw_records(data_dir: str, *, crop_fraction: float | None = None, size: int = IMAGE_SIZE,
                prepare: bool = True):
    """LFW's images as the face model sees them: cropped and resized like `face_folder`'s.

    An `input_pipeline.Records` over the prepared `lfw` (its labels are all 0: LFW's people are
    no classes of the training set). With `crop_fraction=None`, the crop recorded in the
    prepared face_folder's build.json.

    Raises:
      prepare_data.DataUnavailableError: lfw (or, for its crop, face_folder) is not prepared.
    """
    from PIL import Image  # pylint: disable=g-import-not-at-top

    from train import input_pipeline, prepare_data  # pylint: disable=g-import-not-at-top

    if crop_fraction is None:
        crop_fraction = float(prepare_data.build_record("face_folder", data_dir)["crop_fraction"])

    class LfwRecords(input_pipeline.SourceRecords):
        image_shape = (size, size, 3)

        def _example(self, record):
            image = record["image"]
            image = (Image.open(io.BytesIO(image)) if isinstance(image, bytes)
                     else Image.fromarray(np.asarray(image, np.uint8)))
            return preprocess(image, size=size, crop_fraction=crop_fraction), 0

    return LfwRecords("lfw", "train", data_dir, prepare=prepare)
