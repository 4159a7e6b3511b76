"""CPU counting in one place (planktonio/cores.py): the CPUs this process may use, and the cap on workers
and threads, said once per process and value."""

from __future__ import annotations

import logging
import os

from planktonio.cores import CapNotices, available_cpus, usable_count


def test_the_cpus_counted_are_this_process_s_share():
    assert available_cpus() == len(os.sched_getaffinity(0))


def test_a_count_over_the_cpus_is_capped_and_said_once_per_value(caplog):
    notices, cpus = CapNotices(), available_cpus()
    with caplog.at_level(logging.WARNING, logger="planktonio"):
        assert usable_count(None, "loader workers", notices) == cpus
        assert usable_count(cpus, "loader workers", notices) == cpus
        for _ in range(2):
            assert usable_count(cpus + 7, "loader workers", notices) == cpus
        assert usable_count(cpus + 7, "DALI threads", notices) == cpus
    assert [r.getMessage() for r in caplog.records] == [
        f"loader workers: {cpus + 7} asked for, capped at the {cpus} CPU(s) this process may use",
        f"DALI threads: {cpus + 7} asked for, capped at the {cpus} CPU(s) this process may use"]
    assert CapNotices().first_time("loader workers", cpus + 7)  # another object has said nothing yet
