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

A rank that fails, as the OOM killer, a GPU's ECC error or a wedged GPU make
it (the Slurm tests start this module in their jobs through
PLANKTONIO_TRAIN_MODULE): FAULT_SIGNAL (KILL, STOP, ...) is sent by the rank
FAULT_RANK to itself once it has taken its training step FAULT_AT_STEP (counted
from 1 in this process, so a restarted process fails further on) or step S of
epoch E with FAULT_AT=E:S (the same place in every attempt), as it starts its
next step: whether or not the every-N-steps check came between (how often it
comes depends on the machine's speed), the other ranks are then waiting in that
next step's gradient all-reduce, so what they report does not depend on timing
(FAULT_AT needs a step after S in epoch E). With FAULT_ONCE=PATH only the first
process to get there fails, and leaves PATH behind (the time it failed).

HOLD_AT=E:S: right after its training step S of epoch E, the process writes
the file HOLD_FILE and holds there, so that a test's signal arrives at a
known step whatever the machine's speed: until a stop signal has been seen
(HOLD_UNTIL=signal, the default; the run then goes on to its next check) or
until the process is ended (HOLD_UNTIL=forever).

PEER_STALE_S=S: the peer watch (train/peer_watch.py) declares a silent peer
gone after S seconds instead of min(training.collective_timeout_s, 60): a
test can then see the watch speak before gloo's own timeout would.

RANKS=DIR: each rank writes DIR/rank<R>.json at start: where Slurm put it
(node, local rank, the GPUs it was given, the GPU index it takes) and the
MASTER_ADDR it meets the others at.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from train import distributed, loop
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


def install_fault(sig: signal.Signals, rank: int, at_step: int | None, at: tuple[int, int] | None,
                  once: Path | None) -> None:
    if distributed.from_environment().rank != rank:
        return
    original_step, original_epoch = loop.train_step, loop.Trainer.train_epoch
    seen = {"steps": 0, "trainer": None}

    def train_epoch(self, epoch):
        seen["trainer"] = self  # where the run stands: its epoch and the steps done in it
        return original_epoch(self, epoch)

    def train_step(*args, **kwargs):
        trainer = seen["trainer"]
        done = (trainer.progress.epoch, trainer.progress.batches_done)  # the steps taken before this one
        if (seen["steps"] == at_step or done == at) and not (once is not None and once.exists()):
            if once is not None:  # whole or not at all: a test reads the time as soon as the file is there
                partial = once.with_name(once.name + ".partial")
                partial.write_text(f"{time.time()}\n")
                partial.replace(once)
            os.kill(os.getpid(), sig)
        seen["steps"] += 1
        return original_step(*args, **kwargs)

    loop.train_step, loop.Trainer.train_epoch = train_step, train_epoch


def install_hold(at: tuple[int, int], marker: Path, forever: bool) -> None:
    original_step, original_epoch = loop.train_step, loop.Trainer.train_epoch
    seen = {"trainer": None}

    def train_epoch(self, epoch):
        seen["trainer"] = self
        return original_epoch(self, epoch)

    def train_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        trainer = seen["trainer"]
        if (trainer.progress.epoch, trainer.progress.batches_done + 1) == at:
            marker.write_text(f"{os.getpid()}\n")
            while forever or not trainer.stop_flag.raised:
                time.sleep(0.01)
        return result

    loop.train_step, loop.Trainer.train_epoch = train_step, train_epoch


def write_placement(folder: Path) -> None:
    ctx = distributed.from_environment()
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{ctx.rank}.json").write_text(json.dumps({
        "rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
        "node": os.environ.get("SLURMD_NODENAME"), "gpus": gpus,
        "device_index": distributed.device_index(ctx.local_rank, len(gpus)),
        "master_addr": os.environ.get("MASTER_ADDR")}))


if __name__ == "__main__":
    env = os.environ
    install_hooks(int(env["SIGTERM_AT_STEP"]) if "SIGTERM_AT_STEP" in env else None,
                  int(env["SIGTERM_RANK"]) if "SIGTERM_RANK" in env else None,
                  Path(env["MASKS"]) if "MASKS" in env else None, float(env.get("STEP_SECONDS", "0")))
    if "FAULT_SIGNAL" in env:
        install_fault(signal.Signals[f"SIG{env['FAULT_SIGNAL']}"], int(env.get("FAULT_RANK", "0")),
                      int(env["FAULT_AT_STEP"]) if "FAULT_AT_STEP" in env else None,
                      tuple(map(int, env["FAULT_AT"].split(":"))) if "FAULT_AT" in env else None,
                      Path(env["FAULT_ONCE"]) if "FAULT_ONCE" in env else None)
    if "HOLD_AT" in env:
        install_hold(tuple(map(int, env["HOLD_AT"].split(":"))), Path(env["HOLD_FILE"]),
                     env.get("HOLD_UNTIL", "signal") == "forever")
    if "PEER_STALE_S" in env:
        from train import peer_watch
        peer_watch.MAX_STALE_S = float(env["PEER_STALE_S"])
    if "RANKS" in env:
        write_placement(Path(env["RANKS"]))
    sys.exit(main(sys.argv[1:]))
