"""The one exception type for problems a user can fix (bad input, bad options).

Command-line entry points print its message and exit with status 2 instead of
showing a traceback; anything else is a bug and keeps its traceback.
"""


class PlanktonioError(Exception):
    """A problem with the user's input: the message says which file and why."""
