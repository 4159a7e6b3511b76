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
    image_info.json                  per split, in manifest order: width, height
                                     (EXIF orientation applied), bytes, mtime
    rejected.csv                     path,reason,detail for every bad file
    skipped.csv                      path,reason for every file that is not a
                                     candidate (other extensions, top-level files)
    duplicates.csv                   group,sha256,class,path,split for every file
                                     whose bytes another file also has

Byte-identical copies (found by the sha256 each decode check also takes):
copies within one class are kept, all in the split of their first copy, so
no picture is trained on and tested on at once; copies under two or more
classes are dropped (why: see the comment in `prepare`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import PlanktonioError
from .files import write_atomic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
TORCHVISION_DECODES = {".jpg", ".jpeg", ".png"}
SPLITS = ("train", "valid", "test")
# Version of the prepared layout: 2 added image_info.json (image sizes for the augmentation plans).
FORMAT = 2
IMAGE_INFO = "image_info.json"
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
            for name in sorted(names):
                rel = Path(folder, name).relative_to(source).as_posix()
                if name.startswith("."):
                    skipped[rel] = "hidden file"
                elif Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
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


def _inspect_chunk(paths: list[str]) -> list[ImageCheck]:
    return [inspect_image(p) for p in paths]


def inspect_images(root: Path, relpaths: list[str], workers: int | None = None) -> dict[str, ImageCheck]:
    """Decode and hash every file in parallel; {relpath: ImageCheck}."""
    if not relpaths:
        return {}
    workers = workers or os.cpu_count() or 1
    absolute = [str(Path(root) / p) for p in relpaths]
    # Chunks amortise the per-task overhead; many chunks keep all workers busy.
    size = max(1, min(256, len(absolute) // (workers * 8) or 1))
    chunks = [absolute[i:i + size] for i in range(0, len(absolute), size)]
    if workers == 1 or len(chunks) == 1:
        results = [r for chunk in chunks for r in _inspect_chunk(chunk)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = [r for chunk_result in pool.map(_inspect_chunk, chunks) for r in chunk_result]
    return dict(zip(relpaths, results))


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


def find_copies(files_by_class: dict[str, list[str]], checks: dict[str, ImageCheck]) -> list[CopyGroup]:
    """Every group of two or more byte-identical files, in the order of their first paths."""
    by_digest: dict[str, list[tuple[str, str]]] = {}
    for name, files in files_by_class.items():
        for path in files:
            by_digest.setdefault(checks[path].sha256, []).append((name, path))
    groups = [CopyGroup(digest, tuple(sorted(files, key=lambda f: f[1])))
              for digest, files in by_digest.items() if len(files) > 1]
    return sorted(groups, key=lambda group: group.files[0][1])


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
            seed: int = 0, workers: int | None = None, exclude: tuple[str, ...] = ()) -> PrepareResult:
    """Scan, validate, filter and split `source`; write manifests into `out`.

    exclude: class names to leave out, e.g. another prepared set's classes
    (pretraining on the classes a later fine-tuning does not use).
    """
    source, out = Path(source).resolve(), Path(out)
    if out.exists() and not out.is_dir():
        raise PlanktonioError(f"--out {out}: is a file, not a folder; choose another --out")
    plan = plan or SplitPlan()
    scan = scan_classes(source)
    found = {name: files for name, files in scan.classes.items() if name not in set(exclude)}
    if not found:
        raise PlanktonioError(f"source {source}: every class folder is excluded ({len(exclude)} names)")
    all_files = [f for files in found.values() for f in files]
    unsafe = {path: ("unsafe name", reason) for path in all_files if (reason := unsafe_name_reason(path))}
    checks = inspect_images(source, [f for f in all_files if f not in unsafe], workers)
    rejected = {**unsafe, **{path: check.problem for path, check in checks.items() if check.problem is not None}}
    usable = {name: [f for f in files if f not in rejected] for name, files in found.items()}

    # Copies filed under two or more classes are dropped, every one of them.
    # Not refused as a whole run: one misfiled picture among tens of thousands
    # must not stop it (the NDSB subset in ../shared/data has one:
    # chaetognath_other/271.jpg and chaetognath_non_sagitta/14864.jpg are the
    # same bytes), and rejected.csv names every copy for whoever can fix the
    # labels. Not one copy kept: the files cannot say which label is right, so
    # a kept copy trains or tests on a label that may be wrong, and one copy in
    # train with another in test would leak a test image into training.
    copy_groups = find_copies(usable, checks)
    for group in copy_groups:
        if len(group.classes) > 1:
            for name, path in group.files:
                rejected[path] = ("duplicate in another class", _in_other_classes(group, name, path))
    usable = {name: [f for f in files if f not in rejected] for name, files in usable.items()}
    # Copies within a class: each image counts once, and its extra copies follow its first copy.
    copies = {group.files[0][1]: [path for _, path in group.files[1:]]
              for group in copy_groups if len(group.classes) == 1}
    extra = {path for paths in copies.values() for path in paths}
    distinct = {name: [f for f in files if f not in extra] for name, files in usable.items()}

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
                f"{' (not counting copies)' if len(distinct[name]) < len(usable[name]) else ''} but the split asks "
                f"for {sum(wanted)} ({'+'.join(map(str, wanted))}); lower --per-class or raise --min-images")

    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label, name in enumerate(kept):
        parts = split_class(distinct[name], plan.counts(len(distinct[name])), seed, name, copies)
        for split in SPLITS:
            splits[split].extend((path, label) for path in parts[split])

    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        write_atomic(out / f"{split}.txt", "".join(f"{p} {l}\n" for p, l in splits[split]))
    write_atomic(out / "rejected.csv", _rejected_csv(source, rejected))
    write_atomic(out / "skipped.csv", _skipped_csv(source, scan.skipped))
    write_atomic(out / "duplicates.csv", _duplicates_csv(source, copy_groups, splits))
    write_atomic(out / IMAGE_INFO, json.dumps(_image_info(source, splits, checks)) + "\n")
    meta = {
        "format": FORMAT,
        "root": str(source),
        "classes": kept,
        "num_classes": len(kept),
        "split_sizes": {s: len(splits[s]) for s in SPLITS},
        "usable_per_class": {name: len(usable[name]) for name in kept},
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
    return PrepareResult(out, kept, splits, rejected, {n: len(usable[n]) for n in kept}, dropped, scan.skipped,
                         copy_groups)


def _image_info(source: Path, splits: dict[str, list[tuple[str, int]]], checks: dict[str, ImageCheck]) -> dict:
    """Per split, in manifest order: each image's size (for the augmentation plans), bytes and mtime.

    Kept apart from the manifests, which stay in DALI's file_list format (its
    label is the last integer of a line, so no column can be appended).
    Bytes and modification time let a run check cheaply that files did not
    change since they were decoded here.
    """
    info = {}
    for split, entries in splits.items():
        stats = [os.stat(source / path) for path, _ in entries]
        info[split] = {
            "width": [checks[path].width for path, _ in entries],
            "height": [checks[path].height for path, _ in entries],
            "bytes": [s.st_size for s in stats],
            "mtime_ns": [s.st_mtime_ns for s in stats],
        }
    return {**info, "checksum": _info_checksum(info)}


def _info_checksum(info: dict) -> str:
    """sha256 of the recorded sizes, bytes and dates of every split: an edited image_info.json (a width
    changed by hand) would make DALI, which crops by the recorded size, cut the wrong box without a word."""
    splits = {split: info[split] for split in SPLITS if split in info}
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()


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

    def entries(self, split: str) -> list[tuple[str, int]]:
        """(relative path, label) pairs of a split, in manifest order."""
        manifest = self.manifest(split)
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
            problem = manifest_line_problem(line, self.num_classes)
            if problem:
                raise PlanktonioError(f"{manifest}:{number}: {problem} in {line!r}; rerun prepare or fix the line")
            path, _, label = line.rpartition(" ")
            entries.append((path, int(label)))
        return entries

    def check_files_unchanged(self, split: str, entries: list[tuple[str, int]], info: "ImageInfo") -> None:
        """Fail before a run starts, naming the file, if one moved or changed since `prepare` decoded it.

        DALI stops the whole pipeline on a bad file, possibly hours in; sizes
        and modification times are the cheap check (one stat per file).
        """
        for i, (path, _) in enumerate(entries):
            try:
                stat = os.stat(self.root / path)
            except FileNotFoundError:
                raise self._missing(split, path) from None
            except OSError as error:
                raise PlanktonioError(f"{self.root / path}: cannot be read ({error.strerror})") from None
            if stat.st_size != info.bytes[i] or stat.st_mtime_ns != info.mtime_ns[i]:
                raise PlanktonioError(
                    f"{self.root / path}: changed since prepare checked it ({stat.st_size} bytes, was "
                    f"{info.bytes[i]}; or a newer modification time); rerun prepare to check it again")

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

    def image_sizes(self, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(widths, heights) of a split's images in manifest order."""
        info = self.image_info(split, count)
        return info.width, info.height

    def image_info(self, split: str, count: int) -> "ImageInfo":
        """A split's image sizes, bytes and modification times, in manifest order, as `prepare` recorded them.

        The augmentation plans need the sizes; a folder prepared before they
        were recorded (or edited by hand since) is an error that says to rerun prepare.
        """
        info_file = self.path / IMAGE_INFO
        rerun = "rerun `python -m planktonio prepare` to write it"
        if not info_file.is_file():
            raise PlanktonioError(f"{info_file}: not found: {self.path} was prepared by an older planktonio; {rerun}")
        try:
            recorded = json.loads(info_file.read_text())
            fields = recorded[split]
            info = ImageInfo(*(np.asarray(fields[name], dtype=np.int64)
                               for name in ("width", "height", "bytes", "mtime_ns")))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, OverflowError) as error:
            raise PlanktonioError(f"{info_file}: not a valid image_info.json ({error}); {rerun}") from None
        # (files of an older prepare have no checksum: their sizes are taken as they are)
        if "checksum" in recorded and recorded["checksum"] != _info_checksum(recorded):
            raise PlanktonioError(f"{info_file}: its content does not match its checksum (edited since prepare "
                                  f"wrote it: the recorded image sizes decide every crop); rerun "
                                  f"`python -m planktonio prepare`")
        lengths = {len(a) for a in (info.width, info.height, info.bytes, info.mtime_ns)}
        if lengths != {count} or (count and min(info.width.min(), info.height.min()) < 1):
            raise PlanktonioError(f"{info_file}: its {split} entries do not match {self.manifest(split)} "
                                  f"({sorted(lengths)} records, {count} images); {rerun}")
        return info


@dataclass(frozen=True)
class ImageInfo:
    """Per image of a split, in manifest order: what prepare found (EXIF orientation applied)."""

    width: np.ndarray
    height: np.ndarray
    bytes: np.ndarray
    mtime_ns: np.ndarray
