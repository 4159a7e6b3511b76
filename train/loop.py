"""The training loop: `fit` tells the story of a run; `Trainer.run` runs its epochs.

A run: join the job (train/distributed.py's Session: this rank's device, the
process group), build what it is made of (train/executor.py: precision,
data set, model), take the run folder for this process alone
(run_folder.py), read last.pt if asked to continue (checkpointer.py), build
its inputs (inputs.py: images, or a feature cache's kept activations), then
epoch after epoch: train, validate, record (writers.py: metrics.jsonl,
learning curves, TensorBoard), remember the best weights, decide on early
stopping (early_stopping.py) and on a checkpoint (the Checkpointer), until
the epochs or the patience run out, a signal asks to stop (signals.py) or a
value stops being finite. At the end the best weights are tested and
summary.json written (summary.py). Files are written by rank 0 only; every
number that goes into them is summed over the ranks first.

The host never waits for the GPU inside an epoch but at the check every
`training.check_every` steps (and at the epoch's end): losses and accuracy
are summed on the device, batches are timed by TimedBatches (train/timing.py)
and the optimizer step does not synchronise (fused kernels on a GPU), so the
CPU queues the next step while the GPU runs this one.
"""

from __future__ import annotations

import functools
import math
import sys
import time
import weakref
from pathlib import Path

import torch
from tqdm import tqdm

from planktonio.files import write_atomic
from planktonio.loaders import resolve_device

from . import calibration, distributed, run_record
from .checkpointer import Checkpointer, NonFinite, Progress, check_finite, has_work_left, load_for_resume
from .config import Config, dump
from .early_stopping import EarlyStopping
from .executor import Executor
from .inputs import Inputs, build_inputs
from .metrics import EpochStats, RunningSums
from .model import set_train_mode
from .peer_watch import claim_the_line
from .profiler import StepProfiler
from .run_folder import lock_run, make_run_folder
from .signals import EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_OK, EXIT_PEER_LOST, Interrupted, StopFlag
from .step import make_optimizer, make_scaler, train_step
from .summary import write_summary
from .timing import TimedBatches
from .writers import MetricsLog, MetricsWriters


def say(is_main: bool, message: str, error: bool = False) -> None:
    """A line of the run's log, from rank 0 (or from every rank for errors). A terminal that went away
    (SIGHUP) must not turn a clean stop into a crash."""
    if is_main or error:
        try:
            print(message, file=sys.stderr if error else sys.stdout, flush=True)
        except OSError:
            pass


# ---------------------------------------------------------------- the story of a run


def fit(config: Config, data: Path, out: Path, resume: bool = False) -> int:
    """Train; returns the exit code (signals.EXIT_*)."""
    out = Path(out)
    if distributed.is_main_process():
        make_run_folder(out)
    t = config.training
    try:
        with StopFlag() as stop_flag, distributed.Session(resolve_device(t.device), t.collective_timeout_s) as ctx, \
                Executor(config, data, ctx) as executor, lock_run(out, ctx):
            log = functools.partial(say, ctx.is_main)
            state = load_for_resume(config, out, resume)
            if state is not None:
                run_record.check_same_data(out, data, "--resume")
                if not has_work_left(state, config) and (out / "summary.json").exists():
                    log(f"{out}: the run already finished ({state['finished'] or 'no epochs left'}) at epoch "
                        f"{state['epoch']}; nothing to resume (raise training.epochs or training.patience to "
                        f"continue)")
                    return EXIT_OK
            with build_inputs(executor, out, log, stop_flag) as inputs:
                return Trainer(executor, inputs, out, stop_flag).run(data, state)
    except Interrupted as stopped:  # a signal before there was anything to checkpoint
        say(True, str(stopped))
        return EXIT_INTERRUPTED
    except distributed.PeerLost as error:
        if claim_the_line():  # (else the peer watch said it, and is ending the process)
            say(True, f"{error}; exiting with {EXIT_PEER_LOST} for the job to restart from last.pt", error=True)
        return EXIT_PEER_LOST


# ---------------------------------------------------------------- the epochs


# Under DDP, the longest a signal waits for the ranks' next check (when steps are slow; fast ones are checked
# every training.check_every steps): well within Slurm's --signal=USR1@300 margin.
CHECK_SECONDS = 5.0


class Trainer:
    """The optimizer loop of a run over its inputs: its epochs (`run`), each epoch's steps, validation, the end."""

    def __init__(self, executor: Executor, inputs: Inputs, out: Path, stop_flag: StopFlag):
        self.ex, self.inputs, self.out, self.config = executor, inputs, out, executor.config
        self.net = executor.training_net(inputs.module)  # DDP-wrapped under several ranks, compiled if asked
        self.eval_net = executor.compiled(inputs.module)
        o, t = self.config.optimizer, self.config.training
        self.optimizer = make_optimizer(o.name, executor.model, executor.device, o.lr, o.momentum, o.weight_decay)
        self.scaler = make_scaler(executor.precision, executor.device)
        self.progress = Progress()
        self.early = EarlyStopping(t.patience)
        self.checkpointer = Checkpointer(out, executor, self.optimizer, self.scaler, self.progress, self.early)
        self.stop_flag = stop_flag     # raised by a signal at any time of the run (fit installs it)
        self.check_interval = 1 if executor.ctx.distributed else t.check_every  # steps between checks (check())
        self.profiler: StepProfiler | None = None
        self.mean_loss = math.nan      # the running training loss, as of the last check
        self.phase = "start-up"        # what the ranks were doing together, for a lost peer's message
        # (weakly: the peer watch must not keep the Trainer, and with it the DDP model, past the run)
        me = weakref.ref(self)
        distributed.set_activity(lambda: me().activity() if me() is not None else "the run's end")

    def say(self, message: str, error: bool = False) -> None:
        say(self.ex.ctx.is_main, message, error)

    def activity(self) -> str:
        """What the ranks are doing together now, for a lost peer's line."""
        return f"{self.phase} at epoch {self.progress.epoch}, step {self.progress.batches_done}"

    def run(self, data: Path, state: dict | None) -> int:
        """The epochs of the run, from the start or from last.pt's `state`, to its end or a stop; returns the
        exit code."""
        ex, out, config, progress = self.ex, self.out, self.config, self.progress
        if ex.ctx.is_main:
            write_atomic(out / "config.yaml", dump(config))
            run_record.write(out, data)
        if state is not None:
            self.checkpointer.restore(state)
            continuing = f" (it had finished: {state['finished']})" if state["finished"] else ""
            self.say(f"resuming {out} at epoch {progress.epoch}, batch {progress.batches_done}{continuing}")
            planned = state["config"]["training"]["epochs"]
            if config.optimizer.schedule == "cosine" and planned != config.training.epochs:
                self.say(f"the cosine schedule is planned again over {config.training.epochs} epochs (was "
                         f"{planned}): from epoch {progress.epoch} on the learning rate is that of a "
                         f"{config.training.epochs}-epoch run, {self.lr_at(progress.epoch):.3g} now")
        writers = MetricsWriters(out, f"{out.name}: {config.model.name}", progress.epoch,
                                 config.training.tensorboard) if ex.ctx.is_main else None
        self.say(f"{config.model.name} ({config.model.freeze} frozen), {ex.precision}, {self.inputs.loader_name} "
                 f"loader, {ex.ctx.world_size} process(es) on {ex.device}, {len(self.inputs.train)} steps of "
                 f"{config.loader.batch_size} per epoch")
        try:
            with StepProfiler(config.profile, out, ex.ctx.rank, ex.device, self.say) as self.profiler:
                # A run with no work left gets here only when it stopped before writing summary.json
                # (killed while testing the best weights): it finishes now.
                stop_reason = None if state is None or has_work_left(state, config) else \
                    (state["finished"] or "max_epochs")
                while stop_reason is None:
                    epoch = progress.epoch
                    train = self.train_epoch(epoch)
                    if train is None:
                        return self.stopped_in_epoch(epoch)
                    record = self.end_epoch(epoch, train, writers)
                    stop_reason = self.stop_reason()
                    stop = self.checkpoint_if_due(stop_reason)
                    self.say(f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} | "
                             f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f} top5 "
                             f"{record['val_top5']:.3f} | {record['images_per_s']:.0f} img/s, data wait "
                             f"{100 * record['data_wait_fraction']:.0f}%")
                    if stop_reason is None and stop:
                        self.say(f"stopping on {self.stop_flag.signal_name or 'a signal'} after epoch {epoch}: "
                                 f"{self.saved()}")
                        return EXIT_INTERRUPTED
                self.finish(stop_reason)
                return EXIT_OK
        except NonFinite as error:
            return self.stop_non_finite(error)
        except Exception as error:
            if distributed.is_peer_failure(error):
                raise distributed.peer_lost(ex.ctx, error, self.phase,
                                            f"at epoch {progress.epoch}, step {progress.batches_done}") from None
            raise
        finally:
            if writers is not None:
                writers.close()
                if writers.curves.error is not None:
                    self.say(f"warning: {writers.curves.path} was not drawn: {writers.curves.error}", error=True)

    # ------------------------------------------------------------ an epoch

    def lr_at(self, epoch: int) -> float:
        o = self.config.optimizer
        if o.schedule == "cosine":
            return o.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.config.training.epochs))
        return o.lr

    def train_epoch(self, epoch: int) -> EpochStats | None:
        """One epoch (or what is left of it after a resume); None if a signal or a finished trace stopped it."""
        ex, progress, loader = self.ex, self.progress, self.inputs.train
        if self.trace_done():
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)
        set_train_mode(ex.model, self.config.model.frozen_mode)
        loader.set_epoch(epoch, skip_batches=progress.batches_done)
        steps = len(loader)
        # A bar on an interactive terminal only: in batch logs (Slurm) the epoch lines suffice.
        show = ex.ctx.is_main and self.config.training.progress and sys.stderr.isatty()
        bar = tqdm(total=steps, initial=progress.batches_done, desc=f"epoch {epoch}", disable=not show, leave=False)
        started = self.checked_at = time.perf_counter()
        sums, batches = RunningSums(ex.device), TimedBatches(loader, ex.device)
        checked, stopped = progress.batches_done, False
        # One process: a signal is honoured at the next step boundary (the flag is a host value, reading it
        # waits for nothing). Under DDP the ranks must agree, so it waits for the next check.
        alone = not ex.ctx.distributed
        for images, labels in batches:
            self.phase = "a training step (the gradients' all-reduce)"
            loss, logits = train_step(self.net, self.optimizer, self.scaler, images, labels, ex.device,
                                      ex.amp_dtype)
            sums.add(loss, logits, labels)
            progress.batches_done += 1
            bar.update(1)
            if self.profiler is not None:
                self.profiler.step()
            if progress.batches_done - checked >= self.check_interval or (alone and self.stop_flag.raised) or \
                    (self.profiler is not None and self.profiler.done):
                stop = self.check(sums, epoch, checked)
                checked = progress.batches_done
                bar.set_postfix(loss=f"{self.mean_loss:.3f}", refresh=False)
                if (stop or self.trace_done()) and progress.batches_done < steps:
                    stopped = True
                    break
        if checked != progress.batches_done:  # the epoch's end: nothing unchecked goes further
            self.check(sums, epoch, checked)
        # (a signal seen at the epoch's end: the epoch completes, run() stops at the boundary)
        bar.close()
        timing = batches.finish()
        stats = sums.read()
        stats.data_seconds = timing.data_seconds
        stats.seconds = time.perf_counter() - started
        stats.compute_seconds = stats.seconds - stats.data_seconds if timing.step_seconds is None else \
            timing.step_seconds
        stats = progress.partial + stats
        if stopped:
            progress.partial = stats
            return None
        progress.batches_done, progress.partial = 0, EpochStats()
        return stats

    def trace_done(self) -> bool:
        """A trace run (profile.stop_after) ends once its trace is written."""
        return self.profiler is not None and self.profiler.done and self.config.profile.stop_after

    def check(self, sums: RunningSums, epoch: int, checked: int) -> bool:
        """The every-N-steps check: the one place an epoch waits for the GPU (one sync, one
        all-reduce under DDP, so that every rank takes the same decision).

        Raises NonFinite if a loss since the last check was NaN/inf on any rank
        (a NaN or inf makes the sum of losses NaN or inf); returns whether a
        signal asks to stop. Under DDP it also sets when the next check comes:
        after `training.check_every` steps, or sooner when steps are slow (at
        most CHECK_SECONDS apart, from the ranks' mean step time), so that a
        signal is obeyed within seconds however long a step takes.
        """
        self.phase = f"the every-{self.config.training.check_every}-steps check (all_reduce)"
        now = time.perf_counter()
        step_seconds = (now - self.checked_at) / max(self.progress.batches_done - checked, 1)
        values = torch.tensor([float(self.stop_flag.raised), step_seconds], dtype=torch.float64,
                              device=self.ex.device)
        loss_sum, stop, seconds = distributed.all_sum_(torch.cat([sums.loss_sum.reshape(1), values])).tolist()
        self.checked_at = time.perf_counter()
        if self.ex.ctx.distributed:
            mean_step = max(seconds / self.ex.ctx.world_size, 1e-9)
            self.check_interval = max(1, min(self.config.training.check_every, int(CHECK_SECONDS / mean_step)))
        if not math.isfinite(loss_sum):
            raise NonFinite("non_finite_loss", f"the loss became {loss_sum} in epoch {epoch}, in one of steps "
                            f"{checked + 1}-{self.progress.batches_done} (checked every "
                            f"{self.config.training.check_every} steps)")
        self.mean_loss = loss_sum / max(sums.images * self.ex.ctx.world_size, 1)
        return stop > 0

    def end_epoch(self, epoch: int, train: EpochStats, writers: MetricsWriters | None) -> dict:
        """Validate, check the weights, record the epoch, remember the best weights; returns the record."""
        validation_started = time.perf_counter()
        train = train.reduced(self.ex.device)
        self.phase = "validation (all_reduce)"
        valid = self.ex.evaluate(self.inputs.valid, net=self.eval_net)
        record = epoch_record(epoch, train, valid, self.lr_at(epoch), self.ex.ctx.world_size, self.ex.device,
                              time.perf_counter() - validation_started)
        check_finite(self.ex.model, self.optimizer, self.ex.device, f"after epoch {epoch}")
        if writers is not None:
            writers.write(record)
        if self.early.update(epoch, record["val_loss"]):
            self.checkpointer.remember_best(epoch, record["val_loss"])
        self.progress.epoch = epoch + 1
        return record

    def stop_reason(self) -> str | None:
        if self.early.should_stop:
            return "early_stopping"
        if self.progress.epoch >= self.config.training.epochs:
            return "max_epochs"
        return None

    def checkpoint_if_due(self, stop_reason: str | None) -> bool:
        """last.pt at the run's end, on a signal, or when the policy says; returns whether a signal asks to
        stop. Every rank takes the same decisions (a checkpoint is collective)."""
        stop, due = (v > 0 for v in distributed.all_sum(
            [float(self.stop_flag.raised), float(self.checkpointer.due())], self.ex.device))
        if stop_reason or stop or due:
            self.phase = "writing the checkpoint (gather)"
            self.checkpointer.save(finished=stop_reason)
        return stop

    # ------------------------------------------------------------ the ways a run ends

    def stopped_in_epoch(self, epoch: int) -> int:
        """A finished trace (exit 0), or a signal mid-epoch: last.pt where the run stands (exit 75)."""
        if self.trace_done():
            self.say(f"traced {self.config.profile.active} steps: {', '.join(map(str, self.profiler.written))}")
            return EXIT_OK
        self.phase = "writing the checkpoint (gather)"
        self.checkpointer.save()
        self.say(f"stopping on {self.stop_flag.signal_name or 'a signal'} at epoch {epoch}, step "
                 f"{self.progress.batches_done}: {self.saved()}")
        return EXIT_INTERRUPTED

    def saved(self) -> str:
        if self.config.training.speed_run:
            return "a speed run writes no checkpoint: nothing to resume"
        return f"{self.out / 'last.pt'} written; continue with --resume"

    def stop_non_finite(self, error: NonFinite) -> int:
        """Exit 3, saying which checkpoint holds the last good state; best.pt (finite by construction) is kept."""
        self.checkpointer.write_best()  # the summary names the best epoch: its file too
        self.say(f"stopping: {error}; {self.checkpointer.last_good()}")
        if self.ex.ctx.is_main:
            self.write_summary(error.kind, test=None)
        return EXIT_NON_FINITE

    def finish(self, stop_reason: str) -> None:
        """Test the best weights (when there is a test split) and write summary.json."""
        ex, test = self.ex, None
        if not self.config.training.speed_run and (ex.dataset.path / "test.txt").exists() and \
                ex.dataset.entries("test"):
            if self.checkpointer.best is not None:
                ex.model.load_state_dict(self.checkpointer.best["model"])
            self.phase = "testing the best weights (all_reduce)"
            loader = self.inputs.eval_batches("test")
            try:
                stats = ex.evaluate(loader, net=self.eval_net)
            finally:
                loader.close()
            test = {k.removeprefix("test_"): v for k, v in stats.summary("test").items()}
        if ex.ctx.is_main:
            self.write_summary(stop_reason, test)
        if self.config.training.calibrate and not self.config.training.speed_run:
            self.calibrate()

    def calibrate(self) -> None:
        """RUN/calibration.json from the best weights' validation logits (train/calibration.py)."""
        self.phase = "calibrating on the validation split (all_reduce)"
        _, logits, labels = self.ex.evaluate(self.inputs.valid, collect=True, net=self.eval_net)
        shares = distributed.gather_to_main((logits, labels))  # each rank scored its share of the split
        if self.ex.ctx.is_main:
            logits, labels = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
            fitted = calibration.calibrate(logits, labels, list(self.ex.dataset.classes),
                                           self.config.training.calibration_target)
            path = calibration.write(self.out, fitted, self.out / "best.pt")
            self.say(f"calibration: temperature {fitted['temperature']:.3f}, validation ECE "
                     f"{fitted['validation']['ece_before']:.3f} -> {fitted['validation']['ece_after']:.3f}, "
                     f"coverage {fitted['validation']['coverage']:.3f} at precision {fitted['target_precision']}: "
                     f"{path}")
            for warning in fitted["warnings"]:
                self.say(f"calibration: {warning}")

    def write_summary(self, stop_reason: str, test: dict | None) -> None:
        ex = self.ex
        write_summary(self.out, MetricsLog(self.out / "metrics.jsonl").records(), stop_reason,
                      best_epoch=self.early.best_epoch, test=test, precision=ex.precision,
                      loader=self.inputs.loader_name, world_size=ex.ctx.world_size, device=ex.device,
                      extra={"feature_cache": self.inputs.feature_cache})


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
