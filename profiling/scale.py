"""How planktonio's costs grow with the number of images: `python -m profiling scale`.

For each size N (default 10k, 100k and 1M images) a synthetic set of N small
JPEGs (8 classes, 32 px: a million fit in a few GB) is made once under
OUT/sets/ and kept for the next run; then each cost is measured in a process
of its own, so that its peak memory is its own:

- prepare: images/s, and the peak memory of its main process (what grows with
  N) and of its largest decode worker;
- pack: images/s;
- the first batch: seconds from make_loader to the first training batch, with
  loose files (every file's size and date checked, in parallel) and with
  shards (one check per shard), and the process's peak memory at that point;
  then the images/s of the next BATCHES batches (the steady rate, which must
  not depend on N).

Before anything is made, the sizes are checked against the disk under OUT and
the memory available (one line, not hours of work and then the OOM killer),
and a kept set is reused only if it still holds what it was made with: its
image count and a fingerprint of its files' names and sizes.

Each cost is reported against N with the exponent b of a least-squares fit
cost = a * N^b (0: flat; 1: linear), and memory as bytes per image: the slope
between the smallest and the largest N (the constant part, torch and the
interpreter, drops out). The figures are for a benchmark's record; no test
checks them (they depend on the machine). docs/measuring.md.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from planktonio.errors import PlanktonioError
from planktonio.files import write_atomic

from .settings import ScaleBenchmark

KIND = "scale"
CLASSES = 8
MADE = "made.json"  # a set's marker: written last, so a set cut short is made again


# ---------------------------------------------------------------- the synthetic sets


def _write_images(args: tuple[Path, int, int, int, int]) -> None:
    """Images [start, stop) of a set: class i % CLASSES, a noisy patch of that class's colour."""
    from PIL import Image
    folder, start, stop, size, seed = args
    rng = np.random.default_rng([seed, start])
    for i in range(start, stop):
        label = i % CLASSES
        colour = np.array([(37 * label) % 256, (91 * label) % 256, (153 * label) % 256], dtype=np.int16)
        pixels = np.clip(colour + rng.integers(-40, 41, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"class{label}" / f"{i:07d}.jpg", quality=90)


def contents(folder: Path) -> tuple[int, str]:
    """A set's image count, and the sha256 of its files' class/name and size, sorted."""
    lines = []
    for label in range(CLASSES):
        try:
            with os.scandir(folder / f"class{label}") as entries:
                lines += [f"class{label}/{entry.name} {entry.stat().st_size}" for entry in entries]
        except FileNotFoundError:
            continue
    lines.sort()
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()


def kept(folder: Path, wanted: dict) -> bool:
    """Whether the set in `folder` was made as `wanted` and still holds what it was made with (else it says
    why it is made again)."""
    try:
        made = json.loads((folder / MADE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(made, dict) or {key: made.get(key) for key in wanted} != wanted:
        return False
    count, fingerprint = contents(folder)
    if (count, fingerprint) == (wanted["images"], made.get("fingerprint")):
        return True
    change = f"{count} images, not {wanted['images']}" if count != wanted["images"] else "other files"
    print(f"scale: the kept set {folder} holds {change} since it was made: making it again", flush=True)
    return False


def make_set(folder: Path, count: int, size: int, workers: int, seed: int = 0) -> float:
    """N synthetic JPEGs in class folders (made once: kept with its marker, and reused while its contents
    match it); the seconds it took (0 if kept)."""
    wanted = {"images": count, "size": size, "classes": CLASSES, "seed": seed}
    if kept(folder, wanted):
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    for label in range(CLASSES):
        (folder / f"class{label}").mkdir(parents=True)
    started = time.perf_counter()
    step = 2000
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_images, [(folder, s, min(s + step, count), size, seed) for s in range(0, count, step)]))
    write_atomic(folder / MADE, json.dumps({**wanted, "fingerprint": contents(folder)[1]}) + "\n")
    return time.perf_counter() - started


# ---------------------------------------------------------------- what the sizes need

BLOCK = 4096             # a loose file takes whole file-system blocks
TAR_BLOCK = 512          # a shard member: a header and its data in 512-byte blocks
INDEX_PER_IMAGE = 512    # the prepared folder's manifests and index, per image (with room)
MEMORY_PER_IMAGE = 1024  # the most a measuring process holds per image (measured: 200-300 bytes; with room)


def sample_jpeg_bytes(size: int) -> int:
    """The bytes of one synthetic JPEG of this side (they hardly vary: noise of one amplitude)."""
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return len(buffer.getbuffer())


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def check_room(bench: ScaleBenchmark, out: Path) -> None:
    """Refuse, in one line, sizes whose sets, prepared folders and shards would not fit the disk under `out`,
    or whose measurements would not fit the memory available: before anything is made."""
    import psutil
    jpeg = sample_jpeg_bytes(bench.image_size)
    to_make = [n for n in bench.sizes if not (out / "sets" / str(n) / MADE).is_file()]
    prepared = list(bench.sizes) if bench.keep else [max(bench.sizes)]  # (else removed once measured)
    disk = sum(to_make) * _round_up(jpeg, BLOCK) + \
        sum(prepared) * (TAR_BLOCK + _round_up(jpeg, TAR_BLOCK) + INDEX_PER_IMAGE)
    memory = max(bench.sizes) * MEMORY_PER_IMAGE
    free, available = shutil.disk_usage(out).free, psutil.virtual_memory().available
    if disk > free or memory > available:
        sizes = ",".join(map(str, bench.sizes))
        raise PlanktonioError(f"scale benchmark: --sizes {sizes} needs about {disk / 2**30:,.1f} GiB of disk under "
                              f"{out} ({free / 2**30:,.1f} GiB free) and {memory / 2**30:,.1f} GiB of memory "
                              f"({available / 2**30:,.1f} GiB available); give smaller sizes")


# ---------------------------------------------------------------- one cost, in a process of its own


def _peak_bytes(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # kilobytes on Linux


def probe(stage: str, args: list[str]) -> dict:
    """One measurement in this process (started by `measure`); its figures."""
    if stage == "prepare":
        from planktonio.preparation import SplitPlan, prepare
        source, out, workers = Path(args[0]), Path(args[1]), int(args[2])
        started = time.perf_counter()
        result = prepare(source, out, plan=SplitPlan(fractions=(0.8, 0.1, 0.1)), workers=workers, progress=False)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "images": sum(len(kept) for kept in result.splits.values()),
                "peak_bytes": _peak_bytes(), "worker_peak_bytes": _peak_bytes(resource.RUSAGE_CHILDREN)}
    if stage == "pack":
        from planktonio.shards import pack
        started = time.perf_counter()
        pack(args[0])
        return {"seconds": time.perf_counter() - started, "peak_bytes": _peak_bytes()}
    if stage == "first-batch":
        importlib.import_module("torch")  # before the clock starts: its import is no part of the cost

        from planktonio.loaders import make_loader
        data, backend, batch_size, workers, batches = args[0], args[1], int(args[2]), int(args[3]), int(args[4])
        started = time.perf_counter()
        loader = make_loader(backend, data, "train", batch_size=batch_size, workers=workers, device="cpu")
        made = time.perf_counter()
        iterator = iter(loader)
        next(iterator)
        first = time.perf_counter()
        taken = 0
        for _ in range(batches):
            if next(iterator, None) is None:
                break
            taken += 1
        steady = time.perf_counter() - first
        loader.close()
        return {"make_loader_seconds": made - started, "first_batch_seconds": first - started,
                "steady_images_per_s": taken * batch_size / steady if taken else None, "steady_batches": taken,
                "peak_bytes": _peak_bytes()}
    raise PlanktonioError(f"scale probe: unknown stage {stage!r}")


def measure(stage: str, *args) -> dict:
    """Run `probe(stage, args)` in a fresh interpreter; its figures, or a one-line error with its output."""
    command = [sys.executable, "-m", "profiling.scale", stage, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PlanktonioError(f"scale: the {stage} measurement failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the benchmark


def growth(sizes: list[int], values: list[float | None]) -> float | None:
    """The exponent b of a least-squares fit value = a * N^b over the sizes measured (None under two)."""
    points = [(math.log(n), math.log(v)) for n, v in zip(sizes, values) if v]
    if len(points) < 2:
        return None
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def per_image(sizes: list[int], peaks: list[int]) -> float | None:
    """Bytes per image: the slope of peak memory between the smallest and the largest N."""
    if len(sizes) < 2:
        return None
    return (peaks[-1] - peaks[0]) / (sizes[-1] - sizes[0])


def run(bench: ScaleBenchmark, json_path: Path | None, environment: dict) -> dict:
    import torch

    from planktonio.cores import available_cpus
    from planktonio.loaders import BACKENDS, resolve_backend
    out = Path(bench.out)
    workers = bench.workers or available_cpus()
    cpu = torch.device("cpu")
    # (a name checked before any set is made; start-up costs, not decoding, are what is measured)
    backend = resolve_backend(bench.backend, cpu) if bench.backend else \
        next(name for name, b in BACKENDS.items() if b.role == "baseline" and b.runs_on(cpu))
    check_room(bench, out)
    rows = []
    for count in sorted(bench.sizes):
        source, prepared = out / "sets" / f"{count}", out / "prepared" / f"{count}"
        made_seconds = make_set(source, count, bench.image_size, workers)
        shutil.rmtree(prepared, ignore_errors=True)  # prepare is measured from nothing, not resumed
        prep = measure("prepare", source, prepared, workers)
        loose = measure("first-batch", prepared, backend, bench.batch_size, workers, bench.batches)
        pack = measure("pack", prepared)
        shards = measure("first-batch", prepared, backend, bench.batch_size, workers, bench.batches)
        row = {"images": count, "made_seconds": made_seconds,
               "prepare_images_per_s": count / prep["seconds"], "prepare_peak_bytes": prep["peak_bytes"],
               "prepare_worker_peak_bytes": prep["worker_peak_bytes"],
               "pack_images_per_s": count / pack["seconds"],
               "loose": loose, "shards": shards}
        rows.append(row)
        print(f"{count:>9,} images: prepare {row['prepare_images_per_s']:,.0f} images/s "
              f"(peak {prep['peak_bytes'] / 2**20:,.0f} MiB), pack {row['pack_images_per_s']:,.0f} images/s, "
              f"first batch {loose['first_batch_seconds']:.2f} s loose / {shards['first_batch_seconds']:.2f} s "
              f"shards", flush=True)
        if not bench.keep:
            shutil.rmtree(prepared, ignore_errors=True)
    sizes = [r["images"] for r in rows]
    result = {
        "kind": KIND, "environment": environment,
        "config": {"sizes": sizes, "image_size": bench.image_size, "classes": CLASSES, "backend": backend,
                   "batch_size": bench.batch_size, "workers": workers, "batches": bench.batches,
                   "split": "fractions 0.8/0.1/0.1, first batches of the train split"},
        "results": rows,
        "growth": {
            "prepare_seconds": growth(sizes, [n / r["prepare_images_per_s"] for n, r in zip(sizes, rows)]),
            "pack_seconds": growth(sizes, [n / r["pack_images_per_s"] for n, r in zip(sizes, rows)]),
            "first_batch_seconds_loose": growth(sizes, [r["loose"]["first_batch_seconds"] for r in rows]),
            "first_batch_seconds_shards": growth(sizes, [r["shards"]["first_batch_seconds"] for r in rows]),
            "steady_images_per_s_shards": growth(sizes, [r["shards"]["steady_images_per_s"] for r in rows]),
        },
        "bytes_per_image": {
            "prepare": per_image(sizes, [r["prepare_peak_bytes"] for r in rows]),
            "training_rank_loose": per_image(sizes, [r["loose"]["peak_bytes"] for r in rows]),
            "training_rank_shards": per_image(sizes, [r["shards"]["peak_bytes"] for r in rows]),
        },
        "complete": True,
    }
    if json_path is not None:
        write_atomic(json_path, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":  # a probe: `measure` starts this module with a stage and its arguments
    print(json.dumps(probe(sys.argv[1], sys.argv[2:])))
