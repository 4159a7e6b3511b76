"""torch.profiler around a run's first steps: the `profile` section of the training config.

The training run itself, with the profiler switched on, is what `python -m
profiling trace` runs: the trace shows the run's own loader, step and timed
batches (the "data" range of train/timing.py and the "forward", "backward"
and "optimizer" ranges of train/step.py), not a copy of them. A small context
manager with a `step()`, as torchtitan's: it records steps
[wait + warmup, wait + warmup + active) and writes one Chrome trace per rank,
RUN/trace-rank<R>.json.gz (open it in Perfetto, or read it with
`python -m profiling inspect`), and with `memory: true` a memory timeline,
RUN/memory-rank<R>.json.gz (bytes per category over time, torch's format)
with its plot, RUN/memory-rank<R>.png, on the CPU as on a GPU (torch's own
HTML export needs CUDA). A run that ends before the trace's last step says
how many steps the trace holds.
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from planktonio.files import atomic_file


class StepProfiler:
    """Profiles steps per the config's profile section; `done` once the trace is written."""

    def __init__(self, options, out: Path, rank: int, device: torch.device, say: Callable[[str], None] = print):
        self.options, self.out, self.rank, self.device, self.say = options, out, rank, device, say
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
            memory = self.out / f"memory-rank{self.rank}.json.gz"
            device = str(self.device) if self.device.type == "cuda" else "cpu"
            with warnings.catch_warnings():  # (deprecated in favour of CUDA-only snapshots: kept for the CPU)
                warnings.simplefilter("ignore", FutureWarning)
                prof.export_memory_timeline(str(memory), device=device)
            self.written += [memory, plot_memory(memory, self.out / f"memory-rank{self.rank}.png", device)]

    def __exit__(self, *exc) -> None:
        if self._profile is not None:
            self._profile.__exit__(*exc)
            self._profile = None
            o = self.options
            if exc[0] is None and self.steps < o.steps:
                recorded = max(0, self.steps - o.wait - o.warmup)
                self.say(f"the run ended after {self.steps} step(s), before the trace's last (wait {o.wait} + "
                         f"warmup {o.warmup} + active {o.active}): the trace holds {recorded} active step(s) of "
                         f"{o.active}; give the run more steps (training.epochs) or ask for fewer")


def plot_memory(timeline: Path, png: Path, device: str) -> Path:
    """The memory timeline of export_memory_timeline (times in us; per time, bytes per category) as a plot of
    the total over time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with gzip.open(timeline, "rt") as f:
        times, sizes = json.load(f)
    start = min(times, default=0)
    figure, axes = plt.subplots(figsize=(10, 4))
    axes.plot([(t - start) / 1e3 for t in times], [sum(s) / 2**20 for s in sizes], drawstyle="steps-post")
    axes.set(xlabel="time (ms)", ylabel="MiB", title=f"memory on {device} during the traced steps")
    with atomic_file(png, "wb") as f:
        figure.savefig(f, format="png", dpi=90)
    plt.close(figure)
    return png
