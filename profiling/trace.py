"""`python -m profiling trace`: a short training run under torch.profiler.

The run is the training program's own (its Executor, optimizer, training
loader, step and timed batches, so the trace shows the "data" range of
train/timing.py and the "forward", "backward" and "optimizer" ranges of
train/step.py) for wait + warmup + active steps, recorded only in the active
ones. Like the training loop, it never makes the host wait for the GPU
between steps. Every rank writes its own Chrome trace, OUT/trace-rank<R>.json.gz
(open it in Perfetto or chrome://tracing, or read it with `inspect`); with
--memory also a memory timeline, OUT/memory-rank<R>.html.
"""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, schedule

from planktonio.errors import PlanktonioError
from train import config as config_module
from train import distributed
from train.executor import Executor
from train.model import set_train_mode
from train.step import make_optimizer, make_scaler, train_step
from train.timing import TimedBatches

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
    try:
        return _trace(config, data, out, options)
    finally:
        gc.collect()  # DistributedDataParallel first, the process group after it (see train/loop.py)
        distributed.shutdown()


def _trace(config, data: Path, out: Path, options: TraceOptions) -> list[Path]:
    executor = Executor(config, data)  # the model; then only what a training step needs
    rank, device = executor.ctx.rank, executor.device
    o = config.optimizer
    net = executor.training_net()
    optimizer = make_optimizer(o.name, executor.model, device, o.lr, o.momentum, o.weight_decay)
    scaler = make_scaler(executor.precision, device)
    loader = executor.loader_for("train", config.loader.batch_size, True)
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

    set_train_mode(executor.model)
    steps = options.wait + options.warmup + options.active
    batches = TimedBatches(itertools.islice(endless(loader), steps), device)
    try:
        with profile(activities=activities,
                     schedule=schedule(wait=options.wait, warmup=options.warmup, active=options.active),
                     on_trace_ready=export, record_shapes=options.memory, profile_memory=options.memory,
                     with_stack=options.memory) as prof:
            for images, labels in batches:
                train_step(net, optimizer, scaler, images, labels, device, executor.amp_dtype)
                prof.step()
    finally:
        loader.close()
    return written
