"""Stop cleanly on the signals a scheduler, a terminal or a lost session sends.

- SIGTERM: Slurm cancels or preempts a job (scancel, a time limit);
- SIGUSR1: a job script asks for it some minutes before its time limit
  (`--signal=USR1@300`);
- SIGINT: Ctrl-C, sent to every process of the foreground group (the
  DataLoader workers ignore it, planktonio/loaders/workers.py);
- SIGHUP: the terminal went away (an ssh session to a login node closed).
Each only raises a flag, from the run's start to its last file; the loop
sees it at the next step boundary (one process) or at its next check (under
DDP, where the ranks agree on it: every `training.check_every` steps, and
sooner when steps are slow), writes last.pt and exits with EXIT_INTERRUPTED,
so a requeued or resubmitted job resumes. Before there is anything to
checkpoint (start-up, the feature cache's pass) it exits with
EXIT_INTERRUPTED too, having written nothing. A second Ctrl-C aborts at
once, with one line: the user asked twice.
After SIGHUP the terminal is gone, and writing to it would fail (EIO) in the
middle of the checkpoint: the standard streams that were that terminal are
pointed at /dev/null (a log redirected to a file keeps its lines).
"""

from __future__ import annotations

import os
import signal
import sys

from planktonio.errors import EXIT_DISK, EXIT_USAGE

EXIT_OK = 0
EXIT_NON_FINITE = 3     # the loss or the weights became NaN or infinite; no checkpoint holds them
EXIT_INTERRUPTED = 75   # EX_TEMPFAIL: stopped by a signal, last.pt written: resume with --resume
EXIT_PEER_LOST = 76     # another rank left (died, or hung past training.collective_timeout_s): restart from last.pt
EXIT_ABORTED = 130      # a second Ctrl-C: stopped at once, nothing written

# What each exit status of `python -m train` means, for its --help and for job scripts' readers.
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_USAGE: "bad input (config, data, weights, a run folder another process is writing)",
    EXIT_NON_FINITE: "the loss or the weights became NaN/inf (no checkpoint holds them)",
    EXIT_DISK: "a file could not be written (disk full, read-only, a quota): free space and run again (fit: with "
               "--resume; the previous checkpoint is intact)",
    EXIT_INTERRUPTED: "stopped by SIGTERM, SIGUSR1, SIGINT or SIGHUP, last.pt written (continue with --resume)",
    EXIT_PEER_LOST: "another rank left or hung (restart from last.pt; the Slurm job scripts do)",
    EXIT_ABORTED: "a second Ctrl-C: stopped at once",
}

HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def _detach_from_lost_terminal() -> None:
    """Point stdout and stderr at /dev/null where they were the terminal that hung up."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and os.isatty(stream.fileno()):
                os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass
    os.close(devnull)


def _say(text: str) -> None:
    """One line on stderr from a signal handler: never let the printing itself fail the run
    (a handler can interrupt another write to the same stream, or the terminal may be gone)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, RuntimeError, ValueError):
        pass


class Interrupted(Exception):
    """A stop signal seen where there is nothing to checkpoint yet (start-up, the feature cache's pass)."""


class StopFlag:
    """The flag the handled signals raise, for the whole of a run (`with StopFlag() as stop:`), from start-up
    to the last file: a signal at any point is a clean stop, never the default action's exit 143 or 138."""

    # What a first and a second Ctrl-C say: what the command does when it stops (fit writes a checkpoint).
    STOPPING = "stopping at the next check (SIGINT): writing a checkpoint; press Ctrl-C again to abort without one"
    ABORTED = "aborted by a second Ctrl-C: nothing written since the last checkpoint"

    def __init__(self, stopping: str | None = None, aborted: str | None = None):
        self.signal_name: str | None = None
        self._previous = {}
        self.stopping, self.aborted = stopping or self.STOPPING, aborted or self.ABORTED

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def install(self) -> StopFlag:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            _say(f"\n{self.aborted}")
            os._exit(EXIT_ABORTED)  # at once: no unwinding through the step that is running
        if signum == signal.SIGHUP:
            _detach_from_lost_terminal()
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            if signum == signal.SIGINT:
                _say(f"\n{self.stopping}")

    @property
    def raised(self) -> bool:
        return self.signal_name is not None

    def interrupted(self, where: str) -> Interrupted:
        """The stop (to raise) where nothing can be checkpointed yet; `where`: what was under way. Under DDP
        the signal may have reached another rank only."""
        return Interrupted(f"stopping on {self.signal_name or 'a signal to another rank'} during {where}: nothing "
                           f"to checkpoint yet; the same command (or --resume) starts there again")

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
