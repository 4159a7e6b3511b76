"""The binary index `prepare` writes beside each text manifest: every image of a split as numpy columns.

    PREPARED/index/<split>.npz   path (one UTF-8 blob, each path ended by "\\n", and where each ends),
                                 label, width, height (EXIF orientation applied), bytes, mtime_ns,
                                 sha256 (32 bytes an image), the manifest's own sha256, a checksum

Why: a run starts by reading what `prepare` recorded of every image it will
read, in every rank. A Python object per image, parsed and checked line by
line, costs minutes at millions of images; here a split is a few arrays,
each read in one call and checked with vectorised operations (no Python loop
over images). The text manifests stay, for people and for DALI's file_list
format; the index records the manifest's sha256, so one edited by hand is
noticed and its bad line named. docs/data.md.

Why numpy's .npz and not Arrow or Parquet: numpy is what every loader
already uses, its arrays load without a conversion, and `np.load` with
`allow_pickle=False` reads numbers and bytes only: nothing in a prepared
folder can run code. Uncompressed, so a column costs one read.

`SplitIndex.check` is what a reader relies on: labels in range, sizes of at
least one pixel, paths that stay inside the data root (no absolute path, no
"..", no backslash, no control character, no surrounding space), columns of
one length, and the checksum of the columns (an index edited or cut since
prepare wrote it is refused: the recorded sizes decide every crop).
`Entries` gives the (path, label) pairs of a split without making them all:
each is made when asked for.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PlanktonioError
from .files import write_arrays
from .path_rules import SEPARATOR, first_path_problem

INDEX_DIR = "index"
FORMAT = 1
COLUMNS = ("path_bytes", "path_end", "label", "width", "height", "bytes", "mtime_ns", "sha256")
# Each column's type and dimensions, as prepare writes them (a forged index may hold others).
COLUMN_TYPES = {"path_bytes": (np.uint8, 1), "path_end": (np.int64, 1), "label": (np.int32, 1),
                "width": (np.int32, 1), "height": (np.int32, 1), "bytes": (np.int64, 1), "mtime_ns": (np.int64, 1),
                "sha256": (np.uint8, 2)}
RERUN = "rerun `python -m planktonio prepare`"
# Threads that stat a split's loose files at once (stat_files): each stat waits on the file system (a
# metadata server on Lustre), not on a core, so more of them than cores pay.
STAT_THREADS = 32


def index_file(prepared: Path, split: str) -> Path:
    return Path(prepared) / INDEX_DIR / f"{split}.npz"


@dataclass(frozen=True)
class SplitIndex:
    """One split's images, in manifest order, as columns."""

    path_bytes: np.ndarray   # uint8: every path's UTF-8 bytes, each followed by "\n"
    path_end: np.ndarray     # int64: where each path's bytes end (the position of its "\n")
    label: np.ndarray        # int32
    width: np.ndarray        # int32, EXIF orientation applied
    height: np.ndarray       # int32
    bytes: np.ndarray        # int64: the file's size when prepare decoded it
    mtime_ns: np.ndarray     # int64: its modification time then
    sha256: np.ndarray       # uint8, N x 32: the digest of the bytes prepare decoded
    manifest_sha256: bytes = b""  # of the text manifest prepare wrote beside it

    def __len__(self) -> int:
        return len(self.label)

    @property
    def path_start(self) -> np.ndarray:
        return np.concatenate([[0], self.path_end[:-1] + 1]).astype(np.int64) if len(self) else \
            np.zeros(0, dtype=np.int64)

    def path(self, position: int) -> str:
        start = 0 if position == 0 else int(self.path_end[position - 1]) + 1
        return self.path_bytes[start:int(self.path_end[position])].tobytes().decode("utf-8")

    def manifest_text(self) -> bytes:
        """The text manifest these columns stand for: "path label" lines (what prepare writes beside it)."""
        return b"".join(b"%s %d\n" % (self.path(p).encode(), int(self.label[p])) for p in range(len(self)))

    def checksum(self) -> str:
        digest = hashlib.sha256(f"planktonio index {FORMAT}".encode())
        for name in COLUMNS:
            array = np.ascontiguousarray(getattr(self, name))
            digest.update(f"{name} {array.dtype.str} {array.shape}".encode())
            digest.update(array.data)
        digest.update(self.manifest_sha256)
        return digest.hexdigest()

    # ---------------------------------------------------------- writing and reading

    @classmethod
    def build(cls, paths: Sequence[str], labels, widths, heights, sizes, mtimes, sha256,
              manifest: bytes) -> "SplitIndex":
        encoded = [p.encode("utf-8") for p in paths]
        blob = np.frombuffer(b"".join(p + b"\n" for p in encoded), dtype=np.uint8)
        ends = np.cumsum(np.asarray([len(p) + 1 for p in encoded], dtype=np.int64)) - 1
        return cls(blob, ends, np.asarray(labels, dtype=np.int32), np.asarray(widths, dtype=np.int32),
                   np.asarray(heights, dtype=np.int32), np.asarray(sizes, dtype=np.int64),
                   np.asarray(mtimes, dtype=np.int64), np.asarray(sha256, dtype=np.uint8).reshape(-1, 32),
                   hashlib.sha256(manifest).digest())

    def write(self, path: Path) -> None:
        arrays = {name: getattr(self, name) for name in COLUMNS}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_arrays(path, {**arrays, "manifest_sha256": np.frombuffer(self.manifest_sha256, dtype=np.uint8),
                            "format": np.asarray(FORMAT),
                            "checksum": np.frombuffer(bytes.fromhex(self.checksum()), np.uint8)})

    @classmethod
    def read(cls, path: Path) -> "SplitIndex":
        """The index at `path`, as written (not yet checked: `check`)."""
        if not path.is_file():
            raise PlanktonioError(f"{path}: not found: {path.parent.parent} was prepared by an older planktonio "
                                  f"or the index was removed; {RERUN}")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                if int(arrays["format"]) != FORMAT:
                    raise PlanktonioError(f"{path}: an index of format {int(arrays['format'])}, this planktonio "
                                          f"reads {FORMAT}; {RERUN}")
                index = cls(*(arrays[name] for name in COLUMNS), manifest_sha256=arrays["manifest_sha256"].tobytes())
                recorded = arrays["checksum"].tobytes().hex()
        except PlanktonioError:
            raise
        except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile) as error:
            raise PlanktonioError(f"{path}: not a readable index ({type(error).__name__}: {error}); {RERUN}") \
                from None
        if recorded != index.checksum():
            raise PlanktonioError(f"{path}: its content does not match its checksum (changed or cut since prepare "
                                  f"wrote it: the recorded image sizes decide every crop); {RERUN}")
        return index

    def check(self, path: Path, num_classes: int) -> None:
        """Every column as a reader needs it, with vectorised checks; a one-line error naming the first
        image at fault otherwise."""
        for name, (dtype, ndim) in COLUMN_TYPES.items():
            column = getattr(self, name)
            if column.dtype != np.dtype(dtype) or column.ndim != ndim:
                raise PlanktonioError(f"{path}: column {name} holds {column.dtype} in {column.ndim} dimension(s), "
                                      f"not {np.dtype(dtype)} in {ndim}; {RERUN}")
        n = len(self.label)
        columns = (self.path_end, self.width, self.height, self.bytes, self.mtime_ns)
        if any(c.ndim != 1 or len(c) != n for c in columns) or self.sha256.shape != (n, 32) or \
                self.path_bytes.ndim != 1:
            raise PlanktonioError(f"{path}: its columns are not of one length; {RERUN}")
        blob, ends = self.path_bytes, self.path_end
        if n and not (ends[-1] == len(blob) - 1 and np.all(np.diff(ends) > 1) and ends[0] > 0):
            raise PlanktonioError(f"{path}: its paths do not fit their bytes; {RERUN}")
        if n == 0 and len(blob):
            raise PlanktonioError(f"{path}: its paths do not fit their bytes; {RERUN}")
        if n:
            separators = blob == SEPARATOR
            if np.count_nonzero(separators) != n or not separators[ends].all():
                raise PlanktonioError(f"{path}: a path holds a line break; {RERUN}")
        self._check_paths(path)
        bad = np.flatnonzero((self.label < 0) | (self.label >= num_classes))
        if len(bad):
            raise self._at(path, bad[0], f"label {int(self.label[bad[0]])} is not a class (there are {num_classes})")
        bad = np.flatnonzero((self.width < 1) | (self.height < 1) | (self.bytes < 0))
        if len(bad):
            raise self._at(path, bad[0], f"size {int(self.width[bad[0]])} x {int(self.height[bad[0]])} px")

    def _check_paths(self, path: Path) -> None:
        """Paths as planktonio/path_rules.py allows them, found on the whole blob at once."""
        found = first_path_problem(self.path_bytes, self.path_end)
        if found is not None:
            raise self._at(path, found[0], f"the path {found[1]}")

    def _at(self, path: Path, position: int, problem: str) -> PlanktonioError:
        shown = self.path_bytes[self.path_start[position]:self.path_end[position]].tobytes()
        return PlanktonioError(f"{path}: image {position} ({shown!r}): {problem}; {RERUN}")


class Entries(Sequence):
    """A split's (relative path, label) pairs in manifest order, made one at a time from its index."""

    def __init__(self, index: SplitIndex):
        self.index = index
        self.labels = index.label

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[p] for p in range(*position.indices(len(self)))]
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(position)
        return self.index.path(position), int(self.labels[position])

    def path(self, position: int) -> str:
        return self.index.path(position)

    def paths(self) -> list[str]:
        """Every path (a Python string each: for the few callers that need them all at once)."""
        return self.index.path_bytes.tobytes().decode("utf-8").split("\n")[:-1]


def stat_files(root: Path, index: SplitIndex, workers: int) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Each file's size and mtime_ns now (-1 where it cannot be read), and why not for those, stat'ed by
    `workers` threads: a stat releases the GIL, and on a network file system (Lustre) each one waits on a
    metadata server, so many in flight is what makes a million of them take seconds, not minutes."""
    from concurrent.futures import ThreadPoolExecutor
    n = len(index)
    sizes, mtimes = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    problems: dict[int, str] = {}
    prefix = os.fsencode(str(root)) + b"/"
    blob = index.path_bytes.tobytes()
    starts, ends = index.path_start.tolist(), index.path_end.tolist()

    def chunk(first: int, last: int) -> None:
        for p in range(first, last):
            try:
                status = os.stat(prefix + blob[starts[p]:ends[p]])
            except FileNotFoundError:
                problems[p] = "missing"
                continue
            except OSError as error:
                problems[p] = error.strerror or type(error).__name__
                continue
            sizes[p], mtimes[p] = status.st_size, status.st_mtime_ns

    step = max(1, min(4096, -(-n // (workers * 4)) if n else 1))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(chunk, first, min(n, first + step)) for first in range(0, n, step)]:
            future.result()
    return sizes, mtimes, problems
