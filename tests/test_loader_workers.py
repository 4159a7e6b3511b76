"""DataLoader workers (planktonio/loaders/workers.py, used by predict's and fit's worker-pool loaders) end with
the process that started them, however it ends, and quietly: the process boundary is the point, so a
subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from .helpers import REPO, _signal_all, descendants, process_env

# Two workers, each in the middle of a minute-long sample when their parent is killed: only the kernel (or
# the DataLoader's watchdog, once the sample is done) can end them.
PARENT = """
import time
from torch.utils.data import DataLoader, Dataset
from planktonio.loaders.workers import start_worker
class Slow(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        time.sleep(60)
        return i
batches = iter(DataLoader(Slow(), num_workers=2, worker_init_fn=start_worker))
print("started", flush=True)
next(batches)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_end_with_their_parent_quietly(sig):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, env=process_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    workers = []
    try:
        assert parent.stdout.readline().strip() == "started"
        deadline = time.time() + 60
        while len(workers) < 2 and time.time() < deadline:
            time.sleep(0.1)
            workers = descendants(parent.pid)
        assert len(workers) == 2, workers
        time.sleep(1)  # their start (worker_init_fn) done, each now asleep in its sample
        parent.send_signal(sig)
        try:  # the workers hold the parent's stdout and stderr: both close once every worker has ended
            out, err = parent.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"workers {workers} outlived their parent (killed by {sig.name}) by 20 s")
        assert parent.returncode == -sig
        assert "Traceback" not in err and "ConnectionResetError" not in err, err
    finally:
        _signal_all([*workers, parent.pid], signal.SIGKILL)
        parent.wait()
