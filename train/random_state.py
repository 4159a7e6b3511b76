"""Random state, one per rank: seeded from (seed, rank), saved into last.pt and put back on resume.

Every generator a step draws from (Python's, numpy's, torch's on the CPU and on this process's GPU) is
kept as plain values and tensors, so that a checkpoint stays data (checkpoint_file.py).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch's generators (CPU and this process's GPU) from (seed, rank).

    Ranks must draw different random numbers where they should differ
    (dropout masks: each rank sees other images, identical masks would be
    correlated noise), and the same ones again when a run is repeated.
    """
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def rng_state(device: torch.device) -> dict:
    """This process's random state as plain values and tensors: Python, numpy, torch on the CPU and its GPU."""
    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)

