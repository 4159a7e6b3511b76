"""torch.profiler around a run's first steps: the `profile` section of the training config.

The training run itself, with the profiler switched on, is what `python -m
profiling trace` runs: the trace shows the run's own loader, step and timed
batches (the "data" range of train/timing.py and the "forward", "backward"
and "optimizer" ranges of train/step.py), not a copy of them. A small context
manager with a `step()`, as torchtitan's: it records steps
[wait + warmup, wait + warmup + active) and writes one Chrome trace per rank,
RUN/trace-rank<R>.json.gz (open it in Perfetto, or read it with
`python -m profiling inspect`), and with `memory: true` a memory timeline,
RUN/memory-rank<R>.html.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule


class StepProfiler:
    """Profiles steps per the config's profile section; `done` once the trace is written."""

    def __init__(self, options, out: Path, rank: int, device: torch.device):
        self.options, self.out, self.rank, self.device = options, out, rank, device
        self.written: list[Path] = []
        self._profile = None
        self.steps = 0

    @property
    def done(self) -> bool:
        return self.options.enabled and self.steps >= self.options.steps

    def __enter__(self) -> "StepProfiler":
        o = self.options
        if o.enabled:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._profile = profile(activities=activities,
                                    schedule=schedule(wait=o.wait, warmup=o.warmup, active=o.active),
                                    on_trace_ready=self._export, record_shapes=o.memory, profile_memory=o.memory,
                                    with_stack=o.memory)
            self._profile.__enter__()
        return self

    def step(self) -> None:
        """After each training step."""
        if self._profile is not None and not self.done:
            self.steps += 1
            self._profile.step()

    def _export(self, prof) -> None:
        path = self.out / f"trace-rank{self.rank}.json.gz"
        prof.export_chrome_trace(str(path))
        self.written.append(path)
        if self.options.memory:
            memory = self.out / f"memory-rank{self.rank}.html"
            prof.export_memory_timeline(str(memory), device=str(self.device) if self.device.type == "cuda" else None)
            self.written.append(memory)

    def __exit__(self, *exc) -> None:
        if self._profile is not None:
            self._profile.__exit__(*exc)
            self._profile = None
