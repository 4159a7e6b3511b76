"""`python -m profiling loaders`: how fast each backend delivers ready batches to the device, over whole epochs.

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
- pipelines built and the time that took, and the backend's own figures
  (its `stats()`: the cache's decode time and memory);
- what the registry declares about it (role, goals), so that the report can
  take ratios over the reference and check the goals without this code.
`--backends auto` is every backend of the registry this machine can run,
the upper bound ("batches already on the device") included. The batches are
timed by train/timing.py's TimedBatches with a device sync per batch (a
batch counts once it is really there). Rows are on disk after every round
of turns (measure.ResultFile). docs/measuring.md.
"""

from __future__ import annotations

import time

import psutil

from planktonio import Output, make_loader
from planktonio.errors import PlanktonioError
from planktonio.loaders import (
    BACKENDS,
    available_cpus,
    resolve_backend,
    resolve_device,
    runnable_backends,
    unavailable_backends,
)
from planktonio.transforms import DEFAULT_TRANSFORMS
from train.timing import TimedBatches

from .measure import ResultFile, device_memory_used_mb, epoch_stream, peak_memory_mb, reset_peak_memory
from .settings import LoaderBenchmark
from .stats import latency_summary, median, summary

MIN_CPU_WINDOW = 0.1  # seconds: CPU times tick in 10 ms steps, useless over shorter windows


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


def timed(stream, count: int, device) -> tuple[list[float], list[bool], int]:
    """Latency of each of `count` batches until it is on the device and ready, which of them opened an
    epoch, and the images seen."""
    timer, firsts, images = TimedBatches(stream, device, sync_each=True), [], 0
    if count <= 0:
        return [], [], 0
    for (images_batch, _), first in timer:
        firsts.append(first)
        images += images_batch.shape[0]
        if len(firsts) == count:
            break
    return timer.latencies, firsts, images


def chosen_backends(bench: LoaderBenchmark, device) -> tuple[list[str], dict[str, str]]:
    """The backends to measure, and those asked for (or, with auto, runnable but for an optional package)
    that cannot run here, with the reason: their rows are skipped, not the benchmark."""
    skipped = {name: why for name, why in unavailable_backends(device).items()
               if bench.backends == ("auto",) or name in bench.backends}
    if bench.backends == ("auto",):
        return runnable_backends(device), skipped
    names = [resolve_backend(name, device) for name in bench.backends if name not in skipped]
    if all(BACKENDS[name].role == "upper-bound" for name in names):
        raise PlanktonioError(f"--backends {','.join(bench.backends)}: name at least one loader backend "
                              f"({', '.join(runnable_backends(device))}); an upper bound only bounds them")
    return names, skipped


def run(bench: LoaderBenchmark, json_path=None, environment: dict | None = None) -> dict:
    device = resolve_device(bench.device)
    names, skipped = chosen_backends(bench, device)
    workers = available_cpus() if bench.workers is None else bench.workers
    transform = DEFAULT_TRANSFORMS["eval" if bench.eval_transform else "train"]
    output = Output(bench.dtype, bench.layout)
    config = {**vars(bench), "backends": names, "workers": workers, "threads": bench.threads or max(1, workers),
              "device": str(device), "transform": transform.to_dict(), "augment": not bench.eval_transform}
    result = ResultFile(json_path, "loaders", environment=environment or {}, config=config, results=[],
                        skipped=skipped)

    # Built and warmed up one at a time, so the device memory each one adds can be told apart.
    loaders, streams, added_mb = {}, {}, {}
    try:
        for name in names:
            before = device_memory_used_mb(device)
            loaders[name] = make_loader(name, bench.data, bench.split, batch_size=bench.batch_size,
                                        transform=transform, output=output, device=device, workers=workers,
                                        threads=bench.threads, train=True)
            streams[name] = epoch_stream(loaders[name])
            timed(streams[name], bench.warmup, device)  # workers started, pipelines built
            added_mb[name] = None if before is None else device_memory_used_mb(device) - before
        epoch_batches = len(loaders[names[0]])
        result.data["config"]["batches_per_epoch"] = epoch_batches
        runs = {name: {"ips": [], "ordinary": [], "boundary": [], "cpu": [], "torch_mb": []} for name in names}
        for repeat in range(bench.repeats):
            _take_turns(bench, device, loaders, streams, epoch_batches, runs)
            rows = [_row(name, runs[name], loaders[name], added_mb[name]) for name in names]
            result.set(results=rows, repeats_done=repeat + 1)
    finally:
        for loader in loaders.values():
            loader.close()
    return result.finish()


def _take_turns(bench: LoaderBenchmark, device, loaders: dict, streams: dict, epoch_batches: int,
                runs: dict) -> None:
    """One round: every backend's turn of `epochs` whole epochs."""
    process = psutil.Process()
    for name, stream in streams.items():
        # Taking turns must not bias the turns: first let the other loaders
        # finish filling their prefetch queues (they would steal cores),
        # then drain this loader's own queue (batches made while it waited
        # would come for free) before the clock starts.
        _wait_until_idle(process)
        timed(stream, loaders[name].prefetch_depth + 2, device)
        reset_peak_memory(device)
        cpu_before, wall_before = _tree_cpu_seconds(process), time.perf_counter()
        # Exactly `epochs` epochs' worth of consecutive batches: `epochs` boundaries in the window.
        latencies, firsts, images = timed(stream, bench.epochs * epoch_batches, device)
        wall = time.perf_counter() - wall_before
        cpu = _tree_cpu_seconds(process) - cpu_before
        r = runs[name]
        if device.type == "cuda":  # this turn's peak, before the next turn resets it
            r["torch_mb"].append(peak_memory_mb(device))
        r["ips"].append(images / wall)
        r["ordinary"] += [t for t, first in zip(latencies, firsts) if not first]
        r["boundary"] += [t for t, first in zip(latencies, firsts) if first]
        if wall >= MIN_CPU_WINDOW:
            r["cpu"].append(100 * cpu / wall / available_cpus())


def _row(name: str, r: dict, loader, added_mb: float | None) -> dict:
    ordinary_ms = 1000 * median(r["ordinary"]) if r["ordinary"] else None
    boundary_ms = 1000 * median(r["boundary"]) if r["boundary"] else None
    return {
        "backend": name,
        "backend_info": BACKENDS[name].describe(),
        "images_per_s": summary(r["ips"]),
        "latency_ms": latency_summary(r["ordinary"] or r["boundary"]),
        "batch_ms": ordinary_ms,
        # the first batch of an epoch: from the last batch of the previous epoch until it is ready;
        # None as a ratio where every timed batch opened an epoch (one-batch epochs)
        "epoch_boundary_ms": boundary_ms,
        "boundary_vs_batch": boundary_ms / ordinary_ms if boundary_ms and ordinary_ms else None,
        # of the cores this process may use; None where the turns were too short to tell
        "cpu_util_percent": summary(r["cpu"])["median"] if r["cpu"] else None,
        # torch's allocator only (the worker-pool paths, the upper bound)
        "peak_gpu_memory_mb": max(r["torch_mb"]) if r["torch_mb"] else None,
        "device_memory_added_mb": added_mb,
        "pipelines_built": loader.pipelines_built,
        "pipeline_build_seconds": loader.build_seconds,
        "stats": loader.stats(),
    }
