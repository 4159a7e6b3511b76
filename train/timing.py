"""Where a batch is timed: the one helper every consumer takes its batches through.

`TimedBatches` wraps a loader (or any iterator of batches) and measures two
things without ever making the host wait for the GPU:
- data wait: host time spent blocked in the loader's `next()`, inside a
  "data" range (torch.profiler, and NVTX on a GPU), so traces show it too;
- step time on the GPU: a pair of CUDA events around each step (from
  handing out a batch to asking for the next one), read once, at the end
  (`step_seconds`), when the consumer synchronises anyway.

The training loop, `profiling trace` and `profiling amp` (end to end) all
take their batches through it, so they time the same thing the same way.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch

from .step import annotate


class TimedBatches:
    """Iterates over `batches`, adding up the time spent waiting for each."""

    def __init__(self, batches: Iterable, device: torch.device):
        self._batches = iter(batches)
        self._cuda = device.type == "cuda"
        self.data_seconds = 0.0  # host time blocked waiting for the next batch
        self.count = 0           # batches handed out
        self._steps: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._step_start: torch.cuda.Event | None = None

    def __iter__(self) -> "TimedBatches":
        return self

    def __next__(self):
        self._end_step()  # the consumer asks for the next batch: its step has been queued
        start = time.perf_counter()
        with annotate("data", self._cuda):
            batch = next(self._batches, None)
        self.data_seconds += time.perf_counter() - start
        if batch is None:
            raise StopIteration
        self.count += 1
        if self._cuda:
            self._step_start = torch.cuda.Event(enable_timing=True)
            self._step_start.record()
        return batch

    def _end_step(self) -> None:
        if self._step_start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._steps.append((self._step_start, end))
            self._step_start = None

    def step_seconds(self) -> float | None:
        """GPU time inside the steps handed out so far (None on a CPU).

        Waits for the last step to finish: call it once, when done (also
        after leaving the loop early).
        """
        self._end_step()
        if not self._cuda:
            return None
        if not self._steps:
            return 0.0
        self._steps[-1][1].synchronize()
        seconds = sum(start.elapsed_time(end) for start, end in self._steps) / 1000
        self._steps.clear()
        return seconds
