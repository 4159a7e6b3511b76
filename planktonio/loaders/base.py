"""What every loader backend yields, and the bookkeeping they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..dataset import PreparedDataset
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
    workers: int         # decoding threads (DALI) or worker processes (torchvision)
    seed: int
    entries: list[tuple[str, int]]  # the split's manifest: (relative path, label), read once


class Loader:
    """Iterates over one epoch of (images, labels) batches on `spec.device`.

    images: float tensor N x C x H x W (dtype and memory format from
    spec.output), normalised; labels: int64 tensor N. Iterating again starts
    the next epoch. len() is the number of batches this shard yields per epoch.
    """

    backend = "base"

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.manifest_size = len(spec.entries)
        self.epoch, self.skip_batches = 0, 0

    def __len__(self) -> int:
        s = self.spec
        if s.train:
            return sharding.train_batches(self.manifest_size, s.shard_count, s.batch_size)
        return sharding.eval_batches(self.manifest_size, s.shard_index, s.shard_count, s.batch_size)

    @property
    def num_samples(self) -> int:
        """Images this shard yields per epoch."""
        s = self.spec
        if s.train:
            return len(self) * s.batch_size
        return len(sharding.eval_shard_range(self.manifest_size, s.shard_index, s.shard_count))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose which epoch the next iteration reads (like DistributedSampler.set_epoch).

        skip_batches: start that epoch after its first batches, as a run
        resumed mid-epoch must (training only; the rest of the epoch is read
        in the same order as without the skip).
        """
        if skip_batches and not self.spec.train:
            raise ValueError("skip_batches applies to training loaders only")
        self.epoch, self.skip_batches = epoch, skip_batches

    def _epoch_positions(self) -> list[int]:
        """Manifest positions this shard reads in the current epoch, after any skipped batches."""
        s = self.spec
        if s.train:
            order = sharding.train_order(self.manifest_size, s.seed, self.epoch, s.shard_index, s.shard_count)
            return order[self.skip_batches * s.batch_size:]
        return list(sharding.eval_shard_range(self.manifest_size, s.shard_index, s.shard_count))

    def _end_epoch(self) -> None:
        self.set_epoch(self.epoch + 1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes or pipelines; the loader is unusable afterwards."""
