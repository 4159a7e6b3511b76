"""Reading a prepared set: the folder `prepare` wrote (planktonio/preparation.py), as every run reads it.

`PreparedDataset` gives a split's images from its binary index (checked
once: planktonio/index.py), in manifest order, and checks before a run that
the loose files have not changed since prepare decoded them. The text
manifests are for people and DALI's file_list; a run reads them only to say
how one edited since prepare differs from its index. docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PlanktonioError
from .index import STAT_THREADS, Entries, SplitIndex, index_file, stat_files

SPLITS = ("train", "valid", "test")


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


def _state(path: Path) -> tuple[int, int, int]:
    status = path.stat()
    return status.st_ino, status.st_size, status.st_mtime_ns
