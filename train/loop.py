"""The training loop: epochs of steps, validation, early stopping, checkpoints, resume.

Read top to bottom: `fit` sets up (`Trainer.__init__`), then per epoch
`train_epoch` (timed: data wait vs compute) and `evaluate`, then the
bookkeeping (metrics.jsonl, best.pt, last.pt, early stopping). Files are
written by rank 0 only; every number that goes into them is summed over
the ranks first.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from planktonio import PreparedDataset, make_loader
from planktonio.errors import PlanktonioError
from planktonio.loaders import resolve_device

from . import checkpoint, distributed
from .config import Config, dump
from .metrics import top1_top5_correct
from .model import build_model, set_train_mode
from .signals import EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_OK, StopFlag
from .step import AMP_DTYPES, annotate, autocast, model_input, resolve_precision, train_step


@dataclass
class EpochStats:
    """Running sums over one pass; summed across ranks before anything is reported."""

    loss_sum: float = 0.0
    correct: float = 0.0
    top5: float = 0.0
    images: float = 0.0
    data_seconds: float = 0.0     # waiting for the next batch
    compute_seconds: float = 0.0  # forward, backward, optimizer step (synchronised)

    def add(self, loss: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        top1, top5 = top1_top5_correct(logits, labels)
        self.loss_sum += loss * n
        self.correct += top1
        self.top5 += top5
        self.images += n

    def reduced(self, device: torch.device) -> "EpochStats":
        return EpochStats(*distributed.all_sum(list(asdict(self).values()), device))

    def summary(self, prefix: str) -> dict:
        n = max(self.images, 1)
        return {f"{prefix}_loss": self.loss_sum / n, f"{prefix}_acc": self.correct / n,
                f"{prefix}_top5": self.top5 / n, f"{prefix}_images": int(self.images)}


class NonFiniteLoss(Exception):
    pass


class Trainer:
    def __init__(self, config: Config, data: Path, out: Path):
        self.config, self.out = config, out
        t = config.training
        requested = resolve_device(t.device)
        self.ctx = distributed.init(requested)
        if requested.type == "cuda" and self.ctx.distributed:
            requested = torch.device("cuda", self.ctx.local_rank)
            torch.cuda.set_device(requested)
        self.device = requested
        self.precision = resolve_precision(t.precision, self.device)
        self.amp_dtype = AMP_DTYPES[self.precision]
        self.dataset = PreparedDataset.load(data)

        torch.manual_seed(t.seed)  # the same initial head on every rank (DDP also broadcasts it)
        m = config.model
        self.model = build_model(m.name, self.dataset.num_classes, m.weights, m.freeze).to(self.device)
        memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=memory_format)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise PlanktonioError("every parameter is frozen: nothing to train")
        self.net = torch.compile(self.model) if t.compile else self.model
        if self.ctx.distributed:
            self.net = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        o = config.optimizer
        if o.name == "sgd":
            self.optimizer = torch.optim.SGD(trainable, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(trainable, lr=o.lr, weight_decay=o.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "amp-fp16")

        self.output = model_input(self.precision, self.device, t.channels_last)
        self.train_loader = self.loader_for("train", config.loader.batch_size, True)
        self.valid_loader = self.loader_for("valid", config.loader.eval_batch_size or config.loader.batch_size, False)

        # Early stopping and progress, restored by resume().
        self.epoch, self.batches_done, self.partial = 0, 0, EpochStats()
        self.best_loss, self.best_epoch, self.bad_epochs = math.inf, -1, 0
        self.stop_flag = StopFlag()

    def loader_for(self, split: str, batch_size: int, train: bool):
        c = self.config
        return make_loader(
            c.loader.backend, self.dataset, split, batch_size=batch_size,
            transform=c.transform("train" if train else "eval"), output=self.output, device=self.device,
            train=train, shard_index=self.ctx.rank, shard_count=self.ctx.world_size,
            workers=c.loader.workers, seed=c.training.seed)

    # ------------------------------------------------------------ a step, an epoch

    def lr_at(self, epoch: int) -> float:
        o = self.config.optimizer
        if o.schedule == "cosine":
            return o.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.config.training.epochs))
        return o.lr

    def _forward(self, images):
        with autocast(self.device, self.amp_dtype):
            return self.net(images)

    def train_epoch(self, epoch: int) -> EpochStats | None:
        """One epoch (or what is left of it after a resume); None if a signal stopped it."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch)
        set_train_mode(self.model)
        self.train_loader.set_epoch(epoch, skip_batches=self.batches_done)
        stats, self.partial = self.partial, EpochStats()
        # A bar on an interactive terminal only: in batch logs (Slurm) the epoch lines suffice.
        show = self.ctx.is_main and self.config.training.progress and sys.stderr.isatty()
        bar = tqdm(total=len(self.train_loader), initial=self.batches_done, desc=f"epoch {epoch}",
                   disable=not show, leave=False)
        batches = iter(self.train_loader)
        nvtx = self.device.type == "cuda"
        while True:
            start = time.perf_counter()
            with annotate("data", nvtx):
                batch = next(batches, None)
            waited = time.perf_counter() - start
            if batch is None:
                break
            images, labels = batch
            loss, logits = train_step(self.net, self.optimizer, self.scaler, images, labels,
                                      self.device, self.amp_dtype)
            loss_value = loss.item()  # also synchronises: compute time below is real
            stats.data_seconds += waited
            stats.compute_seconds += time.perf_counter() - start - waited
            non_finite = not math.isfinite(loss_value)
            stop = self.stop_flag.raised
            if self.ctx.distributed:  # every rank must take the same decision
                flags = distributed.all_sum([float(non_finite), float(stop)], self.device)
                non_finite, stop = flags[0] > 0, flags[1] > 0
            if non_finite:
                raise NonFiniteLoss(f"loss became {loss_value} at epoch {epoch}, step {self.batches_done}")
            stats.add(loss_value, logits.detach().float(), labels)
            self.batches_done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            if stop and self.batches_done < len(self.train_loader):
                bar.close()
                self.partial = stats
                return None
            # (a signal during the epoch's last step: the epoch ends normally
            # and fit() stops at the boundary)
        bar.close()
        self.batches_done = 0
        return stats

    @torch.no_grad()
    def evaluate(self, loader, collect: bool = False):
        """Loss, accuracy and top-5 over a whole split (every image once across ranks)."""
        self.model.eval()
        stats, predictions, targets = EpochStats(), [], []
        for images, labels in loader:
            logits = self._forward(images).float()
            loss = F.cross_entropy(logits, labels)
            stats.add(loss.item(), logits, labels)
            if collect:
                predictions.append(logits.argmax(dim=1).cpu())
                targets.append(labels.cpu())
        if collect:
            return stats.reduced(self.device), torch.cat(predictions), torch.cat(targets)
        return stats.reduced(self.device)

    # ------------------------------------------------------------ state

    def state(self, finished: str | None = None) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "partial": asdict(self.partial),
            "early_stopping": {"best_loss": self.best_loss, "best_epoch": self.best_epoch,
                               "bad_epochs": self.bad_epochs},
            "rng": checkpoint.rng_state(),
            "config": self.config.to_dict(),
            "classes": list(self.dataset.classes),
            "world_size": self.ctx.world_size,
            "finished": finished,
        }

    def resume(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self.partial = EpochStats(**state["partial"])
        es = state["early_stopping"]
        self.best_loss, self.best_epoch, self.bad_epochs = es["best_loss"], es["best_epoch"], es["bad_epochs"]
        checkpoint.restore_rng(state["rng"])

    def save_last(self, finished: str | None = None) -> None:
        """last.pt: everything a resumed run needs."""
        if self.ctx.is_main:
            checkpoint.save_atomic(self.state(finished), self.out / "last.pt")

    def save_best(self, epoch: int, val_loss: float) -> None:
        """best.pt: the weights and what they are, loadable as `model.weights` of a later run."""
        if self.ctx.is_main:
            checkpoint.save_atomic({"model": self.model.state_dict(), "classes": list(self.dataset.classes),
                                    "epoch": epoch, "val_loss": val_loss, "config": self.config.to_dict()},
                                   self.out / "best.pt")


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
    """Keep the lines of epochs before `epoch`: a resumed run writes the rest again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < epoch]
        path.write_text("".join(line + "\n" for line in lines))


def _load_resume_state(config: Config, out: Path, resume: bool) -> dict | None:
    """last.pt to continue from, or None for a fresh run; refuses to overwrite or to mix configs."""
    last = out / "last.pt"
    if not last.exists():
        return None
    if not resume:
        raise PlanktonioError(f"{out} already holds a run (last.pt); pass --resume to continue it, "
                              f"or choose another --out")
    state = checkpoint.load(last)
    differing = _differing_keys(state["config"], config.to_dict())
    if differing:
        raise PlanktonioError(f"--resume: the config differs from the run's in {', '.join(differing)}; "
                              f"resume with the run's config ({out / 'config.yaml'})")
    return state


def fit(config: Config, data: Path, out: Path, resume: bool = False) -> int:
    """Train; returns the exit code (signals.EXIT_*)."""
    out = Path(out)
    state = _load_resume_state(config, out, resume)
    if state is not None and state["finished"]:
        print(f"{out}: the run already finished ({state['finished']}); nothing to resume")
        return EXIT_OK
    trainer = Trainer(config, data, out)
    ctx = trainer.ctx
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump(config))
        (out / "run.json").write_text(json.dumps({"data": str(Path(data).resolve())}, indent=2) + "\n")
    if state is not None:
        trainer.resume(state)
        _log(ctx, f"resuming {out} at epoch {trainer.epoch}, batch {trainer.batches_done}")
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        _truncate_metrics(metrics_path, trainer.epoch)
    _log(ctx, f"{config.model.name} ({config.model.freeze} frozen), {trainer.precision}, "
              f"{trainer.train_loader.backend} loader, {ctx.world_size} process(es) on {trainer.device}, "
              f"{len(trainer.train_loader)} steps of {config.loader.batch_size} per epoch")

    trainer.stop_flag.install()
    try:
        stop_reason = None
        while stop_reason is None:
            epoch = trainer.epoch
            started = time.perf_counter()
            try:
                train = trainer.train_epoch(epoch)
            except NonFiniteLoss as error:
                _log(ctx, f"stopping: {error}; {out / 'last.pt'} keeps the last good epoch")
                if ctx.is_main:
                    _write_summary(out, metrics_path, "non_finite_loss", trainer, test=None)
                return EXIT_NON_FINITE
            if train is None:
                trainer.save_last()
                _log(ctx, f"stopping on {trainer.stop_flag.signal_name} at epoch {epoch}, step "
                          f"{trainer.batches_done}: {out / 'last.pt'} written; continue with --resume")
                return EXIT_INTERRUPTED
            train_seconds = time.perf_counter() - started
            train = train.reduced(trainer.device)
            valid = trainer.evaluate(trainer.valid_loader)
            record = {
                "epoch": epoch,
                **train.summary("train"),
                **valid.summary("val"),
                "lr": trainer.lr_at(epoch),
                "images_per_s": train.images / train_seconds,
                "data_wait_fraction": train.data_seconds / max(train.data_seconds + train.compute_seconds, 1e-9),
                "epoch_seconds": time.perf_counter() - started,
            }
            # Order matters for a crash in between: the metrics line first (a
            # resume drops lines of epochs that last.pt does not cover), then
            # best.pt, then last.pt.
            if ctx.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if record["val_loss"] < trainer.best_loss:
                trainer.best_loss, trainer.best_epoch, trainer.bad_epochs = record["val_loss"], epoch, 0
                trainer.save_best(epoch, record["val_loss"])
            else:
                trainer.bad_epochs += 1
            trainer.epoch = epoch + 1
            if trainer.bad_epochs >= config.training.patience:
                stop_reason = "early_stopping"
            elif trainer.epoch >= config.training.epochs:
                stop_reason = "max_epochs"
            trainer.save_last(finished=stop_reason)
            _log(ctx, f"epoch {epoch}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f} | "
                      f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f} "
                      f"top5 {record['val_top5']:.3f} | {record['images_per_s']:.0f} img/s, "
                      f"data wait {100 * record['data_wait_fraction']:.0f}%")
            if stop_reason is None and distributed.any_rank(trainer.stop_flag.raised, trainer.device):
                _log(ctx, f"stopping on {trainer.stop_flag.signal_name or 'a signal'} after epoch {epoch}: "
                          f"{out / 'last.pt'} written; continue with --resume")
                return EXIT_INTERRUPTED
        _finish(trainer, metrics_path, stop_reason)
        return EXIT_OK
    finally:
        trainer.stop_flag.uninstall()
        distributed.shutdown()


def _finish(trainer: Trainer, metrics_path: Path, stop_reason: str) -> None:
    """Test the best checkpoint (when there is a test split) and write summary.json."""
    test = None
    best = trainer.out / "best.pt"
    if (trainer.dataset.path / "test.txt").exists() and trainer.dataset.entries("test"):
        if best.exists():
            trainer.model.load_state_dict(checkpoint.load(best)["model"])
        distributed.barrier()
        batch = trainer.config.loader.eval_batch_size or trainer.config.loader.batch_size
        stats = trainer.evaluate(trainer.loader_for("test", batch, False))
        test = {k.removeprefix("test_"): v for k, v in stats.summary("test").items()}
    if trainer.ctx.is_main:
        _write_summary(trainer.out, metrics_path, stop_reason, trainer, test)


def _write_summary(out: Path, metrics_path: Path, stop_reason: str, trainer: Trainer, test) -> None:
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
        "precision": trainer.precision,
        "loader": trainer.train_loader.backend,
        "world_size": trainer.ctx.world_size,
        "device": str(trainer.device) if trainer.device.type == "cpu" else torch.cuda.get_device_name(trainer.device),
    }
    checkpoint_text = json.dumps(summary, indent=2) + "\n"
    tmp = out / ".summary.json.tmp"
    tmp.write_text(checkpoint_text)
    tmp.replace(out / "summary.json")
