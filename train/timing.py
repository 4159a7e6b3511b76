"""Where a batch is timed: the one timer every consumer takes its batches through.

`TimedBatches` wraps a loader (or any iterator of batches) and measures:
- data wait: host time spent blocked in the loader's `next()`, inside the
  "data" range (torch.profiler, and NVTX on a GPU), so traces show it too;
- step time on the GPU: a pair of CUDA events around each step (from handing
  out a batch to asking for the next one), recorded on the stream of the
  batches' device (not the current device's: with `cuda:1` that would time
  cuda:0), read once, at the end, when the consumer synchronises anyway;
- the wall time from the first batch asked for to `finish()`;
- with `sync_each=True` (benchmarks of loaders only: timm's
  --synchronize-step, opt-in), each batch's latency until it is on the device
  and ready: the device is synchronised after every batch.
Without sync_each it never makes the host wait for the GPU.

The training loop (and so `profiling trace`, which is the training run with
the profiler on), `profiling loaders` and `profiling amp` all time their
batches with it, so they time the same thing the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from . import ranges
from .step import annotate


@dataclass
class Timing:
    """What a TimedBatches measured."""

    batches: int
    data_seconds: float            # host time blocked waiting for batches
    wall_seconds: float            # from the first batch asked for to finish()
    step_seconds: float | None     # GPU time inside the steps (CUDA events); None on a CPU
    latencies: list[float] = field(default_factory=list)  # per batch, until ready (sync_each only)


class TimedBatches:
    """Iterates over `batches`, adding up the time spent waiting for each."""

    def __init__(self, batches: Iterable, device: torch.device, sync_each: bool = False):
        self._batches = iter(batches)
        self._device = device
        self._cuda = device.type == "cuda"
        self._sync_each = sync_each
        self.data_seconds = 0.0  # host time blocked waiting for the next batch
        self.count = 0           # batches handed out
        self.latencies: list[float] = []
        self._started: float | None = None
        self._steps: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._step_start: torch.cuda.Event | None = None

    def __iter__(self) -> "TimedBatches":
        return self

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event

    def __next__(self):
        self._end_step()  # the consumer asks for the next batch: its step has been queued
        start = time.perf_counter()
        if self._started is None:
            self._started = start
        with annotate(ranges.DATA, self._cuda):
            batch = next(self._batches, None)
            if batch is not None and self._sync_each and self._cuda:
                torch.cuda.synchronize(self._device)  # ready on the device, not just queued
        waited = time.perf_counter() - start
        self.data_seconds += waited
        if batch is None:
            raise StopIteration
        if self._sync_each:
            self.latencies.append(waited)
        self.count += 1
        if self._cuda:
            self._step_start = self._event()
        return batch

    def _end_step(self) -> None:
        if self._step_start is not None:
            self._steps.append((self._step_start, self._event()))
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

    def finish(self) -> Timing:
        """Wait for the last step and return what was measured."""
        step = self.step_seconds()
        wall = 0.0 if self._started is None else time.perf_counter() - self._started
        return Timing(self.count, self.data_seconds, wall, step, list(self.latencies))
