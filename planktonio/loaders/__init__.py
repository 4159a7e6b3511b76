"""One interface over every loader backend: `make_loader(backend=..., ...)`.

    loader = make_loader("dali-gpu", "runs/prepared", "train", batch_size=256,
                         transform=TRAIN_AUGMENT, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # already on the device, normalised
            ...

Backends are looked up in BACKENDS, the one registry: a new one (a
GPU-resident cache of decoded images, packed shard files) is one more entry
there, and reaches the training config's choices and `profiling loaders
--backends auto` without further edits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..dataset import PreparedDataset
from ..errors import PlanktonioError
from ..shards import ShardSet
from ..transforms import EVAL_TRANSFORM, TRAIN_AUGMENT, Output, Transform
from . import sharding
from .base import Loader, LoaderSpec


@dataclass(frozen=True)
class Backend:
    """One loader backend: how to build it and where it can run."""

    name: str
    summary: str
    needs_gpu: bool
    build: Callable[[LoaderSpec], Loader]

    def runs_on(self, device: torch.device) -> bool:
        return device.type == "cuda" or not self.needs_gpu


def _dali(decode: str) -> Callable[[LoaderSpec], Loader]:
    def build(spec: LoaderSpec) -> Loader:
        from .dali_loader import DaliLoader
        return DaliLoader(spec, decode)
    return build


def _torchvision(spec: LoaderSpec) -> Loader:
    from .torchvision_loader import TorchvisionLoader
    return TorchvisionLoader(spec)


def _cache(spec: LoaderSpec) -> Loader:
    from .cache_loader import CacheLoader
    return CacheLoader(spec, budget_bytes=spec.cache_budget_bytes, overflow=spec.cache_overflow)


# The one list of backends: make_loader, the training config's choices and
# `profiling loaders --backends auto` all read it.
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("dali-gpu", "DALI, JPEG decode on the GPU (mixed decoder: nvJPEG / hardware decoder)", True,
            _dali("gpu")),
    Backend("dali-cpu", "DALI, the whole pipeline on CPU threads", False, _dali("cpu")),
    Backend("torchvision", "torchvision decode + transforms in DataLoader worker processes", False, _torchvision),
    Backend("cache", "decode once (DALI) into uint8 images kept on the device; crops and resizes as tensor ops",
            False, _cache),
)}
# Names that stand for a backend chosen by the device.
ALIASES = {"dali": "DALI on the GPU where there is one (dali-gpu), else on the CPU (dali-cpu)"}


def backend_choices() -> tuple[str, ...]:
    """Every name make_loader accepts: the aliases, then the backends."""
    return (*ALIASES, *BACKENDS)


def runnable_backends(device: torch.device) -> list[str]:
    """The backends this machine can run for `device`, in registry order."""
    return [name for name, backend in BACKENDS.items() if backend.runs_on(device)]


def available_cpus() -> int:
    """The CPUs this process may run on: under Slurm, the task's share of the node, not all of it."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_backend(backend: str, device: torch.device) -> str:
    """"dali" means dali-gpu where there is a GPU and dali-cpu elsewhere."""
    if backend == "dali":
        return "dali-gpu" if device.type == "cuda" else "dali-cpu"
    if backend not in BACKENDS:
        raise PlanktonioError(f"unknown loader backend {backend!r}; choose from {', '.join(backend_choices())}")
    if not BACKENDS[backend].runs_on(device):
        raise PlanktonioError(f"backend {backend} needs device cuda ({BACKENDS[backend].summary}); "
                              f"choose one of {', '.join(runnable_backends(device))} on a machine without a GPU")
    return backend


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlanktonioError("device cuda asked for, but torch sees no GPU here")
    return device


def make_loader(
    backend: str,
    data: str | Path | PreparedDataset,
    split: str,
    *,
    batch_size: int,
    transform: Transform | None = None,
    output: Output | None = None,
    device: str | torch.device | None = "auto",
    train: bool | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    workers: int | None = None,
    threads: int | None = None,
    seed: int = 0,
    cache_budget_bytes: int | None = None,
    cache_overflow: str = "host",
) -> Loader:
    """A loader over one split of a prepared dataset; see Loader for what it yields.

    transform: defaults to TRAIN_AUGMENT for the train split, EVAL_TRANSFORM otherwise.
    train: shuffle each epoch and drop the last partial batch; defaults to split == "train".
    workers: torchvision worker processes; defaults to the CPUs this process may use.
    threads: DALI CPU threads; defaults to `workers`. With dali-gpu the GPU decodes and a few
        threads suffice, while the torchvision baseline wants every core: set them apart.
    cache_budget_bytes: the cache backend keeps its decoded images on the device up to this many
        bytes (default: no limit on the CPU, half the GPU's memory on cuda); past it,
        cache_overflow="host" keeps them in (pinned) host memory and copies each batch over,
        cache_overflow="error" refuses with the size needed.
    """
    dataset = data if isinstance(data, PreparedDataset) else PreparedDataset.load(data)
    device = resolve_device(device)
    backend = resolve_backend(backend, device)
    if batch_size < 1:
        raise PlanktonioError(f"batch size must be >= 1, not {batch_size}")
    if (workers is not None and workers < 0) or (threads is not None and threads < 1):
        raise PlanktonioError(f"workers must be >= 0 and threads >= 1, not {workers} and {threads}")
    sharding.check_shard(shard_index, shard_count)
    entries = dataset.entries(split)
    if not entries:
        raise PlanktonioError(f"{dataset.manifest(split)}: the {split} split has no images; prepare it with "
                              f"images in every split (--per-class / --fractions)")
    info = dataset.image_info(split, len(entries))
    shards = ShardSet.open(dataset, split, entries)  # verified here: a damaged shard fails before training
    if shards is None:
        dataset.check_files_unchanged(split, entries, info)
    elif not np.array_equal(shards.size, info.bytes):  # prepare rerun on changed files since the pack
        raise PlanktonioError(f"{dataset.path / 'shards'}: the {split} shards hold other bytes than prepare "
                              f"recorded for the same files; pack again (python -m planktonio pack --data "
                              f"{dataset.path})")
    workers = available_cpus() if workers is None else workers
    is_train_split = split == "train"
    spec = LoaderSpec(
        dataset=dataset,
        split=split,
        batch_size=batch_size,
        transform=transform or (TRAIN_AUGMENT if is_train_split else EVAL_TRANSFORM),
        output=output or Output(),
        device=device,
        train=is_train_split if train is None else train,
        shard_index=shard_index,
        shard_count=shard_count,
        workers=workers,
        threads=max(1, workers) if threads is None else threads,
        seed=seed,
        entries=entries,
        widths=info.width,
        heights=info.height,
        cache_budget_bytes=cache_budget_bytes,
        cache_overflow=cache_overflow,
        shards=shards,
    )
    if spec.train and len(entries) // shard_count < batch_size:
        raise PlanktonioError(
            f"{dataset.manifest(split)}: {len(entries)} images over {shard_count} shard(s) "
            f"make no full batch of {batch_size}; lower the batch size")
    return BACKENDS[backend].build(spec)


__all__ = ["ALIASES", "BACKENDS", "Backend", "Loader", "LoaderSpec", "available_cpus", "backend_choices",
           "make_loader", "resolve_backend", "resolve_device", "runnable_backends"]
