"""The run folder: created with a clear error when it cannot be, and written by one process at a time.

Two `train fit` on the same --out (a mistyped --out in a Slurm array, a
resubmission while the first job still runs) would interleave metrics.jsonl
lines and checkpoints of two runs. `RunLock` makes the folder's writer
exclusive for the life of the process that holds it:

- the lock is a POSIX record lock (`fcntl.lockf`) on RUN/.lock. The kernel
  drops it when its process ends, however it ends (SIGKILL, the OOM killer,
  a node lost: the file server then releases it), so a dead run never
  blocks the next one, and no stale lock file needs cleaning up;
- POSIX locks, not flock(2): NFS clients implement them through the NFS
  lock protocol, so they hold across nodes, and Lustre (Cirrus's /work)
  honours both across nodes when mounted with `-o flock` (with
  `localflock`, only within one node: ask the site which);
- the file names its holder (host and pid), which a refused second writer
  prints.
Under DDP rank 0 holds it for all ranks (the others write nothing).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from planktonio.errors import DiskError, PlanktonioError

from . import distributed

LOCK = ".lock"


def make_run_folder(out: Path) -> None:
    """Create --out (and its parents), or say in one line why it cannot be a run folder."""
    if out.exists() and not out.is_dir():
        raise PlanktonioError(f"--out {out}: is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PlanktonioError(f"--out {out}: cannot be used as a run folder ({reason}"
                              f"{f': {error.filename}' if error.filename else ''}); choose another --out") from None


class RunLock:
    """An exclusive lock on a run folder for this process's lifetime (or until release())."""

    def __init__(self, out: Path, action: str = "train fit"):
        self.path = out / LOCK
        self.action = action
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # a read-only or foreign run folder: nothing may be written there
            raise DiskError(f"{self.path.parent}: cannot be written ({error.strerror}), so {self.action} cannot "
                            f"hold it; copy the run folder somewhere writable, or fix its permissions") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise PlanktonioError(f"{self.path}: cannot be locked ({error.strerror}); the file system may "
                                      f"not support locks (Lustre: mount with -o flock)") from None
            raise PlanktonioError(f"{self.path.parent}: another process is writing this run ({self.holder()}); "
                                  f"wait for it to end, or choose another --out") from None
        # Who holds it, for a refused second writer to print. Not read by the lock itself.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.action}, pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def lock_run(out: Path, ctx: distributed.Context, action: str = "train fit") -> Iterator[RunLock]:
    """Rank 0 holds the run folder for the run's life; every rank learns whether it could, so that all stop
    together when it could not."""
    lock, refused = RunLock(out, action), None
    if ctx.is_main:
        try:
            lock.acquire()
        except PlanktonioError as error:
            refused = error
    try:
        if distributed.all_sum([float(refused is not None)], ctx.device)[0] > 0:
            raise refused or PlanktonioError(f"{out}: rank 0 could not take the run folder (its message says why)")
        yield lock
    finally:
        lock.release()
