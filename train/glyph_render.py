"""Renders the Han characters of one typeface into small grayscale images, dropping bad glyphs.

Each glyph is drawn by FreeType (through Pillow) at a 64-pixel em, cropped to its ink, scaled
(keeping its aspect ratio) so that its longer side spans `size - 2 * margin` pixels, and centred
on a black `size x size` canvas: white ink on black, uint8. Normalising position and scale this
way makes two faces' glyphs comparable pixel by pixel, and it turns byte-identical outlines in
two fonts (renamed copies of one design) into byte-identical images that `train/cjk_glyphs.py`
merges.

Only characters in the face's character map are drawn (outside it Pillow would draw the font's
placeholder box). Of those, a glyph is dropped when it is

  blank        no ink at all (the face maps the code point to an empty glyph), or
  placeholder  the same image as that of another character of the face (a box, a question mark
               or a shared fallback glyph standing in for characters the face does not draw).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

EM_PIXELS = 64  # the rendering size before scaling down: enough for smooth 32x32 anti-aliasing


@dataclasses.dataclass
class FaceGlyphs:
    """The glyphs one face drew well, and the counts of those it did not."""

    codepoints: np.ndarray  # int32 [n]
    images: np.ndarray  # uint8 [n, size, size]
    covered: int  # characters of the requested set in the face's character map
    blank: int
    placeholder: int
    failed: int  # FreeType raised on the character


def load_font(path: os.PathLike | str, index: int = 0):
    """The Pillow FreeType font of a face at the rendering size."""
    from PIL import ImageFont  # pylint: disable=g-import-not-at-top

    # Basic layout: one code point is one glyph of the character map, with no shaping (and no
    # language-dependent substitution) in between.
    return ImageFont.truetype(str(path), EM_PIXELS, index=index,
                              layout_engine=ImageFont.Layout.BASIC)


def character_map(path: os.PathLike | str, index: int = 0) -> set[int]:
    """The code points that a face's best Unicode character map covers."""
    from fontTools.ttLib import TTFont  # pylint: disable=g-import-not-at-top

    font = TTFont(str(path), fontNumber=index, lazy=True)
    try:
        return set(font.getBestCmap() or {})
    finally:
        font.close()


def render(font, char: str, *, size: int = 32, margin: int = 2) -> np.ndarray | None:
    """One character as a uint8 [size, size] image (ink 255 on 0), or None if it draws no ink.

    Args:
      font: a font from `load_font`.
      char: the character.
      size: the side of the square image.
      margin: pixels left free on each side of the glyph's longer extent.

    Returns:
      The image, or None for a blank glyph.

    Example:
      >>> font = load_font("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")  # doctest: +SKIP
      >>> render(font, "永").shape  # doctest: +SKIP
      (32, 32)
    """
    from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

    # Drawn around the middle of a canvas of two ems, so that no part of the glyph falls off.
    canvas = Image.new("L", (2 * EM_PIXELS, 2 * EM_PIXELS))
    ImageDraw.Draw(canvas).text((EM_PIXELS, EM_PIXELS), char, font=font, fill=255, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return None
    ink = canvas.crop(box)
    width, height = ink.size
    scale = (size - 2 * margin) / max(height, width)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    glyph = ink.resize((new_width, new_height), Image.Resampling.LANCZOS)
    image = Image.new("L", (size, size))
    image.paste(glyph, ((size - new_width) // 2, (size - new_height) // 2))
    return np.asarray(image)


def render_face(path: os.PathLike | str, index: int, codepoints, *, size: int = 32
                ) -> FaceGlyphs:
    """Renders the requested code points that a face maps, dropping blanks and placeholders.

    Args:
      path: the font file.
      index: the face's index in the file (0 unless a collection).
      codepoints: the code points wanted (ints); the result keeps their order.
      size: the image side.

    Returns:
      The good glyphs and the counts of the dropped ones.
    """
    covered = character_map(path, index)
    wanted = [int(c) for c in codepoints if int(c) in covered]
    font = load_font(path, index)
    drawn: list[tuple[int, np.ndarray]] = []
    blank = failed = 0
    for codepoint in wanted:
        try:
            image = render(font, chr(codepoint), size=size)
        except Exception:  # pylint: disable=broad-except
            failed += 1  # FreeType's errors on a broken outline; the glyph is simply absent
            continue
        if image is None:
            blank += 1
        else:
            drawn.append((codepoint, image))
    # A picture that the face draws for two different characters stands for neither.
    counts: dict[bytes, int] = {}
    for _, image in drawn:
        counts[image.tobytes()] = counts.get(image.tobytes(), 0) + 1
    kept = [(c, image) for c, image in drawn if counts[image.tobytes()] == 1]
    return FaceGlyphs(
        codepoints=np.array([c for c, _ in kept], np.int32),
        images=(np.stack([image for _, image in kept]) if kept
                else np.zeros((0, size, size), np.uint8)),
        covered=len(wanted), blank=blank, placeholder=len(drawn) - len(kept), failed=failed)


@dataclasses.dataclass
class EncodedFace:
    """A face's good glyphs as PNG bytes, with the digests that identify identical images."""

    codepoints: np.ndarray  # int32 [n]
    digests: list[bytes]  # sha1 of each raw image
    pngs: list[bytes]
    covered: int
    blank: int
    placeholder: int
    failed: int
    pixel_sums: np.ndarray  # float64 [n]: each glyph's sum of pixels, and of their squares
    pixel_square_sums: np.ndarray  # (for the training split's mean and standard deviation)
    probes: dict[int, np.ndarray]  # the images of the requested probe characters it drew


def render_face_encoded(task: tuple[str, int, list[int], int, list[int]]) -> EncodedFace:
    """`render_face` for a worker process: PNG-encoded glyphs, and the raw images of probes.

    Args:
      task: (path, index, codepoints, size, probe code points).

    Encoding in the worker keeps the parent's memory at the PNG bytes of the kept glyphs.
    """
    import hashlib  # pylint: disable=g-import-not-at-top

    from train import prepare_data  # pylint: disable=g-import-not-at-top

    path, index, codepoints, size, probes = task
    glyphs = render_face(path, index, codepoints, size=size)
    wanted = set(probes)
    pixels = glyphs.images.reshape(len(glyphs.images), size * size).astype(np.float64)
    return EncodedFace(
        codepoints=glyphs.codepoints,
        digests=[hashlib.sha1(image.tobytes()).digest() for image in glyphs.images],
        pngs=[prepare_data.encode_png(image[..., None]) for image in glyphs.images],
        covered=glyphs.covered, blank=glyphs.blank, placeholder=glyphs.placeholder,
        failed=glyphs.failed, pixel_sums=pixels.sum(axis=1),
        pixel_square_sums=np.square(pixels).sum(axis=1),
        probes={int(c): image for c, image in zip(glyphs.codepoints, glyphs.images)
                if int(c) in wanted})
