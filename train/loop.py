"""The training loop: `fit` tells the story of a run; `Trainer` runs its epochs.

A run: build what it is made of (train/executor.py: processes, device,
precision, model), take the run folder for this process alone
(run_folder.py), continue from last.pt if asked, then epoch after epoch:
train, validate, record (writers.py: metrics.jsonl, learning curves,
TensorBoard), remember the best weights, decide on early stopping
(early_stopping.py) and on a checkpoint (checkpoint.py's policy), until
the epochs or the patience run out, a signal asks to stop (signals.py) or a
value stops being finite. At the end the best weights are tested and
summary.json written (summary.py). Files are written by rank 0 only; every
number that goes into them is summed over the ranks first.

The host never waits for the GPU inside an epoch but at the check every
`training.check_every` steps (and at the epoch's end): losses and accuracy
are summed on the device, batches are timed by TimedBatches (train/timing.py)
and the optimizer step does not synchronise (fused kernels on a GPU), so the
CPU queues the next step while the GPU runs this one.

Checkpoints follow a time budget (`training.checkpoint_every_s`): last.pt at
the first epoch end at least that long after the previous one, and always on
a signal, at early stopping and at the end. The best weights are kept in
memory and written as best.pt with the next checkpoint. A crash (not a
signal: that writes a checkpoint) therefore loses at most the budget plus one
epoch; best.pt and last.pt always come from the same moment, except after a
crash between their two renames, when best.pt can be one improvement ahead
(the resumed run then keeps it). No checkpoint ever holds a NaN or an
infinity: the weights are checked at every epoch's end and before each write.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from planktonio.errors import PlanktonioError
from planktonio.files import write_atomic
from planktonio.loaders import resolve_backend

from . import checkpoint, distributed, run_record
from .checkpoint import CheckpointPolicy
from .config import Config, dump
from .early_stopping import EarlyStopping
from .executor import Executor
from .feature_cache import FeatureCache
from .metrics import EpochStats, RunningSums
from .model import set_train_mode
from .profiler import StepProfiler
from .run_folder import RunLock, make_run_folder
from .signals import EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_OK, EXIT_PEER_LOST, StopFlag
from .step import make_optimizer, make_scaler, train_step
from .summary import write_summary
from .timing import TimedBatches
from .writers import MetricsLog, MetricsWriters

# Keys a resumed run may change: they continue a run (more epochs, more
# patience) or change how it reports, never what it computes.
RESUMABLE_CHANGES = {"training.epochs", "training.patience", "training.progress", "training.check_every",
                     "training.checkpoint_every_s", "training.tensorboard", "training.collective_timeout_s",
                     "training.feature_cache", "training.feature_cache_budget_mb", "training.feature_cache_dir"}


class NonFinite(Exception):
    """The loss or the model's values stopped being finite; the message says where."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # summary.json's stop_reason: non_finite_loss or non_finite_weights


def say(ctx, message: str, error: bool = False) -> None:
    """A line of the run's log, from rank 0 (or from every rank for errors). A terminal that went away
    (SIGHUP) must not turn a clean stop into a crash."""
    if ctx.is_main or error:
        try:
            print(message, file=sys.stderr if error else sys.stdout, flush=True)
        except OSError:
            pass


class Trainer:
    """The optimizer loop over the training loader, and everything a checkpoint must hold to continue exactly."""

    def __init__(self, executor: Executor, out: Path):
        self.ex, self.config, self.out = executor, executor.config, out
        o, t, loader = self.config.optimizer, self.config.training, self.config.loader
        self.optimizer = make_optimizer(o.name, executor.model, executor.device, o.lr, o.momentum, o.weight_decay)
        self.scaler = make_scaler(executor.precision, executor.device)
        self.loader_name = resolve_backend(loader.backend, executor.device)
        # What every epoch would compute identically is computed once where it can be (feature_cache.py);
        # the steps then run the rest of the model on the kept activations.
        self.features = FeatureCache(executor, out, log=lambda line: say(executor.ctx, line))
        if self.features.decide():
            self.features.prepare()
            self.eval_net = self.features.cut.rest
            self.net = executor.training_net(self.eval_net)
            self.train_loader = self.features.batches("train", loader.batch_size, True)
        else:
            if t.feature_cache == "auto":
                say(executor.ctx, f"feature cache off: {self.features.reason}")
            self.eval_net = None  # the whole model
            self.net = executor.training_net()
            self.train_loader = executor.loader_for("train", loader.batch_size, True)
        self.valid_loader = self.eval_loader("valid")

        # Progress, early stopping and the best weights: restored by resume().
        self.epoch, self.batches_done, self.partial = 0, 0, EpochStats()
        self.early = EarlyStopping(t.patience)
        self.best: dict | None = None  # best.pt's content, kept in memory ...
        self.best_written = True       # ... and whether the file holds it yet
        self.policy = CheckpointPolicy(t.checkpoint_every_s)
        self.stop_flag = StopFlag()
        self.profiler: StepProfiler | None = None
        self.mean_loss = math.nan      # the running training loss, as of the last check
        self.phase = "start-up"        # what the ranks were doing together, for a lost peer's message

    def eval_loader(self, split: str):
        """A split's evaluation batches: of the kept activations when the feature cache is used, else of images."""
        if self.features.report["used"]:
            loader = self.config.loader
            return self.features.batches(split, loader.eval_batch_size or loader.batch_size, False)
        return self.ex.eval_loader(split)

    # ------------------------------------------------------------ an epoch

    def lr_at(self, epoch: int) -> float:
        o = self.config.optimizer
        if o.schedule == "cosine":
            return o.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.config.training.epochs))
        return o.lr

    def train_epoch(self, epoch: int) -> EpochStats | None:
        """One epoch (or what is left of it after a resume); None if a signal or a finished trace stopped it."""
        ex = self.ex
        if self._trace_done():
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)
        set_train_mode(ex.model, self.config.model.frozen_mode)
        self.train_loader.set_epoch(epoch, skip_batches=self.batches_done)
        steps, every = len(self.train_loader), self.config.training.check_every
        # A bar on an interactive terminal only: in batch logs (Slurm) the epoch lines suffice.
        show = ex.ctx.is_main and self.config.training.progress and sys.stderr.isatty()
        bar = tqdm(total=steps, initial=self.batches_done, desc=f"epoch {epoch}", disable=not show, leave=False)
        started = time.perf_counter()
        sums, batches = RunningSums(ex.device), TimedBatches(self.train_loader, ex.device)
        checked, stopped = self.batches_done, False
        for images, labels in batches:
            self.phase = "a training step (the gradients' all-reduce)"
            loss, logits = train_step(self.net, self.optimizer, self.scaler, images, labels, ex.device, ex.amp_dtype)
            sums.add(loss, logits, labels)
            self.batches_done += 1
            bar.update(1)
            if self.profiler is not None:
                self.profiler.step()
            if self.batches_done % every == 0 or (self.profiler is not None and self.profiler.done):
                stop = self._check(sums, epoch, checked)
                checked = self.batches_done
                bar.set_postfix(loss=f"{self.mean_loss:.3f}", refresh=False)
                if (stop or self._trace_done()) and self.batches_done < steps:
                    stopped = True
                    break
        if checked != self.batches_done:  # the epoch's end: nothing unchecked goes further
            self._check(sums, epoch, checked)
        # (a signal seen at the epoch's end: the epoch completes, fit() stops at the boundary)
        bar.close()
        timing = batches.finish()
        stats = sums.read()
        stats.data_seconds = timing.data_seconds
        stats.seconds = time.perf_counter() - started
        stats.compute_seconds = stats.seconds - stats.data_seconds if timing.step_seconds is None else \
            timing.step_seconds
        stats = self.partial + stats
        if stopped:
            self.partial = stats
            return None
        self.batches_done, self.partial = 0, EpochStats()
        return stats

    def _trace_done(self) -> bool:
        """A trace run (profile.stop_after) ends once its trace is written."""
        return self.profiler is not None and self.profiler.done and self.config.profile.stop_after

    def _check(self, sums: RunningSums, epoch: int, checked: int) -> bool:
        """The every-N-steps check: the one place an epoch waits for the GPU (one sync, one
        all-reduce under DDP, so that every rank takes the same decision).

        Raises NonFinite if a loss since the last check was NaN/inf on any rank
        (a NaN or inf makes the sum of losses NaN or inf); returns whether a
        signal asks to stop.
        """
        self.phase = f"the every-{self.config.training.check_every}-steps check (all_reduce)"
        raised = torch.full((), float(self.stop_flag.raised), dtype=torch.float64, device=self.ex.device)
        loss_sum, stop = distributed.all_sum_(torch.stack([sums.loss_sum, raised])).tolist()
        if not math.isfinite(loss_sum):
            raise NonFinite("non_finite_loss", f"the loss became {loss_sum} in epoch {epoch}, in one of steps "
                            f"{checked + 1}-{self.batches_done} (checked every "
                            f"{self.config.training.check_every} steps)")
        self.mean_loss = loss_sum / max(sums.images * self.ex.ctx.world_size, 1)
        return stop > 0

    def validate(self) -> EpochStats:
        self.phase = "validation (all_reduce)"
        return self.ex.evaluate(self.valid_loader, net=self.eval_net)

    def check_finite(self, when: str) -> None:
        """Raise NonFinite, on every rank alike, if a weight, buffer or optimizer state holds a NaN or an infinity."""
        named = [*self.ex.model.state_dict().items(), *checkpoint.optimizer_tensors(self.optimizer)]
        culprit = checkpoint.first_non_finite(named)
        if distributed.all_sum([float(culprit is not None)], self.ex.device)[0] > 0:
            raise NonFinite("non_finite_weights", f"{culprit or 'a value on another rank'} holds a NaN or an infinity {when} "
                            f"(the training diverged: lower optimizer.lr)")

    # ------------------------------------------------------------ best weights, checkpoints

    def remember_best(self, epoch: int, val_loss: float) -> None:
        """Keep the weights of the best validation loss in memory (best.pt follows with the next
        checkpoint). Frozen parameters never change, so they are shared, not copied."""
        frozen = {name for name, p in self.ex.model.named_parameters() if not p.requires_grad}
        weights = {k: v if k in frozen else v.detach().clone() for k, v in self.ex.model.state_dict().items()}
        self.best = {"model": weights, "classes": list(self.ex.dataset.classes), "epoch": epoch,
                     "val_loss": val_loss, "config": self.config.to_dict()}
        self.best_written = False

    def state(self, finished: str | None = None) -> dict:
        """Everything a resumed run needs; the random state of every rank (collective: all ranks call it)."""
        return {
            "model": self.ex.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "early_stopping": self.early.state(),
            # One entry per rank: each draws its own random numbers and has its own share of the epoch so far.
            "ranks": distributed.gather_to_main({"rng": checkpoint.rng_state(self.ex.device),
                                                 "partial": asdict(self.partial)}),
            "config": self.config.to_dict(),
            "classes": list(self.ex.dataset.classes),
            "world_size": self.ex.ctx.world_size,
            "finished": finished,
        }

    def save_checkpoint(self, finished: str | None = None) -> None:
        """best.pt if it changed, then last.pt, each written atomically; never a non-finite one. Every rank
        calls it. A speed run writes none (its time would count as training time)."""
        if self.config.training.speed_run:
            return
        self.check_finite(f"at epoch {self.epoch}, step {self.batches_done}, before writing last.pt")
        self.phase = "writing the checkpoint (gather)"
        state = self.state(finished)
        if self.ex.ctx.is_main:
            self.write_best()
            checkpoint.save_atomic(state, self.out / "last.pt")
            # Where last.pt stands, for job scripts that read it without torch (slurm/common.sh).
            write_atomic(self.out / "last.json", json.dumps({"epoch": self.epoch, "step": self.batches_done,
                                                             "finished": finished}) + "\n")
        distributed.barrier()  # no rank leaves (and maybe exits) before the files are there
        self.best_written = True
        self.policy.written()

    def write_best(self) -> None:
        if self.ex.ctx.is_main and not self.best_written and self.best is not None and \
                not self.config.training.speed_run:
            checkpoint.save_atomic(self.best, self.out / "best.pt")

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
        self.early.restore(state["early_stopping"])
        mine = state["ranks"][ctx.rank]
        self.partial = EpochStats.from_dict(mine["partial"])
        checkpoint.restore_rng(mine["rng"], self.ex.device)
        best = self.out / "best.pt"
        if best.exists():
            self.best = checkpoint.load(best)
            # A crash between writing best.pt and last.pt leaves best.pt one improvement ahead: keep it.
            if self.best["val_loss"] < self.early.best_loss:
                self.early.best_loss, self.early.best_epoch = self.best["val_loss"], self.best["epoch"]


# ---------------------------------------------------------------- the program


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += _differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(prefix + key)
    return keys


def _resume_state(config: Config, out: Path, resume: bool) -> dict | None:
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


def _lock(out: Path, ex: Executor) -> RunLock:
    """Rank 0 takes the run folder; every rank learns whether it could (so that all stop together)."""
    lock, refused = RunLock(out), None
    if ex.ctx.is_main:
        try:
            lock.acquire()
        except PlanktonioError as error:
            refused = error
    if distributed.all_sum([float(refused is not None)], ex.device)[0] > 0:
        raise refused or PlanktonioError(f"{out}: rank 0 could not take the run folder (its message says why)")
    return lock


def fit(config: Config, data: Path, out: Path, resume: bool = False) -> int:
    """Train; returns the exit code (signals.EXIT_*)."""
    out = Path(out)
    if distributed.is_main_process():
        make_run_folder(out)
    executor, peer_lost = None, False
    try:
        executor = Executor(config, data)
        lock = _lock(out, executor)
        try:
            state = _resume_state(config, out, resume)
            if state is not None:
                run_record.check_same_data(out, data, "--resume")
                if not _has_work_left(state, config) and (out / "summary.json").exists():
                    say(executor.ctx, f"{out}: the run already finished ({state['finished'] or 'no epochs left'}) "
                                      f"at epoch {state['epoch']}; nothing to resume (raise training.epochs or "
                                      f"training.patience to continue)")
                    return EXIT_OK
            return _run(Trainer(executor, out), data, state)
        finally:
            lock.release()
    except distributed.PeerLost as error:
        peer_lost = True
        say(executor.ctx, f"{error}; exiting with {EXIT_PEER_LOST} for the job to restart from last.pt", error=True)
        return EXIT_PEER_LOST
    finally:
        # The process group goes last: DistributedDataParallel holds it, and freeing DDP
        # after destroy_process_group can hang gloo (seen 1 run in 5 here). After a peer
        # left, the group cannot be shut down cleanly: the process ends without it.
        gc.collect()
        if not peer_lost:
            distributed.shutdown()


def _run(trainer: Trainer, data: Path, state: dict | None) -> int:
    """The epochs of a run, from the start or from `state` (last.pt), to its end or a stop."""
    ex, out, config = trainer.ex, trainer.out, trainer.config
    ctx = ex.ctx
    if ctx.is_main:
        (out / "config.yaml").write_text(dump(config))
        run_record.write(out, data)
    if state is not None:
        trainer.resume(state)
        continuing = f" (it had finished: {state['finished']})" if state["finished"] else ""
        say(ctx, f"resuming {out} at epoch {trainer.epoch}, batch {trainer.batches_done}{continuing}")
    writers = MetricsWriters(out, f"{out.name}: {config.model.name}", trainer.epoch, config.training.tensorboard) \
        if ctx.is_main else None
    say(ctx, f"{config.model.name} ({config.model.freeze} frozen), {ex.precision}, "
             f"{trainer.loader_name} loader, {ctx.world_size} process(es) on {ex.device}, "
             f"{len(trainer.train_loader)} steps of {config.loader.batch_size} per epoch")
    trainer.stop_flag.install()
    try:
        with StepProfiler(config.profile, out, ctx.rank, ex.device) as profiler:
            trainer.profiler = profiler
            return _epochs(trainer, writers, state)
    except NonFinite as error:
        return _stop_non_finite(trainer, error)
    except Exception as error:
        if distributed.is_peer_failure(error):
            raise distributed.peer_lost(ctx, error, trainer.phase,
                                        f"at epoch {trainer.epoch}, step {trainer.batches_done}") from None
        raise
    finally:
        trainer.stop_flag.uninstall()
        trainer.train_loader.close()  # worker processes and pipelines end now, not at exit
        trainer.valid_loader.close()
        if writers is not None:
            writers.close()
            if writers.curves.error is not None:
                say(ctx, f"warning: {writers.curves.path} was not drawn: {writers.curves.error}", error=True)


def _epochs(trainer: Trainer, writers: MetricsWriters | None, state: dict | None) -> int:
    ex, config = trainer.ex, trainer.config
    ctx, device = ex.ctx, ex.device
    # A run with no work left gets here only when it stopped before writing summary.json
    # (killed while testing the best weights): it finishes now.
    stop_reason = None if state is None or _has_work_left(state, config) else (state["finished"] or "max_epochs")
    while stop_reason is None:
        epoch = trainer.epoch
        train = trainer.train_epoch(epoch)
        if train is None and trainer._trace_done():
            say(ctx, f"traced {config.profile.active} steps: {', '.join(map(str, trainer.profiler.written))}")
            return EXIT_OK
        if train is None:
            trainer.save_checkpoint()
            say(ctx, f"stopping on {trainer.stop_flag.signal_name or 'a signal'} at epoch {epoch}, step "
                     f"{trainer.batches_done}: {_saved(trainer)}")
            return EXIT_INTERRUPTED
        validation_started = time.perf_counter()
        train = train.reduced(device)
        valid = trainer.validate()
        record = epoch_record(epoch, train, valid, trainer.lr_at(epoch), ctx.world_size, device,
                              time.perf_counter() - validation_started)
        trainer.check_finite(f"after epoch {epoch}")
        if writers is not None:
            writers.write(record)
        if trainer.early.update(epoch, record["val_loss"]):
            trainer.remember_best(epoch, record["val_loss"])
        trainer.epoch = epoch + 1
        if trainer.early.should_stop:
            stop_reason = "early_stopping"
        elif trainer.epoch >= config.training.epochs:
            stop_reason = "max_epochs"
        # Every rank must take the same decisions (a checkpoint is collective).
        stop, due = (v > 0 for v in distributed.all_sum(
            [float(trainer.stop_flag.raised), float(trainer.policy.due())], device))
        if stop_reason or stop or due:
            trainer.save_checkpoint(finished=stop_reason)
        say(ctx, f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} | "
                 f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f} top5 {record['val_top5']:.3f} | "
                 f"{record['images_per_s']:.0f} img/s, data wait {100 * record['data_wait_fraction']:.0f}%")
        if stop_reason is None and stop:
            say(ctx, f"stopping on {trainer.stop_flag.signal_name or 'a signal'} after epoch {epoch}: "
                     f"{_saved(trainer)}")
            return EXIT_INTERRUPTED
    _finish(trainer, stop_reason)
    return EXIT_OK


def _saved(trainer: Trainer) -> str:
    if trainer.config.training.speed_run:
        return "a speed run writes no checkpoint: nothing to resume"
    return f"{trainer.out / 'last.pt'} written; continue with --resume"


def epoch_record(epoch: int, train: EpochStats, valid: EpochStats, lr: float, world_size: int,
                 device: torch.device, validation_seconds: float) -> dict:
    """One line of metrics.jsonl: an epoch's losses and accuracy, and how fast it went."""
    train_seconds = train.seconds / world_size  # wall time, the mean over ranks
    record = {
        "epoch": epoch,
        **train.summary("train"),
        **valid.summary("val"),
        "lr": lr,
        # over the whole epoch, the part before a resume included
        "images_per_s": train.images / max(train_seconds, 1e-9),
        "data_wait_fraction": train.data_seconds / max(train.seconds, 1e-9),
        "epoch_seconds": train_seconds + validation_seconds,
    }
    if device.type == "cuda":  # the share of the wall time the GPU spent inside steps
        record["gpu_busy_fraction"] = train.compute_seconds / max(train.seconds, 1e-9)
    return record


def _stop_non_finite(trainer: Trainer, error: NonFinite) -> int:
    """Exit 3, saying which checkpoint holds the last good state; best.pt (finite by construction) is kept."""
    ex, out = trainer.ex, trainer.out
    trainer.write_best()  # the summary names the best epoch: its file too
    last = out / "last.pt"
    if last.exists():
        good = f"{last} keeps the last good checkpoint (epoch {checkpoint.load(last)['epoch']})"
    elif (out / "best.pt").exists():
        good = f"no last.pt was written; {out / 'best.pt'} holds the best good weights"
    else:
        good = "no checkpoint was written: nothing good to keep; lower the learning rate and start again"
    say(ex.ctx, f"stopping: {error}; {good}")
    if ex.ctx.is_main:
        _write_summary(trainer, error.kind, test=None)
    return EXIT_NON_FINITE


def _finish(trainer: Trainer, stop_reason: str) -> None:
    """Test the best weights (when there is a test split) and write summary.json."""
    ex, test = trainer.ex, None
    if not trainer.config.training.speed_run and (ex.dataset.path / "test.txt").exists() and \
            ex.dataset.entries("test"):
        if trainer.best is not None:
            ex.model.load_state_dict(trainer.best["model"])
        trainer.phase = "testing the best weights (all_reduce)"
        loader = trainer.eval_loader("test")
        try:
            stats = ex.evaluate(loader, net=trainer.eval_net)
        finally:
            loader.close()
        test = {k.removeprefix("test_"): v for k, v in stats.summary("test").items()}
    if ex.ctx.is_main:
        _write_summary(trainer, stop_reason, test)


def _write_summary(trainer: Trainer, stop_reason: str, test: dict | None) -> None:
    ex = trainer.ex
    write_summary(trainer.out, MetricsLog(trainer.out / "metrics.jsonl").records(), stop_reason,
                  best_epoch=trainer.early.best_epoch, test=test, precision=ex.precision,
                  loader=trainer.loader_name, world_size=ex.ctx.world_size, device=ex.device,
                  extra={"feature_cache": trainer.features.report})
