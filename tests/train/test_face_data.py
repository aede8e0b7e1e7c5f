"""Face data: an identity-folder set and LFW with its pairs, on tiny generated image folders.

No face data can be had here; these tests make folders in the layouts users bring (CASIA-WebFace
or MS1MV2 extracted; LFW's lfw.tgz and pairs.txt) and run the preparation, the reading, one short
training run of train/configs/face_folder.py and the failure without the data.
"""

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from train import face_data, input_pipeline, prepare_data, verification_pairs

IDENTITIES = ["Ada_Lovelace", "Alan_Turing", "Grace_Hopper", "Kurt_Goedel", "Emmy_Noether"]


def _face(rng, size):
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def make_face_folder(root, images_per_identity=(5, 4, 3, 6, 2), seed=0):
    rng = np.random.default_rng(seed)
    for identity, count in zip(IDENTITIES, images_per_identity):
        (root / identity).mkdir(parents=True)
        for i in range(count):
            size = (120 + 10 * i, 100 + 7 * i)  # sizes vary: each is cropped and resized
            _face(rng, size).save(root / identity / f"{i:03d}.jpg")
    (root / IDENTITIES[0] / "broken.jpg").write_bytes(b"not a jpeg")
    (root / IDENTITIES[0] / "notes.txt").write_text("not an image")
    return root


def make_lfw(root, seed=1):
    """lfw.tgz with 4 people, and a pairs.txt of 2 folds of 2 + 2 pairs."""
    rng = np.random.default_rng(seed)
    people = {"Aaron_Peirsol": 3, "Abdullah_Gul": 2, "Adam_Sandler": 2, "Ai_Sugiyama": 1}
    folder = root / "extract" / "lfw"
    for name, count in people.items():
        (folder / name).mkdir(parents=True)
        for n in range(1, count + 1):
            _face(rng, (250, 250)).save(folder / name / f"{name}_{n:04d}.jpg")
    with tarfile.open(root / "lfw.tgz", "w:gz") as archive:
        archive.add(folder, arcname="lfw")
    (root / "pairs.txt").write_text(
        "2\t2\n"
        "Aaron_Peirsol\t1\t2\nAbdullah_Gul\t1\t2\n"
        "Aaron_Peirsol\t3\tAi_Sugiyama\t1\nAdam_Sandler\t1\tAbdullah_Gul\t2\n"
        "Aaron_Peirsol\t2\t3\nAdam_Sandler\t1\t2\n"
        "Ai_Sugiyama\t1\tAbdullah_Gul\t1\nAaron_Peirsol\t1\tAdam_Sandler\t2\n")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    data_dir = root / "tfds"
    make_face_folder(face_data.manual_dir("face_folder", str(data_dir)))
    make_lfw(face_data.manual_dir("lfw", str(data_dir)))
    prepare_data.prepare("face_folder", str(data_dir), crop_fraction=0.8, processes=1)
    prepare_data.prepare("lfw", str(data_dir))
    return str(data_dir)


def test_face_folder_labels_identities_and_holds_out_one_image_each(prepared):
    record = prepare_data.build_record("face_folder", prepared)
    assert record["num_classes"] == 5 and record["unreadable"] == 1
    # Identities with >= 4 images (Ada 5 + a broken file, Alan 4, Kurt 6) give one test image.
    assert record["examples"] == {"train": 17, "test": 3} and record["crop_fraction"] == 0.8
    train = tfds.data_source("face_folder", split="train", data_dir=prepared)
    test = tfds.data_source("face_folder", split="test", data_dir=prepared)
    names = tfds.builder("face_folder", data_dir=prepared).info.features["label"].names
    assert names == sorted(IDENTITIES)
    labels = [int(train[i]["label"]) for i in range(len(train))]
    assert labels == sorted(labels) and np.bincount(labels).tolist() == [4, 3, 2, 3, 5]
    assert sorted(int(test[i]["label"]) for i in range(len(test))) == [0, 1, 4]
    folder = prepare_data.prepared_folder("face_folder", prepared)
    np.testing.assert_array_equal(np.load(folder / "labels-train.npy"), labels)
    assert train[0]["image"].shape == (112, 112, 3)
    files = {train[i]["file"].decode() for i in range(len(train))} | {
        test[i]["file"].decode() for i in range(len(test))}
    assert len(files) == 20 and "Ada_Lovelace/broken.jpg" not in files


def test_preprocess_crops_the_centre_and_resizes():
    image = np.zeros((100, 200, 3), np.uint8)
    image[25:75, 75:125] = 255  # a white square in the middle: half the shorter side
    out = face_data.preprocess(Image.fromarray(image), size=20, crop_fraction=0.5)
    assert out.shape == (20, 20, 3) and out[2:-2, 2:-2].min() == 255  # all of the crop is white
    whole = face_data.preprocess(Image.fromarray(image), size=20, crop_fraction=1.0)
    assert whole[0, 0].max() == 0 and whole[10, 10].min() == 255


def test_lfw_pairs_resolve_to_the_named_images(prepared):
    pairs, records = verification_pairs.verification_data("face_folder", prepared)
    assert len(pairs) == 8 and pairs.num_folds == 2 and pairs.split == "train"
    np.testing.assert_array_equal(pairs.same, [1, 1, 0, 0] * 2)
    source = tfds.data_source("lfw", split="train", data_dir=prepared)
    names = [source[i]["label"].decode() for i in range(len(source))]
    assert names == sorted(names) and len(names) == 8
    first = [(names[a], names[b]) for a, b in zip(pairs.left, pairs.right)]
    assert first[0] == ("Aaron_Peirsol", "Aaron_Peirsol") and pairs.left[0] != pairs.right[0]
    assert first[2] == ("Aaron_Peirsol", "Ai_Sugiyama") and first[7] == ("Aaron_Peirsol",
                                                                          "Adam_Sandler")
    # Aaron_Peirsol_0003 is the third Aaron record: the record order is (person, file).
    assert pairs.left[2] == names.index("Aaron_Peirsol") + 2
    # The model sees LFW cropped and resized like the training images (the recorded crop 0.8).
    images, _ = records.read(pairs.left[:2])
    raw = source[int(pairs.left[0])]["image"]
    assert images.shape == (2, 112, 112, 3)
    np.testing.assert_array_equal(
        images[0], face_data.preprocess(Image.fromarray(raw), crop_fraction=0.8))


def test_parse_lfw_pairs_checks_the_announced_counts():
    with pytest.raises(ValueError, match="announces 1 folds of 2 x 1 pairs but has 1"):
        face_data.parse_lfw_pairs("1\t1\nA\t1\t2\n")
    with pytest.raises(ValueError, match="is not a pair"):
        face_data.parse_lfw_pairs("1\t1\nA\t1\nB\t1\tC\t1\n")


@pytest.mark.parametrize("dataset, names", [
    ("face_folder", "downloads/manual/face_folder/<identity>/"),
    ("lfw", "lfw.tgz and pairs.txt"),
])
def test_missing_face_data_fails_with_one_line_naming_what_and_where(tmp_path, dataset, names):
    for prepare in (True, False):
        with pytest.raises(prepare_data.DataUnavailableError) as raised:
            if dataset == "face_folder":
                input_pipeline.open_source(dataset, "train", str(tmp_path), prepare=prepare)
            else:
                face_data.lfw_records(str(tmp_path), crop_fraction=1.0, prepare=prepare)
        message = str(raised.value)
        assert "\n" not in message and names in message and str(tmp_path) in message, message
    assert not (tmp_path / dataset).exists()


def _train_command(workdir, data_dir, *extra):
    return [sys.executable, "-m", "train", "--config", "train/configs/face_folder.py:runlocal",
            "--workdir", str(workdir), f"--config.data_dir={data_dir}",
            "--config.progress_bar=False", "--config.num_steps=4", "--config.batch_size=4",
            "--config.eval_batch_size=4", "--config.model=small_cnn", *extra]


@pytest.mark.slow
def test_face_config_trains_end_to_end_on_a_tiny_folder(prepared, tmp_path):
    from tests.train import test_main

    done = subprocess.run(_train_command(tmp_path / "w", prepared), cwd=test_main.REPO,
                          env=test_main.environment(), capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["dataset"] == "face_folder" and results["steps"] == 4
    assert 0 <= results["test_accuracy"] <= 1


def test_face_config_without_data_stops_with_one_line(tmp_path):
    from tests.train import test_main

    done = subprocess.run(_train_command(tmp_path / "w", tmp_path / "empty"),
                          cwd=test_main.REPO, env=test_main.environment(), capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "face_folder" in lines[0] and "<identity>" in lines[0], (
        done.stderr[-3000:])
    assert "Traceback" not in done.stderr


def test_lfw_records_under_tfds_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        records = face_data.lfw_records(str(tmp_path), crop_fraction=0.5, prepare=False)
        images, labels = records.read(np.array([5, 0, 3]))
    assert len(records) == 6 and images.shape == (3, 112, 112, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0]
