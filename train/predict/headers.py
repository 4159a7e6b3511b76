"""The header scan before any decoding (sizes, and the files no loader can read), in worker processes.

Loose files are planktonio.unlabelled's own scan. Tar shards are scanned
here: a job that carried the shards would pickle their whole member table
every time (its size grows with the catalog, and at a million members it
holds up the first batch for minutes), so each worker gets the shards
once, when it starts (the pool's initializer), and each job carries its
positions only.
"""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from planktonio import unlabelled
from planktonio.unlabelled import Catalog, TarShards

JOB_IMAGES = 512  # the most images of one job

_shards: TarShards | None = None  # in a scan worker: the catalog's shards, handed over once


def read_headers(catalog: Catalog, positions: np.ndarray, workers: int = 1, pool=ProcessPoolExecutor):
    """Widths, heights (arrays over `positions`) and {position: (reason, detail)} of the images no loader
    can read, `workers` processes at a time (`pool`: the executor class, for tests)."""
    if catalog.shards is None or workers <= 1:
        return unlabelled.read_headers(catalog, positions, workers)
    chunks = jobs([int(p) for p in positions], workers)
    with pool(max_workers=workers, initializer=_keep, initargs=(catalog.shards,)) as scan:
        results = [r for done in scan.map(_scan, chunks) for r in done]
    widths = np.asarray([r[0] for r in results], dtype=np.int64)
    heights = np.asarray([r[1] for r in results], dtype=np.int64)
    problems = {p: r[2] for p, r in zip(positions.tolist(), results) if r[2] is not None}
    return widths, heights, problems


def jobs(positions: list[int], workers: int) -> list[list[int]]:
    """The positions in jobs of at most JOB_IMAGES, about eight a worker (so that the workers end together)."""
    size = max(1, min(JOB_IMAGES, len(positions) // (workers * 8) or 1))
    return [positions[i:i + size] for i in range(0, len(positions), size)]


def _keep(shards: TarShards) -> None:
    global _shards
    _shards = shards


def _scan(positions: list[int]) -> list[tuple[int, int, tuple[str, str] | None]]:
    return [(0, 0, ("empty", "member has 0 bytes")) if not _shards.size[p]
            else unlabelled.peek(io.BytesIO(_shards.read(p).tobytes())) for p in positions]
