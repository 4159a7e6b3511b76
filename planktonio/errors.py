"""The exception types for problems a user can fix: bad input, bad options, a disk that cannot take a file.

Command-line entry points print the message (one line) and exit with status 2
(PlanktonioError) or 74 (DiskError, EX_IOERR) instead of showing a traceback;
anything else is a bug and keeps its traceback.
"""

EXIT_USAGE = 2   # bad input or options: fix them
EXIT_DISK = 74   # EX_IOERR: a file could not be written (disk full, read-only, quota, not a folder)


class PlanktonioError(Exception):
    """A problem with the user's input: the message says which file and why."""

    exit_code = EXIT_USAGE


class DiskError(PlanktonioError):
    """A file could not be written; the message names it and what the system said (nothing already written
    is lost: every file is replaced whole or not at all, planktonio/files.py)."""

    exit_code = EXIT_DISK
