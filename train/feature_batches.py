"""The feature cache's batches: kept activations served in the order and shards of the loaders' rules.

`FeatureBatches` looks like a Loader to the training loop. A store in host or
device memory is gathered batch by batch; a store on disk (a memory-mapped
file, `OnDisk`) is read a few batches ahead by a background thread, each
batch's rows gathered in file order (sorted: the kernel reads ahead along a
file, and a page is read once however many rows of the batch it holds), then
put back in the batch's order: the same values, so the same run.
"""

from __future__ import annotations

import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from planktonio import memory
from planktonio.loaders import sharding

READ_AHEAD = 4  # batches a store on disk is read ahead of the step

# ------------------------------------------------------------------ the kept activations


class FeatureBatches:
    """Batches of kept activations in the order and shards in which the training or evaluation loader
    would read the images (the loaders' rules, sharding.py), with their labels: looks like a Loader."""

    backend = "feature cache"

    def __init__(self, store: memory.Rows, count: int, views: int, labels: torch.Tensor, *, batch_size: int,
                 train: bool, seed: int, shard_index: int, shard_count: int, device: torch.device):
        self.store, self.count, self.views, self.labels = store, count, views, labels  # rows: view v at v*count
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shard_index, self.shard_count, self.device = shard_index, shard_count, device
        self.epoch, self.skip_batches = 0, 0

    def __len__(self) -> int:
        if self.train:
            return sharding.train_batches(self.count, self.shard_count, self.batch_size)
        return sharding.eval_batches(self.count, self.shard_index, self.shard_count, self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def _order(self) -> torch.Tensor:
        if self.train:
            order = sharding.train_order(self.count, self.seed, self.epoch, self.shard_index, self.shard_count)
        else:
            order = sharding.eval_shard_range(self.count, self.shard_index, self.shard_count)
        return torch.as_tensor(list(order), dtype=torch.long)

    def __iter__(self):
        order = self._order()
        rows = order + (self.epoch % self.views) * self.count  # the epoch's view: its plans repeat with the period
        # The epoch's order goes to where the rows and the labels are once, not per batch: a cached epoch on
        # a GPU is a fraction of a second of small kernels, and a copy from pageable memory waits.
        rows, labels_order = rows.to(self.store.device), order.to(self.labels.device)

        def batch(index: int):
            taken = slice(index * self.batch_size, (index + 1) * self.batch_size)
            labels = self.labels.index_select(0, labels_order[taken])
            if not self.store.on_disk:
                return self.store.gather(rows[taken], self.device), labels
            in_file_order, where = rows[taken].sort()  # (module docstring), then back in the batch's order
            back = torch.empty_like(where)
            back[where] = torch.arange(len(where))
            return self.store.gather(in_file_order, self.device).index_select(0, back.to(self.device)), labels
        indices = range(self.skip_batches, len(self))
        if not self.store.on_disk:
            yield from map(batch, indices)
        else:  # a reader thread gathers (reads from disk) the next batches while the step runs on this one
            reader = ThreadPoolExecutor(1, thread_name_prefix="feature-cache-reader")
            try:
                ahead = deque(reader.submit(batch, i) for i in indices[:READ_AHEAD])
                for i in indices[READ_AHEAD:]:
                    ahead.append(reader.submit(batch, i))
                    yield ahead.popleft().result()
                while ahead:
                    yield ahead.popleft().result()
            finally:  # an epoch left early (a stop signal): the batches read ahead are not waited for
                reader.shutdown(wait=True, cancel_futures=True)
        self.set_epoch(self.epoch + 1)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ a store on disk


class OnDisk:
    """Where the stores go when no memory budget takes them: memory-mapped files in `folder`
    (memory.Rows.in_file), in host memory's place; nothing reserved in a budget."""

    device, pinned = memory.HOST, False

    def __init__(self, folder: Path, ranks_on_node: int = 1):
        self.folder = folder
        shared = f", one store for the {ranks_on_node} ranks of each node" if ranks_on_node > 1 else ""
        self.placement = f"disk ({folder}, memory-mapped{shared})"

    def release(self) -> None:
        pass


def disk_free_bytes(folder: Path) -> int:
    """Free bytes where `folder` is (or would be made: its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free
