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


# ------------------------------------------------------------------ random state, one per rank


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch's generators (CPU and this process's GPU) from (seed, rank).

    Ranks must draw different random numbers where they should differ
    (dropout masks: each rank sees other images, identical masks would be
    correlated noise), and the same ones again when a run is repeated.
    """
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def rng_state(device: torch.device) -> dict:
    """This process's random state: Python, numpy, torch on the CPU and on its own GPU."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        if isinstance(state["cuda"], list):  # checkpoints before per-rank states held every device's
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"], device)
