"""Debian's CJK font packages: fetched without installing, their faces and their licences.

The many-class dataset `cjk_glyphs` (see `train/cjk_glyphs.py`) renders Han characters from the
typefaces in Debian's `fonts-*` packages. They are fetched into a cache folder with
`apt-get download` and unpacked with `dpkg-deb -x`: neither needs a system-wide install, and
both work offline wherever a Debian mirror is reachable (the registries these machines reach).

  FULL_PACKAGES   every package with a typeface covering >= 500 of the dataset's characters
                  (67 packages: 782 MB of .debs, 2.8 GB unpacked).
  LEAN_PACKAGES   small packages from 11 distinct families, for CI (14 packages: 39 MB of
                  .debs, 101 MB unpacked).

Each package's licence is read from `usr/share/doc/<package>/copyright` inside the package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence

# Packages whose faces share one design are one family: a positive verification pair must be
# drawn from two different families, never from two weights or regional cuts of one design.
# The family of a package is its name unless listed here.
_FAMILY_OF_PACKAGE = {
    "fonts-noto-cjk-extra": "fonts-noto-cjk",
    "fonts-nanum-extra": "fonts-nanum",
    "fonts-nanum-eco": "fonts-nanum",
    "fonts-unfonts-extra": "fonts-unfonts-core",
    "fonts-umeplus-cl": "fonts-umefont",  # Ume's kanji, like fonts-umeplus
    "fonts-takao-gothic": "fonts-ipafont",  # Takao is IPA's outlines renamed
    "fonts-takao-mincho": "fonts-ipafont",
    "fonts-ipafont-gothic": "fonts-ipafont",
    "fonts-ipafont-mincho": "fonts-ipafont",
    "fonts-ipaexfont-gothic": "fonts-ipafont",  # IPAex derives from IPA
    "fonts-ipaexfont-mincho": "fonts-ipafont",
    "fonts-ipamj-mincho": "fonts-ipafont",  # 95% of its glyphs within 3/255 of IPA Mincho's
    "fonts-monapo": "fonts-ipafont",  # IPA P Gothic's kanji with Mona's other glyphs
    "fonts-yozvox-yozfont-antique": "fonts-yozvox-yozfont",
    "fonts-yozvox-yozfont-cute": "fonts-yozvox-yozfont",
    "fonts-yozvox-yozfont-edu": "fonts-yozvox-yozfont",
    "fonts-yozvox-yozfont-new-kana": "fonts-yozvox-yozfont",
    "fonts-yozvox-yozfont-standard-kana": "fonts-yozvox-yozfont",
    "fonts-cwtex-fs": "fonts-cwtex",
    "fonts-cwtex-heib": "fonts-cwtex",
    "fonts-cwtex-kai": "fonts-cwtex",
    "fonts-cwtex-ming": "fonts-cwtex",
    "fonts-cwtex-yen": "fonts-cwtex",
    "fonts-arphic-ukai": "fonts-arphic",
    "fonts-arphic-uming": "fonts-arphic",
    "fonts-arphic-bkai00mp": "fonts-arphic",
    "fonts-arphic-bsmi00lp": "fonts-arphic",
    "fonts-arphic-gbsn00lp": "fonts-arphic",
    "fonts-arphic-gkai00mp": "fonts-arphic",
    "fonts-sawarabi-gothic": "fonts-sawarabi",
    "fonts-sawarabi-mincho": "fonts-sawarabi",
    "fonts-motoya-l-cedar": "fonts-motoya",
    "fonts-motoya-l-maruberi": "fonts-motoya",
    "fonts-mmcedar": "fonts-motoya",  # Motoya L Cedar with M+ kana
    "fonts-cns11643-kai": "fonts-cns11643",
    "fonts-cns11643-sung": "fonts-cns11643",
    "fonts-aoyagi-kouzan-t": "fonts-aoyagi",
    "fonts-aoyagi-soseki": "fonts-aoyagi",
    "fonts-kouzan-mouhitsu": "fonts-aoyagi",  # the same calligrapher's brush fonts
    "fonts-horai-umefont": "fonts-umefont",
    "fonts-umeplus": "fonts-umefont",  # Ume's kanji with M+ kana
    "fonts-komatuna": "fonts-konatu",  # Konatu's kanji with M+ kana
    "fonts-migmix": "fonts-vlgothic",  # both carry the older M+ kanji (97% near-identical)
    "fonts-ricty-diminished": "fonts-mplus",  # Circle M+ 1m's kanji
    "fonts-lxgw-wenkai": "fonts-klee",  # LXGW WenKai is derived from Klee One
    "fonts-babelstone-han": "fonts-arphic",  # BabelStone Han builds on the AR PL fonts
    "fonts-naver-d2coding": "fonts-nanum",  # the same foundry's hanja
}

# Every Debian package (bookworm) with a face that covers >= 500 of the 10,563 characters, less
# those that draw something other than the character at 32x32: fonts-misaki (an 8x8 bitmap design)
# and fonts-kanjistrokeorders (stroke-order numbers drawn over the character).
FULL_PACKAGES: tuple[str, ...] = (
    "fonts-alee", "fonts-aoyagi-kouzan-t", "fonts-aoyagi-soseki", "fonts-arphic-bkai00mp",
    "fonts-arphic-bsmi00lp", "fonts-arphic-gbsn00lp", "fonts-arphic-gkai00mp",
    "fonts-arphic-ukai", "fonts-arphic-uming", "fonts-babelstone-han", "fonts-baekmuk",
    "fonts-cns11643-kai", "fonts-cns11643-sung", "fonts-cwtex-fs", "fonts-cwtex-heib",
    "fonts-cwtex-kai", "fonts-cwtex-ming", "fonts-cwtex-yen", "fonts-dejima-mincho",
    "fonts-hanazono", "fonts-horai-umefont", "fonts-ipaexfont-gothic", "fonts-ipaexfont-mincho",
    "fonts-ipafont-gothic", "fonts-ipafont-mincho", "fonts-ipamj-mincho", "fonts-kiloji",
    "fonts-klee", "fonts-komatuna", "fonts-konatu", "fonts-kouzan-mouhitsu",
    "fonts-lxgw-wenkai", "fonts-migmix", "fonts-mmcedar", "fonts-mona", "fonts-monapo",
    "fonts-motoya-l-cedar", "fonts-motoya-l-maruberi", "fonts-mplus", "fonts-nanum",
    "fonts-nanum-eco", "fonts-nanum-extra", "fonts-naver-d2coding", "fonts-noto-cjk",
    "fonts-noto-cjk-extra", "fonts-oradano-mincho-gsrr", "fonts-reggae",
    "fonts-ricty-diminished", "fonts-sawarabi-gothic", "fonts-sawarabi-mincho", "fonts-seto",
    "fonts-smiley-sans", "fonts-takao-gothic", "fonts-takao-mincho", "fonts-umeplus",
    "fonts-umeplus-cl", "fonts-unfonts-core", "fonts-unfonts-extra", "fonts-vlgothic",
    "fonts-woowa-bm", "fonts-wqy-microhei", "fonts-wqy-zenhei", "fonts-yozvox-yozfont-antique",
    "fonts-yozvox-yozfont-cute", "fonts-yozvox-yozfont-edu", "fonts-yozvox-yozfont-new-kana",
    "fonts-yozvox-yozfont-standard-kana",
)

# Small packages from distinct foundries: a real (if narrow) version of the dataset that CI
# fetches and renders in 10-40 s on 2 CPU cores.
LEAN_PACKAGES: tuple[str, ...] = (
    "fonts-arphic-bkai00mp", "fonts-arphic-gbsn00lp", "fonts-ipafont-gothic",
    "fonts-ipafont-mincho", "fonts-wqy-microhei", "fonts-vlgothic", "fonts-motoya-l-cedar",
    "fonts-cwtex-kai", "fonts-cwtex-ming", "fonts-smiley-sans", "fonts-dejima-mincho",
    "fonts-mona", "fonts-sawarabi-gothic", "fonts-konatu",
)

PACKAGE_SETS: dict[str, tuple[str, ...]] = {"full": FULL_PACKAGES, "lean": LEAN_PACKAGES}

_FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked; the message says what failed."""


def family_of(package: str) -> str:
    """The design family of a package's faces (see `_FAMILY_OF_PACKAGE`)."""
    return _FAMILY_OF_PACKAGE.get(package, package)


def fetch(packages: Iterable[str], cache_dir: os.PathLike | str) -> dict[str, pathlib.Path]:
    """Downloads and unpacks Debian packages into `cache_dir`, without installing them.

    `<cache_dir>/debs/` keeps the .deb files, `<cache_dir>/<package>/` their contents. A package
    already unpacked is not fetched again.

    Args:
      packages: Debian package names.
      cache_dir: the cache folder (created if missing).

    Returns:
      {package: the folder it was unpacked into}.

    Raises:
      FetchError: `apt-get` or `dpkg-deb` is missing, or a package cannot be downloaded.
    """
    cache = pathlib.Path(cache_dir).expanduser()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    packages = list(dict.fromkeys(packages))
    missing = [p for p in packages if not (cache / p / ".unpacked").exists()]
    for tool in ("apt-get", "dpkg-deb") if missing else ():
        if shutil.which(tool) is None:
            raise FetchError(f"{tool} is not on PATH: the font packages need a Debian system")
    if missing:
        # One apt-get call for all: it resolves the versions once and downloads in one session.
        done = subprocess.run(["apt-get", "download", *missing], cwd=debs, capture_output=True,
                              text=True, check=False)
        if done.returncode:
            raise FetchError(
                f"apt-get download failed (exit {done.returncode}): "
                f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}; "
                "run `apt-get update` first if the package lists are missing")
    for package in missing:
        deb = _deb_of(debs, package)
        target = cache / package
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        (target / ".unpacked").write_text(deb.name + "\n")  # the marker that it is complete
    return {p: cache / p for p in packages}


def _deb_of(debs: pathlib.Path, package: str) -> pathlib.Path:
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise FetchError(f"apt-get download left no .deb of {package} in {debs}")
    return found[-1]


def package_version(folder: pathlib.Path) -> str:
    """The Debian version of an unpacked package (from the .deb's file name)."""
    name = (folder / ".unpacked").read_text().strip()  # <package>_<version>_<arch>.deb
    return name.split("_")[1].replace("%3a", ":")


@dataclasses.dataclass(frozen=True, order=True)
class Face:
    """One typeface: a font file (and index inside a collection) of a package."""

    package: str
    path: str  # relative to the package's folder
    index: int
    name: str  # the font's own family and style names, e.g. "Noto Sans CJK SC Bold"

    @property
    def family(self) -> str:
        return family_of(self.package)

    @property
    def id(self) -> str:
        return f"{self.package}/{pathlib.Path(self.path).name}#{self.index}"


def faces(package: str, folder: os.PathLike | str) -> list[Face]:
    """The faces of an unpacked package: each distinct font file, each face of a collection.

    Symbolic links and byte-identical copies of a file are skipped, so every face is listed once.
    """
    from fontTools.ttLib import TTCollection, TTFont  # pylint: disable=g-import-not-at-top

    folder = pathlib.Path(folder)
    seen, found = set(), []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix.lower() not in _FONT_SUFFIXES:
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        opened = None
        try:
            if path.suffix.lower() in (".ttc", ".otc"):
                opened = TTCollection(str(path), lazy=True)
                fonts = opened.fonts
            else:
                opened = TTFont(str(path), lazy=True)
                fonts = [opened]
            for index, font in enumerate(fonts):
                names = font["name"]
                name = f"{names.getBestFamilyName()} {names.getBestSubFamilyName()}"
                found.append(Face(package, str(path.relative_to(folder)), index, name))
        except Exception:  # pylint: disable=broad-except
            continue  # a file fontTools cannot parse is no face FreeType would render well
        finally:
            if opened is not None:
                opened.close()
    return found


def _licence_fields(text: str) -> list[str]:
    """The License: values of the stanzas of a DEP-5 copyright file, less those of debian/*."""
    licences = []
    for stanza in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*(.+)$", stanza, re.MULTILINE)
        licence = re.search(r"^License:\s*(.+)$", stanza, re.MULTILINE)
        if files and licence and not files.group(1).strip().startswith("debian/"):
            licences.append(licence.group(1).strip())
    return list(dict.fromkeys(licences))


def licence(package: str, folder: os.PathLike | str) -> str:
    """The licence of a package's files, from its `usr/share/doc/<package>/copyright`.

    The License fields of the stanzas that are not Debian's packaging, where the file is in the
    machine-readable (DEP-5) form; otherwise the licence's title line (e.g. "ARPHIC PUBLIC
    LICENSE"), or the first line that names a licence.
    """
    path = pathlib.Path(folder) / "usr/share/doc" / package / "copyright"
    if not path.exists():
        return "unknown (no copyright file)"
    text = path.read_text(errors="replace")
    fields = _licence_fields(text)
    if fields:
        return "; ".join(fields)
    lines = [line.strip() for line in text.splitlines()]
    for line in lines:
        if re.search(r"LICEN[CS]E", line) and line.upper() == line and len(line) < 80:
            return line
    for line in lines:
        if re.search(r"licen[cs]e", line, re.IGNORECASE) and len(line) > 8:
            return line
    return f"see usr/share/doc/{package}/copyright"


def licences(folders: dict[str, pathlib.Path]) -> dict[str, str]:
    """{package: licence} of unpacked packages."""
    return {package: licence(package, folder) for package, folder in sorted(folders.items())}


def all_faces(folders: dict[str, pathlib.Path], packages: Sequence[str] | None = None
              ) -> list[Face]:
    """The faces of the unpacked packages, in a canonical (sorted) order."""
    return sorted(face for p in (packages or sorted(folders)) for face in faces(p, folders[p]))
