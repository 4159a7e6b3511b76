"""Images without labels, as `train predict` reads them: a folder, a list of paths, or tar shards.

- a folder: every image under it (nested folders allowed; the extensions
  `prepare` takes; hidden files left out); each folder that holds images
  directly is one *sample* (an instrument's bin, a station's cast);
- a text file (any other file): one image path per line, absolute or
  relative to the file's folder; samples are the images' folders;
- tar shards: a folder of `.tar` files in the webdataset layout (members
  `KEY.jpg`, ...), as `planktonio pack` writes them (its `shards/` folder);
  a member's name is its path, or the path pack's index recorded for it,
  and its sample that path's folder.

The work is cut into *units*, each written on its own by `train predict`:
a sample's images (at most UNIT_IMAGES of them; a larger sample is cut into
parts), a shard's, or for a list fixed chunks of UNIT_IMAGES. A unit's name
depends only on the input, so a rerun (or another task of a job array) finds
the units already done (and checks that they hold the same images).

Before anything is decoded, each image's header is read, in parallel: its
size (EXIF orientation applied), which the evaluation plans need, and the
files that are not 8-bit images at all (empty, text, 16-bit, not an image),
rejected there with the reason. One that breaks in decoding (truncated) is
found by the loader that decodes it. Nothing is decoded twice. docs/predict.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, UnidentifiedImageError

from .image_checks import EXIF_ORIENTATION, IMAGE_EXTENSIONS, QUARTER_TURNS, WIDE_MODES
from .errors import PlanktonioError

UNIT_IMAGES = 10_000  # the most images of one unit: a stop loses at most this much work


@dataclass(frozen=True)
class Unit:
    name: str    # for its files: the sample (percent-encoded) and the part, or the shard's name
    start: int   # positions [start, stop) of the catalog
    stop: int


class TarShards:
    """The image members of tar files, read by offset from memory maps (what the loaders call `shards`)."""

    def __init__(self, folder: Path, names: list[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
                 members: list[str]):
        self.directory, self.names, self.members = folder, names, members
        self.shard, self.offset, self.size = shard, offset, size
        self._maps: dict[int, np.memmap] = {}

    def read(self, position: int) -> np.ndarray:
        number = int(self.shard[position])
        if number not in self._maps:
            self._maps[number] = np.memmap(self.directory / self.names[number], dtype=np.uint8, mode="r")
        start = int(self.offset[position])
        return np.asarray(self._maps[number][start:start + int(self.size[position])])

    def describe(self, position: int) -> str:
        return f"{self.directory / self.names[int(self.shard[position])]}:{self.members[position]}"

    def __getstate__(self):  # worker processes open their own maps
        return {**self.__dict__, "_maps": {}}


@dataclass
class Catalog:
    """Every image of the input, in order, unit after unit."""

    source: Path
    root: Path                  # loose files: their paths are relative to it
    paths: list[str]            # as written in the outputs: relative to the source folder, or as listed
    samples: list[str]
    units: list[Unit]
    shards: TarShards | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def digest(self, unit: Unit) -> str:
        """sha256 of a unit's image paths: a finished unit's file is used again only for the same images."""
        return hashlib.sha256("\n".join(self.paths[unit.start:unit.stop]).encode()).hexdigest()


def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _sample_units(samples: list[str]) -> list[Unit]:
    """A unit per sample (its images are contiguous: sorted by sample), cut into parts of at most
    UNIT_IMAGES; named after the sample, percent-encoded, and the part."""
    units, start, part = [], 0, 0
    while start < len(samples):
        stop = start
        while stop < len(samples) and samples[stop] == samples[start] and stop - start < UNIT_IMAGES:
            stop += 1
        part = part + 1 if units and samples[units[-1].start] == samples[start] else 0
        units.append(Unit(f"{quote(samples[start], safe='')}.part{part:04d}", start, stop))
        start = stop
    return units


def _chunk_units(name: str, count: int) -> list[Unit]:
    """Fixed chunks of UNIT_IMAGES in order (a list of paths: its samples may be many and small)."""
    return [Unit(f"{name}.part{i // UNIT_IMAGES:04d}", i, min(i + UNIT_IMAGES, count))
            for i in range(0, count, UNIT_IMAGES)]


def discover(source: str | os.PathLike) -> Catalog:
    """The images of SRC (a folder, a list file, or a folder of tar shards), in a fixed order."""
    source = Path(source)
    if source.is_file():
        return _from_list(source)
    if not source.is_dir():
        raise PlanktonioError(f"--images {source}: no such file or folder")
    tars = sorted(p for p in source.iterdir() if p.suffix == ".tar" and p.is_file())
    if tars:
        return _from_shards(source, tars)
    paths = []
    for folder, subfolders, names in os.walk(source, onerror=_unreadable):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        paths += [Path(folder, name).relative_to(source).as_posix() for name in sorted(names) if _is_image(name)]
    if not paths:
        raise PlanktonioError(f"--images {source}: no images under it ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    samples = [os.path.dirname(p) or "." for p in paths]
    order = sorted(range(len(paths)), key=lambda i: (samples[i], paths[i]))  # a sample's images together
    paths, samples = [paths[i] for i in order], [samples[i] for i in order]
    return Catalog(source, source, paths, samples, _sample_units(samples))


def _unreadable(error: OSError):
    raise PlanktonioError(f"{error.filename}: cannot be read ({error.strerror}); fix its permissions")


def _from_list(listing: Path) -> Catalog:
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PlanktonioError(f"--images {listing}: cannot be read as a list of image paths ({error})") from None
    paths = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not paths:
        raise PlanktonioError(f"--images {listing}: lists no images (one path per line)")
    # Absolute paths stay so; relative ones are relative to the list's folder. The root is the filesystem's.
    absolute = [p if os.path.isabs(p) else str((listing.parent / p).resolve()) for p in paths]
    samples = [os.path.dirname(p) for p in absolute]
    order = sorted(range(len(paths)), key=lambda i: (samples[i], absolute[i]))
    absolute, samples = [absolute[i] for i in order], [samples[i] for i in order]
    return Catalog(listing, Path("/"), absolute, samples, _chunk_units(quote(listing.stem, safe=""), len(absolute)))


def _from_shards(folder: Path, tars: list[Path]) -> Catalog:
    """Every image member of the tars, shard after shard; names from pack's index where there is one."""
    recorded = {}
    for index_file in folder.glob("*.json"):  # pack's per-split index: the path each sample came from
        try:
            index = json.loads(index_file.read_text())
            for number, shard in enumerate(index["shards"]):
                recorded[shard["name"]] = [p for p, s in zip(index["path"], index["shard"]) if s == number]
        except (ValueError, KeyError, TypeError, OSError):
            continue
    names, shard, offset, size, members, paths, units = [], [], [], [], [], [], []
    for number, tar in enumerate(tars):
        try:
            with tarfile.open(tar) as archive:
                images = [m for m in archive.getmembers() if m.isfile() and _is_image(os.path.basename(m.name))]
        except (tarfile.TarError, OSError) as error:
            raise PlanktonioError(f"--images {tar}: not a readable tar file ({error})") from None
        start = len(paths)
        named = recorded.get(tar.name)
        for i, member in enumerate(images):
            shard.append(number)
            offset.append(member.offset_data)
            size.append(member.size)
            members.append(member.name)
            paths.append(named[i] if named and len(named) == len(images) else member.name)
        names.append(tar.name)
        units.append(Unit(tar.stem, start, len(paths)))
    if not paths:
        raise PlanktonioError(f"--images {folder}: its tar files hold no images")
    samples = [os.path.dirname(p) or "." for p in paths]
    shards = TarShards(folder, names, np.asarray(shard), np.asarray(offset), np.asarray(size), members)
    return Catalog(folder, folder, paths, samples, [u for u in units if u.stop > u.start], shards)


# ---------------------------------------------------------------- headers: sizes and the files that are not images


def peek(source) -> tuple[int, int, tuple[str, str] | None]:
    """(width, height, problem) from an image's header, without decoding it: its size with the EXIF
    orientation applied, or why no loader can read it (reason, detail) as `prepare` names them."""
    try:
        with Image.open(source) as image:
            width, height = image.size
            if image.mode in WIDE_MODES:
                why = (f"{WIDE_MODES[image.mode]} (PIL mode {image.mode}); convert to 8 bits, e.g. with "
                       f"`python -m planktonio square`")
                return 0, 0, ("unsupported bit depth", why)
            if image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS:
                width, height = height, width
    except UnidentifiedImageError:
        return 0, 0, ("not an image", "no known image format")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        detail = str(error) or type(error).__name__
        return 0, 0, ("truncated" if "truncat" in detail.lower() else "unreadable", detail)
    if width < 1 or height < 1:
        return 0, 0, ("not an image", f"size {width}x{height}")
    return width, height, None


def _peek_files(paths: list[str]) -> list[tuple[int, int, tuple[str, str] | None]]:
    out = []
    for path in paths:
        try:
            empty = os.path.getsize(path) == 0
        except OSError as error:
            out.append((0, 0, ("unreadable", error.strerror or type(error).__name__)))
            continue
        out.append((0, 0, ("empty", "file has 0 bytes")) if empty else peek(path))
    return out


def _peek_members(shards: TarShards, positions: list[int]):
    return [(0, 0, ("empty", "member has 0 bytes")) if not shards.size[p]
            else peek(io.BytesIO(shards.read(p).tobytes())) for p in positions]


def read_headers(catalog: Catalog, positions: np.ndarray, workers: int = 1):
    """Widths, heights (arrays over `positions`) and {position: (reason, detail)} of those no loader can
    read, from the images' headers, `workers` processes at a time."""
    positions = [int(p) for p in positions]
    size = max(1, min(512, len(positions) // max(workers * 8, 1) or 1))
    chunks = [positions[i:i + size] for i in range(0, len(positions), size)]
    if catalog.shards is not None:
        jobs = [(_peek_members, catalog.shards, chunk) for chunk in chunks]
    else:
        jobs = [(_peek_files, [str(catalog.root / catalog.paths[p]) for p in chunk]) for chunk in chunks]
    if workers <= 1 or len(jobs) <= 1:
        results = [r for job in jobs for r in job[0](*job[1:])]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = [r for done in pool.map(_call, jobs) for r in done]
    widths = np.asarray([r[0] for r in results], dtype=np.int64)
    heights = np.asarray([r[1] for r in results], dtype=np.int64)
    problems = {p: r[2] for p, r in zip(positions, results) if r[2] is not None}
    return widths, heights, problems


def _call(job):
    return job[0](*job[1:])
