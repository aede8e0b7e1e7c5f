"""`cjk_glyphs`: a many-class image dataset, Han characters drawn in Debian's typefaces, offline.

A class is a character, its examples are the same character drawn in different typefaces: an
open-set recognition benchmark with about ten thousand classes, prepared from Debian's font
packages alone (no face data can be had on a machine that reaches only package registries). How
it is built:

  1. Characters: the union of GB2312 levels 1-2, JIS X 0208 levels 1-2, Big5's common characters
     and the hanja of KS X 1001, decoded with Python's codecs and restricted to the CJK Unified
     Ideographs block (KS X 1001's duplicate hanja decode to compatibility ideographs and go):
     10,563 characters.
  2. Typefaces: every face of the packages of a package set (`font_packages.PACKAGE_SETS`) that
     maps at least `face_min_coverage` (5%) of them, fetched with `apt-get download` and unpacked
     with `dpkg-deb -x` into a cache folder (no system-wide install).
  3. Glyphs: each face draws the characters of its character map (`glyph_render`: 32x32 uint8,
     white on black, cropped to the ink and scaled to fit); blank glyphs, FreeType errors and
     placeholders (one picture for several characters) are dropped. A face is dropped whole
     when more than `FACE_MAX_PLACEHOLDER_FRACTION` (1%) of its mapped characters are
     placeholders (its character map claims characters it does not draw) or more than
     `FACE_MAX_BLANK_FRACTION` (half) come out blank or fail.
  4. Duplicates: a glyph whose image equals one already drawn for the character by an earlier
     face (in the faces' sorted order) is dropped, so renamed copies of a design (Takao = IPA,
     the Noto regional cuts of a shared ideograph) count once.
  5. Families: a face's family is its package's design family (`font_packages.family_of`);
     two families whose faces draw >= `SHARED_DESIGN_FRACTION` of `probe_characters()` within
     3/255 of each other (one design shipped twice, slightly altered) are merged into one.
  6. Classes: the characters with >= `min_glyphs` distinct glyphs from >= `min_families`
     families, in an order shuffled with `SEED`. The first `heldout_classes` are held out
     (split "heldout": every glyph of a character never trained on); the others are the
     training classes, labelled 0..T-1 in that order, so the first K labels
     (`config.num_classes=K`) are a random set of K characters.
  7. Closed-set test: `test_fraction` of each training class's glyphs (at least one), drawn
     with `SEED`, form the split "test"; the rest form "train".
  8. Pairs: 10 folds of `pairs_per_fold` pairs of held-out glyphs, half same-character, every
     pair's two glyphs from two different families, the folds disjoint in characters
     (`verification_pairs.sample_pairs`), stored as `pairs.json` beside the data.

The records of each split are stored in order (by label, then face): record i of "heldout" is
what `pairs.json` calls example i. Every example carries its `label`, its typeface `family`
and its `face` ("<package>/<font file>#<index>"). Beside the data, `labels-<split>.npy` holds
each split's labels, and `build.json` the package versions and licences, each face's counts
(and why a face was dropped), the class and glyph counts and the time the rendering took.

Two builder configs: "full" (`FULL_PACKAGES`, every class that qualifies) and "lean"
(`LEAN_PACKAGES`, 600 classes: what CI downloads and prepares in 10-40 s). The full
build (Debian bookworm, measured): 9,563 training and 1,000 held-out classes, 932,221 distinct
glyphs (27-171 per class, median 94) from 187 faces in 25 families, 757 MB on disk; its
raw-pixel cosine baseline on the pairs (`train/pixel_baseline.py`) is 0.8005 +- 0.0185.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from train import font_packages, glyph_render, verification_pairs

# The seed of the class order, the test glyphs and the pairs: the dataset is a function of the
# package versions alone.
SEED = 20171117
FACE_MAX_PLACEHOLDER_FRACTION = 0.01
FACE_MAX_BLANK_FRACTION = 0.5
SHARED_DESIGN_FRACTION = 0.25
NEAR_IDENTICAL = 3.0  # mean absolute difference (0..255) under which two glyphs are one design
SPLITS = ("train", "test", "heldout")

# (codec, lead bytes, trail bytes) of the double-byte rows that hold each standard's Han
# characters: GB2312 levels 1-2 (rows 16-87), JIS X 0208 levels 1-2 (rows 16-84, EUC-JP),
# Big5's common characters (0xA440-0xC67E), KS X 1001's hanja (rows 42-93, EUC-KR).
_STANDARDS = {
    "GB2312 levels 1-2": ("gb2312", range(0xB0, 0xF8), range(0xA1, 0xFF)),
    "JIS X 0208 levels 1-2": ("euc_jp", range(0xB0, 0xF5), range(0xA1, 0xFF)),
    "Big5 common": ("big5", range(0xA4, 0xC7), [*range(0x40, 0x7F), *range(0xA1, 0xFF)]),
    "KS X 1001 hanja": ("euc_kr", range(0xCA, 0xFE), range(0xA1, 0xFF)),
}
_UNIFIED_IDEOGRAPHS = range(0x4E00, 0xA000)


def standard_characters(standard: str) -> set[int]:
    """The code points of a standard's Han characters (a key of `_STANDARDS`)."""
    codec, leads, trails = _STANDARDS[standard]
    found = set()
    for lead in leads:
        for trail in trails:
            try:
                char = bytes([lead, trail]).decode(codec)
            except UnicodeDecodeError:
                continue
            if len(char) == 1 and ord(char) in _UNIFIED_IDEOGRAPHS:
                found.add(ord(char))
    return found


def han_classes() -> list[int]:
    """The sorted code points of the dataset's candidate characters (10,563).

    Example:
      >>> classes = han_classes()
      >>> len(classes), chr(classes[0])
      (10563, '一')
    """
    return sorted(set().union(*(standard_characters(s) for s in _STANDARDS)))


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What a builder config of `cjk_glyphs` renders and how it splits it."""

    packages: str  # a key of font_packages.PACKAGE_SETS
    heldout_classes: int
    pairs_per_fold: int
    max_classes: int | None = None  # training + held-out; None: every class that qualifies
    min_glyphs: int = 10
    min_families: int = 3
    # A face that maps less than this fraction of the characters rendered is not used (500 of
    # the 10,563): a Hangul or kana font with a few hundred hanja is not a CJK typeface.
    face_min_coverage: float = 0.05
    test_fraction: float = 0.1
    image_size: int = 32
    num_folds: int = 10


OPTIONS = {
    "full": BuildOptions("full", heldout_classes=1000, pairs_per_fold=600),
    "lean": BuildOptions("lean", heldout_classes=100, pairs_per_fold=100, max_classes=600,
                         min_glyphs=5),
}


@dataclasses.dataclass
class Glyphs:
    """The distinct glyphs of all faces, one entry per glyph."""

    codepoints: list[int] = dataclasses.field(default_factory=list)
    faces: list[int] = dataclasses.field(default_factory=list)  # index into the faces list
    pngs: list[bytes] = dataclasses.field(default_factory=list)
    pixel_sums: list[float] = dataclasses.field(default_factory=list)
    pixel_square_sums: list[float] = dataclasses.field(default_factory=list)


def probe_characters(count: int = 64) -> list[int]:
    """Characters of all four standards, evenly spaced: the sample that compares two faces."""
    common = sorted(set.intersection(*(standard_characters(s) for s in _STANDARDS)))
    return common[:: len(common) // count][:count]


def render_glyphs(faces: Sequence[font_packages.Face], folders: dict[str, pathlib.Path],
                  codepoints: Sequence[int], *, size: int = 32, min_characters: int = 500,
                  processes: int | None = None, log: Callable[[str], None] = print
                  ) -> tuple[Glyphs, list[dict]]:
    """Renders every face's characters in parallel and keeps the distinct, good glyphs.

    Args:
      faces: the faces, in the order that decides which of two identical glyphs is kept.
      folders: {package: unpacked folder}.
      codepoints: the characters wanted.
      size: the image side.
      min_characters: a face that maps fewer of `codepoints` is not used.
      processes: worker processes (default: the CPU count).
      log: progress lines.

    Returns:
      (the kept glyphs, one report per face: its counts, its family after merging shared
      designs, and, if dropped, why).
    """
    probes = probe_characters()
    tasks = [(str(folders[f.package] / f.path), f.index, list(codepoints), size, probes)
             for f in faces]
    glyphs, reports, face_probes = Glyphs(), [], []
    seen: set[tuple[int, bytes]] = set()
    # spawn: the parent may have JAX's threads running (data prepared on first use by a run),
    # which a fork would copy in an unknown state.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes or os.cpu_count()) as pool:
        for number, (face, drawn) in enumerate(
                zip(faces, pool.imap(glyph_render.render_face_encoded, tasks)), 1):
            report = {"face": face.id, "name": face.name, "family": face.family,
                      "covered": drawn.covered, "blank": drawn.blank,
                      "placeholder": drawn.placeholder, "failed": drawn.failed,
                      "kept": 0, "duplicates": 0, "dropped": _drop_reason(drawn, min_characters)}
            if report["dropped"] is None:
                for i, codepoint in enumerate(drawn.codepoints.tolist()):
                    key = (codepoint, drawn.digests[i])
                    if key in seen:
                        report["duplicates"] += 1
                        continue
                    seen.add(key)
                    glyphs.codepoints.append(codepoint)
                    glyphs.faces.append(len(reports))
                    glyphs.pngs.append(drawn.pngs[i])
                    glyphs.pixel_sums.append(float(drawn.pixel_sums[i]))
                    glyphs.pixel_square_sums.append(float(drawn.pixel_square_sums[i]))
                    report["kept"] += 1
            reports.append(report)
            face_probes.append(drawn.probes if report["dropped"] is None else {})
            if number % 25 == 0 or number == len(faces):
                log(f"rendered {number}/{len(faces)} faces, {len(glyphs.pngs)} distinct glyphs")
    merge_shared_designs(reports, face_probes)
    return glyphs, reports


def _drop_reason(drawn: glyph_render.EncodedFace, min_characters: int) -> str | None:
    if drawn.covered < min_characters:
        return f"maps {drawn.covered} < {min_characters} characters"
    if drawn.placeholder > FACE_MAX_PLACEHOLDER_FRACTION * drawn.covered:
        return f"{drawn.placeholder} of {drawn.covered} mapped characters drawn as placeholders"
    if drawn.blank + drawn.failed > FACE_MAX_BLANK_FRACTION * drawn.covered:
        return (f"{drawn.blank + drawn.failed} of {drawn.covered} mapped characters blank or "
                "FreeType errors")
    return None


def merge_shared_designs(reports: list[dict], face_probes: list[dict[int, np.ndarray]],
                         *, min_common: int = 16) -> list[tuple[str, str, float]]:
    """Merges the families of faces that draw the same design (see the module doc, step 5).

    Two faces of different families whose common probe glyphs are near-identical
    (`NEAR_IDENTICAL`) for at least `SHARED_DESIGN_FRACTION` of them join their families; the
    merged family takes the alphabetically first name. Updates each report's "family" in place
    (its package's family stays in "package_family").

    Returns:
      The merges: (family, family, fraction of near-identical probes).
    """
    parent: dict[str, str] = {}

    def root(family: str) -> str:
        while parent.get(family, family) != family:
            family = parent[family]
        return family

    merges = []
    for i, first in enumerate(face_probes):
        for j in range(i + 1, len(face_probes)):
            a, b = root(reports[i]["family"]), root(reports[j]["family"])
            common = sorted(first.keys() & face_probes[j].keys())
            if a == b or len(common) < min_common:
                continue
            differences = [np.abs(first[c].astype(np.int16) - face_probes[j][c]).mean()
                           for c in common]
            fraction = float(np.mean(np.asarray(differences) < NEAR_IDENTICAL))
            if fraction >= SHARED_DESIGN_FRACTION:
                parent[max(a, b)] = min(a, b)
                merges.append((reports[i]["family"], reports[j]["family"], fraction))
    for report in reports:
        report["package_family"] = report["family"]
        report["family"] = root(report["family"])
    return merges


@dataclasses.dataclass
class Layout:
    """How the glyphs become classes, splits and pairs."""

    classes: list[int]  # code point of each label: the training classes, then the held-out ones
    num_train_classes: int
    labels: np.ndarray  # int64 [glyphs]: the label of each glyph (-1: its class is not used)
    splits: dict[str, np.ndarray]  # split -> glyph indices in record order
    pairs: verification_pairs.Pairs


def lay_out(glyphs: Glyphs, reports: list[dict], options: BuildOptions, candidates: Sequence[int]
            ) -> Layout:
    """Chooses the classes, splits the glyphs and draws the held-out pairs (see the module doc).

    Args:
      glyphs: the distinct glyphs.
      reports: the face reports of `render_glyphs` (for each glyph's family).
      options: the builder config's options.
      candidates: the characters in their shuffled order (`SEED`).

    Raises:
      ValueError: too few characters qualify for the held-out classes and a training class.
    """
    codepoints = np.asarray(glyphs.codepoints, np.int64)
    family_names = sorted({r["family"] for r in reports})
    family_of_face = np.array([family_names.index(r["family"]) for r in reports], np.int64)
    families = family_of_face[np.asarray(glyphs.faces, np.int64)] if glyphs.faces else np.zeros(
        0, np.int64)
    grouped: dict[int, list[int]] = {}
    for index, codepoint in enumerate(codepoints.tolist()):
        grouped.setdefault(codepoint, []).append(index)
    # Within a class, the glyphs in the faces' order (their index order).
    members = {c: np.asarray(indices, np.int64) for c, indices in grouped.items()}
    qualified = [c for c in candidates
                 if len(members.get(c, ())) >= options.min_glyphs
                 and len(np.unique(families[members[c]])) >= options.min_families]
    if options.max_classes is not None:
        qualified = qualified[: options.max_classes]
    if len(qualified) <= options.heldout_classes:
        raise ValueError(f"{len(qualified)} characters have >= {options.min_glyphs} glyphs from "
                         f">= {options.min_families} families; {options.heldout_classes} are "
                         "held out and at least one must be left to train on")
    heldout, training = qualified[: options.heldout_classes], qualified[options.heldout_classes:]
    classes = training + heldout
    labels = np.full(len(codepoints), -1, np.int64)
    rng = np.random.default_rng(SEED)
    train, test = [], []
    for label, codepoint in enumerate(classes):
        chosen = members[codepoint]
        labels[chosen] = label
        if label < len(training):
            count = max(1, round(options.test_fraction * len(chosen)))
            is_test = np.zeros(len(chosen), bool)
            is_test[rng.choice(len(chosen), count, replace=False)] = True
            train.append(chosen[~is_test])
            test.append(chosen[is_test])
    heldout_glyphs = np.concatenate([members[c] for c in heldout])
    pairs = verification_pairs.sample_pairs(
        labels[heldout_glyphs], families[heldout_glyphs], num_folds=options.num_folds,
        pairs_per_fold=options.pairs_per_fold, seed=SEED, split="heldout")
    return Layout(classes=classes, num_train_classes=len(training), labels=labels,
                  splits={"train": np.concatenate(train), "test": np.concatenate(test),
                          "heldout": heldout_glyphs},
                  pairs=pairs)


def candidate_characters(options: BuildOptions) -> list[int]:
    """The characters to render, in the shuffled order that decides the classes' roles."""
    order = np.random.default_rng(SEED).permutation(han_classes()).tolist()
    if options.max_classes is None:
        return order
    # A margin over max_classes for the characters that fail the glyph and family counts.
    return order[: math.ceil(1.5 * options.max_classes)]


@dataclasses.dataclass
class Build:
    glyphs: Glyphs
    faces: list[font_packages.Face]
    layout: Layout
    record: dict


def build(config: str, cache_dir: os.PathLike | str, *, processes: int | None = None,
          log: Callable[[str], None] = print, packages: Sequence[str] | None = None,
          options: BuildOptions | None = None) -> Build:
    """Fetches the fonts, renders the glyphs and lays out the dataset of a builder config.

    Args:
      config: "full" or "lean" (a key of `OPTIONS`).
      cache_dir: where the .deb files are downloaded and unpacked.
      processes: rendering processes (default: the CPU count).
      log: progress lines.
      packages: the packages to use instead of the config's (for tests); with `folders` already
        unpacked in `cache_dir` they are not downloaded.
      options: options instead of the config's (for tests).

    Returns:
      The glyphs, faces, layout and the build record (written as build.json).
    """
    options = options or OPTIONS[config]
    packages = list(packages or font_packages.PACKAGE_SETS[options.packages])
    start, cpu_start = time.perf_counter(), time.process_time()
    folders = font_packages.fetch(packages, cache_dir)
    fetched = time.perf_counter() - start
    faces = font_packages.all_faces(folders, packages)
    log(f"{len(packages)} packages, {len(faces)} faces in {cache_dir}")
    candidates = candidate_characters(options)
    render_start = time.perf_counter()
    glyphs, reports = render_glyphs(faces, folders, candidates, size=options.image_size,
                                    min_characters=math.ceil(
                                        options.face_min_coverage * len(candidates)),
                                    processes=processes, log=log)
    render_seconds = time.perf_counter() - render_start
    layout = lay_out(glyphs, reports, options, candidates)
    record = build_record(config, options, folders, reports, glyphs, layout,
                          fetch_seconds=fetched, render_seconds=render_seconds,
                          parent_cpu_seconds=time.process_time() - cpu_start,
                          processes=processes or os.cpu_count())
    return Build(glyphs, faces, layout, record)


def build_record(config: str, options: BuildOptions, folders: dict[str, pathlib.Path],
                 reports: list[dict], glyphs: Glyphs, layout: Layout, **timing) -> dict:
    """What build.json says of a build: sources, licences, counts and times."""
    train = layout.splits["train"]
    pixels = options.image_size ** 2
    mean = float(np.sum(np.asarray(glyphs.pixel_sums)[train]) / (len(train) * pixels))
    square = float(np.sum(np.asarray(glyphs.pixel_square_sums)[train]) / (len(train) * pixels))
    per_class = np.bincount(layout.labels[layout.labels >= 0])
    kept_faces = [r for r in reports if r["dropped"] is None and r["kept"]]
    return {
        "dataset": "cjk_glyphs", "config": config, "options": dataclasses.asdict(options),
        "num_classes": layout.num_train_classes,
        "heldout_classes": len(layout.classes) - layout.num_train_classes,
        "classes": "".join(chr(c) for c in layout.classes),
        "class_standards": list(_STANDARDS),
        "examples": {split: len(indices) for split, indices in layout.splits.items()},
        "glyphs_per_class": {"min": int(per_class.min()), "median": float(np.median(per_class)),
                             "max": int(per_class.max())},
        "distinct_glyphs": len(glyphs.pngs),
        "faces_rendered": len(reports), "faces_kept": len(kept_faces),
        "families_kept": len({r["family"] for r in kept_faces}),
        "merged_families": {r["package_family"]: r["family"] for r in reports
                            if r["package_family"] != r["family"]},
        "pairs": {"count": len(layout.pairs), "folds": layout.pairs.num_folds,
                  "same": int(layout.pairs.same.sum())},
        "train_mean": mean, "train_std": math.sqrt(max(square - mean * mean, 0.0)),
        "packages": {p: {"version": font_packages.package_version(folder),
                         "licence": font_packages.licence(p, folder),
                         "family": font_packages.family_of(p)}
                     for p, folder in sorted(folders.items())},
        "faces": reports, "seed": SEED, **timing,
    }


def builder_class():
    """The TFDS builder of `cjk_glyphs` (defined on demand: importing TFDS costs seconds)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    class CjkGlyphs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Han characters (classes) in Debian's typefaces (examples); see train/cjk_glyphs.py."""

        name = "cjk_glyphs"
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release."}
        BUILDER_CONFIGS = [
            tfds.core.BuilderConfig(name="full", description="Every Debian CJK font package."),
            tfds.core.BuilderConfig(name="lean", description="14 small packages, 600 classes."),
        ]
        cache_dir: str | None = None  # default: <data_dir>/downloads/cjk_fonts
        processes: int | None = None
        packages: Sequence[str] | None = None  # for tests: instead of the config's
        options: BuildOptions | None = None  # for tests: instead of the config's

        def _info(self):
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(32, 32, 1)),
                    "label": tfds.features.ClassLabel(),  # names: the characters
                    "family": tfds.features.Text(),
                    "face": tfds.features.Text(),
                }),
                supervised_keys=("image", "label"),
                homepage="https://packages.debian.org/search?keywords=fonts-",
                disable_shuffling=True,  # record i of a split is the i-th example written
                license="Each typeface's own licence (Debian main; build.json names them).",
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            cache = self.cache_dir or os.path.join(os.path.dirname(os.path.dirname(
                os.path.dirname(self.data_dir))), "downloads", "cjk_fonts")
            built = build(self.builder_config.name, cache, processes=self.processes,
                          packages=self.packages, options=self.options)
            self.info.features["label"].names = [chr(c) for c in built.layout.classes]
            # self.data_dir is the folder being written: these land with the records, atomically.
            folder = pathlib.Path(self.data_dir)
            (folder / "build.json").write_text(json.dumps(built.record, indent=1,
                                                          ensure_ascii=False))
            verification_pairs.save_pairs(built.layout.pairs, folder)
            for split in SPLITS:  # the labels without reading every record (input_pipeline)
                np.save(folder / f"labels-{split}.npy",
                        built.layout.labels[built.layout.splits[split]].astype(np.int32))
            return {split: self._generate_examples(built, split) for split in SPLITS}

        def _generate_examples(self, built, split):
            glyphs, layout = built.glyphs, built.layout
            for key, index in enumerate(layout.splits[split].tolist()):
                face = built.faces[glyphs.faces[index]]
                yield key, {"image": glyphs.pngs[index], "label": int(layout.labels[index]),
                            "family": face.family, "face": face.id}

    return CjkGlyphs
