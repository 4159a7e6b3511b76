"""The measuring core the benchmarks are built on: batches across epochs, device memory, results on disk.

The benchmarks (loader_bench.py, amp_bench.py, trace.py, suite.py) are
programs on top of this module and of train/timing.py (the one batch timer);
they do not import each other. A result is a JSON file of one `kind`, each
kind rendered by its own module in profiling/render/ (which imports no torch).

`ResultFile` writes a result as it is measured: every finished row is on
disk at once (atomically), so a benchmark stopped by its time budget keeps
the rows it finished, and the report shows them.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from planktonio.files import write_atomic


def epoch_stream(loader):
    """(batch, first_of_its_epoch) across epoch boundaries, as a training run sees them."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for index, batch in enumerate(loader):
            yield batch, index == 0


def endless(loader):
    """Batches across epoch boundaries."""
    for batch, _ in epoch_stream(loader):
        yield batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_memory_used_mb(device: torch.device) -> float | None:
    """Memory in use on the whole GPU: unlike torch's allocator statistics, this sees DALI's pools too."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """The torch allocator's peak since the last reset_peak_memory."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class ResultFile:
    """A result of one kind, rewritten (atomically) whenever a row is added: a stopped benchmark keeps its rows.

    result = ResultFile(path, "amp", environment=..., config=...)
    result.add("compute", row)     # on disk now
    result.set(note=...)           # any other top-level field
    """

    def __init__(self, path: Path | None, kind: str, **fields):
        self.path = Path(path) if path else None
        self.data = {"kind": kind, **fields, "complete": False}
        self._write()

    def add(self, section: str, row: dict) -> None:
        self.data.setdefault(section, []).append(row)
        self._write()

    def set(self, **fields) -> None:
        self.data.update(fields)
        self._write()

    def finish(self) -> dict:
        """Every planned row is in: mark it complete (a report says when a result was cut short)."""
        self.set(complete=True)
        return self.data

    def _write(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(self.data, indent=2) + "\n")
