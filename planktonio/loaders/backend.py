"""What a loader backend declares about itself, in its own module: the plugin contract.

Everything the rest of the code asks about a backend is here, so that a new
one is one file (its `BACKENDS` tuple) and one entry in the registry
(loaders/__init__.py), with no edit elsewhere:
- name, summary, the devices it runs on;
- its role in a comparison (ROLES below): which row the benchmark's ratios
  and the report's goals are taken over, which rows are what this project
  offers, which is only a bound;
- its own options (a dataclass: the cache's budget and overflow), reachable
  from the training config as `loader.options` and checked like any setting;
- the goals it promises (checked by `profiling report` on what was measured);
- how to build it from a LoaderSpec and its options.
The extra figures a backend reports come from its Loader's `stats()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch

from ..declared import SettingsError, build

# A backend's role in a comparison.
ROLES = {
    "reference": "the pipeline the plankton study ran: the goals' speed-ups are taken over it",
    "baseline": "a conventional pipeline, shown for comparison (the goals fall back to the first one "
                "when no reference was measured)",
    "candidate": "what this project offers to make loading fast",
    "peer": "another project's loader doing the same work its own way (its own crop sampling): the speed a "
            "user would get instead, measured beside ours, never trained with",
    "upper-bound": "batches already on the device: what a consumer would see if loading cost nothing",
}


@dataclass(frozen=True)
class Goal:
    """A speed a backend promises: `factor` x the images/s of what it is compared with, on `device`.

    over="reference": the reference row (see ROLES); over="candidates": the
    fastest other candidate measured in the same run; over="peers": the
    fastest peer (another project's loader) measured in the same run.
    """

    over: str
    factor: float
    device: str      # "cpu", "cuda" or "any": the goal holds where the device is of this type
    why: str = ""


@dataclass(frozen=True)
class NoOptions:
    """A backend without options of its own."""


@dataclass(frozen=True)
class Backend:
    """One loader backend, as its module declares it."""

    name: str
    summary: str
    devices: tuple[str, ...]                       # "cpu", "cuda": where it can run
    role: str                                      # a key of ROLES
    build: Callable[[Any, Any], Any]               # (LoaderSpec, options) -> Loader
    options: type = NoOptions                      # a dataclass of its own settings (loader.options)
    goals: tuple[Goal, ...] = ()
    trains: bool = True                            # a training run may use it (an upper bound may not)
    # `train predict` may use it: it reads each image once, batch by batch (the cache decodes a whole split
    # before its first batch and keeps it, which pays off from a second epoch on, never in one pass)
    streams: bool = True
    # Why it cannot run here (an optional package missing), or None: such a backend is left out of
    # runnable_backends, and a benchmark shows its row as skipped with this reason
    missing: Callable[[], str | None] = lambda: None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"backend {self.name}: role {self.role!r} is not one of {', '.join(ROLES)}")

    def runs_on(self, device: torch.device) -> bool:
        return device.type in self.devices

    def parse_options(self, values: dict | None):
        """The backend's options from a mapping (the config's loader.options); a bad key names the backend."""
        try:
            return build(self.options, values or {}, "loader.options")
        except SettingsError as error:
            raise SettingsError(error.problems, prefix=f"loader backend {self.name}") from None

    def describe(self) -> dict:
        """What a result file records about the backend, so that a report can read it without this code."""
        return {"name": self.name, "summary": self.summary, "role": self.role,
                "goals": [asdict(goal) for goal in self.goals],
                "options": [f.name for f in fields(self.options)]}

