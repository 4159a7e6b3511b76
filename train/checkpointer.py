"""best.pt, last.pt and resume: what a run's checkpoints hold, when they are written, how a run continues.

Like torchtitan's CheckpointManager, one object owns it all for the fit loop:
- when: last.pt at the first epoch end at least `training.checkpoint_every_s`
  after the previous checkpoint (CheckpointPolicy), and always on
  a signal, at early stopping and at the end: the loop asks with `due()` and
  `save()` (what a crash can lose: CheckpointPolicy);
- the best weights are kept in memory (`remember_best`) and written as best.pt
  with the next checkpoint, so best.pt and last.pt come from the same moment,
  except after a crash between their two renames, when best.pt can be one
  improvement ahead (the resumed run then keeps it);
- what last.pt holds: the state of each of its parts (the model, the
  optimizer, the loss scaler, early stopping, where the run stands:
  `Progress`), each `Stateful` (state_dict / load_state_dict), the config
  and classes, and every rank's random state and share of the epoch so far;
  the file itself: checkpoint_file.py;
- never a NaN or an infinity (`check_finite` before every write);
- resume: `load_for_resume` reads last.pt and refuses a config that would
  compute something else (the settings a resumed run may change are marked
  `resumable` where train/config.py declares them); `restore` puts
  everything back.
Files are written by rank 0; every rank calls `save` (it gathers the ranks'
random states) and leaves it only once the files are there. docs/training.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from planktonio.errors import PlanktonioError
from planktonio.files import write_atomic

from . import checkpoint_file, distributed, random_state
from .config import Config, resumable_keys
from .early_stopping import EarlyStopping
from .metrics import EpochStats

clock = time.monotonic  # the checkpoint budget's clock (tests replace it)


class Stateful(Protocol):
    """A part of a run's checkpoint: torch's modules, optimizers and scalers are, and so are the run's own."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """Where a run stands: epochs completed, batches done in the current one, and what those measured."""

    epoch: int = 0
    batches_done: int = 0
    partial: EpochStats = field(default_factory=EpochStats)  # this rank's: saved with its random state

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]


class CheckpointPolicy:
    """last.pt at the first epoch end at least `every_s` seconds after the previous checkpoint.

    (And always on a signal, at early stopping and at the end: the loop asks
    for those itself.) A crash therefore loses at most every_s plus one epoch.
    """

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.written_at = clock()

    def due(self) -> bool:
        return clock() - self.written_at >= self.every_s

    def written(self) -> None:
        self.written_at = clock()


class NonFinite(Exception):
    """The loss or the model's values stopped being finite; the message says where."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # summary.json's stop_reason: non_finite_loss or non_finite_weights


def first_non_finite(named_tensors) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None (one device sync)."""
    named = [(name, t) for name, t in named_tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return next((name for (name, _), ok in zip(named, finite) if not ok), None)


def optimizer_tensors(optimizer: torch.optim.Optimizer):
    """(name, tensor) of an optimizer's state: momentum buffers, Adam's moments."""
    for index, per_parameter in enumerate(optimizer.state.values()):
        for key, value in per_parameter.items():
            yield f"optimizer state {key} of parameter {index}", value


def check_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, when: str) -> None:
    """Raise NonFinite, on every rank alike, if a weight, buffer or optimizer state holds a NaN or an infinity."""
    named = [*model.state_dict().items(), *optimizer_tensors(optimizer)]
    culprit = first_non_finite(named)
    if distributed.all_sum([float(culprit is not None)], device)[0] > 0:
        raise NonFinite("non_finite_weights", f"{culprit or 'a value on another rank'} holds a NaN or an infinity "
                                              f"{when} (the training diverged: lower optimizer.lr)")


# ------------------------------------------------------------------ resume: which last.pt, if any


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(prefix + key)
    return keys


def load_for_resume(config: Config, out: Path, resume: bool) -> dict | None:
    """last.pt to continue from, or None for a fresh run; refuses to overwrite or to mix configs."""
    last = out / "last.pt"
    if not last.exists():
        return None
    if not resume:
        raise PlanktonioError(f"{out} already holds a run (last.pt); pass --resume to continue it, "
                              f"or choose another --out")
    state = checkpoint_file.load(last)
    resumable = resumable_keys()
    differing = [key for key in _differing_keys(state["config"], config.to_dict()) if key not in resumable]
    if differing:
        raise PlanktonioError(f"--resume: the config differs from the run's in {', '.join(differing)}; "
                              f"resume with the run's config ({out / 'config.yaml'}; only "
                              f"{', '.join(sorted(resumable))} may change)")
    return state


def has_work_left(state: dict, config: Config) -> bool:
    """A run continues while it has epochs left and patience left (both may have been raised)."""
    t = config.training
    return state["epoch"] < t.epochs and state["early_stopping"]["bad_epochs"] < t.patience


# ------------------------------------------------------------------ the checkpointer


class Checkpointer:
    """Writes best.pt and last.pt of a run and restores a run from them (see the module's docstring)."""

    def __init__(self, out: Path, executor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 progress: Progress, early: EarlyStopping):
        self.out, self.ex = out, executor
        self.optimizer, self.progress, self.early = optimizer, progress, early
        # The parts of last.pt, each under its key (the keys of every last.pt written so far).
        self.parts: dict[str, Stateful] = {"model": executor.model, "optimizer": optimizer, "scaler": scaler,
                                           "early_stopping": early}
        # a speed run writes no checkpoint while it runs (its time would count as training), only best.pt at
        # its end, for evaluate and predict
        self.speed_run = executor.config.training.speed_run
        self.policy = CheckpointPolicy(executor.config.training.checkpoint_every_s)
        self.best: dict | None = None  # best.pt's content, kept in memory ...
        self.best_written = True       # ... and whether the file holds it yet

    def due(self) -> bool:
        return self.policy.due()

    def remember_best(self, epoch: int, val_loss: float) -> None:
        """Keep the weights of the best validation loss in memory (best.pt follows with the next
        checkpoint). Frozen parameters never change, so they are shared, not copied."""
        model = self.ex.model
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        weights = {k: v if k in frozen else v.detach().clone() for k, v in model.state_dict().items()}
        self.best = {"model": weights, "classes": list(self.ex.dataset.classes), "epoch": epoch,
                     "val_loss": val_loss, "config": self.ex.config.to_dict()}
        self.best_written = False

    def state(self, finished: str | None = None) -> dict:
        """Everything a resumed run needs; the random state of every rank (collective: all ranks call it)."""
        ex = self.ex
        return {
            **{name: part.state_dict() for name, part in self.parts.items()},
            **self.progress.state_dict(),  # epoch, batches_done: top-level keys
            # One entry per rank: each draws its own random numbers and has its own share of the epoch so far.
            "ranks": distributed.gather_to_main({"rng": random_state.rng_state(ex.device),
                                                 "partial": asdict(self.progress.partial)}),
            "config": ex.config.to_dict(),
            "classes": list(ex.dataset.classes),
            "world_size": ex.ctx.world_size,
            "finished": finished,
        }

    def save(self, finished: str | None = None) -> None:
        """best.pt if it changed, then last.pt, each written atomically; never a non-finite one. Every rank
        calls it."""
        if self.speed_run:
            if finished is not None:
                self.write_best()
            return
        progress = self.progress
        check_finite(self.ex.model, self.optimizer, self.ex.device,
                     f"at epoch {progress.epoch}, step {progress.batches_done}, before writing last.pt")
        state = self.state(finished)
        if self.ex.ctx.is_main:
            self.write_best()
            checkpoint_file.save_atomic(state, self.out / "last.pt")
            # Where last.pt stands, for job scripts that read it without torch (slurm/common.sh).
            write_atomic(self.out / "last.json", json.dumps({"epoch": progress.epoch, "step": progress.batches_done,
                                                             "finished": finished}) + "\n")
        distributed.barrier()  # no rank leaves (and maybe exits) before the files are there
        self.best_written = True
        self.policy.written()

    def write_best(self) -> None:
        """best.pt, if the best weights changed since it was written (rank 0)."""
        if self.ex.ctx.is_main and not self.best_written and self.best is not None:
            checkpoint_file.save_atomic(self.best, self.out / "best.pt")

    def restore(self, state: dict) -> None:
        """Continue from last.pt's `state`: weights, optimizer, scaler, progress, early stopping, this rank's
        random state, and the best weights of best.pt."""
        ctx = self.ex.ctx
        if state["world_size"] != ctx.world_size:
            raise PlanktonioError(f"--resume: {self.out} was trained by {state['world_size']} process(es), this "
                                  f"run has {ctx.world_size}; each rank's shard and random state continue only "
                                  f"with {state['world_size']}")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        self.progress.load_state_dict(state)
        mine = state["ranks"][ctx.rank]
        self.progress.partial = EpochStats.from_dict(mine["partial"])
        random_state.restore_rng(mine["rng"], self.ex.device)
        best = self.out / "best.pt"
        if best.exists():
            self.best = checkpoint_file.load(best)
            # A crash between writing best.pt and last.pt leaves best.pt one improvement ahead: keep it.
            if self.best["val_loss"] < self.early.best_loss:
                self.early.best_loss, self.early.best_epoch = self.best["val_loss"], self.best["epoch"]

    def last_good(self) -> str:
        """Which checkpoint holds the last good state, for a run stopped by a non-finite value."""
        last, best = self.out / "last.pt", self.out / "best.pt"
        if last.exists():
            return f"{last} keeps the last good checkpoint (epoch {checkpoint_file.load(last)['epoch']})"
        if best.exists():
            return f"no last.pt was written; {best} holds the best good weights"
        return "no checkpoint was written: nothing good to keep; lower the learning rate and start again"
