"""Each kind of result renders its own report section: one module per kind, none importing torch.

A result file's `kind` picks its section here; `profiling report` only
loads the files and puts the sections (and the goals they checked) together.
"""

from __future__ import annotations

from . import amp, inspect, loaders, predict, scale, smoke, suite, training

SECTIONS = {
    suite.KIND: suite.section,
    smoke.KIND: smoke.section,
    loaders.KIND: loaders.section,
    amp.KIND: amp.section,
    training.KIND: training.section,
    predict.KIND: predict.section,
    scale.KIND: scale.section,
    "inspect": inspect.trace_section,
    "inspect-ranks": inspect.ranks_section,
    "inspect-compare": inspect.compare_section,
}
