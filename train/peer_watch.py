"""A rank's watch over its peers: a peer that left or hung, said in one line and exit 76 under NCCL as under gloo.

Under gloo a collective with a peer gone raises in Python (connection
reset), or times out after `training.collective_timeout_s` (a hung peer), and
the training loop turns either into one line and exit 76 (distributed.py).
Under NCCL (torch 2.10) neither reaches Python. Collectives are asynchronous:
the host blocks in a CUDA synchronisation (a check's `.tolist()`), and
torch's own watchdog thread, once it finds the failure (an NCCL error, or
the process group's timeout), logs, waits 60 s for a debug dump, then ends
the process with SIGABRT from that thread (TORCH_NCCL_ASYNC_ERROR_HANDLING=3,
the default: ProcessGroupNCCL.cpp, Watchdog::run): no line of ours, exit
134. Blocking wait (TORCH_NCCL_BLOCKING_WAIT=1) would raise only for work
handles the program waits on itself, not for DDP's bucket all-reduces or a
plain all_reduce, and on one node NCCL sees a dead peer only as a timeout.

So each rank also keeps a heartbeat in the rendezvous store: a counter it
raises every second from a thread of its own (which runs while the main
thread is blocked in a collective), reading the others'. A peer whose
counter has not moved for `stale_s` (the collective timeout, at most 60 s)
has left (on this host: its process is gone) or stopped answering (SIGSTOP,
a wedged GPU, a lost node); a store that does not answer means its host,
rank 0's node or torchrun's agent, is gone. The watch then says so in the
gloo path's one line and ends the process with exit 76 at once
(`os._exit`: with a peer gone the process group cannot be destroyed, its
destructor would wait on it). Whichever of the two notices first speaks,
once. The job scripts restart the step from last.pt.

A peer that ended is not a peer lost: a rank that ends cleanly stops its
heartbeat, then sets its done mark in the store, and is watched no more
(rank 0's post-training work, calibration and plots, can outlast the
staleness limit). Rank 0 hosts the store under srun, so it leaves last: it
waits (`finish`) until every other rank is done or silent for `stale_s`
(lost) before it destroys the process group and exits, and a rank still
polling the store never finds it gone. docs/training.md.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .signals import EXIT_PEER_LOST

KEY = "planktonio/heartbeat/{}"
BEAT_S = 1.0        # how often a rank raises its counter and reads the others'
MAX_STALE_S = 60.0  # the longest a silent peer is waited for (shorter with a shorter collective timeout)

_said = threading.Lock()  # one line per process, from the watch or from the main thread, whichever comes first


def done_key(rank: int) -> str:
    """Where a rank's done mark goes (1 once it ended cleanly), per attempt: torchrun's agent keeps its store
    across the restarts of its workers, and a mark of an earlier attempt must not count."""
    return f"planktonio/done/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def claim_the_line() -> bool:
    """Whether this caller is the first to say that a peer is gone (and the only one to say it)."""
    return _said.acquire(blocking=False)


def _state(pid: int) -> str | None:
    """A process's state letter on this host (R, S, T: stopped, ...), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0]


class PeerWatch:
    """The heartbeat of one rank (`start`, `stop`); `look` is one round of it, a pure step for tests."""

    def __init__(self, ctx, store, stale_s: float, activity: Callable[[], str] = lambda: "start-up",
                 clock: Callable[[], float] = time.monotonic):
        self.ctx, self.store, self.stale_s, self.activity, self.clock = ctx, store, stale_s, activity, clock
        now = clock()
        self.seen = {rank: (None, now) for rank, _, _ in ctx.peers if rank != ctx.rank}  # rank: (count, when)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def look(self) -> str | None:
        """Raise this rank's counter and read the others'; the one line to say when a peer is gone, else None."""
        try:
            silent = self._silent()
        except Exception as error:  # the store's own exceptions differ by transport
            host = next((h for r, h, _ in self.ctx.peers if r == 0), "its host")
            return self._line(f"rank 0 on {host}", "left", f"the rendezvous store there does not answer: "
                                                            f"{(str(error).splitlines() or [type(error).__name__])[0]}")
        if not silent:
            return None
        now, rank = self.clock(), silent[0]
        _, host, pid = next(p for p in self.ctx.peers if p[0] == rank)
        quiet = f"no heartbeat for {now - self.seen[rank][1]:.0f} s"
        if host == socket.gethostname():
            state = _state(pid)
            if state is None:
                return self._line(f"rank {rank} on {host}", "left", f"{quiet}; process {pid} is gone")
            if state == "T":
                return self._line(f"rank {rank} on {host}", "stopped answering", f"{quiet}; process {pid} is stopped")
        return self._line(f"rank {rank} on {host}", "stopped answering", quiet)

    def _silent(self) -> list[int]:
        """Raise this rank's counter; the peers not done whose counters have not moved for stale_s (a peer
        found done is watched no more)."""
        self.store.add(KEY.format(self.ctx.rank), 1)
        for rank in [rank for rank in self.seen if self.store.add(done_key(rank), 0)]:
            del self.seen[rank]
        counts = {rank: self.store.add(KEY.format(rank), 0) for rank in self.seen}
        now = self.clock()
        for rank, count in counts.items():
            if count != self.seen[rank][0]:
                self.seen[rank] = (count, now)
        return [rank for rank, (_, since) in self.seen.items() if now - since > self.stale_s]

    def finish(self, clean: bool, sleep: Callable[[float], None] = time.sleep) -> list[int]:
        """At this rank's end, the watch's thread stopped: its done mark (after a clean end: not a failure,
        which its peers must see as a peer lost); on rank 0 after a clean end, the wait until every other rank
        is done or lost (after a failure the others are failing too, or are told by its absence). The ranks
        lost (a store that does not answer: every rank not yet seen done)."""
        try:
            if clean:
                self.store.add(done_key(self.ctx.rank), 1)
            if not clean or self.ctx.rank != 0:
                return []
            while set(silent := self._silent()) != set(self.seen):
                sleep(BEAT_S)
            return sorted(silent)
        except Exception:  # the store's own exceptions differ by transport
            return sorted(self.seen)

    def _line(self, who: str, what: str, reason: str) -> str:
        return (f"rank {self.ctx.rank} on {socket.gethostname()}: {who} {what} during {self.activity()} ({reason}); "
                f"exiting with {EXIT_PEER_LOST} for the job to restart from last.pt")

    # ------------------------------------------------------------ the thread

    def start(self) -> "PeerWatch":
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            line = self.look()
            if line is not None and claim_the_line():
                try:
                    print(line, file=sys.stderr, flush=True)
                finally:
                    os._exit(EXIT_PEER_LOST)  # at once: the main thread may be blocked in a collective for good

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def rendezvous_store(timeout_s: float):
    """A client of the job's rendezvous store of its own (MASTER_ADDR:MASTER_PORT, as torchrun and the job
    scripts set them), so that the watch never shares a connection with torch's own use of it; None where
    the job has no such store (a rendezvous by file)."""
    import torch.distributed as dist
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address or not port:
        return None
    return dist.TCPStore(address, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)
