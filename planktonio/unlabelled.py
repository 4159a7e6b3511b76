"""Images without labels, as `train predict` reads them: a folder, a list of paths, or tar shards.

- a folder: every image under it (nested folders and linked folders
  allowed; the extensions `prepare` takes; hidden files left out); each
  folder that holds images directly is one *sample* (an instrument's bin, a
  station's cast);
- a text file (any other file): one image path per line, absolute or
  relative to the file's folder; samples are the images' folders;
- tar shards: a folder of `.tar` files in the webdataset layout (members
  `KEY.jpg`, ...), as `planktonio pack` writes them (its `shards/` folder);
  a member's name is its path, or the path pack's index recorded for it,
  and its sample that path's folder.

Every image found is accounted for: read, or rejected with the reason. Some
are rejected as they are found (`Catalog.problems`): images of a format no
loader reads ("unsupported format": .gif, .webp, ...), names that are not
UTF-8 ("unsafe name", shown with \\xNN escapes), a path listed again
("duplicate path"), members lost in a damaged stretch of a shard ("damaged
shard": planktonio/shard_reading.py). They take their place in their sample
and unit like any image, so a sample's counts include them.

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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .errors import PlanktonioError
from .image_checks import EMPTY, IMAGE_EXTENSIONS, OTHER_IMAGE_EXTENSIONS, header_check
from .path_rules import NOT_UTF8, path_problem, shown
from .processes import end_with_parent
from .shard_reading import Damage, MemberMaps, scan_members

UNIT_IMAGES = 10_000  # the most images of one unit: a stop loses at most this much work


@dataclass(frozen=True)
class Unit:
    name: str    # for its files: the sample (percent-encoded) and the part, or the shard's name
    start: int   # positions [start, stop) of the catalog
    stop: int


class TarShards(MemberMaps):
    """The image members of tar files, read by offset from memory maps (what the loaders call `shards`)."""

    def __init__(self, folder: Path, names: list[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
                 members: list[str]):
        super().__init__(folder, names, shard, offset, size)
        self.members = members

    def describe(self, position: int) -> str:
        return f"{self.directory / self.names[int(self.shard[position])]}:{self.members[position]}"


@dataclass
class Catalog:
    """Every image of the input, in order, unit after unit."""

    source: Path
    root: Path                  # loose files: their paths are relative to it
    paths: list[str]            # as written in the outputs: relative to the source folder, or as listed
    samples: list[str]
    units: list[Unit]
    shards: TarShards | None = None
    # position -> (reason, detail) of the images rejected as they were found (read_headers reports them)
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def digest(self, unit: Unit) -> str:
        """sha256 of a unit's image paths: a finished unit's file is used again only for the same images."""
        return hashlib.sha256("\n".join(self.paths[unit.start:unit.stop]).encode()).hexdigest()


@dataclass(frozen=True)
class Found:
    """One image as found, before the catalog's order is set."""

    sample: str
    path: str                                 # printable: a name that is not UTF-8 shown escaped
    problem: tuple[str, str] | None = None


def _ordered(found: list[Found]) -> tuple[list[str], list[str], dict[int, tuple[str, str]]]:
    """Paths, samples and problems by position, a sample's images together (sorted by sample, then path)."""
    found = sorted(found, key=lambda f: (f.sample, f.path))
    return [f.path for f in found], [f.sample for f in found], \
        {p: f.problem for p, f in enumerate(found) if f.problem is not None}


def _name_problem(path: str, ext: str) -> tuple[str, str] | None:
    """Why an image found under this name is rejected before it is read, or None."""
    if path_problem(path) == NOT_UTF8:
        return ("unsafe name", "the name is not valid UTF-8 (shown with \\xNN escapes for the bytes that are "
                               "not); rename the file")
    if ext in OTHER_IMAGE_EXTENSIONS:
        return ("unsupported format", f"{ext} images are not read (only {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                      f"convert it, e.g. to PNG")
    return None


def _taken(name: str) -> bool:
    """A name found as an image: read, or rejected as an image of a format no loader reads."""
    ext = os.path.splitext(name)[1].lower()
    return not name.startswith(".") and (ext in IMAGE_EXTENSIONS or ext in OTHER_IMAGE_EXTENSIONS)


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
        raise PlanktonioError(f"--images {source}: no such file or folder; give a file of paths (one image a "
                              f"line) or a folder of images or of tar shards")
    tars = sorted(p for p in source.iterdir() if p.suffix == ".tar" and p.is_file())
    if tars:
        return _from_shards(source, tars)
    return _from_folder(source)


def _from_folder(source: Path) -> Catalog:
    """Every image under `source`, linked folders entered (each real folder once: a link back to a folder
    already walked is not followed again)."""
    found, walked = [], set()
    for folder, subfolders, names in os.walk(source, onerror=_unreadable, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in walked:
            subfolders[:] = []
            continue
        walked.add((status.st_dev, status.st_ino))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        prefix = Path(folder).relative_to(source).as_posix()
        for name in sorted(n for n in names if _taken(n)):
            path = name if prefix == "." else f"{prefix}/{name}"
            found.append(Found(shown(prefix), shown(path), _name_problem(path, os.path.splitext(name)[1].lower())))
    if not found:
        raise PlanktonioError(f"--images {source}: no images under it ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    paths, samples, problems = _ordered(found)
    return Catalog(source, source, paths, samples, _sample_units(samples), problems=problems)


def _unreadable(error: OSError):
    raise PlanktonioError(f"{error.filename}: cannot be read ({error.strerror}); fix its permissions")


def _from_list(listing: Path) -> Catalog:
    """The images a file lists: each path once (a path listed again is rejected as a duplicate)."""
    refused = f"--images {listing}: {{}}; give a file of paths (one image path a line) or a folder"
    if _taken(listing.name):
        raise PlanktonioError(refused.format("an image, not a list of images"))
    try:
        data = listing.read_bytes()
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "a NUL byte")
        lines = data.decode("utf-8").splitlines()
    except OSError as error:
        raise PlanktonioError(refused.format(f"cannot be read ({error.strerror})")) from None
    except UnicodeDecodeError:
        raise PlanktonioError(refused.format("not a text file of paths (not UTF-8 text)")) from None
    listed = [(number, line.strip()) for number, line in enumerate(lines, start=1)
              if line.strip() and not line.lstrip().startswith("#")]
    if not listed:
        raise PlanktonioError(f"--images {listing}: lists no images (one path per line)")
    # Absolute paths stay so; relative ones are relative to the list's folder. The root is the filesystem's.
    first_line: dict[str, int] = {}
    found = []
    for number, path in listed:
        absolute = path if os.path.isabs(path) else str((listing.parent / path).resolve())
        first = first_line.setdefault(os.path.normpath(absolute), number)
        problem = None if first == number else \
            ("duplicate path", f"listed again at line {number} of {listing.name} (first at line {first}): "
                               f"predicted once")
        found.append((os.path.dirname(absolute), absolute, number, problem))
    found.sort(key=lambda f: f[:3])
    paths, samples = [f[1] for f in found], [f[0] for f in found]
    problems = {p: f[3] for p, f in enumerate(found) if f[3] is not None}
    return Catalog(listing, Path("/"), paths, samples, _chunk_units(quote(listing.stem, safe=""), len(paths)),
                   problems=problems)


def _recorded_paths(folder: Path) -> dict[str, list[str]]:
    """shard name -> the paths its images came from, where an index of pack's lists them."""
    recorded = {}
    for index_file in folder.glob("*.json"):
        try:
            index = json.loads(index_file.read_text())
            for number, shard in enumerate(index["shards"]):
                recorded[shard["name"]] = [p for p, s in zip(index["path"], index["shard"]) if s == number]
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return recorded


def _from_shards(folder: Path, tars: list[Path]) -> Catalog:
    """Every image member of the tars, shard after shard, and every image lost in a damaged stretch of one;
    names from pack's index where there is one."""
    recorded = _recorded_paths(folder)
    names, shard, offset, size, members, paths, units, problems = [], [], [], [], [], [], [], {}
    for number, tar in enumerate(tars):
        try:
            found, damage = scan_members(tar)
        except (tarfile.TarError, OSError) as error:
            raise PlanktonioError(f"--images {tar}: not a readable tar file ({error}); remove it or write it "
                                  f"again") from None
        images = [m for m in found if m.isfile() and _taken(os.path.basename(m.name))]
        named = recorded.get(tar.name) if not damage else None
        entries = [(m.offset_data, m.size, shown(m.name),
                    named[i] if named and len(named) == len(images) else shown(m.name),
                    _name_problem(m.name, os.path.splitext(m.name)[1].lower())) for i, m in enumerate(images)]
        entries += [(at, 0, name, name, ("damaged shard", detail))
                    for at, name, detail in _lost_images(tar, found, images, damage)]
        start = len(paths)
        for at, length, member, path, problem in sorted(entries, key=lambda e: e[0]):
            if problem is not None:
                problems[len(paths)] = problem
            shard.append(number)
            offset.append(at)
            size.append(length)
            members.append(member)
            paths.append(path)
        names.append(tar.name)
        units.append(Unit(tar.stem, start, len(paths)))
    if not paths:
        raise PlanktonioError(f"--images {folder}: its tar files hold no images")
    samples = [os.path.dirname(p) or "." for p in paths]
    shards = TarShards(folder, names, np.asarray(shard), np.asarray(offset, dtype=np.int64),
                       np.asarray(size, dtype=np.int64), members)
    return Catalog(folder, folder, paths, samples, [u for u in units if u.stop > u.start], shards, problems)


def _key(name: str | None) -> str:
    """A member's webdataset key: its base name up to the first dot."""
    return os.path.basename(name).split(".", 1)[0] if name else ""


def _lost_images(tar: Path, found: list[tarfile.TarInfo], images: list[tarfile.TarInfo],
                 damage: list[Damage]) -> list[tuple[int, str, str]]:
    """(offset, name, detail) of what the damaged stretches of a tar lost: by key where the members have
    numbered keys (webdataset keys, as pack writes them: each key without its image is lost), and each
    stretch at the start or the end (what it held cannot be counted); else each stretch."""
    if not damage:
        return []
    where = ", ".join(f"{d.start}-{d.stop}" for d in damage)
    said = f"bytes {where} of {tar.name} hold no valid tar header (the shard is damaged): {{}}; the members " \
           f"after them were read"
    keys = [_key(m.name) for m in found]
    if not all(k.isascii() and k.isdigit() and len(k) == len(keys[0]) for k in keys):
        return [(d.start, f"{tar.name}:{d.start}-{d.stop}", said.format("the images stored there are lost"))
                for d in damage]
    numbers, with_image = [int(k) for k in keys], {int(_key(m.name)) for m in images}
    lost = [k for k in range(min(numbers), max(numbers) + 1) if k not in with_image]
    after = [(int(_key(d.after)) if d.after else max(numbers) + 1, d.start) for d in damage]
    lost_keys = [(min((start for key, start in after if key >= k), default=damage[-1].start), f"{k:0{len(keys[0])}d}",
                  said.format(f"the image of key {k:0{len(keys[0])}d} is lost")) for k in lost]
    ends = [(d.start, f"{tar.name}:{d.start}-{d.stop}", said.format("what was stored there before the first "
             "member read or after the last is lost")) for d in damage if d.before is None or d.after is None]
    return lost_keys + ends


# ---------------------------------------------------------------- headers: sizes and the files that are not images


def _peek_files(paths: list[str]) -> list[tuple[int, int, tuple[str, str] | None]]:
    out = []
    for path in paths:
        try:
            empty = os.path.getsize(path) == 0
        except OSError as error:
            out.append((0, 0, ("unreadable", error.strerror or type(error).__name__)))
            continue
        out.append((0, 0, EMPTY) if empty else header_check(path))
    return out


def _peek_members(shards: TarShards, positions: list[int]):
    return [(0, 0, ("empty", "member has 0 bytes")) if not shards.size[p]
            else header_check(io.BytesIO(shards.read(p).tobytes())) for p in positions]


# A job that carried the shards would pickle their whole member table each time (it grows with the catalog:
# 53 MiB a job at a million members), so each scan worker gets them once, when it starts, and a job carries
# its positions only.
_worker_shards: TarShards | None = None


def _start_scan_worker(parent: int, shards: TarShards | None) -> None:
    end_with_parent(parent)
    keep_shards(shards)


def keep_shards(shards: TarShards | None) -> None:
    """The shards this scan worker reads (handed over once, when it starts)."""
    global _worker_shards
    _worker_shards = shards


def _scan_members(positions: list[int]):
    return _peek_members(_worker_shards, positions)


def read_headers(catalog: Catalog, positions: np.ndarray, workers: int = 1, pool=ProcessPoolExecutor):
    """Widths, heights (arrays over `positions`) and {position: (reason, detail)} of those no loader can
    read: the images rejected as they were found, and those found so from their headers, `workers`
    processes at a time (`pool`: the executor class, for tests)."""
    positions = [int(p) for p in positions]
    problems = {p: catalog.problems[p] for p in positions if p in catalog.problems}
    todo = [p for p in positions if p not in problems]
    size = max(1, min(512, len(todo) // max(workers * 8, 1) or 1))
    chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
    if catalog.shards is not None:
        jobs, scan, here = chunks, _scan_members, partial(_peek_members, catalog.shards)
    else:
        jobs = [[str(catalog.root / catalog.paths[p]) for p in chunk] for chunk in chunks]
        scan = here = _peek_files
    if workers <= 1 or len(jobs) <= 1:
        results = [r for job in jobs for r in here(job)]
    else:
        with pool(max_workers=workers, initializer=_start_scan_worker,
                  initargs=(os.getpid(), catalog.shards)) as scanners:
            results = [r for done in scanners.map(scan, jobs) for r in done]
    found = dict(zip(todo, results))
    widths = np.asarray([found[p][0] if p in found else 0 for p in positions], dtype=np.int64)
    heights = np.asarray([found[p][1] if p in found else 0 for p in positions], dtype=np.int64)
    problems.update({p: r[2] for p, r in found.items() if r[2] is not None})
    return widths, heights, {p: problems[p] for p in positions if p in problems}
