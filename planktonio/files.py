"""Writing files so that a reader never sees half of one: the one atomic-write helper.

Every file planktonio, train and profiling write for later reading (manifests,
shard indexes, checkpoints, summaries, results) goes through `atomic_file`:
the bytes go to a temporary file beside the target, are flushed (and, where
a crash must not lose them, fsync'd), then renamed over it. A rename within
one folder is atomic on POSIX file systems (Lustre included), so the target
is either the old file or the new one, never a mix; a process killed half-way
leaves only the temporary file, which the next write replaces.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def temporary_path(path: Path) -> Path:
    """Where atomic_file writes `path` first (what a process killed half-way leaves behind)."""
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, durable: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces `path`, on an error it is removed.

    durable: fsync the data before the rename (checkpoints: a machine that
    crashes right after the rename must not come back with an empty file).
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, content: str | bytes, *, durable: bool = False) -> None:
    """Write text or bytes to `path` atomically (see atomic_file)."""
    with atomic_file(path, "wb" if isinstance(content, bytes) else "w", durable=durable) as f:
        f.write(content)
