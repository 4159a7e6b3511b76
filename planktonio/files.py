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

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from .errors import DiskError

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


# What a write can fail with that is the disk's doing, not the program's: said in one line (DiskError).
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM,
               errno.ENOTDIR, errno.EISDIR, errno.ENOENT}


def disk_cause(error: BaseException, names: tuple) -> OSError | None:
    """The disk's OSError behind `error`, about one of `names` (None: no file named): the error itself, or one
    that a library caught and replaced with its own (torch.save raises RuntimeError "unexpected pos ..." over
    the ENOSPC of its write; its __context__ keeps the OSError). None if the disk is not the cause."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_ERRNOS and error.filename in names:
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_error(path: Path, error: OSError) -> DiskError:
    reason = error.strerror or type(error).__name__
    return DiskError(f"{path}: cannot be written ({reason}); free space, fix the folder's permissions or choose "
                     f"another place (nothing written before was lost)")


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, durable: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces `path`, on an error it is removed.

    durable: fsync the data before the rename (checkpoints: a machine that
    crashes right after the rename must not come back with an empty file).
    A disk that cannot take the file (full, read-only, a quota, a missing or
    non-folder parent) is a DiskError naming `path`; the old file is intact.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise disk_error(path, error) from None
    tmp = Path(name)
    try:
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would make it: mkstemp's 0600 hides shared runs' files
        os.replace(tmp, path)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        # (an error reading something else inside the block names that file: it stays what it is)
        cause = disk_cause(error, (None, str(tmp), str(path)))
        if cause is not None:
            raise disk_error(path, cause) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike, what: str, make_parent: bool = False) -> None:
    """Before expensive work: `path` can be written (its folder exists, or is made with make_parent, and takes
    a file, and it is not a folder itself). A DiskError naming `what` (the option that gave it) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise DiskError(f"{what} {path}: is a folder; name a file in it")
    if make_parent and not path.parent.exists():
        try:
            path.parent.mkdir(parents=True)
        except OSError as error:
            raise DiskError(f"{what} {path}: its folder cannot be made ({error.strerror or error})") from None
    if not path.parent.is_dir():
        raise DiskError(f"{what} {path}: its folder {path.parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise DiskError(f"{what} {path}: cannot be written there ({error.strerror or error}); choose another "
                        f"place") from None


def check_folder_writable(folder: str | os.PathLike, what: str, make: bool = True) -> None:
    """Before expensive work: `folder` exists or can be made (made, unless make=False: then its nearest
    existing parent is tried), and takes a file. A DiskError otherwise."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise DiskError(f"{what} {folder}: is a file, not a folder")
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise DiskError(f"{what} {folder}: {existing} is a file, not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise DiskError(f"{what} {folder}: cannot be written ({error.strerror or error}); choose another "
                        f"place") from None


def write_atomic(path: str | os.PathLike, content: str | bytes, *, durable: bool = False) -> None:
    """Write text or bytes to `path` atomically (see atomic_file)."""
    with atomic_file(path, "wb" if isinstance(content, bytes) else "w", durable=durable) as f:
        f.write(content)


def write_arrays(path: str | os.PathLike, arrays: dict) -> None:
    """numpy arrays to an .npz file (read with np.load, allow_pickle=False), atomically, the same arrays always
    giving the same bytes: np.savez stamps each member with the time of writing, this writes a fixed date,
    so a prepare run twice (or resumed) writes byte-identical indexes. Uncompressed: a column is one read."""
    import io
    import zipfile

    import numpy as np
    with atomic_file(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue())
