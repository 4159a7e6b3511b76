"""One interface over every loader backend: `make_loader(backend=..., ...)`.

    loader = make_loader("dali-gpu", "runs/prepared", "train", batch_size=256,
                         transform=TRAIN_AUGMENT, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # already on the device, normalised
            ...

Backends are looked up in BACKENDS, so a new one (a GPU-resident cache of
decoded images, packed shard files) is one more entry, and train/profiling
switch between them with a single flag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..dataset import PreparedDataset
from ..errors import PlanktonioError
from ..transforms import EVAL_TRANSFORM, TRAIN_AUGMENT, Output, Transform
from . import sharding
from .base import Loader, LoaderSpec


def _dali(decode: str) -> Callable[[LoaderSpec], Loader]:
    def build(spec: LoaderSpec) -> Loader:
        from .dali_loader import DaliLoader
        return DaliLoader(spec, decode)
    return build


def _torchvision(spec: LoaderSpec) -> Loader:
    from .torchvision_loader import TorchvisionLoader
    return TorchvisionLoader(spec)


BACKENDS: dict[str, Callable[[LoaderSpec], Loader]] = {
    "dali-gpu": _dali("gpu"),     # DALI, JPEG decode on the GPU (mixed decoder)
    "dali-cpu": _dali("cpu"),     # DALI, the whole pipeline on CPU threads
    "torchvision": _torchvision,  # DataLoader worker processes
}


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
        raise PlanktonioError(f"unknown loader backend {backend!r}; choose from dali, {', '.join(BACKENDS)}")
    if backend == "dali-gpu" and device.type != "cuda":
        raise PlanktonioError("backend dali-gpu decodes on the GPU and needs device cuda; "
                              "use dali-cpu (or dali) on a machine without a GPU")
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
    seed: int = 0,
) -> Loader:
    """A loader over one split of a prepared dataset; see Loader for what it yields.

    transform: defaults to TRAIN_AUGMENT for the train split, EVAL_TRANSFORM otherwise.
    train: shuffle each epoch and drop the last partial batch; defaults to split == "train".
    workers: DALI threads or torchvision worker processes; defaults to the CPUs this process may use.
    """
    dataset = data if isinstance(data, PreparedDataset) else PreparedDataset.load(data)
    device = resolve_device(device)
    backend = resolve_backend(backend, device)
    if batch_size < 1:
        raise PlanktonioError(f"batch size must be >= 1, not {batch_size}")
    sharding.check_shard(shard_index, shard_count)
    entries = dataset.entries(split)
    dataset.check_files_exist(split, entries)
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
        workers=available_cpus() if workers is None else workers,
        seed=seed,
        entries=entries,
    )
    if spec.train and len(entries) // shard_count < batch_size:
        raise PlanktonioError(
            f"{dataset.manifest(split)}: {len(entries)} images over {shard_count} shard(s) "
            f"make no full batch of {batch_size}; lower the batch size")
    return BACKENDS[backend](spec)


__all__ = ["BACKENDS", "Loader", "LoaderSpec", "available_cpus", "make_loader", "resolve_backend",
           "resolve_device"]
