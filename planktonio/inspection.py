"""`prepare`'s costly part: every candidate image decoded once, in parallel, into columns; resumable.

Each file is read once by a worker process: its size and modification time
(stat'ed before the read, so a file changed during prepare looks changed to
the run that checks it), its full decode (image_checks.py `decode_check`: what
every loader backend will need of it) and the sha256 of the bytes it decoded
(which finds copies). What comes back is kept in numpy columns indexed by
the file's position, a few dozen bytes an image, and a dict for the files
that failed, with the reason: no Python object per image, so a million
images cost what their columns cost.

Work goes out in chunks of a few hundred files with a bounded number in
flight (the pool is never handed the whole list at once), and comes back in
*parts* of PART_IMAGES positions: each part, once all of its chunks are in,
is written to the journal (OUT/.prepare-journal/, atomically). A prepare
stopped by any signal, SIGKILL included, and run again finds the journal of
the same file list and decodes only the parts it lacks; the columns, and so
everything prepare writes, are those of an uninterrupted run. The journal
goes when prepare has written its folder. docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zipfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import remove_stale, write_arrays, write_atomic
from .processes import end_with_parent

JOURNAL = ".prepare-journal"
JOURNAL_FORMAT = 1
PART_IMAGES = 16384    # positions per journal part: a stop loses at most about this much decoding
CHUNK_IMAGES = 256     # files per task sent to a worker
IN_FLIGHT_PER_WORKER = 4


@dataclass
class Inspection:
    """What decoding every file found, by position: sizes, bytes, dates, digests; and the failures."""

    width: np.ndarray
    height: np.ndarray
    bytes: np.ndarray
    mtime_ns: np.ndarray
    sha256: np.ndarray                    # N x 32 uint8 (zeros for a file that failed)
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)  # position -> (reason, detail)

    @classmethod
    def empty(cls, n: int) -> "Inspection":
        return cls(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64),
                   np.zeros((n, 32), np.uint8))

    def put(self, start: int, part: dict) -> None:
        stop = start + len(part["width"])
        for name in ("width", "height", "bytes", "mtime_ns", "sha256"):
            getattr(self, name)[start:stop] = part[name]
        for offset, reason, detail in part["problems"]:
            self.problems[start + offset] = (reason, detail)


def _inspect_chunk(root: str, paths: list[str]) -> dict:
    """One task of a worker: the columns of these files (positions relative to the chunk's first)."""
    from .image_checks import decode_check
    n = len(paths)
    out = {"width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32), "bytes": np.zeros(n, np.int64),
           "mtime_ns": np.zeros(n, np.int64), "sha256": np.zeros((n, 32), np.uint8), "problems": []}
    for i, path in enumerate(paths):
        full = os.path.join(root, path)
        try:
            status = os.stat(full)
            with open(full, "rb") as f:
                data = f.read()
        except OSError as error:  # permissions, I/O errors
            out["problems"].append((i, "unreadable", str(error) or type(error).__name__))
            continue
        check = decode_check(full, data)
        out["bytes"][i], out["mtime_ns"][i] = status.st_size, status.st_mtime_ns
        out["sha256"][i] = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
        if check.problem is not None:
            out["problems"].append((i, *check.problem))
        else:
            out["width"][i], out["height"][i] = check.width, check.height
    return out


class Journal:
    """The parts of an inspection done so far, in OUT/.prepare-journal/, for one list of files."""

    def __init__(self, out: Path, source: Path, paths: list[str], skip: np.ndarray):
        self.folder = Path(out) / JOURNAL
        digest = hashlib.sha256(str(source).encode())
        for path in paths:
            digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
        digest.update(np.packbits(skip).tobytes())
        self.header = {"format": JOURNAL_FORMAT, "source": str(source), "files": len(paths),
                       "part_images": PART_IMAGES, "digest": digest.hexdigest()}

    def start(self) -> set[int]:
        """The parts done already by an earlier run of the same file list (others' journals are cleared)."""
        header = self.folder / "header.json"
        try:
            same = json.loads(header.read_text()) == self.header
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(header, json.dumps(self.header) + "\n")
            return set()
        done = set()
        for part in self.folder.glob("part-*.npz"):
            remove_stale(part)
            done.add(int(part.stem.removeprefix("part-")))
        return done

    def write(self, number: int, inspection: Inspection, start: int, stop: int) -> None:
        problems = [[p - start, *inspection.problems[p]] for p in range(start, stop) if p in inspection.problems]
        write_arrays(self.folder / f"part-{number:06d}.npz",
                     {**{name: getattr(inspection, name)[start:stop]
                         for name in ("width", "height", "bytes", "mtime_ns", "sha256")},
                      "problems": np.frombuffer(json.dumps(problems).encode(), np.uint8)})

    def read(self, number: int) -> dict | None:
        """A part's columns, or None where it cannot be read (written again)."""
        try:
            with np.load(self.folder / f"part-{number:06d}.npz", allow_pickle=False) as part:
                columns = {name: part[name] for name in ("width", "height", "bytes", "mtime_ns", "sha256")}
                columns["problems"] = [tuple(p) for p in json.loads(part["problems"].tobytes())]
            return columns
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def inspect_files(source: Path, paths: list[str], skip: np.ndarray, workers: int, out: Path,
                  progress: bool | None = None) -> tuple[Inspection, Journal]:
    """Decode every file of `paths` not marked in `skip` (in parallel, resuming a journal in `out`)."""
    inspection = Inspection.empty(len(paths))
    journal = Journal(out, source, paths, skip)
    done = _resume(journal, inspection)
    chunks = _chunks_to_decode(len(paths), done, skip)
    if done:
        print(f"prepare: {len(done)} of {_parts(len(paths))} parts were decoded by an earlier run "
              f"({journal.folder}); going on from there", file=sys.stderr, flush=True)
    from tqdm import tqdm
    bar = tqdm(total=len(paths), initial=len(paths) - sum(b - a for a, b in chunks), unit="image",
               desc="prepare: decoding", disable=progress is False or (progress is None and not sys.stderr.isatty()))
    results = _Results(inspection, journal, paths, skip, chunks, bar)
    try:
        if workers <= 1 or len(chunks) <= 1:
            _decode_here(str(source), chunks, results)
        else:
            _decode_in_pool(str(source), chunks, workers, results)
    finally:
        bar.close()
    return inspection, journal


def _parts(n: int) -> int:
    return -(-n // PART_IMAGES)


def _resume(journal: Journal, inspection: Inspection) -> set[int]:
    """The parts an earlier run decoded, put into `inspection`: their numbers."""
    n, done = len(inspection.width), set()
    for number in sorted(journal.start()):
        columns = journal.read(number) if number < _parts(n) else None
        start = number * PART_IMAGES
        if columns is not None and len(columns["width"]) == min(PART_IMAGES, n - start):
            inspection.put(start, columns)
            done.add(number)
    return done


def _chunks_to_decode(n: int, done: set[int], skip: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of the parts not done; a chunk never spans two parts."""
    chunks = [(start, min(start + CHUNK_IMAGES, (start // PART_IMAGES + 1) * PART_IMAGES, n))
              for number in range(_parts(n)) if number not in done
              for start in range(number * PART_IMAGES, min((number + 1) * PART_IMAGES, n), CHUNK_IMAGES)]
    return [(a, b) for a, b in chunks if not skip[a:b].all()] + \
           [(a, b) for a, b in chunks if skip[a:b].all()]  # all-skipped chunks finish their parts at once


class _Results:
    """Where decoded chunks go: into the columns, onto the progress bar, and, once a part's chunks are all
    in, into the journal."""

    def __init__(self, inspection: Inspection, journal: Journal, paths: list[str], skip: np.ndarray,
                 chunks: list[tuple[int, int]], bar) -> None:
        self.inspection, self.journal, self.paths, self.skip, self.bar = inspection, journal, paths, skip, bar
        self.left: dict[int, int] = {}  # part number -> chunks of it still out
        for a, _ in chunks:
            self.left[a // PART_IMAGES] = self.left.get(a // PART_IMAGES, 0) + 1

    def todo(self, a: int, b: int) -> list[str]:
        """The names of a chunk's files to decode (those not skipped)."""
        return [self.paths[p] for p in range(a, b) if not self.skip[p]]

    def finished(self, a: int, b: int, columns: dict | None) -> None:
        """A chunk's columns (of its files not skipped; None: it had none) are in."""
        if columns is not None:
            self.inspection.put(a, self._spread(a, b, columns))
        self.bar.update(b - a)
        number = a // PART_IMAGES
        self.left[number] -= 1
        if self.left[number] == 0:
            n = len(self.paths)
            self.journal.write(number, self.inspection, number * PART_IMAGES, min((number + 1) * PART_IMAGES, n))

    def _spread(self, a: int, b: int, columns: dict) -> dict:
        """A chunk's results (of its files not skipped) at their positions."""
        kept = np.flatnonzero(~self.skip[a:b])
        full = Inspection.empty(b - a)
        for name in ("width", "height", "bytes", "mtime_ns", "sha256"):
            getattr(full, name)[kept] = columns[name]
        problems = [(int(kept[i]), reason, detail) for i, reason, detail in columns["problems"]]
        return {**{name: getattr(full, name) for name in ("width", "height", "bytes", "mtime_ns", "sha256")},
                "problems": problems}


def _decode_here(root: str, chunks: list[tuple[int, int]], results: _Results) -> None:
    for a, b in chunks:
        names = results.todo(a, b)
        results.finished(a, b, _inspect_chunk(root, names) if names else None)


def _decode_in_pool(root: str, chunks: list[tuple[int, int]], workers: int, results: _Results) -> None:
    """The chunks decoded by `workers` processes, a bounded number in flight, in the order they finish."""
    with ProcessPoolExecutor(workers, initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
        pending, queue = {}, iter(chunks)
        while True:
            while len(pending) < workers * IN_FLIGHT_PER_WORKER:
                chunk = next(queue, None)
                if chunk is None:
                    break
                names = results.todo(*chunk)
                if not names:
                    results.finished(*chunk, None)
                    continue
                pending[pool.submit(_inspect_chunk, root, names)] = chunk
            if not pending:
                break
            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in ready:
                a, b = pending.pop(future)
                results.finished(a, b, future.result())
