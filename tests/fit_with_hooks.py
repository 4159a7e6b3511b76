"""`python -m train ...` with test hooks applied from outside (production code carries none).

    SIGTERM_RANK=1 SIGTERM_AT_STEP=8 python -m torch.distributed.run --nproc_per_node 2 \\
        -m tests.fit_with_hooks fit --config ... --out RUN
    MASKS=DIR python -m torch.distributed.run ... -m tests.fit_with_hooks fit ...

SIGTERM_AT_STEP: the rank SIGTERM_RANK (every rank if unset) sends itself a
real SIGTERM right after its training step number SIGTERM_AT_STEP (counted
from 1 in this process). MASKS: before its first training step, each rank
writes DIR/mask-rank<R>.json, the dropout mask its random state would draw
now (drawn on a copy of the state, so the run itself is unchanged).
STEP_SECONDS: each training step takes that much longer (a slow run, so that
a test's signals arrive mid-epoch).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from train import loop
from train.__main__ import main


def install_hooks(sigterm_at: int | None, sigterm_rank: int | None, masks: Path | None,
                  step_seconds: float = 0.0) -> None:
    rank = int(os.environ.get("RANK", "0"))
    original = loop.train_step
    taken = {"steps": 0}

    def train_step(*args, **kwargs):
        if masks is not None and taken["steps"] == 0:
            with torch.random.fork_rng(devices=[]):
                mask = torch.nn.functional.dropout(torch.ones(512), p=0.5) > 0
            masks.mkdir(parents=True, exist_ok=True)
            (masks / f"mask-rank{rank}.json").write_text(json.dumps(mask.tolist()))
        result = original(*args, **kwargs)
        time.sleep(step_seconds)
        taken["steps"] += 1
        if taken["steps"] == sigterm_at and sigterm_rank in (None, rank):
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    loop.train_step = train_step


if __name__ == "__main__":
    env = os.environ
    install_hooks(int(env["SIGTERM_AT_STEP"]) if "SIGTERM_AT_STEP" in env else None,
                  int(env["SIGTERM_RANK"]) if "SIGTERM_RANK" in env else None,
                  Path(env["MASKS"]) if "MASKS" in env else None, float(env.get("STEP_SECONDS", "0")))
    sys.exit(main(sys.argv[1:]))
