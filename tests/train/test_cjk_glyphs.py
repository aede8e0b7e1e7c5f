"""cjk_glyphs: class set, rendering filters, splits by class, pairs, TFDS round trip, baseline.

The fast tests build the dataset from tiny generated fonts (tests/train/fake_fonts.py) laid out
like unpacked Debian packages, so nothing is downloaded; the slow one fetches and prepares the
real lean package set where apt-get can reach a Debian mirror.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.train import fake_fonts
from train import (
    cjk_glyphs,
    font_packages,
    glyph_render,
    input_pipeline,
    pixel_baseline,
    prepare_data,
    verification_pairs,
)


def test_class_set_is_the_union_of_the_four_standards_han_characters():
    # Sizes of the standards' Han sets: GB2312 levels 1-2 3755 + 3008, JIS X 0208 levels 1-2
    # 2965 + 3390, Big5's common characters 5401, KS X 1001's 4888 hanja less the 268 that
    # decode to compatibility ideographs.
    sizes = {s: len(cjk_glyphs.standard_characters(s)) for s in cjk_glyphs._STANDARDS}
    assert sizes == {"GB2312 levels 1-2": 6763, "JIS X 0208 levels 1-2": 6355,
                     "Big5 common": 5401, "KS X 1001 hanja": 4620}
    classes = cjk_glyphs.han_classes()
    assert len(classes) == 10563 and classes == sorted(set(classes))
    assert all(0x4E00 <= c <= 0x9FFF for c in classes)
    assert {ord(c) for c in "永和国學漢字"} <= set(classes)


def test_render_keeps_drawn_glyphs_and_drops_blanks_and_placeholders(tmp_path):
    codepoints = cjk_glyphs.han_classes()[:10]
    for kind, expected in (("normal", (9, 0, 0)), ("blank", (0, 9, 0)),
                           ("placeholder", (0, 0, 9))):
        fake_fonts.make_font(tmp_path / f"{kind}.ttf", kind, codepoints[:8] + codepoints[9:],
                             style=1, kind=kind)
        glyphs = glyph_render.render_face(tmp_path / f"{kind}.ttf", 0, codepoints)
        assert glyphs.covered == 9  # only the mapped characters are drawn
        assert (len(glyphs.codepoints), glyphs.blank, glyphs.placeholder) == expected
    glyphs = glyph_render.render_face(tmp_path / "normal.ttf", 0, codepoints)
    assert glyphs.images.shape == (9, 32, 32) and glyphs.images.dtype == np.uint8
    assert codepoints[8] not in glyphs.codepoints.tolist()
    # Cropped to the ink and scaled: the 2-pixel margin on the longer side, ink in the middle.
    for image in glyphs.images:
        rows, columns = np.nonzero(image > 0)
        extent = max(rows.max() - rows.min(), columns.max() - columns.min()) + 1
        assert 27 <= extent <= 29
    assert len({image.tobytes() for image in glyphs.images}) == 9


def test_faces_drawing_one_design_share_a_family():
    rng = np.random.default_rng(0)
    design = {c: rng.integers(0, 256, (32, 32), dtype=np.uint8) for c in range(20)}
    other = {c: rng.integers(0, 256, (32, 32), dtype=np.uint8) for c in range(20)}
    altered = {c: np.clip(image.astype(int) + (c % 2), 0, 255).astype(np.uint8)
               for c, image in design.items()}  # within 1/255: the same design
    fresh = {c: rng.integers(0, 256, (32, 32), dtype=np.uint8) for c in range(20)}
    half = {c: design[c] if c < 4 else fresh[c] for c in range(20)}  # 20% shared: not merged
    reports = [{"family": f} for f in ("b-family", "a-family", "c-family", "d-family")]
    cjk_glyphs.merge_shared_designs(reports, [design, altered, other, half])
    assert [r["family"] for r in reports] == ["a-family", "a-family", "c-family", "d-family"]
    assert [r["package_family"] for r in reports] == ["b-family", "a-family", "c-family",
                                                      "d-family"]


FONTS = [  # (package, style, kind)
    ("fonts-test-a", 0, "normal"), ("fonts-test-b", 1, "normal"),
    ("fonts-test-c", 2, "normal"), ("fonts-test-d", 3, "normal"),
    ("fonts-test-copy", 0, "normal"),  # a's outlines again: every glyph a duplicate
    ("fonts-test-blank", 0, "blank"), ("fonts-test-box", 0, "placeholder"),
]
OPTIONS = cjk_glyphs.BuildOptions("lean", heldout_classes=8, pairs_per_fold=6, num_folds=4,
                                  min_glyphs=3, min_families=3, face_min_coverage=0.001,
                                  test_fraction=0.25)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """cjk_glyphs/lean built from 7 tiny fonts of 24 characters, read back through TFDS."""
    root = tmp_path_factory.mktemp("cjk")
    codepoints = cjk_glyphs.han_classes()[100:124]
    packages = fake_fonts.make_packages(root / "cache", codepoints, FONTS)
    builder = cjk_glyphs.builder_class()(config="lean", data_dir=str(root / "tfds"),
                                         file_format="array_record")
    builder.cache_dir, builder.processes = str(root / "cache"), 1
    builder.packages, builder.options = packages, OPTIONS
    builder.download_and_prepare()
    return root, codepoints, packages


def _split(data_dir, split):
    source = tfds.data_source("cjk_glyphs/lean", split=split, data_dir=data_dir)
    return [source[i] for i in range(len(source))]


def test_build_splits_by_class_and_holds_out_test_glyphs(tiny_build):
    root, codepoints, _ = tiny_build
    data_dir = str(root / "tfds")
    record = prepare_data.build_record("cjk_glyphs_lean", data_dir)
    faces = {f["face"].split("/")[0]: f for f in record["faces"]}
    assert faces["fonts-test-blank"]["dropped"] and faces["fonts-test-box"]["dropped"]
    assert faces["fonts-test-copy"]["kept"] == 0 and faces["fonts-test-copy"]["duplicates"] == 24
    assert all(faces[f"fonts-test-{x}"]["kept"] == 24 for x in "abcd")
    # 24 characters, each with 4 distinct glyphs from 4 families: 8 held out, 16 trained on.
    assert record["num_classes"] == 16 and record["heldout_classes"] == 8
    train, test, heldout = (_split(data_dir, s) for s in cjk_glyphs.SPLITS)
    assert (len(train), len(test), len(heldout)) == (16 * 3, 16, 8 * 4)
    assert record["examples"] == {"train": 48, "test": 16, "heldout": 32}
    labels = {s: [int(r["label"]) for r in rs]
              for s, rs in (("train", train), ("test", test), ("heldout", heldout))}
    assert set(labels["train"]) == set(labels["test"]) == set(range(16))
    assert set(labels["heldout"]) == set(range(16, 24))
    # Records sorted by label; every glyph of a class is in train or test, never both.
    assert labels["train"] == sorted(labels["train"])
    for label in range(16):
        glyph_images = [r["image"].tobytes() for s in (train, test) for r in s
                        if int(r["label"]) == label]
        assert len(glyph_images) == len(set(glyph_images)) == 4
    folder = prepare_data.prepared_folder("cjk_glyphs_lean", data_dir)
    for split in cjk_glyphs.SPLITS:  # the stored labels are the records' labels
        np.testing.assert_array_equal(np.load(folder / f"labels-{split}.npy"), labels[split])
    names = tfds.builder("cjk_glyphs/lean", data_dir=data_dir).info.features["label"].names
    assert sorted(ord(n) for n in names) == codepoints
    assert {r["family"].decode() for r in heldout} == {f"fonts-test-{x}" for x in "abcd"}
    assert "tensorflow" not in sys.modules


def test_pairs_are_lfw_style_over_the_held_out_classes(tiny_build):
    root, _, _ = tiny_build
    data_dir = str(root / "tfds")
    pairs, records = verification_pairs.verification_data("cjk_glyphs_lean", data_dir)
    heldout = _split(data_dir, "heldout")
    label = np.array([int(r["label"]) for r in heldout])
    family = np.array([r["family"] for r in heldout])
    assert pairs.split == "heldout" and len(pairs) == 24 and pairs.num_folds == 4
    np.testing.assert_array_equal(np.bincount(pairs.fold), [6] * 4)
    for k in range(4):  # half of each fold same-class
        assert pairs.same[pairs.fold == k].sum() == 3
    np.testing.assert_array_equal(label[pairs.left] == label[pairs.right], pairs.same)
    assert np.all(family[pairs.left] != family[pairs.right])
    classes_of_fold = [set(label[pairs.left][pairs.fold == k]) | set(label[pairs.right][
        pairs.fold == k]) for k in range(4)]
    assert all(not (a & b) for i, a in enumerate(classes_of_fold) for b in classes_of_fold[i + 1:])
    assert len({(min(a, b), max(a, b)) for a, b in zip(pairs.left, pairs.right)}) == 24
    # The records the pairs address are the held-out split's, as images.
    images, _ = records.read(pairs.left[:3])
    np.testing.assert_array_equal(images, np.stack([heldout[i]["image"] for i in pairs.left[:3]]))


def test_build_is_a_function_of_the_fonts(tiny_build):
    root, _, packages = tiny_build
    again = cjk_glyphs.build("lean", root / "cache", processes=1, packages=packages,
                             options=OPTIONS, log=lambda line: None)
    stored = verification_pairs.load_pairs("cjk_glyphs_lean", str(root / "tfds"))
    assert again.layout.pairs.to_json() == stored.to_json()
    record = prepare_data.build_record("cjk_glyphs_lean", str(root / "tfds"))
    assert again.record["classes"] == record["classes"]
    assert again.record["train_mean"] == pytest.approx(record["train_mean"])


def test_all_labels_come_from_the_stored_file_without_reading_the_records(tiny_build,
                                                                           monkeypatch):
    root, _, _ = tiny_build
    records = input_pipeline.SourceRecords("cjk_glyphs_lean", "train", str(root / "tfds"))
    expected = np.array([int(r["label"]) for r in _split(str(root / "tfds"), "train")])
    monkeypatch.setattr(records, "_records", lambda keys: pytest.fail("read the records"))
    np.testing.assert_array_equal(records.all_labels(), expected)


def test_training_reads_the_first_classes_of_the_prepared_data(tiny_build):
    from train.configs import default

    root, _, _ = tiny_build
    config = default.get_config()
    config.update(dataset="cjk_glyphs_lean", data_dir=str(root / "tfds"), num_classes=5)
    assert input_pipeline.num_classes(config) == 5
    config.num_classes = 0
    assert input_pipeline.num_classes(config) == 16  # from build.json
    config.num_classes = 5
    train = input_pipeline.training_data(config, input_pipeline.open_split(
        "cjk_glyphs_lean", "train", config.data_dir, prepare=False))
    test = input_pipeline.evaluation_data(config, input_pipeline.open_split(
        "cjk_glyphs_lean", "test", config.data_dir, prepare=False))
    assert len(train) == 15 and len(test) == 5
    images, labels = train.read(np.arange(len(train)))
    assert images.shape == (15, 32, 32, 1) and sorted(set(labels.tolist())) == list(range(5))


def test_pixel_baseline_scores_the_stored_pairs(tiny_build):
    root, _, _ = tiny_build
    pairs, scores = pixel_baseline.pair_scores("cjk_glyphs_lean", str(root / "tfds"))
    _, records = verification_pairs.verification_data("cjk_glyphs_lean", str(root / "tfds"))
    left = records.read(pairs.left)[0].reshape(len(pairs), -1).astype(float)
    right = records.read(pairs.right)[0].reshape(len(pairs), -1).astype(float)
    expected = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(left, right)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    mean, std, per_fold = pixel_baseline.ten_fold_accuracy(scores, pairs.same, pairs.fold)
    assert per_fold.shape == (4,) and 0 <= mean <= 1 and std >= 0


def test_missing_cjk_glyphs_names_the_command_that_prepares_it(tmp_path):
    with pytest.raises(prepare_data.DataUnavailableError,
                       match="rendered from Debian's font packages"):
        input_pipeline.open_source("cjk_glyphs", "train", str(tmp_path), prepare=False)


def test_licence_is_read_from_the_copyright_file(tmp_path):
    packages = fake_fonts.make_packages(tmp_path, [0x4E00], [("fonts-test-a", 0, "normal")])
    assert font_packages.licence(packages[0], tmp_path / packages[0]) == "OFL-1.1"
    doc = tmp_path / "plain/usr/share/doc/plain"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Copyright:\n  (see below)\n\nARPHIC PUBLIC LICENSE\n\n...\n")
    assert font_packages.licence("plain", tmp_path / "plain") == "ARPHIC PUBLIC LICENSE"


def _apt_reaches_a_mirror() -> bool:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return False
    done = subprocess.run(["apt-get", "download", "--print-uris", "fonts-vlgothic"],
                          capture_output=True, text=True, check=False)
    return done.returncode == 0 and ".deb" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _apt_reaches_a_mirror(),
                    reason="apt-get cannot download Debian's font packages here")
def test_lean_set_is_fetched_rendered_and_prepared(tmp_path):
    prepare_data.prepare("cjk_glyphs_lean", str(tmp_path / "tfds"),
                         font_cache=tmp_path / "fonts")
    record = prepare_data.build_record("cjk_glyphs_lean", str(tmp_path / "tfds"))
    assert record["num_classes"] == 500 and record["heldout_classes"] == 100
    assert record["pairs"] == {"count": 1000, "folds": 10, "same": 500}
    assert record["glyphs_per_class"]["min"] >= 5 and record["families_kept"] >= 8
    assert set(record["packages"]) == set(font_packages.LEAN_PACKAGES)
    assert all(p["licence"] and not p["licence"].startswith("unknown")
               for p in record["packages"].values())
    pairs, scores = pixel_baseline.pair_scores("cjk_glyphs_lean", str(tmp_path / "tfds"))
    mean, _, _ = pixel_baseline.ten_fold_accuracy(scores, pairs.same, pairs.fold)
    assert 0.6 < mean < 0.95  # far from chance and from perfect: room for a learned embedding
    json.dumps(record)  # the record is plain JSON


@pytest.mark.slow
def test_cjk_config_trains_on_the_first_classes_of_the_prepared_data(tiny_build, tmp_path):
    from tests.train import test_main

    root, _, _ = tiny_build
    command = [sys.executable, "-m", "train", "--config", "train/configs/cjk_glyphs.py:lean",
               "--workdir", str(tmp_path / "w"), f"--config.data_dir={root / 'tfds'}",
               "--config.prepare_data=False", "--config.progress_bar=False",
               "--config.num_classes=12", "--config.num_steps=6", "--config.batch_size=8",
               "--config.eval_batch_size=8", "--config.log_every_steps=3"]
    done = subprocess.run(command, cwd=test_main.REPO, env=test_main.environment(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert results["dataset"] == "cjk_glyphs_lean" and results["steps"] == 6
    # 12 classes of 3 training glyphs: 36 examples, 4 steps an epoch; the run spans 2 epochs.
    assert 0 <= results["test_accuracy"] <= 1
