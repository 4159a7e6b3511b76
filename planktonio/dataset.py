"""Dataset preparation: scan class folders, reject bad files, split, write manifests.

A bad file must never reach a training run: DALI's decoder stops the whole
pipeline on one ("Critical error in pipeline"), possibly hours in. So
`prepare` decodes every image once, up front and in parallel, writes each
rejected file with its reason to rejected.csv, and the manifests it writes
list only files that decoded.

Layout written to OUT:
    train.txt, valid.txt, test.txt   one "relative/path label" per line, the
                                     format of DALI's readers.file(file_list=)
    classes.json                     class names (label = index), the source
                                     root the paths are relative to, counts
    index/train.npz, ...             per split, in manifest order, as numpy columns
                                     (planktonio/index.py): path, label, width, height
                                     (EXIF orientation applied), bytes, mtime, sha256;
                                     what every run reads (the text is for people)
    rejected.csv                     path,reason,detail for every bad file
    skipped.csv                      path,reason for every file that is not a
                                     candidate (other extensions, top-level files)
    duplicates.csv                   group,sha256,class,path,split for every file
                                     whose bytes another file also has

Every candidate is decoded by worker processes into columns, journaled so
that a stopped prepare goes on where it was (planktonio/inspection.py).

Byte-identical copies (found by the sha256 each decode check also takes):
copies within one class are kept, all in the split of their first copy, so
no picture is trained on and tested on at once; copies under two or more
classes are dropped (why: see the comment in `prepare`).
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import PlanktonioError
from .files import write_atomic
from .index import STAT_THREADS, Entries, SplitIndex, index_file, stat_files
from .inspection import inspect_files

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
TORCHVISION_DECODES = {".jpg", ".jpeg", ".png"}
SPLITS = ("train", "valid", "test")
# Version of the prepared layout: 2 added image_info.json (image sizes for the augmentation plans); 3 put
# what prepare records of each image in the binary index (planktonio/index.py) instead.
FORMAT = 3
IMAGE_INFO = "image_info.json"  # format 2's; removed by a prepare of format 3
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


# ---------------------------------------------------------------- scanning


@dataclass
class Scan:
    """What a source folder holds: each class's candidate images, and every file left out, with why."""

    classes: dict[str, list[str]]      # class name -> relative paths, sorted (sub-folders included)
    skipped: dict[str, str]            # relative path -> why it is not a candidate


def unsafe_name_reason(relpath: str) -> str | None:
    """Why a path cannot go into a manifest line, or None.

    A manifest is one "path label" per line, read by DALI's file_list and by
    str.splitlines (which also splits at form feeds, U+2028 and other
    separators); control characters and line breaks would split or corrupt
    a line, so such names are refused, never mangled.
    """
    if len(relpath.splitlines()) != 1 or any(ord(c) < 32 or ord(c) == 127 for c in relpath):
        return "name has a line break or control character (rename the file)"
    if relpath != relpath.strip():
        return "name starts or ends with whitespace (rename the file)"
    if "\\" in relpath:
        return "name has a backslash (rename the file)"
    return None


def scan_classes(source: Path) -> Scan:
    """Each class folder under `source` (images in its sub-folders belong to it) and what is left out."""
    source = Path(source)
    if not source.is_dir():
        raise PlanktonioError(f"source {source}: no such directory")
    classes: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}

    def unreadable(error: OSError):
        raise PlanktonioError(f"{error.filename}: cannot be read ({error.strerror}); fix its permissions "
                              f"or move it out of {source}")

    try:
        top = sorted(source.iterdir())
    except OSError as error:
        unreadable(error)
    root = source.resolve()
    for entry in top:
        if not entry.is_dir():
            skipped[entry.name] = "not in a class folder"
            continue
        if entry.name.startswith("."):
            skipped[entry.name + "/"] = "hidden folder"
            continue
        if entry.is_symlink() and (entry.resolve() == root or entry.resolve() in root.parents):
            skipped[entry.name + "/"] = (f"a link to {entry.resolve()}, the source folder itself or a folder above "
                                         f"it: its images would be filed under a second class")
            continue
        files = []
        for folder, subfolders, names in os.walk(entry, onerror=unreadable):
            subfolders.sort()
            prefix = Path(folder).relative_to(source).as_posix() + "/"  # (once per folder, not per file)
            for name in sorted(names):
                rel = prefix + name
                if name.startswith("."):
                    skipped[rel] = "hidden file"
                elif os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    skipped[rel] = f"not an image extension ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                else:
                    files.append(rel)
        classes[entry.name] = sorted(files)
    if not classes:
        raise PlanktonioError(
            f"source {source}: no class folders (expected one sub-folder of images per class)")
    return Scan(classes, skipped)


# -------------------------------------------------------------- validating


@dataclass(frozen=True)
class ImageCheck:
    """What decoding one file found: a problem (reason, detail), or its size as every loader sees it;
    and the sha256 of the bytes it decoded (empty when they could not be read)."""

    problem: tuple[str, str] | None
    width: int = 0
    height: int = 0
    sha256: str = ""


# PIL modes of more than 8 bits per channel, which prepare refuses (square converts them).
WIDE_MODES = {"I;16": "16-bit grey", "I;16L": "16-bit grey", "I;16B": "16-bit grey", "I;16N": "16-bit grey",
              "I": "32-bit integer grey", "F": "32-bit float grey"}

# EXIF orientations that turn the picture a quarter: width and height swap
# once the orientation is applied, as DALI and the torchvision backend do.
QUARTER_TURNS = {5, 6, 7, 8}
EXIF_ORIENTATION = 0x0112


def inspect_image(path: str | os.PathLike) -> ImageCheck:
    """Decode one file fully: its size (EXIF orientation applied) and sha256, or why it is unusable.

    Reasons: "empty", "truncated", "not an image", "unreadable". The file is
    read once: the digest is of exactly the bytes that were decoded. Decoded
    with PIL, and JPEG/PNG again with torchvision.io (libjpeg-turbo), since a
    file must decode in every loader backend.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:  # permissions, I/O errors
        return ImageCheck(("unreadable", str(error) or type(error).__name__))
    check = _decode_check(path, data)
    return replace(check, sha256=hashlib.sha256(data).hexdigest())


def _decode_check(path: str | os.PathLike, data: bytes) -> ImageCheck:
    if not data:
        return ImageCheck(("empty", "file has 0 bytes"))
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: header checks alone miss truncation
            width, height = image.size
            if width < 1 or height < 1:
                return ImageCheck(("not an image", f"size {width}x{height}"))
            if image.mode in WIDE_MODES:
                # The backends would read these differently (DALI scales 16 bits down to 8,
                # torchvision keeps uint16 or clips), so none of them gets one.
                return ImageCheck(("unsupported bit depth", f"{WIDE_MODES[image.mode]} (PIL mode {image.mode}); "
                                   f"convert to 8 bits, e.g. with `python -m planktonio square`"))
            if image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS:
                width, height = height, width
    except UnidentifiedImageError:
        return ImageCheck(("not an image", "no known image format"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        detail = str(error) or type(error).__name__
        if "truncat" in detail.lower():  # PIL: "image file is truncated", "Truncated File Read"
            return ImageCheck(("truncated", detail))
        return ImageCheck(("unreadable", detail))
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


# --------------------------------------------------------------- splitting


@dataclass
class SplitPlan:
    """How many images of each class go to each split: fixed counts or fractions."""

    per_class: tuple[int, int, int] | None = None
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS

    def counts(self, available: int) -> tuple[int, int, int]:
        if self.per_class is not None:
            return self.per_class
        n_valid = round(available * self.fractions[1])
        n_test = round(available * self.fractions[2])
        return available - n_valid - n_test, n_valid, n_test

    def describe(self) -> dict:
        if self.per_class is not None:
            return {"per_class": dict(zip(SPLITS, self.per_class))}
        return {"fractions": dict(zip(SPLITS, self.fractions))}


def split_class(images: list[str], counts: tuple[int, int, int], seed: int, class_name: str,
                copies: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Shuffle one class's distinct images reproducibly and cut them into train/valid/test.

    images: one path per distinct image (its first copy); copies: first copy
    -> its other copies in this class, which go wherever it goes. The counts
    (from --per-class, or --fractions of the distinct images) are therefore met
    exactly in distinct images, and a split's file count exceeds them by the
    extra copies it received. Without copies this is the plain seeded shuffle
    and cut it always was. The generator is seeded by (seed, class name), so
    one class's split does not change when other classes are added or dropped.
    """
    shuffled = sorted(images)
    random.Random(f"{seed}:{class_name}").shuffle(shuffled)
    n_train, n_valid, n_test = counts
    chosen = {"train": shuffled[:n_train], "valid": shuffled[n_train:n_train + n_valid],
              "test": shuffled[n_train + n_valid:n_train + n_valid + n_test]}
    copies = copies or {}
    return {split: sorted(path for first in firsts for path in (first, *copies.get(first, ())))
            for split, firsts in chosen.items()}


@dataclass(frozen=True)
class CopyGroup:
    """Usable files with identical bytes: (class, relative path) pairs sorted by path."""

    sha256: str
    files: tuple[tuple[str, str], ...]

    @property
    def classes(self) -> list[str]:
        return sorted({name for name, _ in self.files})


def find_copies(paths: list[str], class_of: np.ndarray, classes: list[str], sha256: np.ndarray,
                usable: np.ndarray) -> list[CopyGroup]:
    """Every group of two or more byte-identical usable files, in the order of their first paths (found by
    sorting the digests: no Python object per image)."""
    positions = np.flatnonzero(usable)
    if not len(positions):
        return []
    digests = np.ascontiguousarray(sha256[positions]).view(np.dtype((np.void, 32))).ravel()
    _, inverse, counts = np.unique(digests, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts[inverse] > 1)
    groups: dict[int, list[int]] = {}
    for i in repeated.tolist():
        groups.setdefault(int(inverse[i]), []).append(int(positions[i]))
    found = [CopyGroup(bytes(sha256[members[0]]).hex(),
                       tuple(sorted(((classes[class_of[p]], paths[p]) for p in members), key=lambda f: f[1])))
             for members in groups.values()]
    return sorted(found, key=lambda group: group.files[0][1])


def _in_other_classes(group: CopyGroup, name: str, path: str) -> str:
    """rejected.csv's detail for one copy of an image filed under several classes."""
    others = [p for _, p in group.files if p != path]
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (f"also in {', '.join(c for c in group.classes if c != name)}: the same bytes as {shown} "
            f"(sha256 {group.sha256[:16]}...); put the image in its one right class folder")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


# --------------------------------------------------------------- preparing


@dataclass
class PrepareResult:
    out: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    rejected: dict[str, tuple[str, str]]
    usable: dict[str, int]
    dropped_classes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    copy_groups: list[CopyGroup] = field(default_factory=list)

    def summary(self) -> str:
        """A short table: one line per kept class, then totals."""
        width = max([len(c) for c in self.classes] + [5])
        lines = [f"{'class':<{width}}  {'usable':>6}  {'train':>6}  {'valid':>6}  {'test':>6}"]
        per_split = {s: {} for s in SPLITS}
        for split, entries in self.splits.items():
            for _, label in entries:
                per_split[split][label] = per_split[split].get(label, 0) + 1
        for label, name in enumerate(self.classes):
            row = [self.usable[name]] + [per_split[s].get(label, 0) for s in SPLITS]
            lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>6}" for v in row))
        totals = [sum(self.usable[c] for c in self.classes)] + [len(self.splits[s]) for s in SPLITS]
        lines.append(f"{'total':<{width}}  " + "  ".join(f"{v:>6}" for v in totals))
        lines.append(
            f"{len(self.classes)} classes kept, {len(self.dropped_classes)} dropped (too few images), "
            f"{len(self.rejected)} files rejected (see {self.out / 'rejected.csv'}), "
            f"{len(self.skipped)} skipped as not images (see {self.out / 'skipped.csv'})")
        within = [g for g in self.copy_groups if len(g.classes) == 1]
        across = [g for g in self.copy_groups if len(g.classes) > 1]
        said = []
        if within:
            said.append(f"{_count(sum(len(g.files) - 1 for g in within), 'extra copy', 'extra copies')} of "
                        f"{_count(len(within), 'image')} kept in the split of their first copy")
        if across:
            said.append(f"{_count(sum(len(g.files) for g in across), 'file')} of {_count(len(across), 'image')} "
                        f"found in more than one class dropped (see rejected.csv)")
        if said:
            lines.append(f"byte-identical files (see {self.out / 'duplicates.csv'}): " + "; ".join(said))
        return "\n".join(lines)


def prepare(source: Path, out: Path, *, min_images: int = 1, plan: SplitPlan | None = None,
            seed: int = 0, workers: int | None = None, exclude: tuple[str, ...] = (),
            progress: bool | None = None) -> PrepareResult:
    """Scan, validate, filter and split `source`; write manifests and the binary index into `out`.

    exclude: class names to leave out, e.g. another prepared set's classes
    (pretraining on the classes a later fine-tuning does not use).
    progress: a progress bar of the decoding (default: when stderr is a terminal).
    The decoding is journaled in OUT (planktonio/inspection.py): the same call
    after a stop goes on where it was, to the same result.
    """
    source, out = Path(source).resolve(), Path(out)
    if out.exists() and not out.is_dir():
        raise PlanktonioError(f"--out {out}: is a file, not a folder; choose another --out")
    plan = plan or SplitPlan()
    scan = scan_classes(source)
    found = {name: files for name, files in scan.classes.items() if name not in set(exclude)}
    if not found:
        raise PlanktonioError(f"source {source}: every class folder is excluded ({len(exclude)} names)")
    # Every candidate by position: class after class, each class's paths sorted (scan_classes sorts them).
    names = list(found)
    paths = [f for files in found.values() for f in files]
    class_of = np.repeat(np.arange(len(names), dtype=np.int32), [len(found[n]) for n in names])
    class_start = dict(zip(names, np.concatenate([[0], np.cumsum([len(found[n]) for n in names])]).tolist()))
    unsafe = {p: ("unsafe name", reason) for p, path in enumerate(paths) if (reason := unsafe_name_reason(path))}
    skip = np.zeros(len(paths), dtype=bool)
    skip[list(unsafe)] = True
    out.mkdir(parents=True, exist_ok=True)
    checks, journal = inspect_files(source, paths, skip, workers or os.cpu_count() or 1, out, progress)
    rejected = {**unsafe, **checks.problems}  # position -> (reason, detail)
    usable = np.ones(len(paths), dtype=bool)
    usable[list(rejected)] = False

    # Copies filed under two or more classes are dropped, every one of them.
    # Not refused as a whole run: one misfiled picture among tens of thousands
    # must not stop it (the NDSB subset in ../shared/data has one:
    # chaetognath_other/271.jpg and chaetognath_non_sagitta/14864.jpg are the
    # same bytes), and rejected.csv names every copy for whoever can fix the
    # labels. Not one copy kept: the files cannot say which label is right, so
    # a kept copy trains or tests on a label that may be wrong, and one copy in
    # train with another in test would leak a test image into training.
    copy_groups = find_copies(paths, class_of, names, checks.sha256, usable)
    for group in copy_groups:
        if len(group.classes) > 1:
            for name, path in group.files:
                position = _position(found, class_start, name, path)
                rejected[position] = ("duplicate in another class", _in_other_classes(group, name, path))
                usable[position] = False
    # Copies within a class: each image counts once, and its extra copies follow its first copy.
    copies = {group.files[0][1]: [path for _, path in group.files[1:]]
              for group in copy_groups if len(group.classes) == 1}
    extra = {path for others in copies.values() for path in others}
    usable_count = dict(zip(names, np.bincount(class_of[usable], minlength=len(names)).tolist()))
    distinct = {name: [f for p, f in enumerate(found[name], start=class_start[name]) if usable[p] and f not in extra]
                for name in names}

    kept = [name for name, images in distinct.items() if len(images) >= min_images and len(images) > 0]
    dropped = {name: len(images) for name, images in distinct.items() if name not in kept}
    if not kept:
        largest = max(distinct.items(), key=lambda item: len(item[1]))
        raise PlanktonioError(
            f"source {source}: no class has at least {min_images} usable images "
            f"(largest: {largest[0]} with {len(largest[1])})")
    for name in kept:
        wanted = plan.counts(len(distinct[name]))
        if sum(wanted) > len(distinct[name]):
            raise PlanktonioError(
                f"class {name!r} has {len(distinct[name])} usable images"
                f"{' (not counting copies)' if len(distinct[name]) < usable_count[name] else ''} but the split "
                f"asks for {sum(wanted)} ({'+'.join(map(str, wanted))}); lower --per-class or raise --min-images")

    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    positions: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label, name in enumerate(kept):
        parts = split_class(distinct[name], plan.counts(len(distinct[name])), seed, name, copies)
        for split in SPLITS:
            splits[split].extend((path, label) for path in parts[split])
            positions[split].extend(_position(found, class_start, name, path) for path in parts[split])
    del distinct

    for split in SPLITS:
        manifest = "".join(f"{p} {label}\n" for p, label in splits[split]).encode("utf-8")
        at = np.asarray(positions[split], dtype=np.int64)
        index = SplitIndex.build([p for p, _ in splits[split]], [label for _, label in splits[split]], checks.width[at],
                                 checks.height[at], checks.bytes[at], checks.mtime_ns[at], checks.sha256[at],
                                 manifest)
        index.write(index_file(out, split))  # the index first: a manifest without its index is never read
        write_atomic(out / f"{split}.txt", manifest)
    rejected_paths = {paths[p]: problem for p, problem in rejected.items()}
    write_atomic(out / "rejected.csv", _rejected_csv(source, rejected_paths))
    write_atomic(out / "skipped.csv", _skipped_csv(source, scan.skipped))
    write_atomic(out / "duplicates.csv", _duplicates_csv(source, copy_groups, splits))
    (out / IMAGE_INFO).unlink(missing_ok=True)  # what an older prepare wrote: the index holds it now
    meta = {
        "format": FORMAT,
        "root": str(source),
        "classes": kept,
        "num_classes": len(kept),
        "split_sizes": {s: len(splits[s]) for s in SPLITS},
        "usable_per_class": {name: usable_count[name] for name in kept},
        "dropped_classes": dropped,
        "excluded_classes": sorted(exclude),
        "rejected": len(rejected),
        "skipped": len(scan.skipped),
        "duplicate_groups": len(copy_groups),
        "duplicates_dropped": sum(len(g.files) for g in copy_groups if len(g.classes) > 1),
        "min_images": min_images,
        "seed": seed,
        **plan.describe(),
    }
    write_atomic(out / "classes.json", json.dumps(meta, indent=2) + "\n")
    journal.remove()
    return PrepareResult(out, kept, splits, rejected_paths, {n: usable_count[n] for n in kept}, dropped,
                         scan.skipped, copy_groups)


def _position(found: dict[str, list[str]], class_start: dict[str, int], name: str, path: str) -> int:
    """A candidate's position: its class's first, plus its place in the class's sorted paths."""
    return class_start[name] + bisect.bisect_left(found[name], path)


def _skipped_csv(source: Path, skipped: dict[str, str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason"])
    for path, reason in sorted(skipped.items()):
        writer.writerow([str(source / path), reason])
    return buffer.getvalue()


def _duplicates_csv(source: Path, groups: list[CopyGroup], splits: dict[str, list[tuple[str, int]]]) -> str:
    """One row per file of each copy group; split is empty for a file in no manifest (dropped as a copy
    in another class, its class not kept, or not drawn when --per-class takes fewer images)."""
    where = {path: split for split, entries in splits.items() for path, _ in entries}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "sha256", "class", "path", "split"])
    for number, group in enumerate(groups, start=1):
        for name, path in group.files:
            writer.writerow([number, group.sha256, name, str(source / path), where.get(path, "")])
    return buffer.getvalue()


def _rejected_csv(source: Path, rejected: dict[str, tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason", "detail"])
    for path, (reason, detail) in sorted(rejected.items()):
        writer.writerow([str(source / path), reason, detail])
    return buffer.getvalue()


# ------------------------------------------------------- reading it back


def manifest_line_problem(line: str, num_classes: int) -> str | None:
    """What is wrong with one "relative/path label" line, or None.

    The label is the last field (file names may contain spaces): ASCII digits
    only, as DALI's file_list reads it. The path stays inside the data root:
    no absolute paths, no "..", no control characters.
    """
    path, _, label = line.rpartition(" ")
    if not path or not (label.isascii() and label.isdigit()):
        return "expected 'relative/path label' with a label of digits 0-9"
    if int(label) >= num_classes:
        return f"label {label} is not a class (there are {num_classes})"
    if unsafe_name_reason(path):
        return "the path has a line break, a control character or surrounding whitespace"
    parts = Path(path).parts
    if Path(path).is_absolute() or path.startswith(("/", "\\")) or ".." in parts or "\\" in path:
        return "the path leaves the data root (absolute, '..' or a backslash)"
    return None


def read_manifest(manifest: Path, num_classes: int) -> list[tuple[str, int]]:
    """A text manifest's (path, label) pairs, every line checked; a one-line error naming a bad line. What
    people and DALI's file_list read; a run reads the binary index, and reads this only to say how a
    manifest edited since prepare differs from it."""
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PlanktonioError(f"{manifest}: cannot be read as UTF-8 text ({error}); rerun prepare") from None
    if text.startswith("\ufeff"):
        raise PlanktonioError(f"{manifest}: starts with a byte-order mark (U+FEFF: an editor saved it as "
                              f"'UTF-8 with BOM'); save it as plain UTF-8, or rerun prepare")
    entries = []
    for number, line in enumerate(text.split("\n"), start=1):  # "\n" only: prepare writes no other break
        if not line.strip():
            continue
        problem = manifest_line_problem(line, num_classes)
        if problem:
            raise PlanktonioError(f"{manifest}:{number}: {problem} in {line!r}; rerun prepare or fix the line")
        path, _, label = line.rpartition(" ")
        entries.append((path, int(label)))
    return entries


# Indexes read and checked, by file and state: a run asks for a split's several times (its loaders, the
# feature cache, the test at the end), and checking a million images' columns once is enough.
_checked: dict[tuple, SplitIndex] = {}


@dataclass(frozen=True)
class PreparedDataset:
    """A folder written by `prepare`: what the loaders read."""

    path: Path
    root: Path
    classes: tuple[str, ...]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreparedDataset":
        path = Path(path)
        meta_file = path / "classes.json"
        if not meta_file.is_file():
            raise PlanktonioError(
                f"{meta_file}: not found; is {path} a folder written by `python -m planktonio prepare`?")
        try:
            meta = json.loads(meta_file.read_text())
            classes = tuple(meta["classes"])
            if not isinstance(meta["root"], str) or not all(isinstance(c, str) for c in classes):
                raise TypeError("root and classes must be strings")
            return cls(path, Path(meta["root"]), classes)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise PlanktonioError(f"{meta_file}: not a valid classes.json ({error}); rerun prepare") from None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def manifest(self, split: str) -> Path:
        if split not in SPLITS:
            raise PlanktonioError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        manifest = self.path / f"{split}.txt"
        if not manifest.is_file():
            raise PlanktonioError(f"{manifest}: manifest not found")
        return manifest

    def index(self, split: str) -> SplitIndex:
        """The split's binary index, checked (planktonio/index.py), and in agreement with its text manifest."""
        manifest, path = self.manifest(split), index_file(self.path, split)
        try:
            key = (str(path.resolve()), self.num_classes, *_state(path), *_state(manifest))
        except FileNotFoundError:
            key = None
        if key in _checked:
            return _checked[key]
        index = SplitIndex.read(path)
        text = manifest.read_bytes()
        if hashlib.sha256(text).digest() != index.manifest_sha256:
            read_manifest(manifest, self.num_classes)  # a bad line is named first
            raise PlanktonioError(f"{manifest}: differs from what prepare wrote (edited since?), and a run reads "
                                  f"{path}; rerun prepare")
        index.check(path, self.num_classes)
        if key is not None:
            # One data set's splits at a time (the common case: memory stays flat), each split's latest state.
            folder = os.path.dirname(key[0])
            for kept in [k for k in _checked if k[0] == key[0] or os.path.dirname(k[0]) != folder]:
                del _checked[kept]
            _checked[key] = index
        return index

    def entries(self, split: str) -> Entries:
        """(relative path, label) pairs of a split, in manifest order (made one at a time when asked)."""
        return Entries(self.index(split))

    def check_files_unchanged(self, split: str, workers: int = STAT_THREADS) -> None:
        """Fail before a run starts, naming the file, if one moved or changed since `prepare` decoded it.

        DALI stops the whole pipeline on a bad file, possibly hours in; sizes
        and modification times are the cheap check: one stat per file, made by
        `workers` threads at once (a network file system answers each after a
        round trip), compared with the recorded ones in one vectorised step.
        """
        index = self.index(split)
        sizes, mtimes, problems = stat_files(self.root, index, workers)
        changed = np.flatnonzero((sizes != index.bytes) | (mtimes != index.mtime_ns))
        if not len(changed):
            return
        first = int(changed[0])
        path = index.path(first)
        if first in problems:
            if problems[first] == "missing":
                raise self._missing(split, path)
            raise PlanktonioError(f"{self.root / path}: cannot be read ({problems[first]})")
        raise PlanktonioError(
            f"{self.root / path}: changed since prepare checked it ({sizes[first]} bytes, was "
            f"{index.bytes[first]}; or a newer modification time); rerun prepare to check it again"
            + (f" ({len(changed) - 1} more changed)" if len(changed) > 1 else ""))

    def fingerprint(self) -> str:
        """sha256 of the class names and the three manifests: what a run trains, validates and tests on."""
        digest = hashlib.sha256(json.dumps(list(self.classes)).encode())
        for split in SPLITS:
            manifest = self.path / f"{split}.txt"
            digest.update(f"\0{split}\0".encode())
            digest.update(manifest.read_bytes() if manifest.is_file() else b"")
        return digest.hexdigest()

    def _missing(self, split: str, path: str) -> PlanktonioError:
        return PlanktonioError(f"{self.root / path}: listed in {self.manifest(split)} but missing; "
                               f"rerun prepare if the source moved")

    def image_sizes(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(widths, heights) of a split's images in manifest order."""
        info = self.image_info(split)
        return info.width, info.height

    def image_info(self, split: str) -> "ImageInfo":
        """A split's image sizes, bytes and modification times, in manifest order, as `prepare` recorded them
        (the augmentation plans need the sizes)."""
        index = self.index(split)
        return ImageInfo(index.width, index.height, index.bytes, index.mtime_ns)


def _state(path: Path) -> tuple[int, int, int]:
    status = path.stat()
    return status.st_ino, status.st_size, status.st_mtime_ns


@dataclass(frozen=True)
class ImageInfo:
    """Per image of a split, in manifest order: what prepare found (EXIF orientation applied)."""

    width: np.ndarray
    height: np.ndarray
    bytes: np.ndarray
    mtime_ns: np.ndarray
