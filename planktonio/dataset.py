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
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import PlanktonioError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
TORCHVISION_DECODES = {".jpg", ".jpeg", ".png"}
SPLITS = ("train", "valid", "test")
# Version of the prepared layout: 2 added image_info.json (image sizes for the augmentation plans).
FORMAT = 2
IMAGE_INFO = "image_info.json"
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


# ---------------------------------------------------------------- scanning


def scan_classes(source: Path) -> dict[str, list[str]]:
    """Map each class folder under `source` to its image files (relative paths, sorted)."""
    source = Path(source)
    if not source.is_dir():
        raise PlanktonioError(f"source {source}: no such directory")
    classes: dict[str, list[str]] = {}
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [
            f"{class_dir.name}/{f.name}"
            for f in sorted(class_dir.iterdir())
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        classes[class_dir.name] = files
    if not classes:
        raise PlanktonioError(
            f"source {source}: no class folders (expected one sub-folder of images per class)")
    return classes


# -------------------------------------------------------------- validating


@dataclass(frozen=True)
class ImageCheck:
    """What decoding one file found: a problem (reason, detail), or its size as every loader sees it."""

    problem: tuple[str, str] | None
    width: int = 0
    height: int = 0


# EXIF orientations that turn the picture a quarter: width and height swap
# once the orientation is applied, as DALI and the torchvision backend do.
QUARTER_TURNS = {5, 6, 7, 8}
EXIF_ORIENTATION = 0x0112


def inspect_image(path: str | os.PathLike) -> ImageCheck:
    """Decode one file fully: its size (EXIF orientation applied), or why it is unusable.

    Reasons: "empty", "truncated", "not an image", "unreadable". Decoded with
    PIL, and JPEG/PNG again with torchvision.io (libjpeg-turbo), since a file
    must decode in every loader backend.
    """
    try:
        if os.path.getsize(path) == 0:
            return ImageCheck(("empty", "file has 0 bytes"))
        with Image.open(path) as image:
            image.load()  # a full decode: header checks alone miss truncation
            width, height = image.size
            if width < 1 or height < 1:
                return ImageCheck(("not an image", f"size {width}x{height}"))
            if image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS:
                width, height = height, width
    except UnidentifiedImageError:
        return ImageCheck(("not an image", "no known image format"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        detail = str(error) or type(error).__name__
        if isinstance(error, OSError) and error.errno is not None:
            return ImageCheck(("unreadable", detail))  # permissions, I/O errors: errno set by the OS
        if "truncat" in detail.lower():  # PIL: "image file is truncated", "Truncated File Read"
            return ImageCheck(("truncated", detail))
        return ImageCheck(("unreadable", detail))
    # libjpeg-turbo, through torchvision, refuses some corrupt JPEGs that PIL
    # decodes with a warning; the torchvision loader would then drop them.
    if Path(path).suffix.lower() in TORCHVISION_DECODES:
        from torchvision.io import decode_image, read_file
        try:
            decode_image(read_file(str(path)))
        except RuntimeError as error:
            return ImageCheck(("unreadable", f"corrupt data: {str(error).splitlines()[0]}"))
    return ImageCheck(None, width, height)


def check_image(path: str | os.PathLike) -> tuple[str, str] | None:
    """None if the file is a usable image, else (reason, detail)."""
    return inspect_image(path).problem


def _inspect_chunk(paths: list[str]) -> list[ImageCheck]:
    return [inspect_image(p) for p in paths]


def inspect_images(root: Path, relpaths: list[str], workers: int | None = None) -> dict[str, ImageCheck]:
    """Decode every file in parallel; {relpath: ImageCheck}."""
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


def split_class(files: list[str], counts: tuple[int, int, int], seed: int, class_name: str) -> dict[str, list[str]]:
    """Shuffle one class reproducibly and cut it into train/valid/test.

    The generator is seeded by (seed, class name), so one class's split does
    not change when other classes are added or dropped.
    """
    shuffled = sorted(files)
    random.Random(f"{seed}:{class_name}").shuffle(shuffled)
    n_train, n_valid, n_test = counts
    return {
        "train": sorted(shuffled[:n_train]),
        "valid": sorted(shuffled[n_train:n_train + n_valid]),
        "test": sorted(shuffled[n_train + n_valid:n_train + n_valid + n_test]),
    }


# --------------------------------------------------------------- preparing


@dataclass
class PrepareResult:
    out: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    rejected: dict[str, tuple[str, str]]
    usable: dict[str, int]
    dropped_classes: dict[str, int] = field(default_factory=dict)

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
            f"{len(self.rejected)} files rejected (see {self.out / 'rejected.csv'})")
        return "\n".join(lines)


def prepare(source: Path, out: Path, *, min_images: int = 1, plan: SplitPlan | None = None,
            seed: int = 0, workers: int | None = None, exclude: tuple[str, ...] = ()) -> PrepareResult:
    """Scan, validate, filter and split `source`; write manifests into `out`.

    exclude: class names to leave out, e.g. another prepared set's classes
    (pretraining on the classes a later fine-tuning does not use).
    """
    source, out = Path(source).resolve(), Path(out)
    plan = plan or SplitPlan()
    found = {name: files for name, files in scan_classes(source).items() if name not in set(exclude)}
    if not found:
        raise PlanktonioError(f"source {source}: every class folder is excluded ({len(exclude)} names)")
    all_files = [f for files in found.values() for f in files]
    checks = inspect_images(source, all_files, workers)
    rejected = {path: check.problem for path, check in checks.items() if check.problem is not None}
    usable = {name: [f for f in files if f not in rejected] for name, files in found.items()}

    kept = [name for name, files in usable.items() if len(files) >= min_images and len(files) > 0]
    dropped = {name: len(files) for name, files in usable.items() if name not in kept}
    if not kept:
        largest = max(usable.items(), key=lambda item: len(item[1]))
        raise PlanktonioError(
            f"source {source}: no class has at least {min_images} usable images "
            f"(largest: {largest[0]} with {len(largest[1])})")
    for name in kept:
        wanted = plan.counts(len(usable[name]))
        if sum(wanted) > len(usable[name]):
            raise PlanktonioError(
                f"class {name!r} has {len(usable[name])} usable images but the split asks for "
                f"{sum(wanted)} ({'+'.join(map(str, wanted))}); lower --per-class or raise --min-images")

    splits: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label, name in enumerate(kept):
        parts = split_class(usable[name], plan.counts(len(usable[name])), seed, name)
        for split in SPLITS:
            splits[split].extend((path, label) for path in parts[split])

    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        _write_atomic(out / f"{split}.txt", "".join(f"{p} {l}\n" for p, l in splits[split]))
    _write_atomic(out / "rejected.csv", _rejected_csv(source, rejected))
    _write_atomic(out / IMAGE_INFO, json.dumps(_image_info(source, splits, checks)) + "\n")
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
        "min_images": min_images,
        "seed": seed,
        **plan.describe(),
    }
    _write_atomic(out / "classes.json", json.dumps(meta, indent=2) + "\n")
    return PrepareResult(out, kept, splits, rejected, {n: len(usable[n]) for n in kept}, dropped)


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
    return info


def _rejected_csv(source: Path, rejected: dict[str, tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason", "detail"])
    for path, (reason, detail) in sorted(rejected.items()):
        writer.writerow([str(source / path), reason, detail])
    return buffer.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------- reading it back


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
            return cls(path, Path(meta["root"]), tuple(meta["classes"]))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise PlanktonioError(f"{meta_file}: not a valid classes.json ({error})") from None

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
        entries = []
        for number, line in enumerate(manifest.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            # The label is the last field: file names may contain spaces.
            path, _, label = line.rpartition(" ")
            if not path or not label.isdigit() or int(label) >= self.num_classes:
                raise PlanktonioError(f"{manifest}:{number}: expected 'relative/path label', got {line!r}")
            entries.append((path, int(label)))
        return entries

    def check_files_exist(self, split: str, entries: list[tuple[str, int]] | None = None) -> None:
        """Fail early, naming the file, if the source moved since `prepare`."""
        for path, _ in entries if entries is not None else self.entries(split):
            if not (self.root / path).is_file():
                raise PlanktonioError(
                    f"{self.root / path}: listed in {self.manifest(split)} but missing; "
                    f"rerun prepare if the source moved")

    def image_sizes(self, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(widths, heights) of a split's images in manifest order, as `prepare` recorded them.

        The augmentation plans need them; a folder prepared before sizes were
        recorded (or edited by hand since) is an error that says to rerun prepare.
        """
        info_file = self.path / IMAGE_INFO
        rerun = "rerun `python -m planktonio prepare` to write it"
        if not info_file.is_file():
            raise PlanktonioError(f"{info_file}: not found: {self.path} was prepared by an older planktonio; {rerun}")
        try:
            info = json.loads(info_file.read_text())[split]
            widths = np.asarray(info["width"], dtype=np.int64)
            heights = np.asarray(info["height"], dtype=np.int64)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise PlanktonioError(f"{info_file}: not a valid image_info.json ({error}); {rerun}") from None
        if len(widths) != count or len(heights) != count or (count and min(widths.min(), heights.min()) < 1):
            raise PlanktonioError(f"{info_file}: its {split} sizes do not match {self.manifest(split)} "
                                  f"({len(widths)} sizes, {count} images); {rerun}")
        return widths, heights
