"""What makes an image unusable, decided in one place for prepare, predict and every loader.

A bad file must never reach a training run: DALI's decoder stops the whole
pipeline on one ("Critical error in pipeline"), possibly hours in. So every
image is judged by the same rules, with the same words in rejected.csv:
`decode_check` decodes it fully (PIL, and torchvision.io for the formats the
torchvision backend decodes: a file must decode in every backend). The
reasons: "empty", "truncated", "not an image", "unreadable", "unsupported
bit depth".
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .shard_reading import ShardReader

# The extensions taken as images (by prepare's scan and by predict's folders).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
# Images of formats no backend reads: found as images (and rejected as such by predict), never read.
OTHER_IMAGE_EXTENSIONS = {".gif", ".webp", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".jpx", ".jxl", ".jfif",
                          ".jpe", ".apng", ".pbm", ".pgm", ".ppm", ".pnm", ".tga", ".psd", ".ico", ".svg",
                          ".exr", ".raw", ".dng", ".cr2", ".nef", ".qoi"}
# Those the torchvision backend decodes with torchvision.io (libjpeg-turbo, libpng) rather than PIL.
TORCHVISION_DECODES = {".jpg", ".jpeg", ".png"}

# PIL modes of more than 8 bits per channel, which no backend gets (square converts them).
WIDE_MODES = {"I;16": "16-bit grey", "I;16L": "16-bit grey", "I;16B": "16-bit grey", "I;16N": "16-bit grey",
              "I": "32-bit integer grey", "F": "32-bit float grey"}

# EXIF orientations that turn the picture a quarter: width and height swap
# once the orientation is applied, as DALI and the torchvision backend do.
QUARTER_TURNS = {5, 6, 7, 8}
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageCheck:
    """What decoding one file found: a problem (reason, detail), or its size as every loader sees it;
    and the sha256 of the bytes it decoded (empty when they could not be read)."""

    problem: tuple[str, str] | None
    width: int = 0
    height: int = 0
    sha256: str = ""


def inspect_image(path: str | os.PathLike) -> ImageCheck:
    """Decode one file fully: its size (EXIF orientation applied) and sha256, or why it is unusable.

    The file is read once: the digest is of exactly the bytes that were decoded.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:  # permissions, I/O errors
        return ImageCheck(("unreadable", str(error) or type(error).__name__))
    check = decode_check(path, data)
    return replace(check, sha256=hashlib.sha256(data).hexdigest())


def problem_at(path: str | os.PathLike, shards: ShardReader | None = None,
               position: int = 0) -> tuple[str, str] | None:
    """What is wrong with one image of a loader, or None: the loose file at `path`, or where `shards` are
    given, the member at `position` (`path` then its name, whose extension picks the decoders)."""
    if shards is None:
        return inspect_image(path).problem
    return decode_check(path, shards.read(position).tobytes()).problem


EMPTY = ("empty", "file has 0 bytes")


def _mode_problem(image: Image.Image) -> tuple[str, str] | None:
    if image.mode in WIDE_MODES:
        # The backends would read these differently (DALI scales 16 bits down to 8,
        # torchvision keeps uint16 or clips), so none of them gets one.
        return ("unsupported bit depth", f"{WIDE_MODES[image.mode]} (PIL mode {image.mode}); "
                                         f"convert to 8 bits, e.g. with `python -m planktonio square`")
    width, height = image.size
    if width < 1 or height < 1:
        return ("not an image", f"size {width}x{height}")
    return None


def _error_problem(error: Exception) -> tuple[str, str]:
    """The reason for what PIL raised opening or decoding an image."""
    if isinstance(error, UnidentifiedImageError):
        return ("not an image", "no known image format")
    detail = str(error) or type(error).__name__
    if "truncat" in detail.lower():  # PIL: "image file is truncated", "Truncated File Read"
        return ("truncated", detail)
    return ("unreadable", detail)


PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # UnidentifiedImageError: an OSError


def _upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS else (width, height)


def header_check(source) -> tuple[int, int, tuple[str, str] | None]:
    """(width, height, problem) from an image's header, without decoding it (a path or a file object): its
    size with the EXIF orientation applied, or why no loader can read it. Truncation shows only in decoding."""
    try:
        with Image.open(source) as image:
            problem = _mode_problem(image)
            if problem:
                return 0, 0, problem
            width, height = _upright_size(image)
    except PIL_ERRORS as error:
        return 0, 0, _error_problem(error)
    return width, height, None


def decode_check(path: str | os.PathLike, data: bytes) -> ImageCheck:
    """Decode `data` (the bytes of the file or member named `path`, whose extension picks the decoders)."""
    if not data:
        return ImageCheck(EMPTY)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: header checks alone miss truncation
            problem = _mode_problem(image)
            if problem:
                return ImageCheck(problem)
            width, height = _upright_size(image)
    except PIL_ERRORS as error:
        return ImageCheck(_error_problem(error))
    # libjpeg-turbo, through torchvision, refuses some corrupt JPEGs that PIL
    # decodes with a warning; the torchvision loader would then drop them.
    if Path(path).suffix.lower() in TORCHVISION_DECODES:
        import torch
        from torchvision.io import decode_image
        try:
            decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError as error:
            return ImageCheck(("unreadable", f"corrupt data: {str(error).splitlines()[0]}"))
    return ImageCheck(None, width, height)
