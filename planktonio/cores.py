"""CPU cores: how many this process may use, and sharing them between torch's threads and a loader's.

`available_cpus` is the one count of usable CPUs (the affinity: under Slurm,
the task's share of the node) and `usable_count` the one cap on workers and
threads; this module imports nothing heavy, so the doctor and every program
may count with it before torch or a backend loads.

torch's CPU operators run on OpenMP threads (GNU libgomp in the Linux
wheels), which after each parallel region keep spinning for a while in case
more work comes. Where a loader's threads share those cores (DALI's CPU
threads, DataLoader workers), the spinning takes the cores from the
decoder. Classifying (`train predict`, a forward pass per batch) suffers
most; training, whose backward pass keeps the threads busy, gains nothing.
So only the predicting programs ask OpenMP to sleep when idle
(OMP_WAIT_POLICY=PASSIVE), and only where the environment does not say
otherwise. libgomp reads it once, when torch is loaded: call this before
anything imports torch (this module imports nothing heavy). Measured in
profiling/results/ (the predict session); docs/predict.md.
"""

from __future__ import annotations

import logging
import os


def let_idle_threads_sleep() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """The CPUs this process may run on: under Slurm, the task's share of the node, not all of it."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class CapNotices:
    """The (what, asked) pairs whose capping was said already: each is said once per process."""

    def __init__(self):
        self._said: set[tuple[str, int]] = set()

    def first_time(self, what: str, asked: int) -> bool:
        """True the first time this pair is asked about (then remembered), False after."""
        if (what, asked) in self._said:
            return False
        self._said.add((what, asked))
        return True


CAPPED = CapNotices()


def usable_count(asked: int | None, what: str, notices: CapNotices = CAPPED) -> int:
    """Workers or threads: the CPUs this process may use by default, and never more than those.

    A typo (`workers: 1000` on 2 cores) would start a thousand processes that
    make no progress, and that outlive a SIGTERM; more than the usable CPUs
    only makes them queue for the same cores. Said once per process and value.
    """
    usable = available_cpus()
    if asked is None:
        return usable
    if asked > usable:
        if notices.first_time(what, asked):
            logging.getLogger("planktonio").warning(f"{what}: {asked} asked for, capped at the {usable} CPU(s) "
                                                    f"this process may use")
        return usable
    return asked
