"""Reading image members of tar shards: the interface every shard reader offers, the one read path, and a
scan of a tar's members that survives damage.

`ShardReader` is what a loader asks of shards (planktonio/shards.py `ShardSet`
for a prepared split, planktonio/unlabelled.py `TarShards` for predict's
input): a member's bytes by position, and where it lives, for messages.
Both read through `MemberMaps`: the bytes at a recorded offset, sliced from a
memory map of the shard (opened per process, on first use).

`scan_members` lists a tar's members the way Python's tarfile would, except
that it does not stop at a damaged header: tarfile ends the archive there
without a word, so every member after it would be lost silently. Here the
scan goes on at the next valid header (tar headers sit on 512-byte blocks
and carry a checksum), and every stretch of bytes it had to skip is
returned as `Damage`, so what was in it is reported, never dropped.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ShardReader(Protocol):
    """What a loader reads shards through: positions are the loader's (a split's manifest positions)."""

    def read(self, position: int) -> np.ndarray:
        """The encoded image at `position`: uint8 bytes (a view of a memory map)."""

    def describe(self, position: int) -> str:
        """Where that image lives, for messages: the shard file and the member."""


class MemberMaps:
    """Members of tar files (`names` in `directory`) at recorded offsets and sizes, by position."""

    def __init__(self, directory: Path, names: list[str], shard: np.ndarray, offset: np.ndarray,
                 size: np.ndarray):
        self.directory, self.names = Path(directory), names
        self.shard, self.offset, self.size = shard, offset, size
        self._maps: dict[int, np.memmap] = {}

    def read(self, position: int) -> np.ndarray:
        number = int(self.shard[position])
        if number not in self._maps:
            self._maps[number] = np.memmap(self.directory / self.names[number], dtype=np.uint8, mode="r")
        start = int(self.offset[position])
        return np.asarray(self._maps[number][start:start + int(self.size[position])])

    def __getstate__(self):
        # Worker processes open their own maps rather than receive (a copy of) the parent's.
        return {**self.__dict__, "_maps": {}}


@dataclass(frozen=True)
class Damage:
    """Bytes [start, stop) of a tar that hold no valid header where one was due: what was there is lost."""

    start: int
    stop: int
    before: str | None   # the name of the member read just before it (None: the tar's start)
    after: str | None    # the name of the member read just after it (None: the tar's end)


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def scan_members(path: str | os.PathLike) -> tuple[list[tarfile.TarInfo], list[Damage]]:
    """Every member with a valid header, in order, and every damaged stretch between them.

    Raises tarfile.ReadError for an empty file or one with no valid header at all (not a tar), OSError where
    it cannot be read. The end of a tar is its zero blocks: anything else after the last member is damage.
    """
    members: list[tarfile.TarInfo] = []
    damage: list[Damage] = []
    expected = 0   # where the next member's header should start
    size = os.path.getsize(path)
    if not size:
        raise tarfile.ReadError("empty file (0 bytes)")
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(start)
            archive = None
            try:
                archive = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
                for member in iter(archive.next, None):
                    if member.offset > expected:
                        damage.append(Damage(expected, member.offset, members[-1].name if members else None,
                                             member.name))
                    members.append(member)
                    expected = member.offset_data + _padded(member.size)
                break
            except tarfile.ReadError:  # a damaged header after an extended (pax, GNU) one: go on past it
                start = max(start, archive.offset if archive is not None else start) + tarfile.BLOCKSIZE
        end = _last_nonzero(f, expected, size)
    if not members and end > 0:
        raise tarfile.ReadError("no valid tar header in it")
    if end > expected:
        damage.append(Damage(expected, end, members[-1].name if members else None, None))
    return members, damage


def _last_nonzero(f, start: int, stop: int) -> int:
    """One past the last nonzero byte in [start, stop) of an open file; `start` when all are zero."""
    last, at = start, start
    f.seek(start)
    while at < stop:
        block = f.read(min(1 << 20, stop - at))
        if not block:
            break
        stripped = block.rstrip(b"\0")
        if stripped:
            last = at + len(stripped)
        at += len(block)
    return last
