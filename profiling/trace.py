"""`python -m profiling trace`: a short training run under torch.profiler.

The run is the training program's own (its Trainer, loaders and step, so
the trace shows the "data", "forward", "backward" and "optimizer" ranges of
train/step.py) for wait + warmup + active steps, recorded only in the active
ones. Every rank writes its own Chrome trace, OUT/trace-rank<R>.json.gz
(open it in Perfetto or chrome://tracing, or read it with `inspect`); with
--memory also a memory timeline, OUT/memory-rank<R>.html.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from planktonio.errors import PlanktonioError
from train import config as config_module
from train import distributed
from train.loop import Trainer
from train.model import set_train_mode
from train.step import annotate, train_step

from .loaders import endless


@dataclass
class TraceOptions:
    wait: int = 1
    warmup: int = 2
    active: int = 5
    memory: bool = False

    def __post_init__(self):
        if self.wait < 0 or self.warmup < 0 or self.active < 1:
            raise PlanktonioError("trace schedule: wait and warmup must be >= 0, active >= 1")


def run_trace(config_file: Path | None, overrides: list[str], data: Path, out: Path,
              options: TraceOptions) -> list[Path]:
    config = config_module.load(config_file, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, data, out)
    rank, device = trainer.ctx.rank, trainer.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    written = []

    def export(prof):
        path = out / f"trace-rank{rank}.json.gz"
        prof.export_chrome_trace(str(path))
        written.append(path)
        if options.memory:
            memory = out / f"memory-rank{rank}.html"
            prof.export_memory_timeline(str(memory), device=str(device) if device.type == "cuda" else None)
            written.append(memory)

    set_train_mode(trainer.model)
    batches = endless(trainer.train_loader)
    nvtx = device.type == "cuda"
    try:
        with profile(activities=activities,
                     schedule=schedule(wait=options.wait, warmup=options.warmup, active=options.active),
                     on_trace_ready=export, record_shapes=options.memory, profile_memory=options.memory,
                     with_stack=options.memory) as prof:
            for _ in range(options.wait + options.warmup + options.active):
                with annotate("data", nvtx):
                    images, labels = next(batches)
                loss, _ = train_step(trainer.net, trainer.optimizer, trainer.scaler, images, labels,
                                     device, trainer.amp_dtype)
                loss.item()  # the training loop synchronises once per step too
                prof.step()
    finally:
        trainer.train_loader.close()
        distributed.shutdown()
    return written
