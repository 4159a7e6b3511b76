"""What every loader backend yields, and the bookkeeping they share: epochs, shards, plans."""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..dataset import PreparedDataset
from ..plans import Plan, make_plan
from ..shard_reading import ShardReader
from ..transforms import Output, Transform
from . import sharding


@dataclass
class LoaderSpec:
    """Everything a backend needs to build its pipeline; filled in by make_loader."""

    dataset: PreparedDataset
    split: str
    batch_size: int
    transform: Transform
    output: Output
    device: torch.device
    train: bool          # shuffle every epoch and drop the last partial batch
    shard_index: int
    shard_count: int
    workers: int         # DataLoader worker processes (backends that decode in workers)
    threads: int         # DALI CPU threads (backends that decode with DALI)
    seed: int
    entries: Sequence[tuple[str, int]]  # the split's (relative path, label) pairs: index.Entries, or a list
    widths: np.ndarray   # each entry's image size, as prepare recorded it (EXIF orientation applied)
    heights: np.ndarray
    shards: ShardReader | None = None  # the split's packed shards where prepared has them, else loose files


def entry_labels(entries: Sequence[tuple[str, int]]) -> np.ndarray:
    """Every entry's label, as int64: the index's column where there is one (no tuple per image made)."""
    labels = getattr(entries, "labels", None)
    if labels is None:
        labels = [label for _, label in entries]
    return np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class BatchPlan:
    """What one batch is: manifest positions, in order, and the plan of each of those images."""

    epoch: int
    index: int           # the batch's number within its epoch
    positions: np.ndarray
    plan: Plan


class BatchStream:
    """Batch after batch, (epoch, index), across epoch boundaries: what a prefetching backend is fed.

    A backend that prepares batches ahead (DALI's pipeline, DataLoader
    workers) takes them from here with `advance()`; after batch n-1 of
    epoch e comes batch 0 of epoch e+1, so the next epoch is prepared while
    this one ends and a boundary costs no more than any batch. `in_flight`
    remembers what was handed out and not yet received, oldest first.
    """

    def __init__(self, loader: "Loader"):
        # A weak reference: the loader owns its stream (and, through its pipeline or
        # DataLoader, what feeds from it); no cycle back keeps a dropped loader from being
        # freed at once, its worker processes with it.
        self._loader = weakref.ref(loader)
        self.next_batch = (0, 0)   # (epoch, index) that advance() hands out next
        self.in_flight: deque[tuple[int, int]] = deque()

    @property
    def loader(self) -> "Loader":
        return self._loader()

    def upcoming(self) -> tuple[int, int]:
        """The batch the consumer would receive next."""
        return self.in_flight[0] if self.in_flight else self.next_batch

    def redirect(self, epoch: int, index: int) -> int:
        """Hand out (epoch, index) and what follows from now on; returns how many batches were in flight."""
        stale = len(self.in_flight)
        self.next_batch = (epoch, index)
        return stale

    def advance(self) -> BatchPlan:
        epoch, index = self.next_batch
        if index >= len(self.loader):
            epoch, index = epoch + 1, 0
        self.in_flight.append((epoch, index))
        self.next_batch = (epoch, index + 1)
        return self.loader.batch_plan(epoch, index)

    def received(self, epoch: int, index: int) -> None:
        """The consumer got the oldest batch in flight, which must be (epoch, index)."""
        got = self.in_flight.popleft()
        if got != (epoch, index):
            raise RuntimeError(f"{self.loader.backend}: expected batch {(epoch, index)}, got {got}")


class BatchBuffers:
    """Batch memory reused once the consumer has let go of it: a fresh 38 MB batch would be paged in anew
    every time (page faults and zeroing cost about as much as normalising it)."""

    def __init__(self, shape: tuple[int, ...], dtype):
        self.shape, self.dtype = shape, dtype
        self._buffers: list[tuple[np.ndarray, weakref.ref | None]] = []

    def take(self, rows: int) -> np.ndarray:
        """A view of `rows` images of a buffer nobody holds now; the view keeps it taken while it lives."""
        free = next((i for i, (_, handed) in enumerate(self._buffers) if handed is None or handed() is None), None)
        if free is None:
            self._buffers.append((np.empty(self.shape, dtype=self.dtype), None))
            free = len(self._buffers) - 1
        buffer = self._buffers[free][0]
        view = buffer[:rows]
        self._buffers[free] = (buffer, weakref.ref(view))
        return view


class Loader:
    """Iterates over one epoch of (images, labels) batches on `spec.device`.

    images: float tensor N x C x H x W (dtype and memory format from
    spec.output), normalised; labels: int64 tensor N. Iterating again starts
    the next epoch. len() is the number of batches this shard yields per epoch.

    Batch k of epoch e is `batch_plan(e, k)`: which images, and how each is
    cropped and flipped (planktonio/plans.py). Backends differ only in how
    they carry that plan out. Use a loader in a `with` block, or call
    close(), to release its worker processes or pipelines.
    """

    backend = "base"
    prefetch_depth = 0        # batches the backend prepares ahead of the consumer

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.manifest_size = len(spec.entries)
        self.epoch, self.skip_batches = 0, 0
        self.build_seconds = 0.0  # time spent building pipelines (benchmarks report it)
        self.pipelines_built = 0
        self._orders: dict[int, np.ndarray] = {}
        self._plans: dict[int, Plan] = {}

    def __len__(self) -> int:
        s = self.spec
        if s.train:
            return sharding.train_batches(self.manifest_size, s.shard_count, s.batch_size)
        return sharding.eval_batches(self.manifest_size, s.shard_index, s.shard_count, s.batch_size)

    @property
    def images_per_epoch(self) -> int:
        """Images this shard yields per epoch."""
        s = self.spec
        if s.train:
            return len(self) * s.batch_size
        return len(sharding.eval_shard_range(self.manifest_size, s.shard_index, s.shard_count))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose which epoch the next iteration reads (like DistributedSampler.set_epoch).

        skip_batches: start that epoch after its first batches, as a run
        resumed mid-epoch must (training only; the rest of the epoch is read
        in the same order and with the same crops as without the skip).
        """
        if skip_batches and not self.spec.train:
            raise ValueError("skip_batches applies to training loaders only")
        self.epoch, self.skip_batches = epoch, skip_batches

    # ------------------------------------------------------------ plans

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Manifest positions this shard reads in `epoch`, in order."""
        if epoch not in self._orders:
            s = self.spec
            if s.train:
                order = sharding.train_order(self.manifest_size, s.seed, epoch, s.shard_index, s.shard_count)
            else:
                order = sharding.eval_shard_range(self.manifest_size, s.shard_index, s.shard_count)
            self._orders = {epoch: np.asarray(order, dtype=np.int64)}  # one epoch at a time is all we need
        return self._orders[epoch]

    def _epoch_plan(self, epoch: int) -> Plan:
        """The plan of every image of the manifest in `epoch` (vectorised; computed once an epoch). Not a batch's
        plans alone (plans.plan_at, the same rows): drawn per group of 4 positions, a shuffled batch's plans
        cost about 50 times as much per image, on every batch."""
        if epoch not in self._plans:
            s = self.spec
            self._plans = {epoch: make_plan(s.transform, s.widths, s.heights, seed=s.seed, epoch=epoch)}
        return self._plans[epoch]

    def batch_plan(self, epoch: int, index: int) -> BatchPlan:
        """Batch `index` of `epoch`: its images (the last evaluation batch may be short) and their plans."""
        size = self.spec.batch_size
        positions = self._epoch_order(epoch)[index * size:(index + 1) * size]
        return BatchPlan(epoch, index, positions, self._epoch_plan(epoch).take(positions))

    def all_bad_message(self, epoch: int, index: int) -> str:
        """Why a training batch none of whose files could be decoded stops the loader (a backend that skips bad
        files must not leave out a step: a resume would start a batch late, DDP's other ranks would wait)."""
        positions = self.batch_plan(epoch, index).positions.tolist()
        shards, first = self.spec.shards, positions[0]
        first = self.spec.dataset.root / self.spec.entries[first][0] if shards is None else shards.describe(first)
        return (f"{first} and the other {len(positions) - 1} file(s) of training batch {index} of epoch {epoch} "
                f"broke or changed since prepare checked them (the warnings above name each); restore "
                f"them and rerun prepare, then resume")

    def _end_epoch(self) -> None:
        self.set_epoch(self.epoch + 1)

    def stats(self) -> dict:
        """Figures of the backend's own, for benchmarks to report (the cache: its decode and memory)."""
        return {}

    # ------------------------------------------------------------ iteration and lifetime

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes or pipelines; the loader is unusable afterwards."""

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
