"""A checkpoint file: written atomically, loaded without running code, checked against its own checksum.

Run folders are shared between the users of a group and copied around, so a
checkpoint is data, never code: it holds tensors and plain Python values only
(the random states included: numpy's as a tensor), and is loaded with
`torch.load(weights_only=True)`, which refuses any pickled object that would
run code when unpickled. It carries a sha256 of its content (every tensor's
bytes, shape and dtype, every key and plain value, in a fixed order), checked
on load: a file with bytes changed or cut short is refused with a one-line
error that says what to use instead. A checkpoint whose weights, buffers or
optimizer state are not all finite is never written (checkpointer.py's
`check_finite`, which also decides when last.pt is written).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import torch

from planktonio.errors import PlanktonioError
from planktonio.files import atomic_file

CHECKSUM = "checksum"


# ------------------------------------------------------------------ content checksum


def _feed(digest, value) -> None:
    """Add a value to the digest: its type, then its content, so that no two values feed the same bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():  # the tensor's own memory, read in place (hashlib takes a buffer: no copy of it)
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}|".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__}:{value!r}|".encode())
    else:
        raise TypeError(f"a checkpoint holds tensors and plain values only, not {type(value).__name__}")


def content_checksum(state: dict) -> str:
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != CHECKSUM})
    return digest.hexdigest()


# ------------------------------------------------------------------ saving and loading


def save_atomic(state: dict, path: Path) -> None:
    """torch.save with its checksum, to a temporary file, fsync'd, then renamed over `path`."""
    state = {**state, CHECKSUM: content_checksum(state)}
    with atomic_file(path, "wb", durable=True) as f:
        torch.save(state, f)


def torch_load(path: Path, mmap: bool = False):
    """torch.load of tensors and plain values only (no code runs), quietly: its warnings about a file it
    then refuses would print lines beside the one-line error that says what to do. mmap: the tensors are
    read from the file as they are used (a feature cache larger than memory stays on disk until copied)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_error_reason(error: Exception) -> str:
    """torch.load's failure in a few words (its own message spans lines and advises weights_only=False)."""
    text = str(error)
    unsafe = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if unsafe:
        return f"it holds a Python object ({unsafe.group(1)}) that loading would run as code: refused"
    if "Weights only load failed" in text:
        return "it is not a file of tensors (a plain pickle, or another format): refused, unpickling it could run code"
    if re.search(r"invalid load key|central directory|PytorchStreamReader|unexpected EOF|truncated", text, re.I):
        return "not a PyTorch file, or cut short"
    return (text.strip().splitlines() or [type(error).__name__])[0][:200]


ADVICE = {
    "last.pt": "resume is not possible from it: start a new run from its best weights "
               "(--set model.weights=RUN/best.pt), or restore a copy of last.pt",
    "best.pt": "evaluate last.pt instead (--checkpoint last), or restore a copy of best.pt",
}


def load(path: Path, mmap: bool = False) -> dict:
    """A checkpoint written by save_atomic; any problem is a one-line PlanktonioError saying what to do."""
    path = Path(path)
    advice = ADVICE.get(path.name, "use another checkpoint")
    if not path.is_file():
        raise PlanktonioError(f"checkpoint {path}: not found")
    try:
        state = torch_load(path, mmap)
    except Exception as error:  # pickle, zip, truncation, or an object weights_only refuses
        raise PlanktonioError(f"checkpoint {path}: cannot be read ({load_error_reason(error)}); {advice}") from None
    if not isinstance(state, dict) or CHECKSUM not in state:
        raise PlanktonioError(f"checkpoint {path}: no checksum (not written by this planktonio, or by an older "
                              f"one); {advice}")
    if content_checksum(state) != state.pop(CHECKSUM):
        raise PlanktonioError(f"checkpoint {path}: its content does not match its checksum (changed or damaged "
                              f"since it was written); {advice}")
    return state
