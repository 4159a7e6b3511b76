"""Which relative paths a manifest line and an index may hold: the rules once, per path and vectorised.

A manifest is one "path label" per line, read by DALI's file_list and by
str.splitlines (which also splits at form feeds, U+2028 and other
separators); an index holds every path as UTF-8, each ended by "\\n". So a
name that is not UTF-8 (file systems give bytes), that holds a line break or
a control character, or that starts or ends with whitespace is refused,
never mangled; and nothing read from a prepared folder may leave the data
root (absolute, "..", a backslash). `path_problem` judges one path (prepare,
the manifest reader); `first_path_problem` judges an index's paths at once,
with no Python loop over images. Both say the same of every path
(tests/test_dataset.py checks it on random paths).
"""

from __future__ import annotations

import numpy as np

NOT_UTF8 = "is not valid UTF-8"
CONTROL = "has a line break or control character"
WHITESPACE = "starts or ends with whitespace"
BACKSLASH = "leaves the data root (a backslash)"
ABSOLUTE = "leaves the data root (absolute)"
PARENT = "leaves the data root ('..')"
# In this order, so that both forms name the same problem of a path that has several.
PROBLEMS = (NOT_UTF8, CONTROL, WHITESPACE, BACKSLASH, ABSOLUTE, PARENT)

SEPARATOR = ord("\n")
# What str.splitlines splits at beyond the ASCII controls, as UTF-8 (self-synchronising: found by a byte search).
UNICODE_BREAK_CHARS = "\x85\u2028\u2029"
UNICODE_BREAKS = tuple(c.encode() for c in UNICODE_BREAK_CHARS)


def shown(path: str) -> str:
    """A path as it can be printed and written to UTF-8 files: bytes that are not UTF-8 as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_problem(path: str) -> str | None:
    """What is wrong with one relative path (one of PROBLEMS), or None. An empty path is the caller's to refuse.

    `path` as Python gives a file name: bytes that are not UTF-8 as lone surrogates (surrogateescape).
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return NOT_UTF8
    if any(ord(c) < 32 or ord(c) == 127 or c in UNICODE_BREAK_CHARS for c in path):
        return CONTROL
    if path != path.strip():
        return WHITESPACE
    if "\\" in path:
        return BACKSLASH
    if path.startswith("/"):
        return ABSOLUTE
    if ".." in path.split("/"):
        return PARENT
    return None


def first_path_problem(blob: np.ndarray, ends: np.ndarray) -> tuple[int, str] | None:
    """(position, problem) of the first path at fault among all of them, or None.

    blob: uint8, every path's bytes each followed by "\\n"; ends: where each path's "\\n" is (paths not
    empty, checked by the caller). Each rule is one vectorised pass over the blob; of the paths at fault,
    the first is named, and of its problems the first in PROBLEMS.
    """
    if not len(ends):
        return None
    found: dict[int, str] = {}   # path -> its first problem, for the first path each rule finds
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)

    def first(byte_positions: np.ndarray, problem: str) -> None:
        if len(byte_positions):
            position = int(np.searchsorted(ends, byte_positions[0]))
            found.setdefault(position, problem)

    text = blob.tobytes()
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as error:
        first(np.asarray([error.start]), NOT_UTF8)
    control = np.flatnonzero(((blob < 32) & (blob != SEPARATOR)) | (blob == 127))
    breaks = [at for b in UNICODE_BREAKS if (at := text.find(b)) >= 0]
    first(np.sort(np.concatenate([control, np.asarray(breaks, dtype=np.int64)])), CONTROL)
    first(_whitespace_ends(text, blob, starts, ends), WHITESPACE)
    first(np.flatnonzero(blob == ord("\\")), BACKSLASH)
    first(starts[blob[starts] == ord("/")], ABSOLUTE)
    framed = b"\n" + text
    parents = [at for pattern in (b"\n../", b"/../", b"/..\n", b"\n..\n") if (at := framed.find(pattern)) >= 0]
    first(np.asarray(sorted(parents), dtype=np.int64), PARENT)
    if not found:
        return None
    position = min(found)
    # A path found by several rules: name the problem the per-path form names first.
    path = text[int(starts[position]):int(ends[position])].decode("utf-8", "surrogateescape")
    return position, path_problem(path) or found[position]


def _whitespace_ends(text: bytes, blob: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Byte positions of paths that start or end with whitespace: ASCII found vectorised; a path that starts
    or ends with a non-ASCII byte (rare) is decoded and asked (Unicode has some 20 spaces)."""
    first, last = blob[starts], blob[ends - 1]
    ascii_space = np.isin(first, (32,)) | np.isin(last, (32,))  # other ASCII whitespace is a control character
    wide = np.flatnonzero((first >= 0x80) | (last >= 0x80))
    for position in wide.tolist():
        path = text[int(starts[position]):int(ends[position])].decode("utf-8", "surrogateescape")
        if path != path.strip():
            ascii_space[position] = True
    return starts[np.flatnonzero(ascii_space)]
