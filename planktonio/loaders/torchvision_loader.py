"""The torchvision backend: the baseline that DALI is measured against.

Where a batch is decoded: `ManifestDataset.__getitem__`, in DataLoader worker
processes, with torchvision.io (libjpeg-turbo). Where it is augmented: the
same place, `apply_plan`: the image's planned box (planktonio/plans.py) is
cut out, resized with torchvision's antialiased bilinear resize and flipped
if planned, on uint8 tensors. Normalisation and the float conversion happen after the copy to the
device (`Normalizer`), as in timm's PrefetchLoader: a uint8 batch is a
quarter of the bytes of a float32 one, and the GPU does the arithmetic.

Randomness: none here. The sampler hands each worker an image's position
together with its plan, so a batch does not depend on the number of
workers, their persistence, or on whether the run was resumed mid-way.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import signal
import weakref
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from ..dataset import TORCHVISION_DECODES
from ..errors import PlanktonioError
from ..transforms import Output, Transform
from .base import BatchStream, Loader, LoaderSpec

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 2  # batches in flight per worker (DataLoader's default)


def apply_plan(image: torch.Tensor, box: tuple[int, int, int, int, int], size: int) -> torch.Tensor:
    """Crop the plan's box out of a uint8 C x H x W image, resize it to size x size, flip if planned."""
    x, y, w, h, flip = box
    crop = image[:, y:y + h, x:x + w]
    resized = F.resize(crop, [size, size], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return resized.flip(-1) if flip else resized


class Normalizer:
    """uint8 N x C x H x W -> normalised float batch in the requested dtype and memory format.

    Mean and std live on the device once, not copied there for every batch.
    """

    def __init__(self, t: Transform, out: Output, device: torch.device):
        self.mean = torch.tensor(t.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(t.std, device=device).view(1, 3, 1, 1) * 255
        self.out = out

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = (images.float() - self.mean) / self.std
        return images.to(self.out.torch_dtype).contiguous(memory_format=self.out.memory_format)


def decode_rgb(path: str, data: np.ndarray | None = None) -> torch.Tensor:
    """Decode to uint8 3 x H x W with its EXIF orientation applied, as DALI's decoders do.

    torchvision.io (libjpeg-turbo) for JPEG/PNG, PIL for TIFF/BMP. data: the
    file's bytes when they come from a packed shard (path then names the format).
    """
    if os.path.splitext(path)[1].lower() in TORCHVISION_DECODES:
        encoded = read_file(path) if data is None else torch.from_numpy(np.array(data))
        return decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    with Image.open(path if data is None else io.BytesIO(data.tobytes())) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
        return torch.from_numpy(np.asarray(upright).copy()).permute(2, 0, 1).contiguous()


class ManifestDataset(Dataset):
    """Images listed in a manifest, each fetched with its plan: key = (position, (x, y, w, h, flip))."""

    def __init__(self, root, entries: list[tuple[str, int]], widths, heights, size: int, shards=None):
        self.root = str(root)
        self.shards = shards  # a ShardSet: read each image's bytes from its shard, not its file
        self.entries = entries
        self.sizes = list(zip(widths.tolist(), heights.tolist()))
        self.size = size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, tuple[int, int, int, int, int]]):
        position, box = key
        path, label = self.entries[position]
        full_path = f"{self.root}/{path}"
        try:
            image = decode_rgb(full_path, None if self.shards is None else self.shards.read(position))
        except (RuntimeError, OSError) as error:
            # prepare() rejects bad files; one that went bad since is reported
            # and skipped, not allowed to end a run hours in.
            log.warning("skipping %s: cannot decode (%s)", self._where(position, full_path), error)
            return None
        if (image.shape[2], image.shape[1]) != self.sizes[position]:
            log.warning("skipping %s: %d x %d px, but prepare recorded %d x %d (the file changed since; "
                        "rerun prepare)", self._where(position, full_path), image.shape[2], image.shape[1],
                        *self.sizes[position])
            return None
        return apply_plan(image, box, self.size), label


    def _where(self, position: int, full_path: str) -> str:
        """Where a sample came from, for a warning: its file, or its shard and offset."""
        return full_path if self.shards is None else self.shards.describe(position)


def collate_skipping_bad(samples):
    """Stack a batch, leaving out samples the dataset could not decode (None)."""
    good = [s for s in samples if s is not None]
    if not good:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good], dtype=torch.long)


def ignore_stop_signals(worker_id: int) -> None:
    """In each DataLoader worker: leave SIGTERM and SIGUSR1 to the training process.

    scancel, preemption and a time limit signal every process of a job step.
    A worker killed by it makes the DataLoader raise in the main process
    ("worker killed by signal") before the training loop can finish its step
    and checkpoint; ignoring the signal here lets the main process stop
    cleanly (exit 75), and its shutdown ends the workers.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class PlannedBatches(Sampler):
    """The DataLoader's batch sampler: the loader's BatchStream, endless, as lists of (position, box) keys.

    One DataLoader iterator serves the whole run, so the workers prefetch the
    next epoch's first batches while this epoch ends.
    """

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self):
        while True:
            batch = self.stream.advance()
            yield [(position, batch.plan.box(i)) for i, position in enumerate(batch.positions.tolist())]


class TorchvisionLoader(Loader):
    """torchvision decode + transforms in DataLoader workers, normalised on the device."""

    backend = "torchvision"

    def __init__(self, spec: LoaderSpec):
        super().__init__(spec)
        self.prefetch_depth = spec.workers * PREFETCH_FACTOR  # batches the workers prepare ahead
        self.stream = BatchStream(self)
        self.normalize = Normalizer(spec.transform, spec.output, spec.device)
        self.dataloader = DataLoader(
            ManifestDataset(spec.dataset.root, spec.entries, spec.widths, spec.heights, spec.transform.size,
                            spec.shards),
            batch_sampler=PlannedBatches(self.stream),
            num_workers=spec.workers,
            collate_fn=collate_skipping_bad,
            pin_memory=spec.device.type == "cuda",  # page-locked buffers make the copy asynchronous
            persistent_workers=spec.workers > 0,
            prefetch_factor=PREFETCH_FACTOR if spec.workers > 0 else None,
            worker_init_fn=ignore_stop_signals,
            # Its own generator: the DataLoader must not draw its workers' base
            # seed from the global RNG, which dropout uses and a resumed run restores.
            generator=torch.Generator(),
        )
        self._batches = None
        if spec.workers > 0:
            _open_loaders.add(self)

    def _host_batches(self, epoch: int, first: int):
        """Batches first..n-1 of `epoch` as uint8 on the host; a bad file leaves its batch one image short."""
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
                raise PlanktonioError(self._all_bad_message(epoch, index))

    def _all_bad_message(self, epoch: int, index: int) -> str:
        positions = self.batch_plan(epoch, index).positions.tolist()
        shards, first = self.spec.shards, positions[0]
        first = self.spec.dataset.root / self.spec.entries[first][0] if shards is None else shards.describe(first)
        return (f"{first} and the other {len(positions) - 1} file(s) of training batch {index} of epoch {epoch} "
                f"broke or changed since prepare checked them (the warnings above name each); restore "
                f"them and rerun prepare, then resume")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._host_batches(self.epoch, self.skip_batches)
        if self.spec.device.type == "cuda":
            yield from self._prefetch_to_gpu(batches)
        else:
            for images, labels in batches:
                yield self.normalize(images), labels
        self._end_epoch()

    def _prefetch_to_gpu(self, batches):
        """Copy and normalise batch k+1 on a side stream while the model works on batch k."""
        device = self.spec.device
        stream = torch.cuda.Stream(device)

        def stage():
            try:
                images, labels = next(batches)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                images = self.normalize(images.to(device, non_blocking=True))
                labels = labels.to(device, non_blocking=True)
            return images, labels

        ready = stage()
        while ready is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
            images, labels = ready
            # The tensors were made on the side stream but are used on the
            # main one: tell the caching allocator not to reuse them early.
            images.record_stream(torch.cuda.current_stream(device))
            labels.record_stream(torch.cuda.current_stream(device))
            ready = stage()
            yield images, labels

    def close(self) -> None:
        """End the worker processes now: they ignore SIGTERM, so nothing else may be left to stop them."""
        if self._batches is not None and hasattr(self._batches, "_shutdown_workers"):
            self._batches._shutdown_workers()  # asks each worker to exit and joins it
        self._batches = None
        self.dataloader = None
        _open_loaders.discard(self)


# Loaders whose workers are alive. At interpreter exit multiprocessing would
# stop them with SIGTERM, which they ignore (ignore_stop_signals), and then
# wait for ever: close them first. atexit runs handlers last-registered
# first, so this runs before both multiprocessing's and torch's own.
_open_loaders: "weakref.WeakSet[TorchvisionLoader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_open_loaders):
        loader.close()
