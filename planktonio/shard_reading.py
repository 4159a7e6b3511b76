"""Reading image members of tar shards: the interface every shard reader offers, and the one read path.

`ShardReader` is what a loader asks of shards (planktonio/shards.py `ShardSet`
for a prepared split, planktonio/unlabelled.py `TarShards` for predict's
input): a member's bytes by position, and where it lives, for messages.
Both read through `MemberMaps`: the bytes at a recorded offset, sliced from a
memory map of the shard (opened per process, on first use).
"""

from __future__ import annotations

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
