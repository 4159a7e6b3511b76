"""Stop cleanly on the signals a scheduler sends before a time limit.

Slurm sends SIGTERM when it cancels or preempts a job, and a job script can
ask for SIGUSR1 some minutes before its time limit (`--signal=USR1@300`).
Either only raises a flag; the loop sees it at its next check (every
`training.check_every` steps, and at each epoch's end), writes last.pt and
exits with EXIT_INTERRUPTED, so the requeued or resubmitted job resumes.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_USAGE = 2          # bad config, data or weights: fix the input
EXIT_NON_FINITE = 3     # the loss became NaN or infinite; last.pt holds the last good checkpoint
EXIT_INTERRUPTED = 75   # EX_TEMPFAIL: stopped by a signal, resume with --resume

HANDLED = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
