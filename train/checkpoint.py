"""Checkpoints written atomically, with everything a resumed run needs to continue exactly."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from planktonio.errors import PlanktonioError


def save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    if not path.is_file():
        raise PlanktonioError(f"checkpoint {path}: not found")
    try:
        # Our own files: they hold RNG states and numpy arrays, not just tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise PlanktonioError(f"checkpoint {path}: cannot be read ({error})") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
