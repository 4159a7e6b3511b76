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
from .path_rules import path_problem

SPLITS = ("train", "valid", "test")


# ------------------------------------------------------- reading it back


def manifest_line_problem(line: str, num_classes: int) -> str | None:
    """What is wrong with one "relative/path label" line, or None.

    The label is the last field (file names may contain spaces): ASCII digits
    only, as DALI's file_list reads it. The path as planktonio/path_rules.py allows.
    """
    path, _, label = line.rpartition(" ")
    if not path or not (label.isascii() and label.isdigit()):
        return "expected 'relative/path label' with a label of digits 0-9"
    if int(label) >= num_classes:
        return f"label {label} is not a class (there are {num_classes})"
    problem = path_problem(path)
    return None if problem is None else f"the path {problem}"


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


class CheckedIndexes:
    """Split indexes read and checked, by file and state, one data set's at a time.

    A run asks for a split's index several times (its loaders, the feature
    cache, the test at the end), and checking a million images' columns once
    is enough. Kept: the latest state of each split of the last data set
    asked for (train, valid and test stay together; memory stays flat).
    """

    def __init__(self):
        self._kept: dict[tuple, SplitIndex] = {}

    def get(self, key: tuple | None) -> SplitIndex | None:
        return None if key is None else self._kept.get(key)

    def put(self, key: tuple | None, index: SplitIndex) -> None:
        """Keep `index` under `key` = (resolved index path, ...); `None`: not kept (no state to key it by)."""
        if key is None:
            return
        folder = os.path.dirname(key[0])
        stale = [k for k in self._kept if k[0] == key[0] or os.path.dirname(k[0]) != folder]
        for k in stale:  # an older state of this split, or another data set's split
            del self._kept[k]
        self._kept[key] = index

    def __len__(self) -> int:
        return len(self._kept)


CHECKED = CheckedIndexes()


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
        known = CHECKED.get(key)
        if known is not None:
            return known
        index = SplitIndex.read(path)
        text = manifest.read_bytes()
        if hashlib.sha256(text).digest() != index.manifest_sha256:
            read_manifest(manifest, self.num_classes)  # a bad line is named first
            raise PlanktonioError(f"{manifest}: differs from what prepare wrote (edited since?), and a run reads "
                                  f"{path}; rerun prepare")
        index.check(path, self.num_classes)
        CHECKED.put(key, index)
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
