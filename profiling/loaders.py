"""Loader throughput over whole epochs: how fast each backend delivers ready batches to the device.

For each backend, after a warm-up, it times `--epochs` whole epochs' worth
of consecutive batches (so the window holds exactly that many epoch
boundaries), `--repeats` times, the backends taking turns in one process so
that a noisy machine slows them alike and their ratio stays meaningful.
Before each turn the other loaders are left to go idle and the measured
one's prefetch queue is drained, so that neither background work nor
ready-made batches leak into a turn. Per backend:
- images/s over whole epochs (median, min, max over repeats);
- batch latency percentiles of ordinary batches, and the epoch boundary:
  the wait from the last batch of one epoch to the first of the next, next
  to the median ordinary batch (the goal: a boundary costs no more than one
  ordinary batch);
- CPU use of the whole process tree (DataLoader workers included), peak GPU
  memory of the torch allocator per turn, and the device memory the backend
  added when it was built and warmed up (DALI's pools included);
- pipelines built and the time that took.
The "memory" backend serves batches already on the device, decoded once by
the first real backend: the upper bound of an input pipeline, what the
consumer would see if loading cost nothing.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import psutil
import torch

from planktonio import Output, make_loader
from planktonio.errors import PlanktonioError
from planktonio.loaders import available_cpus, resolve_device, runnable_backends
from planktonio.transforms import EVAL_TRANSFORM, TRAIN_AUGMENT

from .stats import latency_summary, median, summary

UPPER_BOUND = "memory"
MIN_CPU_WINDOW = 0.1  # seconds


@dataclass
class LoaderBenchmark:
    data: str
    split: str = "train"
    backends: tuple[str, ...] = ("dali-cpu", "torchvision")
    batch_size: int = 64
    epochs: int = 1        # whole epochs timed per turn
    warmup: int = 5        # untimed batches before the first turn
    repeats: int = 3
    workers: int | None = None
    threads: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    layout: str = "NCHW"
    augment: bool = True  # the training augmentation; False: the evaluation transform

    def __post_init__(self):
        if self.epochs < 1 or self.repeats < 1 or self.warmup < 0 or self.batch_size < 1:
            raise PlanktonioError("loader benchmark: --epochs, --repeats and --batch-size must be >= 1, "
                                  "--warmup >= 0")


def endless(loader):
    """Batches across epoch boundaries, as a training run sees them."""
    for batch, _ in epoch_stream(loader):
        yield batch


def epoch_stream(loader):
    """(batch, first_of_its_epoch) across epoch boundaries."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for index, batch in enumerate(loader):
            yield batch, index == 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tree_cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of a process and its live children."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _wait_until_idle(process: psutil.Process, timeout: float = 30.0, interval: float = 0.2) -> None:
    """Sleep until the process tree uses less than a fifth of one core (or timeout)."""
    deadline = time.perf_counter() + timeout
    before = _tree_cpu_seconds(process)
    while time.perf_counter() < deadline:
        time.sleep(interval)
        now = _tree_cpu_seconds(process)
        if now - before < 0.2 * interval:
            return
        before = now


def device_memory_used_mb(device: torch.device) -> float | None:
    """Memory in use on the whole GPU: unlike torch's allocator statistics, this sees DALI's pools too."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


def time_batches(stream, count: int, device: torch.device) -> tuple[list[float], list[bool], int]:
    """Latency of each of `count` batches (until it is on the device and ready), which of them
    opened an epoch, and the images seen."""
    latencies, firsts, images = [], [], 0
    for _ in range(count):
        start = time.perf_counter()
        (x, _), first = next(stream)
        synchronize(device)  # GPU outputs count only once they are really there
        latencies.append(time.perf_counter() - start)
        firsts.append(first)
        images += x.shape[0]
    return latencies, firsts, images


def _replay(batches, epoch_batches: int):
    """The memory upper bound: a few device-resident batches again and again, in epochs of epoch_batches."""
    for index, batch in enumerate(itertools.cycle(batches)):
        yield batch, index % epoch_batches == 0


def run(bench: LoaderBenchmark) -> dict:
    device = resolve_device(bench.device)
    if bench.backends == ("auto",):  # every backend this machine can run, and the upper bound
        bench.backends = (*runnable_backends(device), UPPER_BOUND)
    real = [name for name in bench.backends if name != UPPER_BOUND]
    if not real:
        raise PlanktonioError(f"--backends {','.join(bench.backends)}: name at least one loader backend "
                              f"({', '.join(runnable_backends(device))}); {UPPER_BOUND} only bounds them")
    workers = available_cpus() if bench.workers is None else bench.workers
    transform = TRAIN_AUGMENT if bench.augment else EVAL_TRANSFORM
    output = Output(bench.dtype, bench.layout)

    # Built and warmed up one at a time, so the device memory each one adds can be told apart.
    loaders, streams, added_mb = {}, {}, {}
    try:
        for name in real:
            before = device_memory_used_mb(device)
            loaders[name] = make_loader(name, bench.data, bench.split, batch_size=bench.batch_size,
                                        transform=transform, output=output, device=device, workers=workers,
                                        threads=bench.threads, train=True)
            streams[name] = epoch_stream(loaders[name])
            time_batches(streams[name], bench.warmup, device)  # workers started, pipelines built
            added_mb[name] = None if before is None else device_memory_used_mb(device) - before
        epoch_batches = len(loaders[real[0]])
        if UPPER_BOUND in bench.backends:
            source = streams[real[0]]  # the same stream: a loader serves one iteration at a time
            cached = [tuple(t.clone() for t in next(source)[0]) for _ in range(min(epoch_batches, 8))]
            streams[UPPER_BOUND] = _replay(cached, epoch_batches)
        results = _take_turns(bench, device, loaders, streams, epoch_batches)
    finally:
        for loader in loaders.values():
            loader.close()
    for result in results:
        name = result["backend"]
        if name in loaders:
            result.update(device_memory_added_mb=added_mb[name], pipelines_built=loaders[name].pipelines_built,
                          pipeline_build_seconds=loaders[name].build_seconds)
            if hasattr(loaders[name], "decode_seconds"):  # the cache backend: its one decode, what it holds
                cache = loaders[name]
                result.update(cache_decode_seconds=cache.decode_seconds, cache_bytes=cache.cache_bytes,
                              cache_bytes_per_image=cache.bytes_per_image, cache_placement=cache.placement)
    return {
        "kind": "loaders",
        "config": {**vars(bench), "backends": list(bench.backends), "workers": workers,
                   "threads": bench.threads or max(1, workers), "device": str(device), "transform": transform.to_dict(),
                   "batches_per_epoch": epoch_batches},
        "results": results,
    }


def _take_turns(bench: LoaderBenchmark, device, loaders: dict, streams: dict, epoch_batches: int) -> list[dict]:
    process = psutil.Process()
    runs = {name: {"ips": [], "ordinary": [], "boundary": [], "cpu": [], "torch_mb": []} for name in streams}
    for _ in range(bench.repeats):
        for name, stream in streams.items():
            # Taking turns must not bias the turns: first let the other loaders
            # finish filling their prefetch queues (they would steal cores),
            # then drain this loader's own queue (batches made while it waited
            # would come for free) before the clock starts.
            _wait_until_idle(process)
            depth = loaders[name].prefetch_depth if name in loaders else 0
            time_batches(stream, depth + 2, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            cpu_before, wall_before = _tree_cpu_seconds(process), time.perf_counter()
            # Exactly `epochs` epochs' worth of consecutive batches: `epochs` boundaries in the window.
            latencies, firsts, images = time_batches(stream, bench.epochs * epoch_batches, device)
            wall = time.perf_counter() - wall_before
            cpu = _tree_cpu_seconds(process) - cpu_before
            r = runs[name]
            if device.type == "cuda":  # this turn's peak, before the next turn resets it
                r["torch_mb"].append(torch.cuda.max_memory_allocated(device) / 2**20)
            r["ips"].append(images / wall)
            r["ordinary"] += [t for t, first in zip(latencies, firsts) if not first]
            r["boundary"] += [t for t, first in zip(latencies, firsts) if first]
            if wall >= MIN_CPU_WINDOW:  # CPU times tick in 10 ms steps: useless over shorter windows
                r["cpu"].append(100 * cpu / wall / available_cpus())
    results = []
    for name, r in runs.items():
        ordinary_ms = 1000 * median(r["ordinary"]) if r["ordinary"] else None
        boundary_ms = 1000 * median(r["boundary"]) if r["boundary"] else None
        results.append({
            "backend": name,
            "images_per_s": summary(r["ips"]),
            "latency_ms": latency_summary(r["ordinary"] or r["boundary"]),
            "batch_ms": ordinary_ms,
            # the first batch of an epoch: from the last batch of the previous epoch until it is ready
            "epoch_boundary_ms": boundary_ms,
            "boundary_vs_batch": boundary_ms / ordinary_ms if boundary_ms and ordinary_ms else None,
            # of the cores this process may use; None where the turns were too short to tell
            "cpu_util_percent": summary(r["cpu"])["median"] if r["cpu"] else None,
            # torch's allocator only (the torchvision path, the memory bound)
            "peak_gpu_memory_mb": max(r["torch_mb"]) if r["torch_mb"] else None,
        })
    return results


def format_table(result: dict) -> str:
    """A plain-text table of a `run` result, fastest first, with the ratio to torchvision."""
    rows = sorted(result["results"], key=lambda r: -r["images_per_s"]["median"])
    baseline = next((r["images_per_s"]["median"] for r in rows if r["backend"] == "torchvision"), None)
    lines = [f"{'backend':<12} {'images/s':>9} {'min':>9} {'max':>9} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'boundary ms':>11} {'CPU %':>6} {'vs torchvision':>14}"]
    for r in rows:
        ips = r["images_per_s"]
        ratio = f"{ips['median'] / baseline:.2f}x" if baseline else "-"
        boundary = "-" if r["epoch_boundary_ms"] is None else f"{r['epoch_boundary_ms']:.1f}"
        lines.append(f"{r['backend']:<12} {_count(ips['median'])} {_count(ips['min'])} {_count(ips['max'])} "
                     f"{r['latency_ms']['p50']:>7.1f} {r['latency_ms']['p99']:>7.1f} {boundary:>11} "
                     f"{_percent(r['cpu_util_percent']):>6} {ratio:>14}")
    return "\n".join(lines)


def _count(value: float) -> str:
    """A rate in 9 characters: whole numbers, or scientific notation when huge (the memory bound)."""
    return f"{value:>9.0f}" if value < 1e8 else f"{value:>9.2e}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
