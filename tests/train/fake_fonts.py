"""Tiny TrueType fonts made with fontTools, laid out like unpacked Debian packages.

`make_packages` writes folders that `train.font_packages.fetch` takes for already unpacked
packages (so nothing is downloaded): each holds one font file and a DEP-5 copyright file. A
character's glyph is a set of bars chosen by the character (so characters differ) drawn with a
stroke width and offset chosen by the font (so typefaces differ).
"""

import pathlib

from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen

UNITS = 1000


def _bars(pen, boxes):
    for x0, y0, x1, y1 in boxes:
        pen.moveTo((x0, y0))
        pen.lineTo((x0, y1))
        pen.lineTo((x1, y1))
        pen.lineTo((x1, y0))
        pen.closePath()


def _glyph_boxes(char_index: int, style: int):
    """Bars for the character's bits: horizontal bars at 4 heights, vertical at 4 places."""
    width = 60 + 40 * style  # the typeface's stroke
    shift = 30 * style
    boxes = [(100 + shift, 80, 900, 80 + width)]  # a base stroke every character has
    for bit in range(8):
        if (char_index + 1) >> bit & 1:
            if bit < 4:
                y = 250 + 170 * bit + shift // 2
                boxes.append((150 + shift, y, 850, y + width))
            else:
                x = 200 + 170 * (bit - 4) + shift
                boxes.append((x, 150, x + width, 880))
    return boxes


def make_font(path: pathlib.Path, family: str, codepoints, *, style: int, kind: str = "normal"):
    """Writes a TrueType font mapping `codepoints`.

    kind: "normal" (each character its own glyph), "blank" (empty glyphs) or "placeholder"
    (one box for every character).
    """
    names = [".notdef"] + [f"uni{c:04X}" for c in codepoints]
    builder = FontBuilder(UNITS, isTTF=True)
    builder.setupGlyphOrder(names)
    builder.setupCharacterMap({c: f"uni{c:04X}" for c in codepoints})
    glyphs = {}
    for index, name in enumerate(names):
        pen = TTGlyphPen(None)
        if name == ".notdef" or kind == "placeholder":
            _bars(pen, [(100, 0, 900, 900)])
        elif kind == "normal":
            _bars(pen, _glyph_boxes(index - 1, style))
        glyphs[name] = pen.glyph()
    builder.setupGlyf(glyphs)
    builder.setupHorizontalMetrics({name: (UNITS, 0) for name in names})
    builder.setupHorizontalHeader(ascent=900, descent=-100)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=900, sTypoDescender=-100, usWinAscent=900, usWinDescent=100)
    builder.setupPost()
    path.parent.mkdir(parents=True, exist_ok=True)
    builder.save(str(path))


COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: 2024 Test Foundry
License: OFL-1.1

Files: debian/*
Copyright: 2024 Debian
License: GPL-2+
"""


def make_packages(cache: pathlib.Path, codepoints, fonts) -> list[str]:
    """Writes unpacked fake packages into `cache`; returns their names.

    Args:
      cache: the font cache folder.
      codepoints: the characters every font maps.
      fonts: (package, style, kind) per package.
    """
    for package, style, kind in fonts:
        folder = cache / package
        make_font(folder / "usr/share/fonts/truetype" / package / f"{package}.ttf",
                  f"{package} Sans", codepoints, style=style, kind=kind)
        doc = folder / "usr/share/doc" / package
        doc.mkdir(parents=True, exist_ok=True)
        (doc / "copyright").write_text(COPYRIGHT)
        (folder / ".unpacked").write_text(f"{package}_1.0-1_all.deb\n")
    return [package for package, _, _ in fonts]
