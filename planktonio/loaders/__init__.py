"""One interface over every loader backend: `make_loader(backend=..., ...)`, and the registry of backends.

    loader = make_loader("dali-gpu", "runs/prepared", "train", batch_size=256,
                         transform=TRAIN_AUGMENT, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # already on the device, normalised
            ...

The registry is BACKEND_MODULES below. Each backend module declares, in a
`BACKENDS` tuple of `Backend`s (loaders/backend.py), everything the rest of
the code asks about it: its name, devices, role in a comparison, options,
goals and how to build it. So adding a backend is one new module and one
entry here: make_loader, the training config's choices and `loader.options`,
`profiling loaders --backends auto`, the report's rows and goals, the
accuracy arms and the loader contract tests all iterate the registry.
Backends import shared pieces (base.py, ops.py, workers.py, dali_graph.py),
never each other. docs/loaders.md.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from ..cores import available_cpus, usable_count
from ..dataset import PreparedDataset
from ..errors import PlanktonioError
from ..shards import ShardSet
from ..transforms import DEFAULT_TRANSFORMS, Output, Transform
from . import sharding
from .backend import ROLES, Backend, Goal
from .base import Loader, LoaderSpec

# The registry: one entry per backend module of this package, in the order tables list them.
BACKEND_MODULES = tuple(importlib.import_module(f".{name}", __name__) for name in (
    "dali_loader",
    "torchvision_loader",
    "cache_loader",
    "memory_loader",
    "pil_loader",
    "turbo_loader",
    "ffcv_loader",
))

BACKENDS: dict[str, Backend] = {b.name: b for module in BACKEND_MODULES for b in module.BACKENDS}
# Names that stand for a backend chosen by the device: the first of their list that runs there.
ALIASES: dict[str, tuple[str, ...]] = {alias: names for module in BACKEND_MODULES
                                       for alias, names in getattr(module, "ALIASES", {}).items()}


def backend_choices(training: bool = False) -> tuple[str, ...]:
    """Every name make_loader accepts (the aliases, then the backends); training: those a run may use."""
    return (*ALIASES, *(name for name, b in BACKENDS.items() if b.trains or not training))


def runnable_backends(device: torch.device, roles: tuple[str, ...] = tuple(ROLES)) -> list[str]:
    """The backends this machine can run for `device`, in registry order (only those of `roles`; not those
    whose optional package is missing here: `unavailable_backends`)."""
    return [name for name, b in BACKENDS.items() if b.runs_on(device) and b.role in roles and b.missing() is None]


def unavailable_backends(device: torch.device) -> dict[str, str]:
    """Backends that would run on `device` but whose optional package is missing here: name -> why."""
    return {name: why for name, b in BACKENDS.items() if b.runs_on(device) and (why := b.missing()) is not None}


def in_comparison_order(names) -> list[str]:
    """Backend names ordered by role (reference, baselines, candidates, the bound), registry order within."""
    order = list(ROLES)
    return sorted(names, key=lambda name: order.index(BACKENDS[name].role))


def default_backend() -> str:
    """The name a run uses when none is given: the registry's first alias (its module's recommended
    backend, chosen by the device)."""
    return next(iter(ALIASES)) if ALIASES else next(name for name, b in BACKENDS.items() if b.trains)


def reference_backend(device: torch.device) -> str | None:
    """The backend comparisons are taken over on `device`: the study's own pipeline (role reference), else
    the first baseline."""
    for role in ("reference", "baseline"):
        names = runnable_backends(device, roles=(role,))
        if names:
            return names[0]
    return None


def backend_of(name: str) -> Backend:
    """The backend a name stands for, without a device: an alias is read as its first backend."""
    if name in ALIASES:
        name = ALIASES[name][0]
    if name not in BACKENDS:
        raise PlanktonioError(f"unknown loader backend {name!r}; choose from {', '.join(backend_choices())}")
    return BACKENDS[name]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend a name means on `device`: an alias picks the first of its backends that runs there."""
    if backend in ALIASES:
        return next(name for name in ALIASES[backend] if BACKENDS[name].runs_on(device))
    if backend not in BACKENDS:
        raise PlanktonioError(f"unknown loader backend {backend!r}; choose from {', '.join(backend_choices())}")
    if (why := BACKENDS[backend].missing()) is not None:
        raise PlanktonioError(f"backend {backend}: {why}")
    if not BACKENDS[backend].runs_on(device):
        raise PlanktonioError(f"backend {backend} needs device {' or '.join(BACKENDS[backend].devices)} "
                              f"({BACKENDS[backend].summary}); choose one of "
                              f"{', '.join(runnable_backends(device))} on this machine")
    return backend


def check_loader_sizes(batch_size: int, workers: int | None, threads: int | None) -> list[str]:
    """What is wrong with a loader's batch size, worker and thread counts: the one place they are checked."""
    problems = []
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, not {batch_size}")
    if workers is not None and workers < 0:
        problems.append(f"workers must be >= 0, not {workers}")
    if threads is not None and threads < 1:
        problems.append(f"threads must be >= 1, not {threads}")
    return problems


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
    options: dict | None = None,
) -> Loader:
    """A loader over one split of a prepared dataset; see Loader for what it yields.

    transform: defaults to DEFAULT_TRANSFORMS["train"] for the train split, ["eval"] otherwise.
    train: shuffle each epoch and drop the last partial batch; defaults to split == "train".
    workers: DataLoader worker processes; defaults to the CPUs this process may use.
    threads: DALI CPU threads; defaults to `workers`. With dali-gpu the GPU decodes and a few
        threads suffice, while the worker-pool backends want every core: set them apart.
    options: the backend's own settings (its `options` dataclass, e.g. the cache's budget_bytes
        and overflow), as a mapping; an unknown key is an error naming the backend.
    """
    resolved = resolve_device(device)
    chosen = BACKENDS[resolve_backend(backend, resolved)]
    parsed_options = chosen.parse_options(options)
    spec = loader_spec(data, split, batch_size=batch_size, transform=transform, output=output, device=resolved,
                       train=train, shard_index=shard_index, shard_count=shard_count, workers=workers,
                       threads=threads, seed=seed)
    return chosen.build(spec, parsed_options)


def loader_spec(
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
    check_files: bool = True,
) -> LoaderSpec:
    """What a loader of one split reads, after every check a loader makes before it reads anything: sizes,
    the shard, a split with images, its files unchanged since prepare (or its shards intact), a full
    training batch. make_loader builds its backend on it; a run that reads a feature cache instead of
    images checks its inputs with it too, so that both refuse the same inputs (train/inputs.py).

    check_files=False leaves out the one check that costs a stat per loose file: for the ranks of a run
    whose first rank makes it for all of them (train/inputs.py shares its verdict). With shards it is one
    stat per shard, made by every rank."""
    dataset = data if isinstance(data, PreparedDataset) else PreparedDataset.load(data)
    device = resolve_device(device)
    problems = check_loader_sizes(batch_size, workers, threads)
    if problems:
        raise PlanktonioError("loader: " + "; ".join(problems))
    sharding.check_shard(shard_index, shard_count)
    entries, info = dataset.entries(split), dataset.index(split)
    is_train = split == "train" if train is None else train
    _check_batches(dataset, split, len(entries), is_train, batch_size, shard_count)
    shards = _checked_images(dataset, split, info.bytes, check_files)
    workers = usable_count(workers, "loader workers")
    return LoaderSpec(
        dataset=dataset,
        split=split,
        batch_size=batch_size,
        transform=transform or DEFAULT_TRANSFORMS["train" if split == "train" else "eval"],
        output=output or Output(),
        device=device,
        train=is_train,
        shard_index=shard_index,
        shard_count=shard_count,
        workers=workers,
        threads=max(1, workers) if threads is None else usable_count(threads, "DALI threads"),
        seed=seed,
        entries=entries,
        widths=info.width,
        heights=info.height,
        shards=shards,
    )


def _check_batches(dataset: PreparedDataset, split: str, images: int, train: bool, batch_size: int,
                   shard_count: int) -> None:
    """A split with images, and where it trains, a full batch in every shard."""
    if not images:
        raise PlanktonioError(f"{dataset.manifest(split)}: the {split} split has no images; prepare it with "
                              f"images in every split (--per-class / --fractions)")
    if train and images // shard_count < batch_size:
        raise PlanktonioError(
            f"{dataset.manifest(split)}: {images} images over {shard_count} shard(s) "
            f"make no full batch of {batch_size}; lower the batch size")


def _checked_images(dataset: PreparedDataset, split: str, recorded_bytes: np.ndarray,
                    check_files: bool) -> ShardSet | None:
    """The split's shards (verified: a damaged shard fails before training), or None for loose files,
    checked unchanged since prepare unless `check_files` is False."""
    shards = ShardSet.open(dataset, split)
    if shards is None:
        if check_files:
            dataset.check_files_unchanged(split)
    elif not np.array_equal(shards.size, recorded_bytes):  # prepare rerun on changed files since the pack
        raise PlanktonioError(f"{dataset.path / 'shards'}: the {split} shards hold other bytes than prepare "
                              f"recorded for the same files; pack again (python -m planktonio pack --data "
                              f"{dataset.path})")
    return shards


__all__ = ["ALIASES", "BACKENDS", "BACKEND_MODULES", "Backend", "Goal", "Loader", "LoaderSpec", "ROLES",
           "available_cpus", "backend_choices", "backend_of", "check_loader_sizes", "default_backend",
           "in_comparison_order", "loader_spec", "make_loader", "reference_backend", "resolve_backend", "resolve_device",
           "runnable_backends", "unavailable_backends", "usable_count"]
