"""Backends that decode in DataLoader worker processes: what they share.

A worker-pool backend (torchvision, pil) supplies only a dataset that turns
one (manifest position, plan box) key into a sample, and what happens to a
batch once it is on the device. Everything else is here:
- `PlannedBatches`: the DataLoader's batch sampler, fed by the loader's
  BatchStream, endless, so one DataLoader iterator serves the whole run and
  the workers prefetch the next epoch's first batches while this one ends;
- a sample that cannot be decoded is reported and left out of its batch
  (`collate_skipping_bad`); a training batch whose every file broke stops
  the loader with an error naming them (a step left out would put a resume
  at the wrong batch and leave DDP's other ranks waiting in all-reduce);
- on a GPU, batch k+1 is copied and finished on a side stream while the
  model works on batch k (timm's PrefetchLoader);
- the workers ignore the signals that the training process handles
  (`ignore_stop_signals`), are ended when the loader is closed or
  dropped, or at exit, and end with their parent however it ends
  (`die_with_parent`: SIGKILL included, quietly).

Randomness: none. The sampler hands each worker an image's position with its
plan, so a batch does not depend on the number of workers, their
persistence, or on whether the run was resumed mid-way.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import signal
import weakref
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import PlanktonioError
from ..processes import end_with_parent
from .base import BatchStream, Loader, LoaderSpec

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 2  # batches in flight per worker (DataLoader's default)
# What a scheduler or a terminal sends every process of a job step or of a
# foreground process group; the training process stops cleanly on each
# (train/signals.py) and its shutdown ends the workers.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def start_worker(worker_id: int) -> None:
    """Each DataLoader worker's start: the stop signals left to the main process, and its end tied to it."""
    ignore_stop_signals(worker_id)
    die_with_parent()


def ignore_stop_signals(worker_id: int) -> None:
    """In each DataLoader worker: leave SIGTERM, SIGUSR1, SIGINT and SIGHUP to the training process.

    scancel, preemption and a time limit signal every process of a job step,
    and Ctrl-C or a closed terminal every process of the foreground group. A
    worker killed by one makes the DataLoader raise in the main process
    ("worker killed by signal") before the training loop can finish its step
    and checkpoint; ignoring it here lets the main process stop cleanly.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent() -> None:
    """In a DataLoader worker: the kernel kills it as soon as the main process ends, however that ends.

    Without it, a worker whose parent was killed lives on until the
    DataLoader's watchdog notices (every 5 s, and only between samples) and
    prints a ConnectionResetError traceback into the job's log on its way
    out. The "parent" is the thread that started the worker: the loaders are
    iterated on the main thread.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        end_with_parent(parent.pid)


def collate_skipping_bad(samples):
    """Stack a batch, leaving out samples the dataset could not decode (None)."""
    good = [s for s in samples if s is not None]
    if not good:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good], dtype=torch.long)


class PlannedBatches(Sampler):
    """The DataLoader's batch sampler: the loader's BatchStream, endless, as lists of (position, box) keys."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self):
        while True:
            batch = self.stream.advance()
            yield [(position, batch.plan.box(i)) for i, position in enumerate(batch.positions.tolist())]


class WorkerPoolLoader(Loader):
    """Batches made by `dataset` in DataLoader workers, finished on the device by `finish`.

    dataset[(position, (x, y, w, h, flip))] -> (image tensor, label), or None
    for a file that cannot be decoded (warn first); finish(images on the
    device) -> the batch the consumer gets.
    """

    def __init__(self, spec: LoaderSpec, dataset: Dataset, finish: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(spec)
        self.prefetch_depth = spec.workers * PREFETCH_FACTOR  # batches the workers prepare ahead
        self.stream = BatchStream(self)
        self.finish = finish
        self.dataloader = DataLoader(
            dataset,
            batch_sampler=PlannedBatches(self.stream),
            num_workers=spec.workers,
            collate_fn=collate_skipping_bad,
            pin_memory=spec.device.type == "cuda",  # page-locked buffers make the copy asynchronous
            persistent_workers=spec.workers > 0,
            prefetch_factor=PREFETCH_FACTOR if spec.workers > 0 else None,
            worker_init_fn=start_worker,
            # Its own generator: the DataLoader must not draw its workers' base
            # seed from the global RNG, which dropout uses and a resumed run restores.
            generator=torch.Generator(),
        )
        self._batches = None
        if spec.workers > 0:
            _open_loaders.add(self)

    def _host_batches(self, epoch: int, first: int):
        """Batches first..n-1 of `epoch` on the host; a bad file leaves its batch one image short."""
        if self._batches is None or self.stream.upcoming() != (epoch, first):
            self.stream.redirect(epoch, first)
            self.stream.in_flight.clear()  # a new iterator drops what the workers had prepared
            self._batches = iter(self.dataloader)
        for index in range(first, len(self)):
            images, labels = next(self._batches)
            self.stream.received(epoch, index)
            if labels.numel():
                yield images, labels
            elif self.spec.train:
                # Not left out: a training step fewer would put a resume at the wrong
                # batch and, under DDP, leave the other ranks waiting in all-reduce.
                # Every file of a batch gone bad is a storage failure; stop and say so.
                raise PlanktonioError(self.all_bad_message(epoch, index))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._host_batches(self.epoch, self.skip_batches)
        if self.spec.device.type == "cuda":
            yield from self._prefetch_to_gpu(batches)
        else:
            for images, labels in batches:
                yield self.finish(images), labels
        self._end_epoch()

    def _prefetch_to_gpu(self, batches):
        """Copy and finish batch k+1 on a side stream while the model works on batch k."""
        device = self.spec.device
        stream = torch.cuda.Stream(device)

        def stage():
            try:
                images, labels = next(batches)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                images = self.finish(images.to(device, non_blocking=True))
                labels = labels.to(device, non_blocking=True)
            return images, labels

        ready = stage()
        while ready is not None:
            consumer = torch.cuda.current_stream(device)
            consumer.wait_stream(stream)
            images, labels = ready
            # The tensors were made on the side stream but are used on the
            # consumer's: tell the caching allocator not to reuse them early.
            images.record_stream(consumer)
            labels.record_stream(consumer)
            ready = stage()
            yield images, labels

    def close(self) -> None:
        """End the worker processes now: they ignore the stop signals, so nothing else may be left to stop them."""
        if self._batches is not None and hasattr(self._batches, "_shutdown_workers"):
            self._batches._shutdown_workers()  # asks each worker to exit and joins it
        self._batches = None
        self.dataloader = None
        _open_loaders.discard(self)


# Loaders whose workers are alive. At interpreter exit multiprocessing would
# stop them with SIGTERM, which they ignore (ignore_stop_signals), and then
# wait for ever: close them first. atexit runs handlers last-registered
# first, so this runs before both multiprocessing's and torch's own.
_open_loaders: "weakref.WeakSet[WorkerPoolLoader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_open_loaders):
        loader.close()
