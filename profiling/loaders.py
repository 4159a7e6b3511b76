"""Loader throughput: how fast each backend delivers ready batches to the device.

For each backend, after a warm-up, it times `--batches` consecutive batches,
`--repeats` times, the backends taking turns in one process so that a noisy
machine slows them alike and their ratio stays meaningful. Before each turn
the other loaders are left to go idle and the measured one's prefetch queue
is drained, so that neither background work nor ready-made batches leak into
a turn. Per backend:
images/s (median, min, max over repeats), batch latency percentiles, CPU
use of the whole process tree (DataLoader workers included) and peak GPU
memory. The "memory" backend serves batches already on the device, decoded
once by the first real backend: the upper bound of an input pipeline, what
the consumer would see if loading cost nothing.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import psutil
import torch

from planktonio import Output, make_loader
from planktonio.loaders import available_cpus, resolve_device
from planktonio.transforms import EVAL_TRANSFORM, TRAIN_AUGMENT

from .stats import latency_summary, summary

UPPER_BOUND = "memory"
MIN_CPU_WINDOW = 0.1  # seconds


@dataclass
class LoaderBenchmark:
    data: str
    split: str = "train"
    backends: tuple[str, ...] = ("dali-cpu", "torchvision")
    batch_size: int = 64
    batches: int = 20
    warmup: int = 5
    repeats: int = 3
    workers: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    layout: str = "NCHW"
    augment: bool = True  # the training augmentation; False: the evaluation transform


def endless(loader):
    """Batches across epoch boundaries, as a training run sees them."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


class MemoryLoader:
    """Serves a fixed set of device-resident batches: no decoding at all."""

    backend = UPPER_BOUND

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def set_epoch(self, epoch):
        pass


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


def device_memory_used_mb(device: torch.device) -> float:
    """Memory in use on the whole GPU: unlike torch's allocator statistics, this sees DALI's pools too."""
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


def time_batches(stream, count: int, device: torch.device, peaks: list | None = None) -> tuple[list[float], int]:
    """Latency of each of `count` batches (until it is on the device and ready) and images seen.

    peaks: if given, the GPU's memory in use after each batch is appended to it.
    """
    latencies, images = [], 0
    for _ in range(count):
        start = time.perf_counter()
        x, _ = next(stream)
        synchronize(device)  # GPU outputs count only once they are really there
        latencies.append(time.perf_counter() - start)
        images += x.shape[0]
        if peaks is not None and device.type == "cuda":
            peaks.append(device_memory_used_mb(device))
    return latencies, images


def run(bench: LoaderBenchmark) -> dict:
    device = resolve_device(bench.device)
    if bench.backends == ("auto",):  # every backend this machine can run, and the upper bound
        bench.backends = (("dali-gpu",) if device.type == "cuda" else ()) + ("dali-cpu", "torchvision", UPPER_BOUND)
    workers = bench.workers or available_cpus()
    transform = TRAIN_AUGMENT if bench.augment else EVAL_TRANSFORM
    output = Output(bench.dtype, bench.layout)
    loaders = {
        name: make_loader(name, bench.data, bench.split, batch_size=bench.batch_size, transform=transform,
                          output=output, device=device, workers=workers, train=True)
        for name in bench.backends if name != UPPER_BOUND
    }
    streams = {name: endless(loader) for name, loader in loaders.items()}
    if UPPER_BOUND in bench.backends:
        source = next(iter(streams.values()))
        cached = [tuple(t.clone() for t in next(source)) for _ in range(min(bench.batches, 8))]
        streams[UPPER_BOUND] = itertools.cycle(cached)
    for stream in streams.values():  # warm-up: workers started, pipelines built, caches filled
        time_batches(stream, bench.warmup, device)

    process = psutil.Process()
    runs = {name: {"ips": [], "latency": [], "cpu": [], "device_mb": [], "torch_mb": []} for name in streams}
    for _ in range(bench.repeats):
        for name, stream in streams.items():
            # Taking turns must not bias the turns: first let the other loaders
            # finish filling their prefetch queues (they would steal cores),
            # then drain this loader's own queue (batches made while it waited
            # would come for free) before the clock starts.
            _wait_until_idle(process)
            depth = getattr(loaders.get(name), "prefetch_depth", 0)
            time_batches(stream, max(bench.warmup, depth + 2), device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            cpu_before, wall_before = _tree_cpu_seconds(process), time.perf_counter()
            latencies, images = time_batches(stream, bench.batches, device, runs[name]["device_mb"])
            wall = time.perf_counter() - wall_before
            cpu = _tree_cpu_seconds(process) - cpu_before
            if device.type == "cuda":  # this turn's peak, before the next turn resets it
                runs[name]["torch_mb"].append(torch.cuda.max_memory_allocated(device) / 2**20)
            runs[name]["ips"].append(images / wall)
            runs[name]["latency"] += latencies
            if wall >= MIN_CPU_WINDOW:  # CPU times tick in 10 ms steps: useless over shorter windows
                runs[name]["cpu"].append(100 * cpu / wall / available_cpus())
    results = []
    for name, r in runs.items():
        result = {
            "backend": name,
            "images_per_s": summary(r["ips"]),
            "latency_ms": latency_summary(r["latency"]),
            # of the cores this process may use; None where the turns were too short to tell
            "cpu_util_percent": summary(r["cpu"])["median"] if r["cpu"] else None,
            # torch's allocator only (the torchvision path, the memory bound) ...
            "peak_gpu_memory_mb": max(r["torch_mb"]) if r["torch_mb"] else None,
            # ... and the whole GPU, DALI's pools and the CUDA context included
            "peak_device_memory_mb": max(r["device_mb"]) if r["device_mb"] else None,
        }
        if hasattr(loaders.get(name), "build_seconds"):
            result["pipeline_build_seconds"] = loaders[name].build_seconds
        results.append(result)
    for loader in loaders.values():
        loader.close()
    return {
        "kind": "loaders",
        "config": {**vars(bench), "backends": list(bench.backends), "workers": workers, "device": str(device),
                   "transform": transform.to_dict()},
        "results": results,
    }


def format_table(result: dict) -> str:
    """A plain-text table of a `run` result, fastest first, with the ratio to torchvision."""
    rows = sorted(result["results"], key=lambda r: -r["images_per_s"]["median"])
    baseline = next((r["images_per_s"]["median"] for r in rows if r["backend"] == "torchvision"), None)
    lines = [f"{'backend':<12} {'images/s':>9} {'min':>9} {'max':>9} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'CPU %':>6} {'vs torchvision':>14}"]
    for r in rows:
        ips = r["images_per_s"]
        ratio = f"{ips['median'] / baseline:.2f}x" if baseline else "-"
        lines.append(f"{r['backend']:<12} {_count(ips['median'])} {_count(ips['min'])} {_count(ips['max'])} "
                     f"{r['latency_ms']['p50']:>7.1f} {r['latency_ms']['p99']:>7.1f} "
                     f"{_percent(r['cpu_util_percent']):>6} {ratio:>14}")
    return "\n".join(lines)


def _count(value: float) -> str:
    """A rate in 9 characters: whole numbers, or scientific notation when huge (the memory bound)."""
    return f"{value:>9.0f}" if value < 1e8 else f"{value:>9.2e}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
