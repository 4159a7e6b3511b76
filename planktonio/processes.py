"""Worker processes end with the process that started them, whatever ends it.

A pool's workers outlive a parent stopped by SIGKILL, or by SIGTERM (whose
default action runs no cleanup): handed to init, they wait on their task
queue forever, holding memory and file handles on a node a job has left.
`end_with_parent`, as a pool's initializer, asks Linux to kill the worker
when its parent dies (prctl PR_SET_PDEATHSIG), and ends the worker at once
if the parent died before that request was made.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent: int) -> None:
    """In a worker process started by `parent` (its pid): die with it. A pool initializer."""
    if sys.platform.startswith("linux"):
        try:
            # SIGKILL: a worker holds nothing to save (the parent writes the journal), and one that
            # handles or blocks SIGTERM would stay.
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc to ask: the check below still holds at start
            pass
    if os.getppid() != parent:
        os._exit(1)
