"""An output folder of predictions belongs to one checkpoint and one set of settings.

samples.csv adds up every unit of OUT: units of two checkpoints (or of
two class lists, thresholds, formats) would make one table of two runs.
So OUT/predictions.json records whose folder it is (the settings key of
settings.py, with the run and checkpoint, for the messages) when it is
first written, and every task checks it before it writes anything:
- the same settings: the task goes on, at the same time as the others (the
  tasks of one job array share the folder by design);
- other settings: refused in one line, unless --overwrite, which makes the
  folder this run's (its old units are redone by the tasks that hold them,
  and the merge refuses to add up what is left of the old ones);
- other settings while a task of them is still writing: refused, --overwrite
  or not.
The writers hold a shared POSIX record lock on OUT/.lock (as fit's run lock,
train/run_folder.py: the kernel drops it however the process ends; NFS and
Lustre with -o flock honour it across nodes); taking the folder for other
settings needs it exclusive. OUT/.gate, held exclusively for the moment of
the check, makes check and claim one step.

POSIX locks belong to the process, and closing any descriptor of the file
drops them: nothing else in the process may open .lock or .gate.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from planktonio.errors import DiskError, PlanktonioError
from planktonio.files import check_folder_writable, write_atomic

from .options import UNITS

OWNER = "predictions.json"
LOCK = ".lock"
GATE = ".gate"
SUMMARIES = ("samples.csv", "rejected.csv", "provenance.json")  # the merge's: they describe the old owner


def owner_of(out: Path) -> dict | None:
    """OUT's owner record, or None where none was written (a new folder, or one of an older planktonio)."""
    try:
        return json.loads((Path(out) / OWNER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise PlanktonioError(f"{Path(out) / OWNER}: unreadable ({error}); choose another --out") from None


def describe(record: dict) -> str:
    """A run's predictions, as the messages name them: the checkpoint, its sha256 and the settings key."""
    return (f"{record.get('run', '?')}/{record.get('checkpoint', '?')} (sha256 "
            f"{str(record.get('checkpoint_sha256', '?'))[:12]}, settings {str(record.get('settings', '?'))[:12]})")


class PredictionsFolder:
    """OUT for the life of one task: `with PredictionsFolder(out, record, overwrite):` checks and claims it."""

    def __init__(self, out: Path, record: dict, overwrite: bool):
        self.out, self.record, self.overwrite = Path(out), record, overwrite
        self._lock: int | None = None

    def __enter__(self) -> PredictionsFolder:
        check_folder_writable(self.out / UNITS, "--out")
        gate = _open(self.out / GATE)
        try:
            fcntl.lockf(gate, fcntl.LOCK_EX)  # held only while the owner is checked and written
            self._lock = _open(self.out / LOCK)
            self._claim()
        except BaseException:
            self.release()
            raise
        finally:
            os.close(gate)
        return self

    def _claim(self) -> None:
        owner = owner_of(self.out)
        if owner is not None and owner.get("settings") == self.record["settings"]:
            if not _try_lock(self._lock, fcntl.LOCK_SH):  # only a claim under the gate holds it exclusively
                raise PlanktonioError(f"--out {self.out}: another predict is taking this folder; try again")
            return
        if owner is not None and not self.overwrite:
            raise PlanktonioError(f"--out {self.out}: holds the predictions of {describe(owner)}, not of "
                                  f"{describe(self.record)}: predicted with other settings or another checkpoint; "
                                  f"choose another --out, or --overwrite to redo every unit (every --shard)")
        if not _try_lock(self._lock, fcntl.LOCK_EX):
            raise PlanktonioError(f"--out {self.out}: another predict is writing it, for {describe(owner or {})}; "
                                  f"wait for it to end, or choose another --out")
        for name in SUMMARIES if owner is not None else ():
            (self.out / name).unlink(missing_ok=True)
        write_atomic(self.out / OWNER, json.dumps(self.record, indent=2) + "\n")
        fcntl.lockf(self._lock, fcntl.LOCK_SH)  # the folder is ours: the tasks of our job may join

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the lock
            self._lock = None

    def __exit__(self, *exc) -> None:
        self.release()


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise DiskError(f"--out {path.parent}: cannot be written ({error.strerror}); choose another --out") from None


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise PlanktonioError(f"cannot lock a predictions folder ({error.strerror}); the file system may not "
                                  f"support locks (Lustre: mount with -o flock)") from None
        return False
    return True
