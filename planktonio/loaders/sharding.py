"""Which images each shard (rank) reads, and how many batches an epoch has.

Every backend follows these rules (through Loader.batch_plan, base.py), and
so does the feature cache (train/feature_cache.py), so a run can switch
loaders without changing what each rank sees or how many steps an epoch takes:

- evaluation: shard i of S reads the contiguous slice [N*i//S, N*(i+1)//S)
  of the manifest, in order, last batch partial: every image exactly once
  per epoch across all shards.
- training: every epoch is a fresh permutation of the manifest, a function
  of (seed, epoch) shared by all ranks (DistributedSampler's scheme); rank i
  takes every S-th image of its first (N//S)*S and yields (N//S)//B full
  batches. Every rank thus takes the same number of optimizer steps, which
  DDP needs, and every backend reads the same images in the same order.
"""

from __future__ import annotations

import math

import torch

from ..errors import PlanktonioError


def check_shard(index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        raise PlanktonioError(f"shard index must be in [0, {count}) for {count} shard(s), not {index}")


def eval_shard_range(num_samples: int, index: int, count: int) -> range:
    """The manifest positions evaluation shard `index` of `count` reads."""
    check_shard(index, count)
    return range(num_samples * index // count, num_samples * (index + 1) // count)


def eval_batches(num_samples: int, index: int, count: int, batch_size: int) -> int:
    return math.ceil(len(eval_shard_range(num_samples, index, count)) / batch_size)


def train_samples_per_shard(num_samples: int, count: int) -> int:
    return num_samples // count


def train_batches(num_samples: int, count: int, batch_size: int) -> int:
    return train_samples_per_shard(num_samples, count) // batch_size


def train_order(num_samples: int, seed: int, epoch: int, index: int, count: int) -> list[int]:
    """The manifest positions training shard `index` of `count` reads in `epoch`, in order."""
    check_shard(index, count)
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    per_shard = train_samples_per_shard(num_samples, count)
    return order[: per_shard * count][index::count]
