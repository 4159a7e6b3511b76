"""`python -m profiling trace`: the training run itself, with its profiler switched on.

It is `python -m train fit` with the config's `profile` section enabled
(train/profiler.py): the run's own loader, step and timed batches, recorded
for wait + warmup + active steps, one Chrome trace per rank in OUT
(trace-rank<R>.json.gz; with --memory also memory-rank<R>.json.gz and .png), after which
the run ends (`profile.stop_after`: no validation, no checkpoint). Under
torchrun every rank writes its own trace. Read them with `python -m
profiling inspect OUT`.
"""

from __future__ import annotations

from pathlib import Path

from train import config as config_module
from train.loop import fit

from .settings import TraceOptions


def run_trace(config_file: Path | None, overrides: list[str], data: Path, out: Path, options: TraceOptions) -> int:
    """Returns fit's exit code (0 once the trace is written)."""
    profile = ["profile.enabled=true", f"profile.wait={options.wait}", f"profile.warmup={options.warmup}",
               f"profile.active={options.active}", f"profile.memory={str(options.memory).lower()}",
               "profile.stop_after=true"]
    config = config_module.load(config_file, [*overrides, *profile])
    return fit(config, data, Path(out))
