"""Sharing CPU cores between torch's threads and a loader's, set before torch loads.

torch's CPU operators run on OpenMP threads (GNU libgomp in the Linux
wheels), which after each parallel region keep spinning for a while in case
more work comes. Where a loader's threads share those cores (DALI's CPU
threads, DataLoader workers), the spinning takes the cores from the
decoder. Classifying (`train predict`, a forward pass per batch) suffers
most; training, whose backward pass keeps the threads busy, gains nothing.
So only the predicting programs ask OpenMP to sleep when idle
(OMP_WAIT_POLICY=PASSIVE), and only where the environment does not say
otherwise. libgomp reads it once, when torch is loaded: call this before
anything imports torch (this module imports nothing). Measured in
profiling/results/ (the predict session); docs/predict.md.
"""

from __future__ import annotations

import os


def let_idle_threads_sleep() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
