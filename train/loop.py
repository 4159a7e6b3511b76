"""The training loop: epochs of steps, validation, early stopping, checkpoints, resume.

Read top to bottom: `fit` builds an Executor (processes, device, precision,
model: train/executor.py) and a Trainer (optimizer, loaders, progress), then
per epoch `train_epoch` and validation, then the bookkeeping (metrics.jsonl,
the best weights, checkpoints, early stopping). Files are written by rank 0
only; every number that goes into them is summed over the ranks first.

The host never waits for the GPU inside an epoch but at the check every
`training.check_every` steps (and at the epoch's end): losses and accuracy
are summed on the device, batches are timed by TimedBatches (train/timing.py)
and the optimizer step does not synchronise (fused kernels on a GPU), so the
CPU queues the next step while the GPU runs this one.

Checkpoints follow a time budget (`training.checkpoint_every_s`), not every
epoch: last.pt is written at the first epoch end at least that long after
the previous one, and always on a signal, at early stopping and at the end.
The best weights are kept in memory and written as best.pt with the next
checkpoint. A crash (not a signal: that writes a checkpoint) therefore loses
at most the budget plus one epoch; best.pt and last.pt always come from the
same moment, except after a crash between their two renames, when best.pt
can be one improvement ahead (the resumed run then keeps it).
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from planktonio.errors import PlanktonioError

from . import checkpoint, distributed, run_record
from .config import Config, dump
from .executor import Executor
from .metrics import EpochStats, RunningSums
from .model import set_train_mode
from .signals import EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_OK, StopFlag
from .step import make_optimizer, make_scaler, train_step
from .timing import TimedBatches

clock = time.monotonic  # the checkpoint budget's clock (tests replace it)

# Keys a resumed run may change: they continue a run (more epochs, more
# patience) or change how it reports, never what it computes.
RESUMABLE_CHANGES = {"training.epochs", "training.patience", "training.progress", "training.check_every",
                     "training.checkpoint_every_s"}


class NonFiniteLoss(Exception):
    pass


class Trainer:
    def __init__(self, executor: Executor, out: Path):
        self.ex, self.config, self.out = executor, executor.config, out
        o = self.config.optimizer
        self.net = executor.training_net()
        self.optimizer = make_optimizer(o.name, executor.model, executor.device, o.lr, o.momentum, o.weight_decay)
        self.scaler = make_scaler(executor.precision, executor.device)
        self.train_loader = executor.loader_for("train", self.config.loader.batch_size, True)
        self.valid_loader = executor.eval_loader("valid")

        # Progress and early stopping, restored by resume().
        self.epoch, self.batches_done, self.partial = 0, 0, EpochStats()
        self.best_loss, self.best_epoch, self.bad_epochs = math.inf, -1, 0
        self.best: dict | None = None  # best.pt's content, kept in memory ...
        self.best_written = True       # ... and whether the file holds it yet
        self.checkpointed_at = clock()
        self.stop_flag = StopFlag()
        self.mean_loss = math.nan      # the running training loss, as of the last check

    # ------------------------------------------------------------ an epoch

    def lr_at(self, epoch: int) -> float:
        o = self.config.optimizer
        if o.schedule == "cosine":
            return o.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.config.training.epochs))
        return o.lr

    def train_epoch(self, epoch: int) -> EpochStats | None:
        """One epoch (or what is left of it after a resume); None if a signal stopped it."""
        ex = self.ex
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)
        set_train_mode(ex.model)
        self.train_loader.set_epoch(epoch, skip_batches=self.batches_done)
        steps, every = len(self.train_loader), self.config.training.check_every
        # A bar on an interactive terminal only: in batch logs (Slurm) the epoch lines suffice.
        show = ex.ctx.is_main and self.config.training.progress and sys.stderr.isatty()
        bar = tqdm(total=steps, initial=self.batches_done, desc=f"epoch {epoch}", disable=not show, leave=False)
        started = time.perf_counter()
        sums, batches = RunningSums(ex.device), TimedBatches(self.train_loader, ex.device)
        checked, stopped = self.batches_done, False
        for images, labels in batches:
            loss, logits = train_step(self.net, self.optimizer, self.scaler, images, labels, ex.device, ex.amp_dtype)
            sums.add(loss, logits, labels)
            self.batches_done += 1
            bar.update(1)
            if self.batches_done % every == 0:
                stop = self._check(sums, epoch, checked)
                checked = self.batches_done
                bar.set_postfix(loss=f"{self.mean_loss:.3f}", refresh=False)
                if stop and self.batches_done < steps:
                    stopped = True
                    break
        if checked != self.batches_done:  # the epoch's end: nothing unchecked goes further
            self._check(sums, epoch, checked)
        # (a signal seen at the epoch's end: the epoch completes, fit() stops at the boundary)
        bar.close()
        compute = batches.step_seconds()
        stats = sums.read()
        stats.data_seconds = batches.data_seconds
        stats.seconds = time.perf_counter() - started
        stats.compute_seconds = stats.seconds - stats.data_seconds if compute is None else compute
        stats = self.partial + stats
        if stopped:
            self.partial = stats
            return None
        self.batches_done, self.partial = 0, EpochStats()
        return stats

    def _check(self, sums: RunningSums, epoch: int, checked: int) -> bool:
        """The every-N-steps check: the one place an epoch waits for the GPU (one sync, one
        all-reduce under DDP, so that every rank takes the same decision).

        Raises NonFiniteLoss if a loss since the last check was NaN/inf on any
        rank (a NaN or inf makes the sum of losses NaN or inf); returns whether
        a signal asks to stop.
        """
        raised = torch.full((), float(self.stop_flag.raised), dtype=torch.float64, device=self.ex.device)
        loss_sum, stop = distributed.all_sum_(torch.stack([sums.loss_sum, raised])).tolist()
        if not math.isfinite(loss_sum):
            raise NonFiniteLoss(f"the loss became {loss_sum} in epoch {epoch}, in one of steps "
                                f"{checked + 1}-{self.batches_done} (checked every "
                                f"{self.config.training.check_every} steps)")
        self.mean_loss = loss_sum / max(sums.images * self.ex.ctx.world_size, 1)
        return stop > 0

    # ------------------------------------------------------------ best weights, checkpoints

    def remember_best(self, epoch: int, val_loss: float) -> None:
        """Keep the weights of the best validation loss in memory (best.pt follows with the next
        checkpoint). Frozen parameters never change, so they are shared, not copied."""
        frozen = {name for name, p in self.ex.model.named_parameters() if not p.requires_grad}
        weights = {k: v if k in frozen else v.detach().clone() for k, v in self.ex.model.state_dict().items()}
        self.best = {"model": weights, "classes": list(self.ex.dataset.classes), "epoch": epoch,
                     "val_loss": val_loss, "config": self.config.to_dict()}
        self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
        self.best_written = False

    def checkpoint_due(self) -> bool:
        return clock() - self.checkpointed_at >= self.config.training.checkpoint_every_s

    def state(self, finished: str | None = None) -> dict:
        """Everything a resumed run needs; the random state of every rank (collective: all ranks call it)."""
        return {
            "model": self.ex.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "early_stopping": {"best_loss": self.best_loss, "best_epoch": self.best_epoch,
                               "bad_epochs": self.bad_epochs},
            # One entry per rank: each draws its own random numbers and has its own share of the epoch so far.
            "ranks": distributed.gather_to_main({"rng": checkpoint.rng_state(self.ex.device),
                                                 "partial": asdict(self.partial)}),
            "config": self.config.to_dict(),
            "classes": list(self.ex.dataset.classes),
            "world_size": self.ex.ctx.world_size,
            "finished": finished,
        }

    def save_checkpoint(self, finished: str | None = None) -> None:
        """best.pt if it changed, then last.pt, each written atomically. Every rank calls it."""
        state = self.state(finished)
        if self.ex.ctx.is_main:
            if not self.best_written:
                checkpoint.save_atomic(self.best, self.out / "best.pt")
            checkpoint.save_atomic(state, self.out / "last.pt")
        distributed.barrier()  # no rank leaves (and maybe exits) before the files are there
        self.best_written = True
        self.checkpointed_at = clock()

    def resume(self, state: dict) -> None:
        ctx = self.ex.ctx
        if state["world_size"] != ctx.world_size:
            raise PlanktonioError(f"--resume: {self.out} was trained by {state['world_size']} process(es), this "
                                  f"run has {ctx.world_size}; each rank's shard and random state continue only "
                                  f"with {state['world_size']}")
        self.ex.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        es = state["early_stopping"]
        self.best_loss, self.best_epoch, self.bad_epochs = es["best_loss"], es["best_epoch"], es["bad_epochs"]
        # (checkpoints written before per-rank state held rank 0's only)
        ranks = state.get("ranks") or [{"rng": state["rng"], "partial": state["partial"]}]
        mine = ranks[ctx.rank] if ctx.rank < len(ranks) else ranks[0]
        self.partial = EpochStats.from_dict(mine["partial"])
        checkpoint.restore_rng(mine["rng"], self.ex.device)
        best = self.out / "best.pt"
        if best.exists():
            self.best = checkpoint.load(best)
            # A crash between writing best.pt and last.pt leaves best.pt one improvement ahead: keep it.
            if self.best["val_loss"] < self.best_loss:
                self.best_loss, self.best_epoch = self.best["val_loss"], self.best["epoch"]


# ---------------------------------------------------------------- the program


def _log(ctx, message: str) -> None:
    if ctx.is_main:
        print(message, flush=True)


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(prefix + key)
    return keys


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Keep the lines of epochs before `epoch`: a resumed run writes the rest again.

    A last line cut short by a crash belongs to an epoch that last.pt does
    not cover, so it goes too; a bad line before it is an error.
    """
    if not path.exists():
        return
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            line_epoch = record["epoch"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                break
            raise PlanktonioError(f"{path}:{number}: not a metrics record ({line[:60]!r}); remove the line "
                                  f"and resume again") from None
        if line_epoch < epoch:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _load_resume_state(config: Config, out: Path, resume: bool) -> dict | None:
    """last.pt to continue from, or None for a fresh run; refuses to overwrite or to mix configs."""
    last = out / "last.pt"
    if not last.exists():
        return None
    if not resume:
        raise PlanktonioError(f"{out} already holds a run (last.pt); pass --resume to continue it, "
                              f"or choose another --out")
    state = checkpoint.load(last)
    differing = [key for key in _differing_keys(state["config"], config.to_dict()) if key not in RESUMABLE_CHANGES]
    if config.optimizer.schedule == "cosine" and state["config"]["training"]["epochs"] != config.training.epochs:
        raise PlanktonioError("--resume: training.epochs sets the length of the cosine learning-rate schedule, "
                              "so changing it would change every later epoch's learning rate; start a new run "
                              f"from this one's weights instead (--set model.weights={out / 'best.pt'})")
    if differing:
        raise PlanktonioError(f"--resume: the config differs from the run's in {', '.join(differing)}; "
                              f"resume with the run's config ({out / 'config.yaml'}; only "
                              f"{', '.join(sorted(RESUMABLE_CHANGES))} may change)")
    return state


def _has_work_left(state: dict, config: Config) -> bool:
    """A run continues while it has epochs left and patience left (both may have been raised)."""
    t = config.training
    return state["epoch"] < t.epochs and state["early_stopping"]["bad_epochs"] < t.patience


def fit(config: Config, data: Path, out: Path, resume: bool = False) -> int:
    """Train; returns the exit code (signals.EXIT_*)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PlanktonioError(f"--out {out}: is a file, not a folder; choose another --out")
    state = _load_resume_state(config, out, resume)
    if state is not None:
        run_record.check_same_data(out, data, "--resume")
    if state is not None and not _has_work_left(state, config) and (out / "summary.json").exists():
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"{out}: the run already finished ({state['finished'] or 'no epochs left'}) at epoch "
                  f"{state['epoch']}; nothing to resume (raise training.epochs or training.patience to continue)")
        return EXIT_OK
    try:
        return _fit(config, data, out, state)
    finally:
        # The process group goes last: DistributedDataParallel holds it, and freeing DDP
        # after destroy_process_group can hang gloo (seen 1 run in 5 here).
        gc.collect()
        distributed.shutdown()


def _fit(config: Config, data: Path, out: Path, state: dict | None) -> int:
    executor = Executor(config, data)
    trainer = Trainer(executor, out)
    ctx, device = executor.ctx, executor.device
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump(config))
        run_record.write(out, data)
    if state is not None:
        trainer.resume(state)
        continuing = f" (it had finished: {state['finished']})" if state["finished"] else ""
        _log(ctx, f"resuming {out} at epoch {trainer.epoch}, batch {trainer.batches_done}{continuing}")
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        _truncate_metrics(metrics_path, trainer.epoch)
    _log(ctx, f"{config.model.name} ({config.model.freeze} frozen), {executor.precision}, "
              f"{trainer.train_loader.backend} loader, {ctx.world_size} process(es) on {device}, "
              f"{len(trainer.train_loader)} steps of {config.loader.batch_size} per epoch")

    trainer.stop_flag.install()
    trainer.checkpointed_at = clock()
    try:
        # A run with no work left gets here only when it stopped before writing summary.json
        # (killed while testing the best weights): it finishes now.
        stop_reason = None if state is None or _has_work_left(state, config) else (state["finished"] or "max_epochs")
        while stop_reason is None:
            epoch = trainer.epoch
            try:
                train = trainer.train_epoch(epoch)
            except NonFiniteLoss as error:
                _log(ctx, f"stopping: {error}; {out / 'last.pt'} keeps the last good checkpoint")
                if ctx.is_main and not trainer.best_written:  # the summary names the best epoch: its file too
                    checkpoint.save_atomic(trainer.best, out / "best.pt")
                if ctx.is_main:
                    _write_summary(out, metrics_path, "non_finite_loss", trainer, test=None)
                return EXIT_NON_FINITE
            if train is None:
                trainer.save_checkpoint()
                _log(ctx, f"stopping on {trainer.stop_flag.signal_name or 'a signal'} at epoch {epoch}, step "
                          f"{trainer.batches_done}: {out / 'last.pt'} written; continue with --resume")
                return EXIT_INTERRUPTED
            validation_started = time.perf_counter()
            train = train.reduced(device)
            valid = executor.evaluate(trainer.valid_loader)
            train_seconds = train.seconds / ctx.world_size  # wall time, the mean over ranks
            record = {
                "epoch": epoch,
                **train.summary("train"),
                **valid.summary("val"),
                "lr": trainer.lr_at(epoch),
                # over the whole epoch, the part before a resume included
                "images_per_s": train.images / max(train_seconds, 1e-9),
                "data_wait_fraction": train.data_seconds / max(train.seconds, 1e-9),
                "epoch_seconds": train_seconds + time.perf_counter() - validation_started,
            }
            if device.type == "cuda":  # the share of the wall time the GPU spent inside steps
                record["gpu_busy_fraction"] = train.compute_seconds / max(train.seconds, 1e-9)
            # The metrics line first: a resume drops the lines of epochs that last.pt does not cover.
            if ctx.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if record["val_loss"] < trainer.best_loss:
                trainer.remember_best(epoch, record["val_loss"])
            else:
                trainer.bad_epochs += 1
            trainer.epoch = epoch + 1
            if trainer.bad_epochs >= config.training.patience:
                stop_reason = "early_stopping"
            elif trainer.epoch >= config.training.epochs:
                stop_reason = "max_epochs"
            # Every rank must take the same decisions (a checkpoint is collective).
            stop, due = (v > 0 for v in distributed.all_sum(
                [float(trainer.stop_flag.raised), float(trainer.checkpoint_due())], device))
            if stop_reason or stop or due:
                trainer.save_checkpoint(finished=stop_reason)
            _log(ctx, f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} | "
                      f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f} "
                      f"top5 {record['val_top5']:.3f} | {record['images_per_s']:.0f} img/s, "
                      f"data wait {100 * record['data_wait_fraction']:.0f}%")
            if stop_reason is None and stop:
                _log(ctx, f"stopping on {trainer.stop_flag.signal_name or 'a signal'} after epoch {epoch}: "
                          f"{out / 'last.pt'} written; continue with --resume")
                return EXIT_INTERRUPTED
        _finish(trainer, metrics_path, stop_reason)
        return EXIT_OK
    finally:
        trainer.stop_flag.uninstall()
        trainer.train_loader.close()  # worker processes and pipelines end now, not at exit
        trainer.valid_loader.close()


def _finish(trainer: Trainer, metrics_path: Path, stop_reason: str) -> None:
    """Test the best weights (when there is a test split) and write summary.json."""
    ex, test = trainer.ex, None
    if (ex.dataset.path / "test.txt").exists() and ex.dataset.entries("test"):
        if trainer.best is not None:
            ex.model.load_state_dict(trainer.best["model"])
        loader = ex.eval_loader("test")
        try:
            stats = ex.evaluate(loader)
        finally:
            loader.close()
        test = {k.removeprefix("test_"): v for k, v in stats.summary("test").items()}
    if ex.ctx.is_main:
        _write_summary(trainer.out, metrics_path, stop_reason, trainer, test)


def _write_summary(out: Path, metrics_path: Path, stop_reason: str, trainer: Trainer, test) -> None:
    ex = trainer.ex
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    best = next((r for r in records if r["epoch"] == trainer.best_epoch), None)
    summary = {
        "stop_reason": stop_reason,
        "epochs_run": len(records),
        "best_epoch": trainer.best_epoch,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_acc": best["val_acc"] if best else None,
        "best_val_top5": best["val_top5"] if best else None,
        "test_of_best": test,
        "train_seconds": sum(r["epoch_seconds"] for r in records),
        "mean_images_per_s": (sum(r["images_per_s"] for r in records) / len(records)) if records else None,
        "mean_data_wait_fraction": (sum(r["data_wait_fraction"] for r in records) / len(records)) if records else None,
        "precision": ex.precision,
        "loader": trainer.train_loader.backend,
        "world_size": ex.ctx.world_size,
        "device": str(ex.device) if ex.device.type == "cpu" else torch.cuda.get_device_name(ex.device),
    }
    if ex.device.type == "cuda":  # this process's own: a run's memory, not what earlier ones left
        free, total = torch.cuda.mem_get_info(ex.device)
        summary["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(ex.device) / 2**20  # torch's allocator
        summary["device_memory_mb"] = (total - free) / 2**20  # the whole GPU: DALI's pools, the context
        summary["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")
