"""Writing files so that a reader never sees half of one: the one atomic-write helper.

Every file planktonio, train and profiling write whole for later reading
(manifests, shard indexes, checkpoints, feature caches, configs, summaries,
results, reports, plots) goes through `atomic_file`: the bytes go to a
temporary file beside the target, are flushed (and, where a crash must not
lose them, fsync'd), then renamed over it. A rename within one folder is
atomic on POSIX file systems (Lustre included), so the target is either the
old file or the new one, never a mix.

Each writer has a temporary of its own (`.NAME.<random>.tmp`), so two
processes writing the same file (two runs sharing a feature-cache folder) never
write into one temporary or rename the other's away: the last complete file
wins. A process killed half-way leaves its temporary behind; `remove_stale`
clears those of a file.

The exceptions are logs written as they grow: metrics.jsonl gets a line per
epoch (appended; a line cut short by a crash is dropped by the resume, which
rewrites the file atomically), and a program's own log files.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

# The process's umask, for the mode of a new file: mkstemp makes its temporary 0600.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def temporaries(path: Path) -> list[Path]:
    """The temporaries of `path` that writers left behind (killed half-way)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def remove_stale(path: Path) -> None:
    """Remove what killed writers of `path` left (call it where no other writer can be at work)."""
    for tmp in temporaries(path):
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, durable: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces `path`, on an error it is removed.

    durable: fsync the data before the rename (checkpoints: a machine that
    crashes right after the rename must not come back with an empty file).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would make it: mkstemp's 0600 hides shared runs' files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, content: str | bytes, *, durable: bool = False) -> None:
    """Write text or bytes to `path` atomically (see atomic_file)."""
    with atomic_file(path, "wb" if isinstance(content, bytes) else "w", durable=durable) as f:
        f.write(content)
